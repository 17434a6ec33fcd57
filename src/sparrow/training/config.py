"""The draft's training settings (`TrainConfig`, read by `load_config` from JSON or YAML with the command line's
flags on top) and the online capture of one sample's hidden states, shared by `sparrow train-draft` (trainer.py)
and `sparrow capture` (offline.py)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field, fields

from ..draft import MODES, POSITION_MODES
from ..errors import SparrowError
from .losses import VISUAL_STATES, LossConfig, capture, capture_greedy


def _opt(default, help: str):
    """A TrainConfig field with its `train-draft --help` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every switch of the method's ablations (docs/method.md section 2b-2c: IVSB, MTP) plus the optimiser. See
    `LossConfig` for the loss fields. Raises SparrowError (one line naming the field) for a value outside its range,
    so that a bad config fails before the target loads."""

    mode: str = _opt("sparrow", "sparrow (text-only draft KV cache) or eagle (the baseline: every position)")
    ivsb: bool = _opt(True, "true/false: feed the target's visual states to the draft in training (IVSB)")
    visual_states: str = _opt("mid", "which visual states IVSB uses: mid (layer --mid-layer), top or none")
    mtp_stages: int = _opt(2, "multi-token prediction stages K (1 = plain next-token training)")
    stage_weights: list[float] | None = None
    mid_layer: int | None = _opt(None, "the target layer m of the visual states (default: half the layers)")
    position_mode: str = _opt("compact", "draft positions: compact (text positions renumbered) or absolute")
    l1_weight: float = _opt(1.0, "weight of the smooth-L1 loss on the target's top hidden state (EAGLE: 1.0)")
    ce_weight: float = _opt(0.1, "weight of the cross-entropy against the target's token (EAGLE: 0.1)")
    steps: int = _opt(1000, "optimiser steps")
    batch: int = _opt(8, "conversations per optimiser step, over all processes")
    lr: float = _opt(1e-3, "peak learning rate (AdamW; cosine to a tenth of it)")
    warmup: int = _opt(50, "linear warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(0.5, "clip the gradient norm to this")
    seed: int = _opt(0, "seed of the draft's weights and the data order")
    save_every: int = _opt(100, "checkpoint every N steps (and on SIGINT/SIGTERM)")
    num_frames: int | None = _opt(16, "at most this many frames per video, sampled uniformly")
    max_pixels: int | None = _opt(None, "resize frames to at most this many pixels (default: the target's)")
    strict_data: bool = _opt(False, "true: fail on a bad sample instead of skipping it")
    eval_samples: int = _opt(4, "held-out samples for the evaluation (0: none)")
    eval_every: int = _opt(0, "evaluate every N steps (0: only after the last)")
    eval_data: str | None = _opt(None, "JSONL of evaluation samples (default: the last --eval-samples of --data)")
    eval_max_new_tokens: int = _opt(128, "tokens generated per evaluation sample")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        choices = {"mode": MODES, "visual_states": VISUAL_STATES, "position_mode": POSITION_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SparrowError(f"{name} {getattr(self, name)!r}: choose {' or '.join(allowed)}")
        least = {"mtp_stages": 1, "steps": 1, "batch": 1, "save_every": 1, "eval_max_new_tokens": 1, "warmup": 0,
                 "eval_samples": 0, "eval_every": 0, "mid_layer": 1, "num_frames": 1, "max_pixels": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise SparrowError(f"{name} {value}: give {low} or more")
        for name in ("lr", "grad_clip"):
            if not 0 < getattr(self, name) < math.inf:
                raise SparrowError(f"{name} {getattr(self, name)}: give a positive number")
        for name in ("weight_decay", "l1_weight", "ce_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise SparrowError(f"{name} {getattr(self, name)}: give 0 or a positive number")
        if self.l1_weight == self.ce_weight == 0:
            raise SparrowError("l1_weight and ce_weight are both 0: nothing to train; give either a weight above 0")
        if self.stage_weights is not None and len(self.stage_weights) != self.mtp_stages:
            raise SparrowError(f"stage_weights {self.stage_weights}: give one weight per MTP stage "
                               f"({self.mtp_stages})")

    def loss(self) -> LossConfig:
        return LossConfig(mode=self.mode, ivsb=self.ivsb, visual_states=self.visual_states,
                          mtp_stages=self.mtp_stages,
                          stage_weights=tuple(self.stage_weights) if self.stage_weights else None,
                          position_mode=self.position_mode, l1_weight=self.l1_weight, ce_weight=self.ce_weight)


def load_config(path: str | None, overrides: dict) -> TrainConfig:
    """A `TrainConfig` from a JSON (or YAML) file, with `overrides` (the CLI's flags, None = unset) on top.
    Raises SparrowError for a missing or unreadable file, an unknown key or a value out of range."""
    raw = {}
    if path:
        if not os.path.isfile(path):
            raise SparrowError(f"{path}: no such config file")
        text = open(path).read()
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise SparrowError("reading a YAML config needs PyYAML (pip install pyyaml), or use JSON") from None
            try:
                raw = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise SparrowError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise SparrowError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise SparrowError(f"{path}: give a mapping of TrainConfig fields, like {{\"steps\": 1000}}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise SparrowError(f"unknown training config keys {sorted(unknown)}; known: {sorted(known)}")
    return TrainConfig(**raw)


def online_capture(target, s, cfg: TrainConfig, mid: int, log=None, max_new_tokens: int | None = None):
    """Run the target over one JSONL sample -> `Captured`, or None (reported; raised with strict_data) for a
    sample that cannot be used: a missing or corrupt video, or a prompt the target cannot take. With
    `max_new_tokens` the sample's answer is ignored: the target answers greedily as it is captured
    (`losses.capture_greedy`)."""
    from ..video import load_video

    try:
        video = load_video(s.video, max_frames=cfg.num_frames) if s.video else None
        inputs = target.prepare(video, s.prompt, max_pixels=cfg.max_pixels)
        if max_new_tokens:
            return capture_greedy(target, inputs, max_new_tokens, mid)[0]
        return capture(target, inputs, s.answer, mid)
    except SparrowError as e:
        if cfg.strict_data:
            raise
        print(f"sparrow: skipping sample {s.id} (line {s.line}): {e}", file=log or sys.stderr)
        return None
