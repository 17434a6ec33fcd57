"""LLaVA-OneVision targets (SigLIP vision tower + Qwen2 language model, 1D RoPE).

Video layout as the HF LLaVA-OneVision video processor produces it: every frame resized to the vision tower's
square `image_size` (bicubic), rescaled 1/255, normalised with mean = std = 0.5 (SigLIP);
pixel_values_videos (1, T, 3, S, S). Placeholders: T * ceil(g / 2)^2 + 1 `<video>` tokens with g = S / patch
(each frame's patch grid is pooled 2x, plus one newline embedding per video).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import SparrowError
from ..video import Video
from .base import Target, chatml_template, register_family

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

@register_family("llava_onevision")
class LlavaOneVisionTarget(Target):
    """LLaVA-OneVision (1D positions; rope_delta 0)."""

    uses_mrope = False
    family = "llava_onevision"
    default_chat_template = chatml_template("<video>\n", "<image>\n")
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

    @staticmethod
    def tiny_config(family: str, text: dict, tokenizer, vision_depth: int = 2):
        """A small random-init config around the text config `text` (`sparrow.tiny.tiny_config`): a Qwen2
        language model and a 2-layer SigLIP tower on 56 px frames."""
        from transformers import AutoConfig

        ids = tokenizer.convert_tokens_to_ids
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=14)
        return AutoConfig.for_model(family, text_config={**text, "model_type": "qwen2"}, vision_config=vision,
                                    image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                    vision_feature_layer=-1, vision_feature_select_strategy="full",
                                    eos_token_id=ids("<|im_end|>"), tie_word_embeddings=False)

    def __init__(self, model, tokenizer, path=None):
        super().__init__(model, tokenizer, path)
        vc = self.config.vision_config
        s = self.processor
        self.size = int(vc.image_size)
        self.grid = vc.image_size // vc.patch_size
        self.mean = np.array(s.get("image_mean", SIGLIP_MEAN), dtype=np.float32)
        self.std = np.array(s.get("image_std", SIGLIP_STD), dtype=np.float32)

    def preprocess_frames(self, frames: np.ndarray) -> torch.Tensor:
        """frames (T, H, W, 3) uint8 -> pixel_values_videos (1, T, 3, S, S) float32."""
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise SparrowError(f"video has zero frames (frames array of shape {frames.shape}); give a non-empty clip")
        s = self.size
        if frames.shape[1:3] != (s, s):
            frames = np.stack([np.asarray(Image.fromarray(f).resize((s, s), Image.BICUBIC)) for f in frames])
        x = (frames.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))[None]

    def resized_size(self, height: int, width: int, max_pixels: int | None = None,
                     min_pixels: int | None = None) -> tuple[int, int]:
        return self.size, self.size

    def visual_tokens(self, frames: int, height: int, width: int, max_pixels: int | None = None,
                      min_pixels: int | None = None) -> int:
        """frames x ceil(grid / 2)^2 (each frame's tokens pooled 2x2) + 1 (the newline token); the frame size does
        not matter (every frame is resized to the vision tower's size)."""
        return frames * math.ceil(self.grid / 2) ** 2 + 1

    def prepare(self, video: str | Video | np.ndarray | None = None, prompt: str = "",
                num_frames: int | None = None, fps: float | None = None, max_pixels: int | None = None,
                min_pixels: int | None = None, system: str | None = None) -> dict:
        """Build HF inputs (input_ids, attention_mask and, with a video, pixel_values_videos (1, T, 3, S, S)).
        max_pixels/min_pixels do not apply (frames are resized to the vision tower's size). See
        `QwenVLTarget.prepare` for the other arguments. Raises SparrowError for bad videos."""
        text = self.render_chat(prompt, video is not None, system)
        out = {}
        if video is not None:
            if isinstance(video, str):
                video = self.sample_video(video, num_frames, fps)
            pixels = self.preprocess_frames(video if isinstance(video, np.ndarray) else video.frames)
            count = self.visual_tokens(pixels.shape[1], self.size, self.size)
            text = self.expand_placeholder(text, self.config.video_token_index, count)
            out["pixel_values_videos"] = pixels.to(self.dtype)
        out = {**self.tokenize(text), **out}
        return {k: v.to(self.device) for k, v in out.items()}

    def prompt_positions(self, inputs: dict) -> tuple[torch.Tensor, int]:
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device).expand(3, -1), 0
