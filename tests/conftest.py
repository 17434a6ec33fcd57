"""Shared fixtures: tiny random checkpoints of each family, small synthetic clips, and a draft fitted to the
target's own greedy continuation (so that trees get accepted deep and every accept path runs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import sparrow  # noqa: E402
from sparrow.tiny import make_tiny_target  # noqa: E402

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_onevision"]
_TARGETS: dict = {}


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


def get_target(ckpt_dir, family: str, seed: int = 0, **kw) -> sparrow.Target:
    key = (family, seed, tuple(sorted(kw.items())))
    if key not in _TARGETS:
        path = os.path.join(str(ckpt_dir), f"{family}-{seed}-{abs(hash(key[2])) % 10**6}")
        kw.setdefault("init_std", 0.1)
        make_tiny_target(path, family, seed=seed, **kw)
        _TARGETS[key] = sparrow.load_target(path, device="cpu")
    return _TARGETS[key]


def clip(num_frames: int, h: int = 56, w: int = 56, seed: int = 0) -> np.ndarray:
    """Random uint8 frames (T, H, W, 3)."""
    return (np.random.RandomState(seed).rand(num_frames, h, w, 3) * 255).astype(np.uint8)


def prepare(target, frames, prompt="Describe the video."):
    return target.prepare(frames, prompt, max_pixels=56 * 56, min_pixels=28 * 28)


def hf_greedy(target, inputs, max_new_tokens) -> list[int]:
    out = target.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def fit_draft(target, inputs, continuation: list[int], mode="sparrow", steps=150, seed=0, lr=3e-3, **cfg):
    """A draft trained (teacher forcing, CE to the next token + SmoothL1 to the target state) on one prompt and
    the target's own continuation, in the sequence layout that `mode` uses at inference (compact positions for
    sparrow). High acceptance on that prompt; any other draft behaviour is still lossless."""
    draft = sparrow.init_draft(target, seed=seed, mode=mode, **cfg)
    L0 = inputs["input_ids"].shape[1]
    cont = torch.tensor(continuation)
    cache = target.new_cache(L0 + len(continuation) + 4)
    pre = target.prefill(inputs, cache, capture_embeds=True)
    _, h_cont = target.forward(cont, None, None, cache)  # generated tokens are text, whatever their id
    ids = torch.cat((inputs["input_ids"][0], cont))
    hidden = torch.cat((pre.hidden_top, h_cont))
    embeds = torch.cat((pre.input_embeds, target.embed_tokens(cont)))
    positions = torch.cat((pre.positions, (torch.arange(L0, ids.shape[0]) + target.rope_delta).expand(3, -1)), 1)
    visual = torch.cat((pre.visual_mask, torch.zeros(len(continuation), dtype=torch.bool)))
    keep = torch.ones(ids.shape[0], dtype=torch.bool) if mode == "eagle" else ~visual
    keep[0] = False
    idx = keep.nonzero(as_tuple=True)[0][:-1]  # inputs t (predict t + 1)
    emb = (embeds if mode == "eagle" else target.embed_tokens(ids))[idx].detach()
    h_prev, h_now, nxt = hidden[idx - 1].detach(), hidden[idx].detach(), ids[idx + 1]
    if mode == "sparrow" and draft.config.position_mode == "compact":
        pos = torch.arange(idx.shape[0]).expand(3, -1)
    elif mode == "sparrow":
        pos = positions[:1, idx].expand(3, -1)
    else:
        pos = positions[:, idx]
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            states = draft(draft.fuse(emb, h_prev).unsqueeze(0), pos.unsqueeze(1))[0]
            loss = torch.nn.functional.cross_entropy(draft.logits(states), nxt) + \
                torch.nn.functional.smooth_l1_loss(states, h_now)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return draft.eval()
