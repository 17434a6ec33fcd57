"""Sparrow: lossless speculative decoding for video LLMs with text-anchored drafts (arXiv 2602.15318).

    target = sparrow.load_target(path)
    draft = sparrow.load_draft(draft_path, target)          # or sparrow.init_draft(target, seed=0)
    inputs = target.prepare(video="clip.mp4", prompt="Describe the video.", num_frames=16)
    out = sparrow.generate(target, draft, inputs, max_new_tokens=128, method="sparrow")
    out.token_ids, out.text, out.stats
"""

from .draft import DraftConfig, SparrowDraft, init_draft, load_draft
from .errors import SparrowError
from .generate import GenerateOutput, Stats, generate
from .targets import Target, load_target, wrap_model
from .tree import TreeConfig
from .video import load_video

__all__ = ["DraftConfig", "GenerateOutput", "SparrowDraft", "SparrowError", "Stats", "Target", "TreeConfig",
           "generate", "init_draft", "load_draft", "load_target", "load_video", "wrap_model"]
__version__ = "0.1.0"
