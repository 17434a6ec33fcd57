"""Tiny checkpoints of every supported family, built from config with random weights (tests, benchmarks).

`make_tiny_target(out_dir, family)` writes a complete local HF checkpoint (weights, config, tokenizer with the
family's special tokens, chat template, generation config) that loads through exactly the path a real
checkpoint takes (`sparrow.load_target`). `build_tokenizer` trains a byte-level BPE (or a word-level vocabulary
for tiny-vocabulary tests) offline with the `tokenizers` library.
"""

from __future__ import annotations

import os

import torch

from .cli import Help
from .errors import SparrowError
from .targets import FAMILIES
from .targets.qwen_vl import QwenVLTarget

QWEN_SPECIALS = list(QwenVLTarget.special_tokens)
QWEN_CHAT_TEMPLATE = QwenVLTarget.default_chat_template

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
    """A small config of `family` (a key of `sparrow.targets.FAMILIES`), built by its adapter's `tiny_config`,
    whose special-token ids come from `tokenizer`. head_dim = hidden / heads. Raises SparrowError for an unknown
    family, or unless layers >= 1 and hidden is a multiple of 2 x heads of at least 8 x heads (a draft for the
    target needs layers >= 2: it reads a middle layer)."""
    if layers < 1:
        raise SparrowError(f"layers {layers}: give 1 or more (2 or more for a target that a draft serves)")
    check_attention_shape(hidden, heads, kv_heads)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                eos_token_id=ids("<|im_end|>"), bos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
                tie_word_embeddings=False)
    return family_class(family).tiny_config(family, text, tokenizer, vision_depth)


def family_class(family: str):
    """The adapter class of `family` (a model_type). Raises SparrowError naming the supported ones."""
    if family not in FAMILIES:
        raise SparrowError(f"family {family!r} is not supported; give one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


def make_tiny_target(out_dir: str, family: str = "qwen2_5_vl", seed: int = 0, kind: str = "bpe",
                     vocab_size: int = 384, init_std: float = 0.02, **config_kwargs) -> str:
    """Write a random-initialised tiny checkpoint of `family` to `out_dir` and return the path.

    `init_std` scales the initial weights (a larger value gives peakier next-token distributions: fewer
    near-ties, more realistic acceptance for tests). Other keyword arguments go to `tiny_config`.
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig

    cls = family_class(family)
    tok = build_tokenizer(SAMPLE_TEXT, list(cls.special_tokens), cls.default_chat_template, vocab_size=vocab_size,
                          kind=kind)
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


def main(argv=None) -> int:
    """`sparrow make-tiny`: write a tiny random checkpoint of a family (tests, benchmarks, experiments)."""
    import argparse

    ap = argparse.ArgumentParser(formatter_class=Help, prog="sparrow make-tiny",
                                 description="Write a tiny random checkpoint of a "
                                 "supported family (tests, benchmarks, experiments).")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_5_vl", help="model_type (default %(default)s)")
    ap.add_argument("--out", required=True, help="the checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default %(default)s)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size (default %(default)s)")
    ap.add_argument("--layers", type=int, default=4, help="text layers (default %(default)s)")
    a = ap.parse_args(argv)
    make_tiny_target(a.out, a.family, seed=a.seed, hidden=a.hidden, layers=a.layers)
    print(f"wrote a tiny random {a.family} checkpoint to {a.out}")
    return 0
