"""Tiny checkpoints of every supported family, built from config with random weights (tests, benchmarks).

`make_tiny_target(out_dir, family)` writes a complete local HF checkpoint (weights, config, tokenizer with the
family's special tokens, chat template, generation config) that loads through exactly the path a real
checkpoint takes (`sparrow.load_target`). `build_tokenizer` trains a byte-level BPE (or a word-level vocabulary
for tiny-vocabulary tests) offline with the `tokenizers` library.
"""

from __future__ import annotations

import os

import torch

from .errors import SparrowError
from .targets.llava_onevision import LlavaOneVisionTarget
from .targets.qwen_vl import QwenVLTarget

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

QWEN_CHAT_TEMPLATE = QwenVLTarget.default_chat_template
LLAVA_CHAT_TEMPLATE = LlavaOneVisionTarget.default_chat_template

SAMPLE_TEXT = [
    "A red circle moves to the left while a blue square stays still.",
    "Describe the video. The green triangle appears, then it disappears behind the yellow box.",
    "How many objects are there? There are three objects: a circle, a square and a star.",
    "You are a helpful assistant. system user assistant",
    "The small purple star bounces off the wall and changes colour to orange.",
]


def build_tokenizer(texts: list[str], specials: list[str], chat_template: str, vocab_size: int = 512,
                    kind: str = "bpe"):
    """Train a tokenizer offline and wrap it as a `PreTrainedTokenizerFast`.

    Args:
        texts: training corpus.
        specials: special tokens, added first (ids 0..len-1 for "word", after the vocabulary for "bpe").
        chat_template: Jinja chat template stored with the tokenizer.
        vocab_size: target vocabulary size (BPE) or cap (word level).
        kind: "bpe" (byte-level BPE, decodes any text) or "word" (whitespace words + [UNK]: tiny vocabularies).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials + ["[UNK]"],
                                            show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:] if kind == "bpe" else specials[1:])
    fast.chat_template = chat_template
    return fast


def check_attention_shape(hidden: int, heads: int, kv_heads: int, flags: tuple[str, str, str] = (
        "heads", "kv_heads", "hidden")) -> None:
    """Check that `heads` query heads and `kv_heads` key/value heads (GQA) split `hidden` into an even head_dim of at
    least 8 (mRoPE gives time, height and width their own rotary pairs of it). `flags` names the three in the
    message. Raises SparrowError otherwise."""
    h, kv, hid = flags
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise SparrowError(f"{h} {heads} / {kv} {kv_heads}: give positive counts, {kv} dividing {h}")
    if hidden < 8 * heads or hidden % (2 * heads):
        raise SparrowError(f"{hid} {hidden}: give a multiple of {2 * heads} from {8 * heads} up ({heads} heads of an "
                           f"even size of at least 8)")


def tiny_config(family: str, vocab_size: int, tokenizer, hidden: int = 64, layers: int = 4, heads: int = 4,
                kv_heads: int = 2, vision_depth: int = 2, max_positions: int = 32768):
    """A small config of `family` ("qwen2_5_vl" | "qwen2_vl" | "llava_onevision") whose special-token ids come
    from `tokenizer`. head_dim = hidden / heads; mRoPE sections are scaled to head_dim / 2. Raises SparrowError
    unless layers >= 1 and hidden is a multiple of 2 x heads of at least 8 x heads (a draft for the target needs
    layers >= 2: it reads a middle layer)."""
    from transformers import AutoConfig

    if layers < 1:
        raise SparrowError(f"layers {layers}: give 1 or more (2 or more for a target that a draft serves)")
    check_attention_shape(hidden, heads, kv_heads)

    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // heads
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                eos_token_id=ids("<|im_end|>"), bos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
                tie_word_embeddings=False)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        half = head_dim // 2
        sec = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # [16, 24, 24] for head_dim 128
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec}
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        if family == "qwen2_5_vl":
            vision.update(out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[vision_depth - 1],
                          tokens_per_second=2)
        else:
            vision.update(embed_dim=32, mlp_ratio=2)
            vision["hidden_size"] = hidden
        cfg = AutoConfig.for_model(family, text_config=text, vision_config=vision,
                                   image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                                   vision_start_token_id=ids("<|vision_start|>"),
                                   vision_end_token_id=ids("<|vision_end|>"), eos_token_id=ids("<|im_end|>"),
                                   tie_word_embeddings=False)
    elif family == "llava_onevision":
        text["model_type"] = "qwen2"
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=14)
        cfg = AutoConfig.for_model(family, text_config=text, vision_config=vision,
                                   image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                   vision_feature_layer=-1, vision_feature_select_strategy="full",
                                   eos_token_id=ids("<|im_end|>"), tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown family {family!r}")
    return cfg


def make_tiny_target(out_dir: str, family: str = "qwen2_5_vl", seed: int = 0, kind: str = "bpe",
                     vocab_size: int = 384, init_std: float = 0.02, **config_kwargs) -> str:
    """Write a random-initialised tiny checkpoint of `family` to `out_dir` and return the path.

    `init_std` scales the initial weights (a larger value gives peakier next-token distributions: fewer
    near-ties, more realistic acceptance for tests). Other keyword arguments go to `tiny_config`.
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig

    specials = LLAVA_SPECIALS if family == "llava_onevision" else QWEN_SPECIALS
    template = LLAVA_CHAT_TEMPLATE if family == "llava_onevision" else QWEN_CHAT_TEMPLATE
    tok = build_tokenizer(SAMPLE_TEXT, specials, template, vocab_size=vocab_size, kind=kind)
    cfg = tiny_config(family, len(tok), tok, **config_kwargs)
    cfg.get_text_config().initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=cfg.get_text_config().eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
