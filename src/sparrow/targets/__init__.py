"""Target adapters, one per model family, behind the `Target` interface (see base.py)."""

from .base import FAMILIES, Prefill, Target, load_target, wrap_model
from . import llava_onevision, qwen_vl  # noqa: F401  (register the families)

__all__ = ["FAMILIES", "Prefill", "Target", "load_target", "wrap_model"]
