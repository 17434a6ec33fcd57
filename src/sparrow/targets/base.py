"""The target interface: everything downstream of `targets/` sees a model family only through `Target`.

A `Target` wraps a HF `...ForConditionalGeneration` model through its public forward (no copied modeling code):
- `prepare(...)` builds the exact inputs that `model.generate(**inputs)` accepts (family-specific);
- `prefill(inputs, cache)` runs the prompt with the video, returning the last logits and the top hidden states
  (optionally the middle layer m and the input embeddings, via hooks);
- `forward(tokens, depths, tree_mask, cache)` verifies a token tree in one forward pass (4D mask, explicit
  positions, mRoPE for Qwen), appending its entries to the cache; `KVCache.accept` keeps the accepted path.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from dataclasses import dataclass

import torch

from .. import cache as kv
from ..cache import KVCache, register_attention
from ..errors import SparrowError
from ..video import Video, load_video, video_info


# frame sampling when the caller gives neither a count nor a rate and the checkpoint's config says nothing: the
# conventions of HF's Qwen2-VL video processor (2 frames a second, 4 to 768 frames)
DEFAULT_SAMPLING = {"fps": 2.0, "min_frames": 4, "max_frames": 768}
CONTEXT_RESERVE = 1024  # context positions `sample_video` leaves for the prompt's text and the answer
# Settings of a checkpoint's generation_config that transformers' `generate` applies as logits processors even when
# greedy, with their neutral values; Sparrow's decoding applies none of them (`Target.unapplied_settings`). It does
# apply `repetition_penalty` (`Target.repetition_penalty`, `verify.RepetitionPenalty`).
UNAPPLIED = {"encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
             "encoder_no_repeat_ngram_size": 0, "bad_words_ids": [], "min_length": 0, "min_new_tokens": 0,
             "suppress_tokens": [], "begin_suppress_tokens": [], "sequence_bias": {}, "forced_bos_token_id": None,
             "forced_eos_token_id": None, "exponential_decay_length_penalty": None}


@dataclass
class Prefill:
    """What the target's prompt pass returns (batch 1, prompt length L, hidden size H, vocabulary V).

    logits: (V,) next-token logits at the last prompt position.
    hidden_top: (L, H) top hidden states (after the final norm: the LM head input).
    hidden_mid: (L, H) hidden states at layer m (HF `hidden_states[m]`), or None.
    input_embeds: (L, H) the language model's input embeddings (video features scattered in), or None.
    positions: (3, L) int64 target positions (3 mRoPE axes; all equal for 1D-RoPE families).
    visual_mask: (L,) bool, True at visual (video/image placeholder) positions.
    """

    logits: torch.Tensor
    hidden_top: torch.Tensor
    hidden_mid: torch.Tensor | None
    input_embeds: torch.Tensor | None
    positions: torch.Tensor
    visual_mask: torch.Tensor


def processor_settings(path: str | None) -> dict:
    """Preprocessing settings shipped with a checkpoint (video_preprocessor_config.json, then
    preprocessor_config.json), or {}: mean/std, patch sizes, pixel bounds."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        f = os.path.join(path, name) if path else None
        if f and os.path.isfile(f):
            return json.load(open(f))
    return {}


