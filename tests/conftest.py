"""Shared fixtures: tiny random checkpoints of each family, small synthetic clips, and a draft fitted to the
target's own greedy continuation (so that trees get accepted deep and every accept path runs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if "SPARROW_CACHE_DIR" not in os.environ:  # the verify costs the tree policy measures: not in the user's cache
    import tempfile

    os.environ["SPARROW_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparrow-test-cache-")

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
    """A draft trained on one prompt and the target's own continuation (the training objective with one MTP
    stage and full cross-entropy weight), in the layout `mode` uses at inference. High acceptance on that
    prompt; any other draft behaviour is still lossless."""
    from sparrow.training.losses import LossConfig, capture_ids, draft_loss

    draft = sparrow.init_draft(target, seed=seed, mode=mode, **cfg)
    c = capture_ids(target, inputs, continuation, None)
    loss_cfg = LossConfig(mode=mode, ivsb=False, mtp_stages=1, ce_weight=1.0,
                          position_mode=draft.config.position_mode)
    c.loss_mask[:] = True
    c.loss_mask[-1] = False
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, _ = draft_loss(draft, target, c, loss_cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()
