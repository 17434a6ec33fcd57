"""Sparrow: lossless speculative decoding for video LLMs with text-anchored drafts (arXiv 2602.15318).

    target = sparrow.load_target(path)
    draft = sparrow.load_draft(draft_path, target)          # or sparrow.init_draft(target, seed=0)
    inputs = target.prepare(video="clip.mp4", prompt="Describe the video.", num_frames=16)
    out = sparrow.generate(target, draft, inputs, max_new_tokens=128, method="sparrow")
    out.token_ids, out.text, out.stats

The names below are imported on first use, so that `import sparrow` (and the command line's --help) does not load
torch and transformers before they are needed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DraftConfig": "draft", "SparrowDraft": "draft", "init_draft": "draft", "load_draft": "draft",
    "SparrowError": "errors",
    "GenerateOutput": "decode", "generate": "decode", "Prompt": "decode", "prefill_prompt": "decode",
    "warm_up": "decode",
    "Stats": "timing",
    "Target": "targets", "load_target": "targets", "wrap_model": "targets",
    "TreeConfig": "tree",
    "load_video": "video",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:  # a submodule (sparrow.decode, sparrow.policy, ...), imported on first use
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'sparrow' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
