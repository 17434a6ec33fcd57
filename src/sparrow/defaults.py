"""Where the embedded default lives: the target trained on the synthetic world, its drafts, example clips."""

from __future__ import annotations

import os

from .errors import SparrowError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TARGET = os.path.join(ASSETS, "target")
# sparrow (IVSB + MTP, text-only cache), eagle (the full-visual baseline), and the ablations no_mtp / no_ivsb
DRAFTS = {m: os.path.join(ASSETS, "drafts", m) for m in ("sparrow", "eagle", "no_mtp", "no_ivsb")}
CLIPS = os.path.join(ASSETS, "clips")
ASSISTANT = os.path.join(ASSETS, "assistant")  # a 2-layer sibling of the target for HF assisted generation


def has_target() -> bool:
    """Whether this install ships the embedded target."""
    return os.path.isfile(os.path.join(TARGET, "config.json"))


def target_path() -> str:
    """The embedded target's directory. Raises SparrowError when this install has none."""
    if not has_target():
        raise SparrowError(f"no embedded target in {TARGET}; pass --target PATH (a local HF checkpoint)")
    return TARGET


def draft_path(method: str) -> str | None:
    """The shipped draft for `method` ("sparrow" | "eagle"), or None when it is not shipped."""
    path = DRAFTS.get(method)
    return path if path and os.path.isfile(os.path.join(path, "config.json")) else None


def assistant_path() -> str | None:
    """The embedded target's small sibling (same tokenizer) for `hf-assisted`, or None when it is not shipped."""
    return ASSISTANT if os.path.isfile(os.path.join(ASSISTANT, "config.json")) else None


def example_clip(i: int = 0) -> str:
    """Path of shipped example clip `i` (0-4; its ground truth is clip{i}.json beside it)."""
    return os.path.join(CLIPS, f"clip{i}.mp4")
