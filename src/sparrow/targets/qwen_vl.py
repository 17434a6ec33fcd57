"""Qwen2-VL and Qwen2.5-VL targets: video preprocessing (numpy/PIL), chat prompt, mRoPE positions.

The pixel layout reproduces the HF Qwen2-VL video processor (which needs torchvision, unavailable here):
smart_resize to multiples of patch * merge, rescale 1/255, CLIP mean/std, pad the frame count to a multiple of the
temporal patch by repeating the last frame, patches ordered (t, h/m, w/m, m, m, C, tp, p, p). One placeholder
token per merged patch: t * h * w / m^2. Qwen2.5-VL adds `second_per_grid_ts` = temporal_patch / sampled fps.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import SparrowError
from ..video import Video
from .base import Target, chatml_template, register_family

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_MIN_PIXELS = 128 * 28 * 28  # HF Qwen2-VL video processor defaults
VIDEO_MAX_PIXELS = 768 * 28 * 28

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize rule (from transformers): sides multiple of `factor`, area within [min, max] pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    try:
        return hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise SparrowError(f"frame size {height}x{width} cannot be resized for this model ({e})") from None


def _pixel_bounds(settings: dict, max_pixels: int | None, min_pixels: int | None) -> tuple[int, int]:
    """(min, max) area of a resized frame: the caller's values, else the checkpoint's processor settings, else HF's
    video defaults. Raises SparrowError for a given value below 1, or a given minimum above the maximum."""
    for flag, value in (("--max-pixels", max_pixels), ("--min-pixels", min_pixels)):
        if value is not None and value < 1:
            raise SparrowError(f"{flag} {value}: give a frame area in pixels, like 200704 (256 x 28 x 28)")
    size = settings.get("size") or {}
    lo = min_pixels or settings.get("min_pixels") or size.get("shortest_edge") or VIDEO_MIN_PIXELS
    hi = max_pixels or settings.get("max_pixels") or size.get("longest_edge") or VIDEO_MAX_PIXELS
    if min_pixels is not None and min_pixels > hi:
        raise SparrowError(f"--min-pixels {min_pixels} is above the largest frame area {int(hi)}; lower it or raise "
                           f"--max-pixels")
    return int(min(lo, hi)), int(hi)


@register_family("qwen2_vl", "qwen2_5_vl")
class QwenVLTarget(Target):
    """Qwen2-VL / Qwen2.5-VL (mRoPE with 3 axes; `rope_delta` shifts the positions of new text tokens)."""

    uses_mrope = True
    default_chat_template = chatml_template("<|vision_start|><|video_pad|><|vision_end|>",
                                            "<|vision_start|><|image_pad|><|vision_end|>")
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>")

    @staticmethod
    def tiny_config(family: str, text: dict, tokenizer, vision_depth: int = 2):
        """A small random-init config of `family` ("qwen2_vl" | "qwen2_5_vl") around the text config `text`
        (`sparrow.tiny.tiny_config`): mRoPE sections scaled to head_dim / 2, a tiny vision tower."""
        from transformers import AutoConfig

        ids = tokenizer.convert_tokens_to_ids
        hidden = text["hidden_size"]
        half = hidden // text["num_attention_heads"] // 2
        sec = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # [16, 24, 24] for head_dim 128
        text = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec}}
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        if family == "qwen2_5_vl":
            vision.update(out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[vision_depth - 1],
                          tokens_per_second=2)
        else:
            vision.update(embed_dim=32, mlp_ratio=2, hidden_size=hidden)
        return AutoConfig.for_model(family, text_config=text, vision_config=vision,
                                    image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                                    vision_start_token_id=ids("<|vision_start|>"),
                                    vision_end_token_id=ids("<|vision_end|>"), eos_token_id=ids("<|im_end|>"),
                                    tie_word_embeddings=False)

    def __init__(self, model, tokenizer, path=None):
        super().__init__(model, tokenizer, path)
        self.family = self.config.model_type
        vc = self.config.vision_config
        s = self.processor
        self.patch = int(s.get("patch_size", vc.patch_size))
        self.temporal_patch = int(s.get("temporal_patch_size", vc.temporal_patch_size))
        self.merge = int(s.get("merge_size", vc.spatial_merge_size))
        self.mean = np.array(s.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.std = np.array(s.get("image_std", CLIP_STD), dtype=np.float32)
        self.settings = s

    def resized_size(self, height: int, width: int, max_pixels: int | None = None,
                     min_pixels: int | None = None) -> tuple[int, int]:
        return self._resized(height, width, max_pixels, min_pixels)

    def _resized(self, height: int, width: int, max_pixels: int | None, min_pixels: int | None) -> tuple[int, int]:
        """A frame's (height, width) after Qwen-VL's resize within the pixel bounds (`_pixel_bounds`)."""
        lo, hi = _pixel_bounds(self.settings, max_pixels, min_pixels)
        return smart_resize(height, width, self.patch * self.merge, lo, hi)

    def preprocess_frames(self, frames: np.ndarray, max_pixels: int | None = None,
                          min_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (T, H, W, 3) uint8 -> pixel_values_videos (t*h*w, 3*tp*p*p) float32, video_grid_thw (1, 3)."""
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise SparrowError(f"video has zero frames (frames array of shape {frames.shape}); give a non-empty clip")
        rh, rw = self._resized(frames.shape[1], frames.shape[2], max_pixels, min_pixels)
        if (rh, rw) != frames.shape[1:3]:
            frames = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames])
        x = (frames.astype(np.float32) / 255.0 - self.mean) / self.std  # (T, H, W, C)
        x = x.transpose(0, 3, 1, 2)  # (T, C, H, W)
        tp, p, m = self.temporal_patch, self.patch, self.merge
        if x.shape[0] % tp:
            x = np.concatenate([x, np.repeat(x[-1:], tp - x.shape[0] % tp, axis=0)])
        gt, gh, gw = x.shape[0] // tp, rh // p, rw // p
        x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * tp * p * p)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([[gt, gh, gw]])

    def visual_tokens(self, frames: int, height: int, width: int, max_pixels: int | None = None,
                      min_pixels: int | None = None) -> int:
        """ceil(frames / temporal patch) x (resized height / (patch x merge)) x (resized width / ...), as
        `preprocess_frames` makes them."""
        rh, rw = self._resized(height, width, max_pixels, min_pixels)
        factor = self.patch * self.merge
        return -(-frames // self.temporal_patch) * (rh // factor) * (rw // factor)

    def prepare(self, video: str | Video | np.ndarray | None = None, prompt: str = "",
                num_frames: int | None = None, fps: float | None = None, max_pixels: int | None = None,
                min_pixels: int | None = None, system: str | None = None) -> dict:
        """Build the HF forward/generate inputs for one video (or none) and a user prompt.

        Args:
            video: a path (file or frame directory), a `Video`, a uint8 array (T, H, W, 3), or None (text only).
            prompt: the user's question.
            num_frames / fps: frame sampling of a path (`Target.sample_video`; neither: the checkpoint's defaults).
            max_pixels / min_pixels: bounds of each frame's area after resizing.
            system: optional system message.
        Returns: dict with input_ids (1, L), attention_mask (1, L), mm_token_type_ids (1, L) and, with a video,
            pixel_values_videos (N, C*tp*p*p), video_grid_thw (1, 3) and (Qwen2.5-VL) second_per_grid_ts (1,).
        Raises: SparrowError for bad videos and settings.
        """
        text = self.render_chat(prompt, video is not None, system)
        out = {}
        if video is not None:
            if isinstance(video, str):
                video = self.sample_video(video, num_frames, fps, max_pixels, min_pixels)
            if isinstance(video, np.ndarray):
                video = Video(frames=video, fps=2.0, indices=np.arange(len(video)), total_frames=len(video))
            pixels, grid = self.preprocess_frames(video.frames, max_pixels, min_pixels)
            text = self.expand_placeholder(text, self.config.video_token_id, int(grid.prod() // self.merge**2))
            out.update(pixel_values_videos=pixels.to(self.dtype), video_grid_thw=grid)
            if self.family == "qwen2_5_vl":
                out["second_per_grid_ts"] = torch.tensor([self.temporal_patch / video.fps])
        tok = self.tokenize(text)
        ids = tok["input_ids"]
        types = torch.zeros_like(ids)
        types[ids == self.config.video_token_id] = 2
        types[ids == self.config.image_token_id] = 1
        out = {**tok, "mm_token_type_ids": types, **out}
        return {k: v.to(self.device) for k, v in out.items()}

    def prompt_positions(self, inputs: dict) -> tuple[torch.Tensor, int]:
        ids = inputs["input_ids"]
        if inputs.get("video_grid_thw") is None and inputs.get("image_grid_thw") is None:
            return torch.arange(ids.shape[1], device=ids.device).expand(3, -1), 0
        kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                  if inputs.get(k) is not None}
        if self.family == "qwen2_vl":
            kwargs.pop("second_per_grid_ts", None)
        pos = self.model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], **kwargs)[0][:, 0]
        last = pos[:, -1]
        if bool((last != last[0]).any()):
            raise SparrowError("the prompt must end with text (the chat template's assistant header), not a video")
        # New tokens continue from the last prompt position on all three axes, as HF generate does. (transformers
        # 5.x places text after a video at start + max(h, w) / merge, so the largest video position can exceed
        # the last text position and get_rope_index's own delta, max + 1 - L, would disagree with generate.)
        return pos, int(last[0]) + 1 - ids.shape[1]
