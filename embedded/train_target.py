"""Train the embedded default target: a small Qwen2.5-VL (the HF class itself) on the synthetic video world.

    python -m embedded train --out runs/target [--steps 12000] [--resume] [--export DIR]

The recipe's stages (`embedded/build.sh`) are runs of this trainer with the flags below. Every step draws fresh clips
(2-96 frames, mostly 224 px, at 2, 4 or 8 fps) with a conversation each: a detailed description (75% of clips)
and 1-2 short questions, or the questions alone. The loss is next-token cross-entropy on the answers, with the
words only the frames decide weighted `--grounded-weight` times (`GROUNDED`). Training aids used by the early
stages and not part of the exported model: a linear probe on the merged visual tokens (`VisionProbe`,
`--aux-weight`, `--vision-steps`), one attention head taught to fetch the visual tokens of each colour word's colour
(`BindingLoss`), a probe of each named object's events (`EventLoss`) and two heads that fetch the object as first
and as last seen (`TimeBindingLoss`).

Fixed seed; bf16 autocast where the device computes bf16 fast, else float32 (`--precision`); `--workers N`
processes draw the batches beside the step (`BatchStream`, for a GPU). Right-padded batches run without their
padding mask (`without_padding_mask`) and, under the language loss alone, as groups of similar lengths
(`length_groups`). A checkpoint (model, optimiser, step, RNG, where the batches stopped) is written atomically
every `--save-every` steps and on SIGINT/SIGTERM; `--resume` continues exactly. `--export DIR` writes the model
with `save_pretrained` (bf16 safetensors, config, tokenizer, chat template, generation and video preprocessor
configs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch

from sparrow.errors import SparrowError, at_least
from sparrow.synthetic.text import DESCRIBE_PROMPTS, describe, first_token_id, one_token_ids, questions
from sparrow.synthetic.world import COLOURS, MOTIONS, SHAPES as OBJECT_SHAPES, SIZES, TEXTURES, _shape_mask, \
    make_clip, plan_clip
from sparrow.targets.base import fast_bf16
from sparrow.targets.qwen_vl import CLIP_MEAN, CLIP_STD
from sparrow.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, build_tokenizer
from sparrow.training.trainer import stop_on_signals
from sparrow.video import Video

TEXT = dict(hidden=256, layers=12, heads=4, kv_heads=2, intermediate=768)
VISION = dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14, temporal_patch_size=2,
              spatial_merge_size=2, window_size=112, fullatt_block_indexes=[2], tokens_per_second=2, in_channels=3)
# (frames, height, width): mostly 224 px (the evaluation's frame size: objects span several patches, which is
# what makes their shapes learnable), with other sizes, aspect ratios and lengths for variety. The last two are the
# 1.5k and 3k buckets' clips (48 and 96 frames at 224 px), which hold 3-6x the visual tokens of the longest others.
SHAPES = [(2, 224, 224), (4, 224, 224), (8, 224, 224), (16, 224, 224), (32, 224, 224), (8, 112, 112),
          (16, 112, 112), (8, 168, 168), (12, 168, 224), (32, 112, 112), (48, 224, 224), (96, 224, 224)]
MIXES = {"short": [0.08, 0.2, 0.22, 0.13, 0.02, 0.08, 0.08, 0.08, 0.06, 0.05, 0, 0],  # ~230 visual tokens a clip
         # 16- and 32-frame clips (the 0.5k bucket and beyond, where events lie several frame pairs apart) twice as
         # often: ~310 visual tokens a clip, steps about a third slower
         "long": [0.05, 0.12, 0.22, 0.25, 0.06, 0.06, 0.08, 0.06, 0.05, 0.05, 0, 0],
         # "long" with one clip in 14 of 48 or 96 frames at 224 px: from 1.5k visual tokens on, the target trained
         # on "long" loses the thread of its own sentences ("on a blac happens"); ~2x the visual tokens of "long"
         "longer": [0.047, 0.111, 0.204, 0.232, 0.056, 0.056, 0.074, 0.056, 0.047, 0.047, 0.05, 0.02]}
# frame rates drawn for a clip (uniformly); a frame pair's temporal mRoPE position steps by 2 / fps x
# tokens_per_second
FPS = (2.0, 4.0, 8.0)
VOCAB = 1024
CELL = 28  # pixels per merged visual token side (patch 14 x spatial merge 2)
# Answer words that only the frames decide (attributes, counts, directions, events), weighted by --grounded-weight
# in the language loss: they are about a quarter of the answer tokens, and the template words around them would
# otherwise dominate the loss long after the model has learned them. Every alternative of a decision must be in it,
# or the weighting biases the decision: the verbs of moving as well as those of keeping still, the words that
# open the next sentence (another object, an event, or "no events"), and the token after an object's motion or
# event, which says whether (another) event of that object follows: " and" / ", then" against "." (stage 1i's
# first run weighted neither, and at step 893 left the event out in 64 of 98 one-event clips), likewise " at
# first" against "." after a colour, and " after about N seconds" against "." after an event (a free choice of
# wording, weighted both ways so that the weighting does not change how often it is written).
GROUNDED = (*COLOURS, *OBJECT_SHAPES, *SIZES, "striped", "one", "two", "three", "left", "right", "up", "down",
            "leftward", "rightward", "upward", "downward", "top", "bottom", "still", "stays", "remains", "keeps",
            "does", "stayed", "moves", "drifts", "slides", "travels", "moved", "rises", "sinks", "once",
            "appears", "shows", "disappears", "turns", "changes", "Nothing", "No", "nothing", "Yes", "A", "There", "The",
            "Then", "First", "Finally", "and", "at", "after")
GROUNDED_PUNCTUATION = (".", ",")  # written without a space before them
ANSWER_OPENINGS = ("Yes", "No", "Nothing", "It")
AUX_CLASSES = (len(COLOURS) + 1, len(OBJECT_SHAPES) + 1, len(SIZES) + 1, len(TEXTURES) + 1, len(MOTIONS) + 1)  # 0: none
EVENT_CLASSES = (2, 2, 2, len(COLOURS))  # appears, disappears, changes colour (no / yes); the colour at the end


def grounded_ids(tokenizer) -> set[int]:
    """The token ids that --grounded-weight weighs: `GROUNDED`'s single-token words (after a space), the first piece
    of the words that open a short answer (`ANSWER_OPENINGS`: whether anything happened is decided there), and
    `GROUNDED_PUNCTUATION`."""
    return set(one_token_ids(tokenizer, GROUNDED).values()) | {first_token_id(tokenizer, w) for w in ANSWER_OPENINGS} \
        | {first_token_id(tokenizer, m) for m in GROUNDED_PUNCTUATION}


def cell_labels(truth: dict, grid: tuple[int, int, int], min_cover: float = 0.25) -> torch.Tensor:
    """Per merged visual token, the attributes of the object that covers it at the token's first frame.

    A token (2 frames x 28 x 28 px) is labelled with the object that shows over the largest part of the cell,
    if that is at least `min_cover` (sampled on a 7 x 7 grid of points; where objects overlap, the one drawn
    last is the one that shows, as in the rendered frame). Labels from coverage, unlike "the cell that holds
    the object's centre", are decidable from the pixels of the cell and its neighbours, which is what lets the
    vision tower learn them quickly.

    Args: truth: a clip's ground truth (with tracks); grid: (t, h, w) merged-token grid of the clip, frames not
        resized (sides multiples of 28).
    Returns: (t*h*w, 6) long: colour, shape, size, texture, motion indices and the object's id, 1-based, 0 where no
        object covers it.
    """
    t, h, w = grid
    lab = torch.zeros((t, h, w, len(AUX_CLASSES) + 1), dtype=torch.long)
    side = min(truth["height"], truth["width"])
    off = (np.arange(7) + 0.5) * CELL / 7
    ys = (np.arange(h)[:, None] * CELL + off[None]).reshape(-1)
    xs = (np.arange(w)[:, None] * CELL + off[None]).reshape(-1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    colours, sizes, motions = list(COLOURS), list(SIZES), list(MOTIONS)
    change = {e["object"]: e["frame"] for e in truth["events"] if e["type"] == "changes colour"}
    for g in range(t):
        f = g * (truth["num_frames"] // t)
        owner = np.full(yy.shape, -1)  # which object each sample point shows; a later object covers an earlier one
        for k, o in enumerate(truth["objects"]):
            if o["appear"] <= f < o["disappear"]:
                cx, cy = o["track"][f]
                owner[_shape_mask(o["shape"], xx, yy, cx, cy, SIZES[o["size"]] * side)] = k
        best = np.zeros((h, w))
        for k, o in enumerate(truth["objects"]):
            cover = (owner == k).reshape(h, 7, w, 7).mean((1, 3))
            sel = (cover >= min_cover) & (cover > best)
            if not sel.any():
                continue
            best = np.where(sel, cover, best)
            colour = o["final_colour"] if o["id"] in change and f >= change[o["id"]] else o["colour"]
            lab[g][torch.from_numpy(sel)] = torch.tensor([
                colours.index(colour) + 1, OBJECT_SHAPES.index(o["shape"]) + 1, sizes.index(o["size"]) + 1,
                TEXTURES.index(o["texture"]) + 1, motions.index(o["motion"]) + 1, o["id"] + 1])
    return lab.reshape(-1, lab.shape[-1])


def named_objects(colour: torch.Tensor, truth: dict) -> torch.Tensor:
    """The object that each colour word of the text names.

    Args: colour: (L,) long, `ColourWords` (1-based index in COLOURS at a colour word, else 0); truth:
        the clip's ground truth.
    Returns: (L,) long: 1 + the id of the object, at every colour word that names exactly one object (by its first
        or its last colour); 0 everywhere else (no colour word, or two objects of that colour).
    """
    out = torch.zeros_like(colour)
    names = list(COLOURS)
    for r in colour.nonzero()[:, 0].tolist():
        objs = [o for o in truth["objects"] if names[int(colour[r]) - 1] in (o["colour"], o["final_colour"])]
        if len(objs) == 1:
            out[r] = objs[0]["id"] + 1
    return out


def event_labels(named: torch.Tensor, truth: dict) -> torch.Tensor:
    """What happens, over the whole clip, to the object that each colour word of the text names.

    Args: named: (L,) long, `named_objects`; truth: the clip's ground truth.
    Returns: (L, 4) long: whether the object appears, disappears, changes colour (0 / 1 each) and the 0-based
        index of its colour at the end, where `named` names an object; -1 everywhere else.
    """
    out = torch.full((named.shape[0], len(EVENT_CLASSES)), -1)
    objects = {o["id"]: o for o in truth["objects"]}
    for r in named.nonzero()[:, 0].tolist():
        o = objects[int(named[r]) - 1]
        kinds = {e["type"] for e in truth["events"] if e["object"] == o["id"]}
        out[r] = torch.tensor([int("appears" in kinds), int("disappears" in kinds), int("changes colour" in kinds),
                               list(COLOURS).index(o["final_colour"])])
    return out


class VisionProbe(torch.nn.Module):
    """Linear probe on the merged visual tokens: (N, hidden) features and (N, 6) `cell_labels` -> loss.

    The loss is the cross-entropy of "which colour, or no object" over every token plus the cross-entropy of
    shape, size, texture and motion over the tokens an object covers (most tokens are background; averaging
    the attributes over all of them would drown the few that carry an object).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)  # the embeddings' scale is the LM's
        self.head = torch.nn.Linear(hidden, sum(AUX_CLASSES))

    def logits(self, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.head(self.norm(feats.float())).split(AUX_CLASSES, dim=-1)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        logits, obj = self.logits(feats), labels[:, 0] > 0
        loss = ce(logits[0], labels[:, 0])
        if obj.any():
            loss = loss + sum(ce(lg[obj], labels[obj, k]) for k, lg in enumerate(logits) if k > 0)
        return loss


def corpus(n: int = 4000) -> list[str]:
    """Text of the world (descriptions, questions, answers, prompts) to train the tokenizer on."""
    out = list(DESCRIBE_PROMPTS) + ["You are a helpful assistant."]
    for s in range(n):
        rng = np.random.default_rng(10**6 + s)
        truth = plan_clip(rng, 16)
        truth["background"] = "gray" if s % 2 else "dark green"
        for e in truth["events"]:
            e["time_s"] = e["frame"] / 4
        out.append(describe(truth, s))
        out += [q + " " + a for q, a in questions(truth, s)]
    return out


def build_model(tokenizer, seed: int, **shape):
    """A fresh `Qwen2_5_VLForConditionalGeneration` of the embedded target's shape (TEXT, with any of its keys
    overridden by `shape`, e.g. layers=2 for the assistant; VISION; mRoPE: head_dim / 8 rotary pairs for time, the
    rest of the head_dim / 2 split between height and width: 8, 12, 12 at head_dim 64) for `tokenizer`'s vocabulary
    and special tokens, initialised from `seed`."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    t = {**TEXT, **shape}
    head_dim = t["hidden"] // t["heads"]
    pairs = head_dim // 2  # rotary pairs, split between time, height and width
    text = dict(vocab_size=len(tokenizer), hidden_size=t["hidden"], intermediate_size=t["intermediate"],
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                num_key_value_heads=t["kv_heads"], max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0,
                                 "mrope_section": [head_dim // 8, (pairs - head_dim // 8) // 2,
                                                   pairs - head_dim // 8 - (pairs - head_dim // 8) // 2]},
                eos_token_id=ids("<|im_end|>"), bos_token_id=ids("<|endoftext|>"),
                pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)
    cfg = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config={**VISION, "out_hidden_size": TEXT["hidden"]},
                               image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                               vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                               eos_token_id=ids("<|im_end|>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                                               do_sample=False)
    return model


class ColourWords:
    """The colour words of a tokenized text, for `named_objects` and the binding losses.

    `ColourWords(tokenizer)(ids)`: ids (L,) long -> (L,) long, at each colour word of the text (not "dark green", a
    background) the colour's 1-based index in COLOURS (the numbering of `cell_labels`), else 0.
    """

    def __init__(self, tokenizer):
        colours = one_token_ids(tokenizer, COLOURS)
        self.ids = {colours[c]: k + 1 for k, c in enumerate(COLOURS) if c in colours}
        self.dark = one_token_ids(tokenizer, ["dark"]).get("dark")  # "dark green" names a background

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.tensor([self.ids.get(t, 0) for t in ids.tolist()])
        if self.dark is not None:
            out[1:][ids[:-1] == self.dark] = 0
        return out


class Batcher:
    """Draws training samples and batches them.

    A sample is a clip (in memory) and a conversation about it: a detailed description (75%) then 1 to
    `max_questions` short questions, or the questions alone; the loss covers every answer. Follow-up questions
    add supervised tokens at a small cost next to the clip's visual tokens, and each one ties an attribute to
    the frames directly. Clip shapes are drawn from `MIXES[mix]`, frame rates uniformly from `FPS`.

    Batches are cut from pools of `pool` batches sorted by length, so that a batch's samples have similar
    lengths and little of the step is spent on padding. The state (`state()` / `restore()`) is the RNG state
    at the start of the current pool and the position in it, so a resumed run draws the same batches.
    """

    def __init__(self, target, seed: int, max_questions: int = 2, pool: int = 4, mix: str = "short"):
        self.t, self.shape_p = target, MIXES[mix]
        self.rng = np.random.default_rng(seed)
        self.max_questions, self.pool = max_questions, pool
        self.queue: list[list[dict]] = []
        tok = target.tokenizer
        self.grounded = torch.tensor(sorted(grounded_ids(tok)))
        self.colour_words = ColourWords(tok)
        self.pool_state, self.pool_pos = self.rng.bit_generator.state, 0

    def sample(self) -> dict:
        """One clip and its conversation, tokenized, with the labels of the losses."""
        rng = self.rng
        frames, h, w = SHAPES[rng.choice(len(SHAPES), p=self.shape_p)]
        fps = float(rng.choice(FPS))
        seed = int(rng.integers(2**31))
        clip = make_clip(seed, frames, h, w, fps=fps)
        qa = questions(clip.truth, seed)
        order = rng.permutation(len(qa))[:int(rng.integers(1, self.max_questions + 1))]
        turns = [(str(rng.choice(DESCRIBE_PROMPTS)), describe(clip.truth, seed))] if rng.random() < 0.75 else []
        turns += [qa[int(k)] for k in order]
        video = Video(frames=clip.frames, fps=fps, indices=np.arange(frames), total_frames=frames)
        inputs = self.t.prepare(video, turns[0][0], max_pixels=h * w, min_pixels=h * w)
        inputs = {k: v.cpu() for k, v in inputs.items()}  # samples are drawn on the CPU, whatever the model's device
        ids, labels = [inputs["input_ids"][0]], [torch.full_like(inputs["input_ids"][0], -100)]
        for i, (question, answer) in enumerate(turns):
            if i:  # a follow-up question in the same conversation (ChatML, as the chat template renders it)
                q = self.t.tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)["input_ids"]
                ids.append(torch.tensor(q))
                labels.append(torch.full((len(q),), -100))
            a = torch.tensor(self.t.tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
            ids.append(a)
            labels.append(torch.cat((a[:-1], torch.tensor([-100]))))  # answer + <|im_end|>, not the newline
            # (labels line up with ids; the HF loss shifts them)
        ids, labels = torch.cat(ids), torch.cat(labels)
        grid = inputs["video_grid_thw"]
        cells = cell_labels(clip.truth, (int(grid[0, 0]), int(grid[0, 1]) // 2, int(grid[0, 2]) // 2))
        colour = self.colour_words(ids)
        named = named_objects(colour, clip.truth)
        return {"ids": ids, "labels": labels, "pixels": inputs["pixel_values_videos"], "grid": grid,
                "sgt": inputs["second_per_grid_ts"], "cells": cells,
                "grounded": (labels >= 0) & torch.isin(labels, self.grounded), "colour": colour,
                "named": named, "event": event_labels(named, clip.truth)}

    def state(self) -> dict:
        return {"pool_state": self.pool_state, "pool_pos": self.pool_pos}

    def restore(self, state: dict, size: int) -> None:
        """Continue where `state()` was taken: redraw that pool and skip the batches already served."""
        self.rng.bit_generator.state = state["pool_state"]
        self.queue = []
        for _ in range(state["pool_pos"]):
            self.batch(size)

    def batch(self, size: int) -> dict:
        """The next batch of `size` samples, right-padded: model inputs (input_ids, attention_mask,
        mm_token_type_ids, the videos' pixels and grids) and the losses' labels (labels, grounded, colour, named
        (B, L); event (B, L, 4); cells (N, 6) of the batch's N merged visual tokens)."""
        if not self.queue:
            self.pool_state, self.pool_pos = self.rng.bit_generator.state, 0
            samples = sorted((self.sample() for _ in range(size * self.pool)), key=lambda s: s["ids"].shape[0])
            chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
            order = self.rng.permutation(len(chunks))
            self.queue = [chunks[int(k)] for k in order]
        self.pool_pos += 1
        samples = self.queue.pop()
        L = max(s["ids"].shape[0] for s in samples)
        pad = self.t.tokenizer.pad_token_id
        ids = torch.full((size, L), pad)
        labels = torch.full((size, L), -100)
        mask = torch.zeros((size, L), dtype=torch.long)
        grounded = torch.zeros((size, L), dtype=torch.bool)
        colour = torch.zeros((size, L), dtype=torch.long)
        named = torch.zeros((size, L), dtype=torch.long)
        event = torch.full((size, L, len(EVENT_CLASSES)), -1)
        for i, s in enumerate(samples):
            n = s["ids"].shape[0]
            ids[i, :n], labels[i, :n], mask[i, :n], grounded[i, :n] = s["ids"], s["labels"], 1, s["grounded"]
            colour[i, :n], named[i, :n], event[i, :n] = s["colour"], s["named"], s["event"]
        types = (ids == self.t.config.video_token_id).long() * 2
        return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, "labels": labels,
                "pixel_values_videos": torch.cat([s["pixels"] for s in samples]),
                "video_grid_thw": torch.cat([s["grid"] for s in samples]),
                "second_per_grid_ts": torch.cat([s["sgt"] for s in samples]),
                "cells": torch.cat([s["cells"] for s in samples]), "grounded": grounded, "colour": colour,
                "named": named, "event": event}


class _Draws(torch.utils.data.IterableDataset):
    """One `Batcher` per DataLoader worker (`make(worker)`), started at `states[worker]` where given; yields
    (worker, the Batcher's state after the batch, batch) for ever."""

    def __init__(self, make, size: int, states: list):
        self.make, self.size, self.states = make, size, states

    def __iter__(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's: it checkpoints, then ends
        w = torch.utils.data.get_worker_info().id
        batcher = self.make(w)
        if self.states[w] is not None:
            batcher.restore(self.states[w], self.size)
        while True:
            batch = batcher.batch(self.size)
            yield w, batcher.state(), batch


class BatchStream:
    """Batches drawn by `workers` processes next to the training step, for a GPU, whose step takes less time than
    drawing a batch on one core (rendering, preprocessing and tokenising 8 clips of about 300 visual tokens:
    about 0.2 s). Worker w draws with its own `Batcher` (`make(w)`), and the batches are served in turn (worker 0,
    1, ..., 0, ...), so a run with the same seed and number of workers draws the same batches, and `state()` (each
    worker's Batcher state after its last batch served) resumes exactly: `BatchStream(make, size, workers,
    state)`, with the `state()` of a stream of as many workers. The workers are forked when the stream is made:
    make it while the model is still on the CPU.
    """

    def __init__(self, make, size: int, workers: int, state: dict | None = None):
        self.states = list((state or {}).get("workers") or [None] * workers)
        loader = torch.utils.data.DataLoader(_Draws(make, size, self.states), batch_size=None, num_workers=workers,
                                             prefetch_factor=4, persistent_workers=True)
        self.it = iter(loader)

    def batch(self, size: int) -> dict:
        w, state, batch = next(self.it)
        self.states[w] = state
        return batch

    def state(self) -> dict:
        return {"workers": list(self.states)}


def _keep_attention_input(saved: dict):
    """A forward pre-hook (with_kwargs) for a text layer's attention that keeps its input (B, L, hidden) as
    saved["x"] and its rotary embeddings (cos, sin) as saved["pe"], for `_head_qk`."""
    def keep(module, args, kwargs):
        saved["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        saved["pe"] = kwargs["position_embeddings"]
    return keep


def _keep_layer_output(saved: dict):
    """A forward hook for a decoder layer that keeps its output hidden states (B, L, hidden) as saved["out"]."""
    def keep(module, args, output):
        saved["out"] = output[0] if isinstance(output, tuple) else output
    return keep


def _head_qk(attn, x: torch.Tensor, pe: tuple, head: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of one attention head as the layer computes them: x (B, L, hidden) the layer's input,
    pe its (cos, sin) -> q, k (B, 1, L, head_dim) each, after the projections and mRoPE."""
    d, kv = attn.head_dim, head // attn.num_key_value_groups
    qs, ks = slice(head * d, (head + 1) * d), slice(kv * d, (kv + 1) * d)
    q = torch.nn.functional.linear(x, attn.q_proj.weight[qs], attn.q_proj.bias[qs])
    k = torch.nn.functional.linear(x, attn.k_proj.weight[ks], attn.k_proj.bias[ks])
    return rope(q[:, None], k[:, None], *pe)


def _fetch_loss(logits: torch.Tensor, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log(the attention mass on `target`): logits (words, L) of one head at text rows `rows` (words,) over every
    key, target (words, L) bool; the causal mask is applied here, as in the real softmax."""
    logits = logits.masked_fill(torch.arange(logits.shape[1], device=logits.device)[None] > rows[:, None], -1e9)
    return torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~target, -1e9), 1)


class _HeadSupervision:
    """What the attention supervisions share: a forward pre-hook on text layer `layer`'s attention keeps its input
    (B, L, hidden) and rotary embeddings in `saved`, from which `_head_qk` recomputes a head's queries and keys;
    `remove` detaches every hook in `hooks`."""

    def __init__(self, model, layer: int):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        self.block = model.model.language_model.layers[layer]
        self.attn, self.rope, self.saved = self.block.self_attn, apply_rotary_pos_emb, {}
        self.hooks = [self.attn.register_forward_pre_hook(_keep_attention_input(self.saved), with_kwargs=True)]

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self.hooks:
            h.remove()
        self.saved.clear()


class BindingLoss(_HeadSupervision):
    """Attention supervision for one head of the language model (a training aid; nothing of it is shipped).

    A forward pre-hook on layer `layer`'s attention keeps its input (B, L, hidden) and rotary embeddings; after
    the forward, `__call__` recomputes head `head`'s queries and keys exactly as the layer does (projections,
    mRoPE) and, at each colour word, takes the cross-entropy of "attend to a visual token of this colour":
    -log(the head's attention mass, over every earlier token as in the real softmax, on the visual tokens whose
    `cell_labels` colour is the word's). Colour words with no visual token of their colour are skipped. A linear
    probe (as `VisionProbe`) on the layer's output at the colour word then predicts the fetched object's
    attributes (the most common `cell_labels` of the matching tokens), so that the fetch carries the object into
    the word's residual stream, where the next words (shape, motion) are read from.
    """

    def __init__(self, model, layer: int, head: int = 0):
        super().__init__(model, layer)
        self.head = head
        self.hooks.append(self.block.register_forward_hook(_keep_layer_output(self.saved)))
        self.probe = VisionProbe(model.config.text_config.hidden_size)  # reads the fetched object at the word

    def __call__(self, input_ids: torch.Tensor, colour: torch.Tensor, cells: torch.Tensor,
                 video_token: int) -> torch.Tensor:
        """input_ids, colour (B, L) (colour: `ColourWords`), cells (N, 6) `cell_labels` of the batch's
        N visual tokens in order -> scalar loss (0 when the batch has no colour word with a matching visual token)."""
        a = self.attn
        x, pe = self.saved.pop("x"), self.saved.pop("pe")
        q, k = _head_qk(a, x, pe, self.head, self.rope)
        vis_cells = torch.zeros(input_ids.shape + (cells.shape[1],), dtype=torch.long,
                                device=input_ids.device)  # 0 off the visual tokens
        vis_cells[input_ids == video_token] = cells
        out = self.saved.pop("out")
        losses, words, labels = [], [], []
        for b in range(input_ids.shape[0]):
            rows = colour[b].nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            logits = (q[b, 0, rows].float() @ k[b, 0].float().T) * a.scaling  # (words, L): every key, as the head
            match = vis_cells[b, :, 0][None] == colour[b, rows][:, None]  # (words, L): visual tokens of the colour
            ok = match.any(1)
            if ok.any():
                losses.append(_fetch_loss(logits[ok], rows[ok], match[ok]))
                for r, m in zip(rows[ok].tolist(), match[ok]):  # the fetched object's attributes: the mode
                    words.append(out[b, r])
                    labels.append(vis_cells[b, m].mode(0).values)
        if not losses:
            return torch.zeros(())
        return torch.cat(losses).mean() + self.probe(torch.stack(words), torch.stack(labels))


class TimeBindingLoss(_HeadSupervision):
    """Attention supervision for two heads of one text layer (a training aid, not shipped): at each colour word
    that names exactly one object (`named_objects`), head `heads[0]` learns to attend to that object's visual
    tokens in the clip's first temporal group and head `heads[1]` to those in its last group, each to
    <|vision_start|> where the object is not there (not come yet, or gone).

    Why: the vision tower sees each pair of frames alone and attention values carry no position, so whether an
    object appears, disappears or changes colour is read only by a head that picks the object's tokens at one
    time; with one head on the start and one on the end, the layer's output at the word holds the object as it
    was first and last seen, which `EventLoss` (on the same layer) reads.

    Args: model: the Qwen2.5-VL model; layer: text layer; heads: (first, last) query heads of that layer.
    Call: input_ids, named (B, L), cells (N, 6) `cell_labels` of the batch's N visual tokens in order, grid
        (B, 3) video_grid_thw, video_token and start_token ids -> scalar loss (0 without a named object).
    """

    def __init__(self, model, layer: int, heads: tuple[int, int] = (0, 2)):
        super().__init__(model, layer)
        self.heads = heads

    @staticmethod
    def targets(input_ids: torch.Tensor, named: torch.Tensor, cells: torch.Tensor, grid: torch.Tensor,
                video_token: int, start_token: int) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Where the two heads should look: per sample b with a named object, (b, rows (words,), first (words, L),
        last (words, L)): the text rows of the named colour words and, for each, the keys of the object in the
        first / last temporal group, or <|vision_start|> alone where there are none."""
        when = []  # per visual token: 1 in the clip's first temporal group, 2 in its last, 3 when it has one group
        for t, h, w in grid.tolist():
            hw = (h // 2) * (w // 2)
            idx = torch.arange(t * hw, device=input_ids.device)
            when.append((idx < hw).long() + 2 * (idx >= (t - 1) * hw).long())
        vis_obj, vis_when = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
        video = input_ids == video_token
        vis_obj[video], vis_when[video] = cells[:, 5], torch.cat(when)
        out = []
        for b in range(input_ids.shape[0]):
            rows = named[b].nonzero()[:, 0]
            start = (input_ids[b] == start_token).nonzero()[:, 0]
            if rows.numel() == 0 or start.numel() == 0:
                continue
            pair = []
            for bit in (1, 2):
                target = (vis_obj[b][None] == named[b, rows][:, None]) & ((vis_when[b] & bit) > 0)[None]
                target[~target.any(1), start[0]] = True  # not there at that time: <|vision_start|>
                pair.append(target)
            out.append((b, rows, *pair))
        return out

    def __call__(self, input_ids: torch.Tensor, named: torch.Tensor, cells: torch.Tensor, grid: torch.Tensor,
                 video_token: int, start_token: int) -> torch.Tensor:
        x, pe = self.saved.pop("x"), self.saved.pop("pe")
        todo = self.targets(input_ids, named, cells, grid, video_token, start_token)
        if not todo:
            return torch.zeros(())
        qk = [_head_qk(self.attn, x, pe, h, self.rope) for h in self.heads]
        losses = []
        for b, rows, *targets in todo:
            for (q, k), target in zip(qk, targets):
                logits = (q[b, 0, rows].float() @ k[b, 0].float().T) * self.attn.scaling  # (words, L): every key
                losses.append(_fetch_loss(logits, rows, target))
        return torch.cat(losses).mean()


class EventLoss(torch.nn.Module):
    """Event supervision (a training aid, not shipped): a linear probe on text layer `layer`'s output at each
    colour word predicts what happens to the object the word names over the whole clip (`event_labels`).

    Why: trained on the description alone, whether an object appears, disappears or changes colour is decided at
    one word of the event sentence, long after the object was named; the probe asks for it where the object is
    first named, so that the event sentence can copy it from there, as the binding supervision does for shape
    and motion.

    Args: model: the Qwen2.5-VL model; layer: the text layer whose output (B, L, hidden) the probe reads.
    Call: (B, L, 4) labels (-1: no label) after the model's forward -> scalar loss (0 without labels).
    """

    def __init__(self, model, layer: int):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.head = torch.nn.Linear(hidden, sum(EVENT_CLASSES))
        self.saved: dict = {}
        self.hook = model.model.language_model.layers[layer].register_forward_hook(_keep_layer_output(self.saved))

    def remove(self) -> None:
        """Detach the hook from the model."""
        self.hook.remove()
        self.saved.clear()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        out, sel = self.saved.pop("out"), labels[..., 0] >= 0
        if not sel.any():
            return torch.zeros(())
        logits = self.head(self.norm(out[sel].float())).split(EVENT_CLASSES, dim=-1)
        return sum(torch.nn.functional.cross_entropy(lg, labels[sel][:, k]) for k, lg in enumerate(logits))


def answer_weights(labels: torch.Tensor, grounded: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, L - 1) float: how much each next-token prediction counts in `answer_loss` (0: not scored)."""
    return (labels[:, 1:] >= 0).float() * (1 + (weight - 1) * grounded[:, 1:].float())


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, grounded: torch.Tensor, weight: float,
                total: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens, (B, L, V) logits and (B, L) labels (-100: not scored,
    aligned with the inputs), where the tokens flagged in `grounded` (B, L) count `weight` times. Divided by the
    rows' own total weight, or by `total` (the whole batch's, when these rows are one of its `length_groups`, so
    that the groups' losses add up to the batch's)."""
    w = answer_weights(labels, grounded, weight)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].clamp(min=0),
                                           reduction="none")
    return (ce * w).sum() / (w.sum().clamp(min=1) if total is None else max(total, 1.0))


GROUP_OVERHEAD = 300  # tokens: what one more forward costs, in padded tokens of work (measured on 2 CPU cores)


def length_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Split a batch's rows into groups that run as separate forwards, each padded only to its own longest row:
    the split of the rows, taken in order of length, that minimises the padded tokens (rows x longest row, summed
    over groups) plus `overhead` per group. A batch of the `longer` mix holds a 3k-token clip beside 300-600-token
    ones, and padding all of them to 3k makes most of the step's work padding.
    Returns: lists of row indices, shortest rows first; one group of every row when splitting saves nothing."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for i in range(1, n + 1):  # best[i]: the cheapest split of the i shortest rows
        for j in range(i):
            cost = best[j] + (i - j) * lengths[order[i - 1]] + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i:
        groups.append(order[cut[i]:i])
        i = cut[i]
    return groups[::-1]


def row_group(batch: dict, rows: list[int]) -> dict:
    """The model inputs and loss targets of some rows of a Batcher batch (which has an attention_mask: it gives each
    row's length), cut to their longest row: input_ids, attention_mask, mm_token_type_ids, labels, grounded
    (R, L'), and those rows' videos (pixel_values_videos, video_grid_thw,
    second_per_grid_ts). One video per row, in row order."""
    length = int(batch["attention_mask"][rows].sum(1).max())
    sizes = batch["video_grid_thw"].prod(1).tolist()  # patches of each row's video
    starts = [0] + list(np.cumsum(sizes))
    index = torch.tensor(rows)
    out = {k: batch[k][index, :length] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels",
                                                    "grounded")}
    out["pixel_values_videos"] = torch.cat([batch["pixel_values_videos"][starts[r]:starts[r + 1]] for r in rows])
    out["video_grid_thw"] = batch["video_grid_thw"][index]
    out["second_per_grid_ts"] = batch["second_per_grid_ts"][index]
    return out


def without_padding_mask(batch: dict) -> dict:
    """`batch` without its (B, L) `attention_mask`, which a right-padded batch does not need: under causal attention
    no real token attends to a pad after it, the pads come after every real token's mRoPE position, and
    `answer_loss` scores no pad. So the loss and its gradients are those of the masked forward, up to rounding
    (bf16: about 0.3% of the gradient's norm), while sdpa, given no mask, takes its fused causal kernel instead of
    writing out every masked score: a step on 8 clips of 3k visual tokens takes half the time on 2 CPU cores.
    Raises SparrowError if some row is padded on the left (a 1 after a 0 in the mask)."""
    mask = batch["attention_mask"]
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise SparrowError("a training batch is padded on the left; the Batcher pads on the right, which the "
                           "unmasked forward needs")
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def lr_at(step: int, total: int, peak: float, warmup: int = 300) -> float:
    """Learning rate at step `step` of `total`: linear warm-up to `peak`, then cosine to 0.1 x peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def save_checkpoint(run: str, model, opt, step: int, batcher, log: list, probes: dict) -> None:
    """Atomic: write to a temporary directory, then rename over the previous checkpoint. `probes`: {name: module
    or None}, the training aids' weights."""
    tmp, final = os.path.join(run, "ckpt.tmp"), os.path.join(run, "ckpt")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                **{k: m.state_dict() if m is not None else None for k, m in probes.items()},
                "batcher": batcher.state(), "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "log.json"), "w") as f:
        json.dump(log, f)
    old = os.path.join(run, "ckpt.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def video_preprocessor_config() -> dict:
    """The frame sizes the target is trained on, as a Qwen2-VL video processor config (what a real checkpoint ships
    in video_preprocessor_config.json): frames are resized to an area within [112^2, 224^2] pixels. Without it the
    Qwen default bounds ([128, 768] x 28^2 pixels) would scale a 224 x 224 clip up to 336 x 336, a frame size the
    target never saw, with 2.25x the visual tokens."""
    lo, hi = min(h * w for _, h, w in SHAPES), max(h * w for _, h, w in SHAPES)
    # a video given without a frame count or rate is sampled at 2 fps, at most as many frames as the longest
    # training clip (96), so that its visual tokens stay within what the target was trained on
    sampling = {"fps": 2.0, "min_frames": 4, "max_frames": max(f for f, _, _ in SHAPES)}
    return {"video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": lo, "max_pixels": hi,
            "size": {"shortest_edge": lo, "longest_edge": hi}, "patch_size": VISION["patch_size"],
            "temporal_patch_size": VISION["temporal_patch_size"], "merge_size": VISION["spatial_merge_size"],
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, **sampling}


def image_preprocessor_config() -> dict:
    """The same sizes and normalisation as an image processor config (preprocessor_config.json, which real Qwen-VL
    checkpoints ship and vLLM requires)."""
    skip = ("video_processor_type", "fps", "min_frames", "max_frames")
    return {"image_processor_type": "Qwen2VLImageProcessor",
            **{k: v for k, v in video_preprocessor_config().items() if k not in skip}}


def export(model, tokenizer, out: str) -> None:
    """save_pretrained in bf16 (the shipped default stays small), with the tokenizer and the video and image
    preprocessor configs (`video_preprocessor_config`, `image_preprocessor_config`), written atomically; loads back
    in fp32 on CPU."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "video_preprocessor_config.json"), "w") as f:
        json.dump(video_preprocessor_config(), f, indent=2)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:  # vLLM reads the image processor's
        json.dump(image_preprocessor_config(), f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m embedded train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="run directory (checkpoints, tokenizer, log)")
    ap.add_argument("--steps", type=int, default=12000, help="steps of the learning-rate schedule (see --until)")
    ap.add_argument("--until", type=int, default=None,
                    help="stop (and checkpoint) at this step, the learning-rate schedule still planned for --steps "
                         "(a resumable stage of a longer recipe)")
    ap.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this wall time")
    ap.add_argument("--batch", type=int, default=8, help="clips per step (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    ap.add_argument("--warmup", type=int, default=300, help="linear warm-up steps of the learning rate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the clips drawn")
    ap.add_argument("--mix", choices=sorted(MIXES), default="short",
                    help="clip lengths drawn: short (mostly 4-8 frames), long (16-32 frames twice as often), "
                         "longer (long plus 48- and 96-frame clips at 224 px)")
    ap.add_argument("--init", help="start from these weights (an earlier stage's --export) instead of random ones")
    ap.add_argument("--init-probes", metavar="STATE_PT",
                    help="start the probes from this checkpoint of an earlier stage (RUN/ckpt/state.pt)")
    ap.add_argument("--layers", type=int, default=TEXT["layers"],
                    help="a new model's text layers (the target: 12; its sibling for HF assisted generation: 2)")
    ap.add_argument("--tokenizer", help="reuse this tokenizer directory (the target's, for a sibling model)")
    ap.add_argument("--grounded-weight", type=float, default=1.0,
                    help="weight, in the language loss, of the answer words that only the frames decide (GROUNDED)")
    ap.add_argument("--aux-weight", type=float, default=1.0,
                    help="weight of the dense vision supervision (VisionProbe; 0 turns it off)")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="first train only the vision tower and its probe for this many steps (counted in --steps)")
    ap.add_argument("--bind-weight", type=float, default=0.0, help="weight of BindingLoss (0: off)")
    ap.add_argument("--bind-layer", type=int, default=1, help="the text layer whose head 0 BindingLoss trains")
    ap.add_argument("--event-weight", type=float, default=0.0, help="weight of EventLoss (0: off)")
    ap.add_argument("--time-weight", type=float, default=0.0, help="weight of TimeBindingLoss (0: off)")
    ap.add_argument("--event-layer", type=int, default=3,
                    help="the text layer that EventLoss reads and whose heads 0 and 2 TimeBindingLoss trains")
    ap.add_argument("--device", default="cpu", help="cpu (the shipped stages), cuda, cuda:N or auto")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="bf16 autocast (as the shipped stages trained) or float32; auto: bf16 where the device "
                         "computes it fast (a GPU, a CPU with AVX-512 or AMX)")
    ap.add_argument("--workers", type=int, default=0,
                    help="draw batches in this many processes beside the step (for a GPU); a run resumes with the "
                         "same number")
    ap.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (and on SIGINT/SIGTERM)")
    ap.add_argument("--log-every", type=int, default=50, help="log the smoothed losses every N steps")
    ap.add_argument("--resume", action="store_true", help="go on from --out's checkpoint")
    ap.add_argument("--export", help="write the trained model here (save_pretrained, bf16)")
    a = ap.parse_args(argv)
    for flag, path, need in (("--init", a.init, "config.json"), ("--tokenizer", a.tokenizer, "tokenizer_config.json")):
        if path is not None and not os.path.isfile(os.path.join(path, need)):
            raise SparrowError(f"{flag} {path}: no {need} there; give an exported target's directory (a stage's "
                               f"--export)")
    if a.init_probes is not None and not os.path.isfile(a.init_probes):
        raise SparrowError(f"--init-probes {a.init_probes} is not a file; give an earlier stage's RUN/ckpt/state.pt")
    at_least(1, ("--steps", a.steps), ("--until", a.until), ("--batch", a.batch), ("--layers", a.layers))
    if a.workers < 0:
        raise SparrowError(f"--workers {a.workers}: give 0 (draw in the training process) or more")
    return a


def main(argv=None):
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    import sparrow

    a = parse_args(argv)
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    except RuntimeError:
        raise SparrowError(f"--device {a.device} is not a device; give cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparrowError(f"--device {a.device}, but torch sees no CUDA device here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SparrowError(f"--device {a.device}: train on cpu or cuda")
    bf16 = a.precision == "bf16" or (a.precision == "auto" and fast_bf16(device))
    if a.precision == "auto" and not bf16:
        print(f"train: {device.type} has no fast bf16 here; training in float32 (--precision bf16 to force it)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(a.out, exist_ok=True)
    tok_dir = os.path.join(a.out, "tokenizer")
    if a.tokenizer and not os.path.isdir(tok_dir):
        AutoTokenizer.from_pretrained(a.tokenizer).save_pretrained(tok_dir)
    if not os.path.isdir(tok_dir) and not a.init:
        build_tokenizer(corpus(), QWEN_SPECIALS, QWEN_CHAT_TEMPLATE, vocab_size=VOCAB).save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(a.init or tok_dir)
    if a.init:
        model = AutoModelForImageTextToText.from_pretrained(a.init, dtype=torch.float32)
        torch.manual_seed(a.seed)  # the fresh probes below: a rerun of the stage starts them alike
    else:
        model = build_model(tokenizer, a.seed, layers=a.layers)
    target = sparrow.wrap_model(model, tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    layers = model.config.text_config.num_hidden_layers
    for flag, layer, on in (("--bind-layer", a.bind_layer, a.bind_weight > 0),
                            ("--event-layer", a.event_layer, a.event_weight > 0 or a.time_weight > 0)):
        if on and not 0 <= layer < layers:
            raise SparrowError(f"{flag} {layer} is not a layer of this {layers}-layer model; pick one in "
                               f"0..{layers - 1}")
    probe = VisionProbe(TEXT["hidden"])
    feats = {}
    model.model.visual.register_forward_hook(lambda m, i, o: feats.__setitem__("v", o.pooler_output))
    vision = list(model.model.visual.parameters()) + (list(probe.parameters()) if a.aux_weight > 0 else [])
    seen = {id(p) for p in vision}
    language = [p for p in model.parameters() if id(p) not in seen]
    params = vision + language
    opt = torch.optim.AdamW([{"params": vision}, {"params": language}], lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    binding = BindingLoss(model, a.bind_layer) if a.bind_weight > 0 else None
    events = EventLoss(model, a.event_layer) if a.event_weight > 0 else None
    timing = TimeBindingLoss(model, a.event_layer) if a.time_weight > 0 else None
    for extra in (binding.probe if binding else None, events):  # probes learn with the language model
        if extra is not None:
            opt.add_param_group({"params": list(extra.parameters())})
            params += list(extra.parameters())
    probes = {"probe": probe, "bind_probe": binding.probe if binding else None, "event_probe": events}
    # the language loss alone splits each batch into `length_groups` (the same gradient up to rounding); the
    # auxiliary losses read the whole batch's hidden states, so with any of them on, a batch is one forward
    grouped = a.aux_weight == 0 and binding is None and events is None and timing is None

    def load_probes(state: dict) -> None:
        for key, module in probes.items():
            if module is not None and state.get(key) is not None:
                module.load_state_dict(state[key])

    if a.init_probes:
        try:
            load_probes(torch.load(a.init_probes, weights_only=False, map_location="cpu"))
        except (RuntimeError, KeyError) as e:
            raise SparrowError(f"the probes of {a.init_probes} do not fit this model "
                               f"({str(e).splitlines()[0][:120]}); drop --init-probes") from None
    step, log = 0, []
    ckpt = os.path.join(a.out, "ckpt", "state.pt")
    state = torch.load(ckpt, weights_only=False, map_location="cpu") if a.resume and os.path.exists(ckpt) else None
    drawn = len(state["batcher"].get("workers", [])) if state is not None else a.workers
    if drawn != a.workers:
        raise SparrowError(f"{ckpt} was drawn with --workers {drawn}; resume with --workers {drawn}")
    if a.workers:  # forked now, while the model is on the CPU: the workers only draw
        batcher = BatchStream(lambda w: Batcher(target, a.seed * 1000 + w, mix=a.mix), a.batch, a.workers,
                              state["batcher"] if state else None)
    else:
        batcher = Batcher(target, a.seed, mix=a.mix)
    for module in (model, *probes.values()):
        if module is not None:
            module.to(device)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            load_probes(state)
            opt.load_state_dict(state["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise SparrowError(f"{ckpt} was written by another version or model shape "
                               f"({str(e).splitlines()[0][:120]}); start a new --out or drop --resume") from None
        step = state["step"]
        if not a.workers:
            batcher.restore(state["batcher"], a.batch)
        torch.set_rng_state(state["torch_rng"])
        log = json.load(open(os.path.join(a.out, "ckpt", "log.json")))
        print(f"resumed at step {step}")
    t0 = time.time()
    bar = tqdm(total=a.steps, initial=step, desc="train", dynamic_ncols=True)
    ema, emas = None, {}  # the answer loss's and each auxiliary loss's moving average
    end = min(a.steps, a.until or a.steps)
    zero = torch.zeros(())
    with stop_on_signals() as stop:
        while step < end and not stop["now"]:
            batch = {k: v.to(device, non_blocking=True) for k, v in batcher.batch(a.batch).items()}
            cells, grounded, labels = batch.pop("cells"), batch.pop("grounded"), batch.pop("labels")
            colour, named, event = batch.pop("colour"), batch.pop("named"), batch.pop("event")
            opt.param_groups[0]["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
            lm_step = step - a.vision_steps  # the language model warms up again when it starts to train
            opt.param_groups[1]["lr"] = lr_at(max(0, lm_step), a.steps - a.vision_steps, a.lr, a.warmup)
            for g in opt.param_groups[2:]:  # the binding and event probes learn with the language model
                g["lr"] = opt.param_groups[1]["lr"]
            vision_only = step < a.vision_steps and a.aux_weight > 0
            terms = {}
            if grouped and not vision_only:  # the language loss alone: one forward per group of similar lengths
                opt.zero_grad(set_to_none=True)
                whole = {**batch, "labels": labels, "grounded": grounded}
                total = float(answer_weights(labels, grounded, a.grounded_weight).sum())
                loss = torch.zeros(())
                for rows in length_groups(batch["attention_mask"].sum(1).tolist()):
                    part = without_padding_mask(row_group(whole, rows))
                    part_labels, part_grounded = part.pop("labels"), part.pop("grounded")
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        part_loss = answer_loss(model(**part).logits, part_labels, part_grounded, a.grounded_weight,
                                                total)
                    part_loss.backward()
                    loss = loss + part_loss.detach()
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    if vision_only:
                        model.model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])
                        loss = torch.zeros(())
                    else:
                        loss = answer_loss(model(**without_padding_mask(batch)).logits, labels, grounded,
                                           a.grounded_weight)
                    terms["aux"] = (a.aux_weight, probe(feats.pop("v"), cells) if a.aux_weight > 0 else zero)
                    if binding is not None:
                        terms["bind"] = (a.bind_weight, zero if vision_only else
                                         binding(batch["input_ids"], colour, cells, model.config.video_token_id))
                    if events is not None:
                        terms["event"] = (a.event_weight, zero if vision_only else events(event))
                    if timing is not None:
                        terms["time"] = (a.time_weight, zero if vision_only else
                                         timing(batch["input_ids"], named, cells, batch["video_grid_thw"],
                                                model.config.video_token_id, model.config.vision_start_token_id))
                opt.zero_grad(set_to_none=True)
                (loss + sum(w * v for w, v in terms.values())).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if not vision_only:
                ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            for k, (_, v) in terms.items():
                emas[k] = v.item() if k not in emas else 0.98 * emas[k] + 0.02 * v.item()
            bar.update(1)
            bar.set_postfix(loss="-" if ema is None else f"{ema:.3f}", **{k: f"{v:.3f}" for k, v in emas.items()})
            if step % a.log_every == 0:
                log.append({"step": step, "loss": None if ema is None else round(ema, 4),
                            **{k: round(v, 4) for k, v in emas.items()}, "s": round(time.time() - t0, 1)})
            if a.minutes and time.time() - t0 > a.minutes * 60:
                stop["now"] = True
            if step % a.save_every == 0 or stop["now"] or step == end:
                save_checkpoint(a.out, model, opt, step, batcher, log, probes)
    bar.close()
    if stop["signal"] and step < end:  # a stop asked for (Ctrl-C, SIGTERM), not a planned one (--until, --minutes)
        print(f"train: interrupted at step {step} of {end}: checkpoint saved in {a.out}; run the same command "
              "again (with --resume) to finish" + (" and export" if a.export else ""), file=sys.stderr)
        return 128 + stop["signal"]  # a script that chains stages (set -e) stops here, not on half-trained weights
    if a.export:
        model.eval()
        export(model.cpu(), tokenizer, a.export)
        print(f"exported to {a.export}")
    return 0