def chatml_template(video_placeholder: str, image_placeholder: str) -> str:
    """A ChatML chat template (Qwen-style, default system message) whose video/image content parts render as the
    given placeholders. Used when a checkpoint ships no template, and by the tiny test checkpoints."""
    return (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'video' %}}{video_placeholder}"
        f"{{% elif part['type'] == 'image' %}}{image_placeholder}"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def cache_kwarg(forward) -> str:
    """The name under which this transformers' model `forward` takes the KV cache: `cache` (5.2x on, where
    `past_key_values` is deprecated with a FutureWarning) or `past_key_values` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class Target:
    """A loaded target video LLM (batch size 1). Subclasses implement `prepare` and `prompt_positions`."""

    family: str = ""
    uses_mrope: bool = False
    default_chat_template: str = ""

    def __init__(self, model, tokenizer, path: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.path = path
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.processor = processor_settings(path)  # the checkpoint's video preprocessor config, or {}
        self.rope_delta = 0  # set by prefill: position of a new token = cache length + rope_delta
        self._cache_kw = cache_kwarg(model.model.forward)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ---- sizes and special tokens (all from the checkpoint's config) ----
    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def max_positions(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS ids as the target's own `generate` uses them (generation_config, else config, else tokenizer)."""
        for src in (getattr(self.model, "generation_config", None), self.config, self.text_config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
        return [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    @property
    def repetition_penalty(self) -> float:
        """The checkpoint's generation_config repetition_penalty (1.0 when unset): what `model.generate` applies
        and what `sparrow.generate` applies unless told otherwise."""
        rp = getattr(getattr(self.model, "generation_config", None), "repetition_penalty", None)
        return 1.0 if rp is None else float(rp)

    def unapplied_settings(self) -> dict:
        """The settings of the checkpoint's generation_config that transformers' `generate` applies even with
        do_sample=False and that Sparrow's decoding does not (banned n-grams or words, a minimum length...: each
        would have to be applied along every path of the draft tree, as the repetition penalty is). Their name ->
        value; {} when there are none."""
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            return {}
        return {k: getattr(gc, k) for k, neutral in UNAPPLIED.items()
                if getattr(gc, k, None) is not None and getattr(gc, k) != neutral}

    @contextlib.contextmanager
    def plain_generation_config(self):
        """Within it, `model.generation_config` holds only the checkpoint's eos, pad and bos ids: transformers'
        `generate` fills whatever a call leaves unset from it, so a call then applies what it is given and nothing
        of the checkpoint's own settings (its `unapplied_settings`, or a top_k / top_p meant for its sampling)."""
        from transformers import GenerationConfig

        own = self.model.generation_config
        pad = own.pad_token_id if own.pad_token_id is not None else (self.eos_token_ids or [None])[0]
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_token_ids, pad_token_id=pad,
                                                        bos_token_id=own.bos_token_id)
        try:
            yield
        finally:
            self.model.generation_config = own

    def hf_greedy(self, inputs: dict, max_new_tokens: int, stop: list[str] | None = None,
                  repetition_penalty: float | None = None) -> list[int]:
        """transformers' own greedy decoding of `inputs` (`model.generate`, do_sample=False), with the checkpoint's
        eos ids and repetition penalty (or `repetition_penalty`) and none of its `unapplied_settings`
        (`plain_generation_config`): the reference that Sparrow's greedy output, given the same stop strings and
        penalty, equals token for token. Returns the new token ids (eos included when it ends the answer)."""
        extra = dict(stop_strings=stop, tokenizer=self.tokenizer) if stop else {}
        rp = self.repetition_penalty if repetition_penalty is None else repetition_penalty
        with self.plain_generation_config():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      repetition_penalty=float(rp), **extra)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def visual_token_ids(self) -> list[int]:
        ids = [getattr(self.config, k, None) for k in ("video_token_id", "image_token_id", "video_token_index",
                                                       "image_token_index")]
        return sorted({i for i in ids if i is not None})

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(L,) bool: True where `input_ids` (L,) holds a visual placeholder token."""
        return torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))

    def default_mid_layer(self) -> int:
        """Layer m of the method (DECISION m = L // 2, docs/method.md section 2)."""
        return self.num_layers // 2

    # ---- family-specific ----
    def prepare(self, video=None, prompt: str = "", **kwargs) -> dict:
        """The HF forward/generate inputs (batch 1) for one video (or none) and a user prompt: input_ids (1, L),
        attention_mask (1, L) and the family's visual tensors. Each family implements it (see
        `QwenVLTarget.prepare` for the arguments). Raises SparrowError for bad videos and settings."""
        raise NotImplementedError

    def visual_tokens(self, frames: int, height: int, width: int, max_pixels: int | None = None,
                      min_pixels: int | None = None) -> int:
        """How many visual tokens `frames` frames of height x width pixels become in the prompt (after the
        family's resizing and merging, with `prepare`'s max_pixels / min_pixels). Each family implements it."""
        raise NotImplementedError

    def sampling_defaults(self) -> dict:
        """How `sample_video` samples a video when the caller gives neither a frame count nor a rate: {"fps",
        "min_frames", "max_frames"} from the checkpoint's video preprocessor config, else Qwen-VL's video processor
        conventions (2 fps, at least 4 and at most 768 frames)."""
        p = self.processor
        return {"fps": float(p.get("fps") or DEFAULT_SAMPLING["fps"]),
                "min_frames": int(p.get("min_frames") or DEFAULT_SAMPLING["min_frames"]),
                "max_frames": int(p.get("max_frames") or DEFAULT_SAMPLING["max_frames"])}

    def sample_video(self, path: str, num_frames: int | None = None, fps: float | None = None,
                     max_pixels: int | None = None, min_pixels: int | None = None,
                     reserve: int = CONTEXT_RESERVE) -> Video:
        """Decode a video file (or frame directory) and sample its frames for this target.

        `num_frames` (exact) or `fps` (a rate) when given; otherwise the checkpoint's `sampling_defaults` (a rate,
        with a minimum and a maximum frame count), further capped so that the visual tokens leave `reserve`
        positions of the context for the prompt's text and the answer. Returns a `Video` (frames (T, H, W, 3)).
        Raises SparrowError for a missing or unreadable video, or, with an explicit count or rate, a video whose
        visual tokens alone would overflow the context (checked from the header, before decoding)."""
        check = self.video_check(max_pixels, min_pixels)
        if num_frames is not None or fps is not None:
            return load_video(path, num_frames=num_frames, fps=fps, check=check)
        d = self.sampling_defaults()
        _, _, h, w = video_info(path)
        cap = d["max_frames"]
        if h > 0 and w > 0:
            budget = max(1, self.max_positions - reserve)
            while cap > 1 and self.visual_tokens(cap, h, w, max_pixels, min_pixels) > budget:
                cap = max(1, int(cap * 0.9))
        return load_video(path, fps=d["fps"], max_frames=cap, min_frames=min(d["min_frames"], cap), check=check)

    def resized_size(self, height: int, width: int, max_pixels: int | None = None,
                     min_pixels: int | None = None) -> tuple[int, int]:
        """(height, width) of a frame after the family's resizing (`prepare`'s max_pixels / min_pixels)."""
        return height, width

    def video_check(self, max_pixels: int | None = None, min_pixels: int | None = None):
        """A `check` for `load_video`: raises SparrowError when the frames to be sampled would, as visual tokens
        alone, overflow the target's context, so that a long video is refused before it is decoded."""
        def check(frames: int, height: int, width: int) -> None:
            n = self.visual_tokens(frames, height, width, max_pixels, min_pixels)
            if n > self.max_positions:
                raise SparrowError(
                    f"the video would be {n} visual tokens ({frames} frames of {width}x{height}) but the target's "
                    f"context is {self.max_positions}; sample fewer frames (--num-frames, a lower --fps, or neither "
                    f"for the checkpoint's defaults) or lower --max-pixels")
        return check

    def prompt_positions(self, inputs: dict) -> tuple[torch.Tensor, int]:
        """Target positions of the prompt, (3, L) int64, and rope_delta (new token position = index + delta)."""
        raise NotImplementedError

    def position_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """Model-ready position ids for positions pos (q,): (3, 1, q) for mRoPE families, else (1, q)."""
        return pos.view(1, 1, -1).expand(3, 1, -1) if self.uses_mrope else pos.view(1, -1)

    def chat_template(self) -> str | None:
        """The checkpoint's chat template (processor's chat_template.json/.jinja first, then the tokenizer's)."""
        if self.path:
            for name in ("chat_template.jinja", "chat_template.json"):
                f = os.path.join(self.path, name)
                if os.path.exists(f):
                    text = open(f, encoding="utf-8").read()
                    return json.loads(text)["chat_template"] if name.endswith(".json") else text
        return getattr(self.tokenizer, "chat_template", None)

    def render_chat(self, prompt: str, has_video: bool, system: str | None) -> str:
        """The prompt text from the checkpoint's chat template (one video placeholder when has_video)."""
        content = ([{"type": "video"}] if has_video else []) + [{"type": "text", "text": prompt}]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template() or
                                                  self.default_chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def expand_placeholder(self, text: str, token_id: int, count: int) -> str:
        """Repeat the single placeholder token `token_id` in `text` `count` times (one per visual token).
        Raises SparrowError when the template did not render exactly one placeholder."""
        pad = self.tokenizer.convert_ids_to_tokens(token_id)
        if text.count(pad) != 1:
            raise SparrowError(f"chat template rendered {text.count(pad)} {pad} tokens for one video; fix the template")
        return text.replace(pad, pad * count)

    def tokenize(self, text: str) -> dict:
        """input_ids and attention_mask (1, L) for the rendered prompt; checks that it fits the context."""
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        self.check_length(ids.shape[1], 0, int(self.visual_mask(ids[0]).sum()))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def check_length(self, prompt_len: int, max_new_tokens: int = 0, visual_tokens: int = 0) -> None:
        """Raises SparrowError when the prompt (`visual_tokens` of its `prompt_len` tokens from the video) plus
        `max_new_tokens` does not fit the target's context; the message gives each share and what to cut."""
        if prompt_len + max_new_tokens > self.max_positions:
            text = prompt_len - visual_tokens
            new = f" and --max-new-tokens asks for {max_new_tokens} more" if max_new_tokens else ""
            raise SparrowError(
                f"the prompt is {prompt_len} tokens ({visual_tokens} from the video, {text} of text){new}, but the "
                f"target's context is {self.max_positions}; " + ("shorten the prompt" if text > visual_tokens else
                "sample fewer frames (--num-frames, --fps) or lower --max-pixels")
                + (" or lower --max-new-tokens" if max_new_tokens else ""))

    # ---- the forward passes ----
    def new_cache(self, capacity: int) -> KVCache:
        """An empty preallocated `KVCache` for this target: `capacity` positions (prompt + tree + new tokens)."""
        return KVCache(self.num_layers, capacity)

    @torch.inference_mode()
    def prefill(self, inputs: dict, cache: KVCache, mid_layer: int | None = None,
                capture_embeds: bool = False, all_logits: bool = False) -> Prefill:
        """Run the prompt (with its video) through the target, filling `cache`.

        Args:
            inputs: the dict from `prepare` (batch 1).
            cache: an empty `KVCache` with room for the prompt.
            mid_layer: also return HF `hidden_states[mid_layer]` (the output of decoder layer mid_layer - 1).
            capture_embeds: also return the language model's input embeddings.
            all_logits: return logits (L, V) for every position instead of the last one (training uses it).
        Returns: `Prefill`. Also sets `self.rope_delta`.
        """
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise SparrowError(f"batch size must be 1, got {input_ids.shape[0]}; run one video at a time")
        positions, self.rope_delta = self.prompt_positions(inputs)
        grabbed, hooks = {}, []
        if mid_layer is not None:
            if not 1 <= mid_layer <= self.num_layers:
                raise SparrowError(f"middle layer must be in 1..{self.num_layers}, got {mid_layer}")

            def grab_mid(_mod, _args, output):
                grabbed["mid"] = (output[0] if isinstance(output, tuple) else output)[0]

            hooks.append(self.language_model.layers[mid_layer - 1].register_forward_hook(grab_mid))
        if capture_embeds:
            def grab_embeds(_mod, _args, kwargs):
                grabbed["embeds"] = kwargs["inputs_embeds"][0]

            hooks.append(self.language_model.register_forward_pre_hook(grab_embeds, with_kwargs=True))
        try:
            kwargs = {k: v for k, v in inputs.items() if k != "position_ids"}
            out = self.model.model(**kwargs, position_ids=self._prompt_position_ids(positions),
                                   **{self._cache_kw: cache}, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        hidden = out.last_hidden_state[0]
        logits = self.lm_head(hidden if all_logits else hidden[-1])
        return Prefill(logits=logits.float(), hidden_top=hidden, hidden_mid=grabbed.get("mid"),
                       input_embeds=grabbed.get("embeds"), positions=positions,
                       visual_mask=self.visual_mask(input_ids[0]))

    def _prompt_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.unsqueeze(1) if self.uses_mrope else positions[:1]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, depths: torch.Tensor | None, tree_mask: torch.Tensor | None,
                cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over q new tokens appended after the cache (decode: q = 1; verify: a token tree).

        Args:
            tokens: (q,) int64 token ids; tokens[0] is the tree root (the last accepted token).
            depths: (q,) int64 depth of each token below the root (position = cache length + depth + rope_delta);
                None means a chain (0..q-1).
            tree_mask: (q, q) bool ancestor mask (True = may attend; the diagonal is True), or None for causal.
            cache: the target `KVCache`; the q entries are appended at [n, n + q).
        Returns: logits (q, V) float32 and top hidden states (q, H).
        Source: tree attention of SpecInfer / Medusa / EAGLE (one target pass over the whole draft tree).
        """
        n, q = cache.length, tokens.shape[0]
        if depths is None:
            depths = torch.arange(q, device=tokens.device)
        pos = n + self.rope_delta + depths
        mask, split = None, {}
        if tree_mask is not None and q > 1:
            if tokens.device.type in kv.SPLIT_TREE:  # the cache without a mask, the tree block by its own
                split = {"sparrow_tree": tree_mask}
            else:
                mask = torch.ones(1, 1, q, n + q, dtype=torch.bool, device=tokens.device)
                mask[0, 0, :, n:] = tree_mask
        out = self.model.model(input_ids=tokens.view(1, q), position_ids=self.position_ids(pos),
                               attention_mask=mask, **{self._cache_kw: cache}, use_cache=True, **split)
        hidden = out.last_hidden_state[0]
        return self.lm_head(hidden).float(), hidden


FAMILIES: dict[str, type[Target]] = {}


def register_family(*model_types: str):
    """Class decorator: `load_target` builds `cls` for checkpoints whose config.json has one of `model_types`."""

    def deco(cls):
        for t in model_types:
            FAMILIES[t] = cls
        return cls

    return deco


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 fast: on CUDA when the GPU has bf16 (Ampere on); on the CPU when oneDNN has
    bf16 kernels for it (AVX-512 or AMX). On a CPU with AVX2 only (AMD Zen 2-3, Intel before Skylake-SP) oneDNN has
    none. Measured on an AMD EPYC with AVX2 (2026-12-03): a 256 x 1024 linear layer's forward and backward took 44x
    longer under bf16 autocast than in float32, the first steps of train-target's stage 1a 79 s against 3-5 s, and
    `sparrow generate` on an example clip prefilled 6.6x and decoded 2.5x slower with the target in bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    except RuntimeError:
        return False


def load_target(path: str | None = None, dtype: str | torch.dtype | None = None, device: str | None = None) -> Target:
    """Load a local HF checkpoint as a `Target`; the family is detected from config.json `model_type`.

    Args:
        path: a directory with config.json, weights (safetensors), tokenizer and chat template; None = the
            embedded default target.
        dtype: "float32" | "bfloat16" | "float16" | torch dtype; default: the checkpoint's (CPU: float32).
        device: "cpu", "cuda", ...; default cuda when available else cpu.
    Raises: SparrowError for a missing path/config, an unsupported family, an unknown dtype name or device, or a
    CUDA device where torch sees none. Prints a warning to stderr when bf16/fp16 is asked for on a CPU without
    fast kernels for it (`fast_bf16`), and a note when the checkpoint's generation_config sets what Sparrow's
    decoding does not apply (`Target.unapplied_settings`, e.g. no_repeat_ngram_size).
    """
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    if path is None:
        from ..defaults import target_path

        path = target_path()
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise SparrowError(f"{path}: no config.json there; give the directory of a HF checkpoint")
    model_type = json.load(open(cfg_path)).get("model_type")
    if model_type not in FAMILIES:
        raise SparrowError(f"{path}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SparrowError(f"device {device!r} is not known; give cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SparrowError(f"device {device!r}: this torch sees no CUDA GPU; give cpu (or leave --device unset)")
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise SparrowError(f"dtype {dtype!r} is not known; give float32, bfloat16 or float16")
        dtype = names[dtype]
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    elif dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu" \
            and not fast_bf16(torch.device("cpu")):
        print(f"sparrow: this CPU has no fast {str(dtype)[6:]} kernels (AVX2 only): the target runs several times "
              f"slower than in float32; drop --dtype to use float32", file=sys.stderr)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=register_attention())
    tokenizer = AutoTokenizer.from_pretrained(path)
    target = FAMILIES[model_type](model.to(device), tokenizer, path)
    unapplied = target.unapplied_settings()
    if unapplied:
        said = ", ".join(f"{k} {v}" for k, v in unapplied.items())
        print(f"sparrow: note: {path}'s generation_config sets {said}, which Sparrow's decoding does not apply: the "
              f"output is the target's decoding without it (as model.generate gives with it unset)", file=sys.stderr)
    return target


def wrap_model(model, tokenizer, path: str | None = None) -> Target:
    """Wrap an already-built HF model (e.g. from config, for tests) as a `Target`, switching it to the
    "sparrow" attention implementation. Raises SparrowError for an unsupported family."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise SparrowError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    model.set_attn_implementation(register_attention())
    return FAMILIES[model_type](model, tokenizer, path)
