"""Train the embedded default target: a small Qwen2.5-VL (the HF class itself) on the synthetic video world.

    python -m sparrow.synthetic.train_target --out runs/target [--steps 12000] [--minutes 85] [--resume]

Fixed seed; bf16 autocast where the device computes bf16 fast, else float32 (`--precision`, `fast_bf16`); on the
CPU or `--device cuda`, with `--workers N` processes drawing the batches (`BatchStream`); right-padded batches fed
without their padding mask (`without_padding_mask`; `--padding-mask` as the shipped stages trained) and, under the
language loss alone, as groups of similar lengths (`length_groups`; `--whole-batches` as the shipped stages
trained); a progress bar with the loss; a checkpoint (model, optimiser, step, RNG, where the batches stopped) every
`--save-every` steps and on SIGINT/SIGTERM, written atomically; `--resume` continues from the last one.
`--export DIR` writes the final model with `save_pretrained` (bf16 safetensors, config, tokenizer, chat
template, generation config) for shipping, with the description wording it was trained on (`text.WORDING_FILE`),
which the reference descriptions of `examples` and `evaluate --reading` then use.

Data: every step draws fresh clips (mostly 64-512 visual tokens: 2-32 frames, mostly at 224 px, frame rates 2-8),
each with a conversation: a detailed description (75% of clips) and 1-2 short questions, or the questions alone.
Loss on answer tokens only. Batches hold samples of similar length (see `Batcher`).

Dense vision supervision (`--aux-weight`, a training aid that is not shipped): a linear probe on the vision
encoder's merged tokens (the visual embeddings the language model reads) predicts, for every merged cell
(2 frames x 28 x 28 px), the colour, shape, size, texture and motion of the object that covers it (or "none"),
from the clip's ground truth. It gives the vision tower a per-token signal instead of the thin one that flows
back from a few attribute words of the answer, which is what limits a language-only loss on this world.

Binding supervision (`--bind-weight`, also a training aid): one attention head of the language model (head 0 of
layer `--bind-layer`) is taught, at every colour word of the text, to attend to the visual tokens of that colour,
and a probe on that layer's output at the word predicts the fetched object's attributes. The aim is that "red"
fetches the red object's tokens, and with them its shape, size and motion, which the vision tower already encodes
per token (pooled over an object's tokens, the vision probe reads shape and motion of all 62 objects of 40
held-out clips). Why it is needed: trained on one-object clips only, the language model goes from 0.38 to 0.90
teacher-forced shape accuracy (the word after a colour) within 50 steps; on the usual 1-3 object mix it stays at
0.3-0.5 over 150 steps. It reads a lone object but does not bind attributes across several.
Stages 1d to 1i of the shipped target trained with it. In the first (1900 steps, `--lr 1e-3 --warmup 100
--grounded-weight 4 --bind-weight 1`; scripts/build_embedded.sh, stage 1d), on 40 held-out clips at 512 visual
tokens, teacher-forced shape accuracy went from 0.43 to 0.94 and motion from 0.63 to 0.86, and the attribute
accuracy of greedy descriptions from 0.52 to 0.63. Over the first 200-400 steps nothing moves: the head learns to
fetch before the model learns to use it. The second (1500 steps, stage 1e: the same losses, `--seed 7 --lr 5e-4`,
fresh probes and optimiser) took the loss from 0.55 to 0.50 and attribute accuracy from 0.58 to 0.61 (200 clips
at 512 tokens) and from 0.57 to 0.59 (100 clips at 1536). Stages 1f to 1i kept it; 1g added the event probe
(`--event-weight`, see `EventLoss`), 1h time binding (`--time-weight`, see `TimeBindingLoss`), 1i the weighted
end of an object's sentence (`GROUNDED`).

Carried event supervision (`--carry-weight`, a training aid): the event probe reads at the colour word what
happens to the object, but the description decides it some words later, at the token after the object's motion
(" and" if an event follows, else "."). On stage 1k (held-out clips at 512 visual tokens, the true description
fed), the event probe's "any event" read at an object's first colour word separates the objects with and without
an event almost perfectly (AUC 0.97, 124 objects of 60 clips), while the target's own " and" against "." does it
at 0.81 (202 objects of 100 clips) and a fresh linear probe on the hidden states of the token before it at
0.58-0.76 on every layer (fit on 100 clips, tested on 50): the fact is read, then not carried to where it is
written. A second probe (`--carry-layer`) asks for the same labels at every token from the colour word to the end
of its clause (`carried_labels`), so that the word that decides can read them. Stage 1l (300 steps, layer 5) took
the probe's loss from 4.25 to 1.93 nats, yet the target's " and" against "." from AUC 0.81 to 0.77: a probe says
what should be there, not where to fetch it from. On stage 1k no head of layers 3-6 attends from a clause's tokens
to its colour word (-log of the attention mass on it: 10-39 nats per head, 4 batches of 8 clips), so the copy
supervision (`--copy-weight`, see `CopyLoss`) teaches one head of the carry layer to.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch

from ..errors import SparrowError, at_least
from ..targets.base import fast_bf16
from ..targets.qwen_vl import CLIP_MEAN, CLIP_STD
from ..tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, build_tokenizer, check_attention_shape
from ..training.trainer import stop_on_signals
from ..video import Video
from .text import DESCRIBE_PROMPTS, WORDING_FILE, describe, first_token_id, one_token_ids, questions
from .world import COLOURS, MOTIONS, SHAPES as OBJECT_SHAPES, SIZES, TEXTURES, _shape_mask, make_clip, plan_clip

TEXT = dict(hidden=256, layers=12, heads=4, kv_heads=2, intermediate=768)
VISION = dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14, temporal_patch_size=2,
              spatial_merge_size=2, window_size=112, fullatt_block_indexes=[2], tokens_per_second=2, in_channels=3)
# (frames, height, width): mostly 224 px (the evaluation's frame size: objects span several patches, which is
# what makes their shapes learnable), with other sizes, aspect ratios and lengths for variety. The last two are the
# 1.5k and 3k buckets' clips (48 and 96 frames at 224 px), which hold 3-6x the visual tokens of the longest others.
SHAPES = [(2, 224, 224), (4, 224, 224), (8, 224, 224), (16, 224, 224), (32, 224, 224), (8, 112, 112),
          (16, 112, 112), (8, 168, 168), (12, 168, 224), (32, 112, 112), (48, 224, 224), (96, 224, 224)]
MIXES = {"short": [0.08, 0.2, 0.22, 0.13, 0.02, 0.08, 0.08, 0.08, 0.06, 0.05, 0, 0],  # ~230 visual tokens a clip
         # 16- and 32-frame clips (the 0.5k bucket and beyond, where events lie several frame pairs apart) twice as
         # often: ~310 visual tokens a clip, steps about a third slower
         "long": [0.05, 0.12, 0.22, 0.25, 0.06, 0.06, 0.08, 0.06, 0.05, 0.05, 0, 0],
         # "long" with one clip in 14 of 48 or 96 frames at 224 px: from 1.5k visual tokens on, the target trained
         # on "long" loses the thread of its own sentences ("on a blac happens"); ~2x the visual tokens of "long"
         "longer": [0.047, 0.111, 0.204, 0.232, 0.056, 0.056, 0.074, 0.056, 0.047, 0.047, 0.05, 0.02],
         # only 4-frame clips at 224 px (two frame pairs, 128 visual tokens): the smallest clip in which an object
         # can appear, disappear or change colour between one frame pair and the next; an experiment's mix (with
         # --hard 1 --hard-ask alone it isolates reading one object across time), not a recipe's
         "pairs": [0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}
# frame rates drawn for a clip (uniformly). A frame pair's temporal mRoPE position steps by 2 / fps x
# tokens_per_second, so at 2 fps a 96-frame clip spans 94 positions, while a 25k-token clip at 4 fps spans 391:
# `--fps 0.5,1,2,4,8` shows the temporal rotary pairs the angles of long videos on short clips.
FPS = (2.0, 4.0, 8.0)
VOCAB = 1024
CELL = 28  # pixels per merged visual token side (patch 14 x spatial merge 2)
# Answer words that only the frames decide (attributes, counts, directions, events), weighted by --grounded-weight
# in the language loss: they are about a quarter of the answer tokens, and the template words around them would
# otherwise dominate the loss long after the model has learned them. Every alternative of a decision must be in it,
# or the weighting biases the decision: the verbs of moving as well as those of keeping still, the words that
# open the next sentence (another object, an event, or "no events"), and the token after an object's motion or
# event, which says whether (another) event of that object follows: " and" / ", then" against "." (stage 1i's
# first run weighted neither, and at step 893 left the event out in 64 of 98 one-event clips), likewise " at
# first" against "." after a colour, and " after about N seconds" against "." after an event (a free choice of
# wording, weighted both ways so that the weighting does not change how often it is written).
GROUNDED = (*COLOURS, *OBJECT_SHAPES, *SIZES, "striped", "one", "two", "three", "left", "right", "up", "down",
            "leftward", "rightward", "upward", "downward", "top", "bottom", "still", "stays", "remains", "keeps",
            "does", "stayed", "moves", "drifts", "slides", "travels", "moved", "rises", "sinks", "once",
            "appears", "shows", "disappears", "turns", "changes", "Nothing", "No", "nothing", "Yes", "A", "There", "The",
            "Then", "First", "Finally", "and", "at", "after")
GROUNDED_PUNCTUATION = (".", ",")  # written without a space before them
STATE_GROUNDED = ("the", "no")  # weighed as well in the `states` wording (`text.scene_states`), only there
ANSWER_OPENINGS = ("Yes", "No", "Nothing", "It")
AUX_CLASSES = (len(COLOURS) + 1, len(OBJECT_SHAPES) + 1, len(SIZES) + 1, len(TEXTURES) + 1, len(MOTIONS) + 1)  # 0: none
EVENT_CLASSES = (2, 2, 2, len(COLOURS))  # appears, disappears, changes colour (no / yes); the colour at the end


def grounded_ids(tokenizer) -> set[int]:
    """The token ids that --grounded-weight weighs: `GROUNDED`'s single-token words (after a space), the first piece
    of the words that open a short answer (`ANSWER_OPENINGS`: whether anything happened is decided there), and
    `GROUNDED_PUNCTUATION`."""
    return set(one_token_ids(tokenizer, GROUNDED).values()) | {first_token_id(tokenizer, w) for w in ANSWER_OPENINGS} \
        | {first_token_id(tokenizer, m) for m in GROUNDED_PUNCTUATION}


def cell_labels(truth: dict, grid: tuple[int, int, int], min_cover: float = 0.25) -> torch.Tensor:
    """Per merged visual token, the attributes of the object that covers it at the token's first frame.

    A token (2 frames x 28 x 28 px) is labelled with the object that shows over the largest part of the cell,
    if that is at least `min_cover` (sampled on a 7 x 7 grid of points; where objects overlap, the one drawn
    last is the one that shows, as in the rendered frame). Labels from coverage, unlike "the cell that holds
    the object's centre", are decidable from the pixels of the cell and its neighbours, which is what lets the
    vision tower learn them quickly.

    Args: truth: a clip's ground truth (with tracks); grid: (t, h, w) merged-token grid of the clip, frames not
        resized (sides multiples of 28).
    Returns: (t*h*w, 6) long: colour, shape, size, texture, motion indices and the object's id, 1-based, 0 where no
        object covers it.
    """
    t, h, w = grid
    lab = torch.zeros((t, h, w, len(AUX_CLASSES) + 1), dtype=torch.long)
    side = min(truth["height"], truth["width"])
    off = (np.arange(7) + 0.5) * CELL / 7
    ys = (np.arange(h)[:, None] * CELL + off[None]).reshape(-1)
    xs = (np.arange(w)[:, None] * CELL + off[None]).reshape(-1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    colours, sizes, motions = list(COLOURS), list(SIZES), list(MOTIONS)
    change = {e["object"]: e["frame"] for e in truth["events"] if e["type"] == "changes colour"}
    for g in range(t):
        f = g * (truth["num_frames"] // t)
        owner = np.full(yy.shape, -1)  # which object each sample point shows; a later object covers an earlier one
        for k, o in enumerate(truth["objects"]):
            if o["appear"] <= f < o["disappear"]:
                cx, cy = o["track"][f]
                owner[_shape_mask(o["shape"], xx, yy, cx, cy, SIZES[o["size"]] * side)] = k
        best = np.zeros((h, w))
        for k, o in enumerate(truth["objects"]):
            cover = (owner == k).reshape(h, 7, w, 7).mean((1, 3))
            sel = (cover >= min_cover) & (cover > best)
            if not sel.any():
                continue
            best = np.where(sel, cover, best)
            colour = o["final_colour"] if o["id"] in change and f >= change[o["id"]] else o["colour"]
            lab[g][torch.from_numpy(sel)] = torch.tensor([
                colours.index(colour) + 1, OBJECT_SHAPES.index(o["shape"]) + 1, sizes.index(o["size"]) + 1,
                TEXTURES.index(o["texture"]) + 1, motions.index(o["motion"]) + 1, o["id"] + 1])
    return lab.reshape(-1, lab.shape[-1])


def named_objects(colour: torch.Tensor, truth: dict) -> torch.Tensor:
    """The object that each colour word of the text names.

    Args: colour: (L,) long, `ColourWords` (1-based index in COLOURS at a colour word, else 0); truth:
        the clip's ground truth.
    Returns: (L,) long: 1 + the id of the object, at every colour word that names exactly one object (by its first
        or its last colour); 0 everywhere else (no colour word, or two objects of that colour).
    """
    out = torch.zeros_like(colour)
    names = list(COLOURS)
    for r in colour.nonzero()[:, 0].tolist():
        objs = [o for o in truth["objects"] if names[int(colour[r]) - 1] in (o["colour"], o["final_colour"])]
        if len(objs) == 1:
            out[r] = objs[0]["id"] + 1
    return out


def event_labels(named: torch.Tensor, truth: dict) -> torch.Tensor:
    """What happens, over the whole clip, to the object that each colour word of the text names.

    Args: named: (L,) long, `named_objects`; truth: the clip's ground truth.
    Returns: (L, 4) long: whether the object appears, disappears, changes colour (0 / 1 each) and the 0-based
        index of its colour at the end, where `named` names an object; -1 everywhere else.
    """
    out = torch.full((named.shape[0], len(EVENT_CLASSES)), -1)
    objects = {o["id"]: o for o in truth["objects"]}
    for r in named.nonzero()[:, 0].tolist():
        o = objects[int(named[r]) - 1]
        kinds = {e["type"] for e in truth["events"] if e["object"] == o["id"]}
        out[r] = torch.tensor([int("appears" in kinds), int("disappears" in kinds), int("changes colour" in kinds),
                               list(COLOURS).index(o["final_colour"])])
    return out


def track_labels(truth: dict, cells: torch.Tensor) -> torch.Tensor:
    """What each merged visual token's object has done up to that token's time: the facts a visual token can
    know in a causal language model, which sees the clip's earlier frames but not its later ones.

    Args: truth: a clip's ground truth; cells: (N, 6) `cell_labels` of its N merged visual tokens, whose colour is
        the object's colour at the token's first frame (a colour change always picks another colour).
    Returns: (N, 3) long: whether the object was absent from the clip's first frame (it appeared), whether it has
        changed colour by the token's first frame (0 / 1 each), and the 0-based index of its first colour, at
        every token an object covers; -1 everywhere else.
    """
    out = torch.full((cells.shape[0], 3), -1)
    covered = cells[:, 5] > 0
    if covered.any():
        objects = sorted(truth["objects"], key=lambda o: o["id"])  # ids are 0, 1, ...: row k is object k
        appeared = torch.tensor([int(o["appear"] > 0) for o in objects])
        first = torch.tensor([list(COLOURS).index(o["colour"]) for o in objects])
        obj = cells[covered, 5] - 1
        out[covered] = torch.stack([appeared[obj], (cells[covered, 0] - 1 != first[obj]).long(), first[obj]], 1)
    return out


def end_labels(truth: dict) -> torch.Tensor:
    """The objects the clip's last frame shows, as (colour at the end, shape) pairs: (len(COLOURS) *
    len(OBJECT_SHAPES),) float multi-hot, for the probe at <|vision_end|> (`TrackLoss`)."""
    out = torch.zeros(len(COLOURS) * len(OBJECT_SHAPES))
    last = truth["num_frames"] - 1
    for o in truth["objects"]:
        if o["appear"] <= last < o["disappear"]:
            out[list(COLOURS).index(o["final_colour"]) * len(OBJECT_SHAPES) + OBJECT_SHAPES.index(o["shape"])] = 1
    return out


def carry_sources(event: torch.Tensor, ids: torch.Tensor, colour: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """The colour word whose object each token of a description's clause is about: from the token after a colour
    word that names one object up to the token before its clause ends. In "The large orange circle stays still and
    disappears", " circle" to " still" point at " orange"; the output at " still" writes " and" (an event follows)
    or "." (none). Read by `carried_labels` and `CopyLoss`.

    Args: event: (L, 4) long, `event_labels` (-1: no label); ids: (L,) long token ids; colour: (L,) long,
        `ColourWords`; stops: (S,) long, the ids that end a clause (" and", ",", ".", "?", <|im_end|>).
    Returns: (L,) long, the row of the clause's colour word at each token after it and before the first stop or
        the next colour word; -1 everywhere else (the colour words themselves included).
    """
    out = torch.full_like(ids, -1)
    stop = torch.isin(ids, stops) | (colour > 0)
    for c in (event[:, 0] >= 0).nonzero()[:, 0].tolist():
        j = c + 1
        while j < ids.shape[0] and not stop[j]:
            out[j] = c
            j += 1
    return out


def carried_labels(event: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`event_labels` carried from each colour word that names one object to the tokens of its clause after it
    (`carry_sources`), for the probe of `--carry-weight` (see `EventLoss`).

    Args: event: (L, 4) long, `event_labels`; source: (L,) long, `carry_sources`.
    Returns: (L, 4) long: the label of the clause's colour word at each token that `source` points from; -1
        everywhere else.
    """
    out = torch.full_like(event, -1)
    out[source >= 0] = event[source[source >= 0]]
    return out


def clause_named(named: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`named_objects` carried from each colour word to the tokens of its clause (`carry_sources`): the object
    each colour word and each clause token is about, where `--time-clause` asks the time binding to fetch it.

    Args: named: (..., L) long, `named_objects` (0: none); source: (..., L) long, `carry_sources` (-1: none).
    Returns: (..., L) long: `named`, and at every token that `source` points from, the clause's object (1 + id).
    """
    out = named.clone()
    sel = source >= 0
    out[sel] = named.gather(-1, source.clamp(min=0))[sel]
    return out


class VisionProbe(torch.nn.Module):
    """Linear probe on the merged visual tokens: (N, hidden) features and (N, 6) `cell_labels` -> loss.

    The loss is the cross-entropy of "which colour, or no object" over every token plus the cross-entropy of
    shape, size, texture and motion over the tokens an object covers (most tokens are background; averaging
    the attributes over all of them would drown the few that carry an object).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)  # the embeddings' scale is the LM's
        self.head = torch.nn.Linear(hidden, sum(AUX_CLASSES))

    def logits(self, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.head(self.norm(feats.float())).split(AUX_CLASSES, dim=-1)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        logits, obj = self.logits(feats), labels[:, 0] > 0
        loss = ce(logits[0], labels[:, 0])
        if obj.any():
            loss = loss + sum(ce(lg[obj], labels[obj, k]) for k, lg in enumerate(logits) if k > 0)
        return loss


def corpus(n: int = 4000) -> list[str]:
    """Text of the world (descriptions, questions, answers, prompts) to train the tokenizer on."""
    out = list(DESCRIBE_PROMPTS) + ["You are a helpful assistant."]
    for s in range(n):
        rng = np.random.default_rng(10**6 + s)
        truth = plan_clip(rng, 16)
        truth["background"] = "gray" if s % 2 else "dark green"
        for e in truth["events"]:
            e["time_s"] = e["frame"] / 4
        out.append(describe(truth, s))
        out += [q + " " + a for q, a in questions(truth, s)]
    return out


def set_mrope_section(text_config, section: list[int]) -> None:
    """Set a Qwen2.5-VL text config's mRoPE split (rotary pairs of time, height, width; time takes the highest
    frequencies). Raises SparrowError unless the three sum to head_dim / 2."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if sum(section) != head_dim // 2:
        raise SparrowError(f"--mrope-section {','.join(map(str, section))}: the pairs must sum to head_dim / 2 = "
                           f"{head_dim // 2}")
    text_config.rope_parameters = {**text_config.rope_parameters, "mrope_section": list(section)}


def build_model(tokenizer, seed: int, mrope_section: list[int] | None = None, **shape):
    """A fresh `Qwen2_5_VLForConditionalGeneration` of the embedded target's shape (TEXT, with any of its keys
    overridden by `shape`, e.g. layers=2 or heads=8, kv_heads=4; VISION; mRoPE: head_dim / 8 rotary pairs for time,
    the rest of the head_dim / 2 split between height and width (8, 12, 12 at head_dim 64), unless `mrope_section`
    says otherwise) for `tokenizer`'s vocabulary and special tokens, initialised from `seed`."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    t = {**TEXT, **shape}
    head_dim = t["hidden"] // t["heads"]
    pairs = head_dim // 2  # rotary pairs, split between time, height and width
    text = dict(vocab_size=len(tokenizer), hidden_size=t["hidden"], intermediate_size=t["intermediate"],
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                num_key_value_heads=t["kv_heads"], max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0,
                                 "mrope_section": [head_dim // 8, (pairs - head_dim // 8) // 2,
                                                   pairs - head_dim // 8 - (pairs - head_dim // 8) // 2]},
                eos_token_id=ids("<|im_end|>"), bos_token_id=ids("<|endoftext|>"),
                pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)
    cfg = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config={**VISION, "out_hidden_size": TEXT["hidden"]},
                               image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                               vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                               eos_token_id=ids("<|im_end|>"), tie_word_embeddings=False)
    if mrope_section is not None:
        set_mrope_section(cfg.text_config, mrope_section)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                                               do_sample=False)
    return model


def grow_depth(model, layers: int):
    """The same target with `layers` text layers, computing exactly the same function: the new layers are spread
    evenly through the stack, each a copy of the layer below it whose two output projections (attention `o_proj`,
    MLP `down_proj`) are zero, so that it adds nothing to the residual stream until it has trained. Vision tower,
    embeddings, final norm and head are kept as they are.

    Why: the world's hardest facts (which of two or three objects appears, disappears or changes colour) stayed
    where they were over stages 1l-1z, and a stage that drew more of one kind of hard scene gained there what it
    lost on the others; more layers test whether the 12-layer target had run out of room. Stage 2a (1x grown to 16
    layers, then 600 steps at lr 3e-4) scored +0.001 +- 0.006 against 1x on 600 held-out clips up to 3k visual
    tokens: not at that much training.

    Args: model: a `Qwen2_5_VLForConditionalGeneration` (float32, on the CPU); layers: the new depth, at least its
    present one. Returns: a new model (same class, config with `num_hidden_layers` and `layer_types` grown).
    Raises: ValueError when `layers` is smaller than the present depth.
    """
    import copy

    text = model.config.text_config
    old = text.num_hidden_layers
    if layers < old:
        raise ValueError(f"grow_depth: {layers} layers is fewer than the model's {old}; give {old} or more")
    if layers == old:
        return model
    extra = layers - old
    after = [max(0, (m + 1) * old // extra - 1) for m in range(extra)]  # the old layer below each new one
    cfg = copy.deepcopy(model.config)
    cfg.text_config.num_hidden_layers = layers
    if getattr(cfg.text_config, "layer_types", None):
        cfg.text_config.layer_types = [cfg.text_config.layer_types[0]] * layers
    grown = type(model)(cfg).to(torch.float32)
    source = []  # for each new layer: (old layer it copies, whether it is a new zero-output copy)
    for i in range(old):
        source.append((i, False))
        source += [(i, True)] * after.count(i)
    state = model.state_dict()
    prefix = "model.language_model.layers."
    new_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for j, (i, fresh) in enumerate(source):
        for k, v in state.items():
            if k.startswith(f"{prefix}{i}."):
                name = k[len(f"{prefix}{i}."):]
                zero = fresh and (name.startswith("self_attn.o_proj.") or name.startswith("mlp.down_proj."))
                new_state[f"{prefix}{j}.{name}"] = torch.zeros_like(v) if zero else v.clone()
    grown.load_state_dict(new_state, strict=True)
    grown.generation_config = model.generation_config
    return grown


HARD_KINDS = ("multi-event", "multi", "colour-change")  # what `is_hard` and --hard-kind take
HARD_ASK = ("after", "alone")  # where a hard clip's per-object questions go (`Batcher`, --hard-ask)
PAIRS_ASK = ("alone", "describe")  # what a --pairs clip is asked (`Batcher`, --pairs-ask)


def is_hard(plan: dict, kind: str = "multi-event") -> bool:
    """A scene whose events the target gets wrong most: two or more objects ("multi") and at least one event
    ("multi-event"). Stage 1k, on 200 held-out clips at 512 visual tokens, wrote the events of 0.73 of the
    one-object one-event clips right, but of 0.12 of those with two objects and none of those with three (it
    mostly left the event out). "multi" keeps the events as often as the world draws them (a target trained on
    "multi-event" clips writes more events, in clips without any too). "colour-change": any scene with an object
    that changes colour. On 200 held-out clips at 512 visual tokens, stage 1x scored the 53 clips with a colour
    change at 0.62 (attributes) against 0.86 for the others; it counted a lone object that changes colour as two
    (the second one "appears") in 4 of 8 clips, and every lone object that appears or disappears as one (22).
    Raises: ValueError for another kind."""
    if kind not in HARD_KINDS:
        raise ValueError(f"is_hard: kind {kind!r} is not one of {HARD_KINDS}")
    if kind == "colour-change":
        return any(e["type"] == "changes colour" for e in plan["events"])
    return len(plan["objects"]) >= 2 and (kind == "multi" or len(plan["events"]) >= 1)


class ColourWords:
    """The colour words of a tokenized text, for `named_objects` and the binding losses.

    `ColourWords(tokenizer)(ids)`: ids (L,) long -> (L,) long, at each colour word of the text (not "dark green", a
    background) the colour's 1-based index in COLOURS (the numbering of `cell_labels`), else 0.
    """

    def __init__(self, tokenizer):
        colours = one_token_ids(tokenizer, COLOURS)
        self.ids = {colours[c]: k + 1 for k, c in enumerate(COLOURS) if c in colours}
        self.dark = one_token_ids(tokenizer, ["dark"]).get("dark")  # "dark green" names a background

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.tensor([self.ids.get(t, 0) for t in ids.tolist()])
        if self.dark is not None:
            out[1:][ids[:-1] == self.dark] = 0
        return out


class Batcher:
    """Draws training samples and batches them.

    A sample is a clip (in memory) and a conversation about it: a detailed description (75%) then 1 to
    `max_questions` short questions, or the questions alone; the loss covers every answer. Follow-up questions
    add supervised tokens at a small cost next to the clip's visual tokens, and each one ties an attribute to
    the frames directly.

    `hard`: that share of the clips of 4 frames or more is drawn again until `is_hard(plan, hard_kind)`, and each
    of its objects' own events is asked ("What happens to the red circle?"): after the other turns
    (`hard_ask="after"`), where a description before it may already state the answer, or as the only turns
    (`hard_ask="alone"`), the first right after the video, so that every answer has to be read from the frames.

    `pairs`: each batch also holds that many clips at 224 px of `pairs_frames` frames (drawn uniformly; 4 frames:
    two frame pairs, 128 visual tokens) with two or three objects and an event, asked only their objects' own events
    (the clips of `--mix pairs --hard 1 --hard-ask alone`), or, with `pairs_ask="describe"`, only asked to describe
    the video (the usual prompts and description), drawn after the pool's other clips; their answer tokens
    count `pairs_weight` times in `answer_loss` (the batch's "row_weight"). With `pairs=0` the draws are those of
    earlier stages.

    `fps`: the frame rates a clip is drawn at, uniformly (`FPS`, the shipped stages' three, by default); the rate
    sets how far apart the frame pairs' temporal mRoPE positions lie.

    Batches are cut from pools of `pool` batches sorted by length, so that a batch's samples have similar
    lengths and little of the step is spent on padding. The state (`state()` / `restore()`) is the RNG state
    at the start of the current pool and the position in it, so a resumed run draws the same batches.
    """

    def __init__(self, target, seed: int, max_questions: int = 2, pool: int = 4, mix: str = "short",
                 events_first: bool = False, colour_last: bool = False, restate: str = "", size_last: bool = False,
                 hard: float = 0.0, hard_kind: str = "multi-event", states: bool = False, track: bool = False,
                 fps: tuple[float, ...] = FPS, hard_ask: str = "after", pairs: int = 0, pairs_weight: float = 1.0,
                 pairs_frames: tuple[int, ...] = (4,), pairs_ask: str = "alone"):
        self.t, self.shape_p, self.hard, self.hard_kind = target, MIXES[mix], hard, hard_kind
        if hard_ask not in HARD_ASK:
            raise ValueError(f"Batcher: hard_ask {hard_ask!r} is not one of {HARD_ASK}")
        self.hard_ask = hard_ask
        if pairs < 0 or pairs_weight <= 0:
            raise ValueError(f"Batcher: pairs {pairs} must be 0 or more and pairs_weight {pairs_weight} positive")
        if not pairs_frames or any(f < 4 or f % 2 for f in pairs_frames):
            raise ValueError(f"Batcher: pairs_frames {pairs_frames} must be even frame counts of 4 or more")
        self.pairs, self.pairs_weight, self.pairs_frames = pairs, float(pairs_weight), [int(f) for f in pairs_frames]
        if pairs_ask not in PAIRS_ASK:
            raise ValueError(f"Batcher: pairs_ask {pairs_ask!r} is not one of {PAIRS_ASK}")
        self.pairs_ask = pairs_ask
        self.fps = [float(f) for f in fps]  # frame rates drawn, uniformly; the default draws as every shipped stage
        self.track = track  # also give `track_labels` and `end_labels` ("track", "end"), for `TrackLoss`
        self.wording = dict(events_first=events_first, colour_last=colour_last, restate=restate,
                            size_last=size_last)  # see `describe`
        if states:  # recorded only when on, so that the earlier stages' exports keep their wording file
            self.wording["states"] = True
        self.rng = np.random.default_rng(seed)
        self.max_questions, self.pool = max_questions, pool
        self.queue: list[list[dict]] = []
        tok = target.tokenizer
        # the state sentences' "shows the red circle" against "shows no object": both weigh
        extra = set(one_token_ids(tok, STATE_GROUNDED).values()) if states else set()
        self.grounded = torch.tensor(sorted(grounded_ids(tok) | extra))
        self.colour_words = ColourWords(tok)
        self.stops = torch.tensor(sorted({first_token_id(tok, w) for w in (" and", ",", ".", "?")}
                                         | {tok.convert_tokens_to_ids("<|im_end|>")}))
        self.pool_state, self.pool_pos = self.rng.bit_generator.state, 0

    def sample(self, pair: bool = False) -> dict:
        """One clip and its conversation; `pair`: one of the `pairs` clips (`pairs_frames` frames at 224 px, 2-3
        objects and an event; its objects' own events asked alone, or its description, as `pairs_ask` says)."""
        rng = self.rng
        if pair:  # one frame count draws nothing (the draws of --pairs before --pairs-frames)
            k = int(rng.integers(len(self.pairs_frames))) if len(self.pairs_frames) > 1 else 0
            frames, h, w = self.pairs_frames[k], 224, 224
        else:
            frames, h, w = SHAPES[rng.choice(len(SHAPES), p=self.shape_p)]
        fps = float(rng.choice(self.fps))
        seed = int(rng.integers(2**31))
        hard = pair or (self.hard > 0 and frames >= 4 and rng.random() < self.hard)
        kind = "multi-event" if pair else self.hard_kind
        while hard and not is_hard(plan_clip(np.random.default_rng(seed), frames), kind):
            seed = int(rng.integers(2**31))  # make_clip draws the same plan from the same seed first
        clip = make_clip(seed, frames, h, w, fps=fps)
        qa = questions(clip.truth, seed)
        order = rng.permutation(len(qa))[:int(rng.integers(1, self.max_questions + 1))]
        turns = [(str(rng.choice(DESCRIBE_PROMPTS)), describe(clip.truth, seed, **self.wording))] \
            if rng.random() < 0.75 else []
        turns += [qa[int(k)] for k in order]
        own = [(q, a) for q, a in qa if q.startswith("What happens to the")]
        if pair and self.pairs_ask == "describe":  # the description alone: the events written where objects are named
            turns = [(str(rng.choice(DESCRIBE_PROMPTS)), describe(clip.truth, seed, **self.wording))]
        elif hard and (pair or self.hard_ask == "alone"):  # its objects' own events, the first right after the video
            turns = [own[int(k)] for k in rng.permutation(len(own))]
        elif hard:  # every object's own events asked as well (a few text tokens next to the clip's visual ones)
            turns += [(q, a) for q, a in own if (q, a) not in turns]
        video = Video(frames=clip.frames, fps=fps, indices=np.arange(frames), total_frames=frames)
        inputs = self.t.prepare(video, turns[0][0], max_pixels=h * w, min_pixels=h * w)
        inputs = {k: v.cpu() for k, v in inputs.items()}  # samples are drawn on the CPU, whatever the model's device
        ids, labels = [inputs["input_ids"][0]], [torch.full_like(inputs["input_ids"][0], -100)]
        for i, (question, answer) in enumerate(turns):
            if i:  # a follow-up question in the same conversation (ChatML, as the chat template renders it)
                q = self.t.tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)["input_ids"]
                ids.append(torch.tensor(q))
                labels.append(torch.full((len(q),), -100))
            a = torch.tensor(self.t.tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
            ids.append(a)
            labels.append(torch.cat((a[:-1], torch.tensor([-100]))))  # answer + <|im_end|>, not the newline
            # (labels line up with ids; the HF loss shifts them)
        ids, labels = torch.cat(ids), torch.cat(labels)
        grid = inputs["video_grid_thw"]
        cells = cell_labels(clip.truth, (int(grid[0, 0]), int(grid[0, 1]) // 2, int(grid[0, 2]) // 2))
        colour = self.colour_words(ids)
        named = named_objects(colour, clip.truth)
        event = event_labels(named, clip.truth)
        source = carry_sources(event, ids, colour, self.stops)
        tracks = {"track": track_labels(clip.truth, cells), "end": end_labels(clip.truth)} if self.track else {}
        return {"ids": ids, "labels": labels, "pixels": inputs["pixel_values_videos"], "grid": grid,
                "sgt": inputs["second_per_grid_ts"], "cells": cells,
                "grounded": (labels >= 0) & torch.isin(labels, self.grounded), "colour": colour,
                "named": named, "event": event, "carry": carried_labels(event, source), "source": source,
                "weight": self.pairs_weight if pair else 1.0, **tracks}

    def state(self) -> dict:
        return {"pool_state": self.pool_state, "pool_pos": self.pool_pos}

    def restore(self, state: dict, size: int) -> None:
        """Continue where `state()` was taken: redraw that pool and skip the batches already served."""
        self.rng.bit_generator.state = state["pool_state"]
        self.queue = []
        for _ in range(state["pool_pos"]):
            self.batch(size)

    def batch(self, size: int) -> dict:
        if not self.queue:
            self.pool_state, self.pool_pos = self.rng.bit_generator.state, 0
            samples = sorted((self.sample() for _ in range(size * self.pool)), key=lambda s: s["ids"].shape[0])
            chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
            order = self.rng.permutation(len(chunks))
            if self.pairs:  # drawn last, so that the other clips and their batches are those drawn without them
                extra = [self.sample(pair=True) for _ in range(self.pairs * len(chunks))]
                chunks = [c + extra[k * self.pairs:(k + 1) * self.pairs] for k, c in enumerate(chunks)]
            self.queue = [chunks[int(k)] for k in order]
        self.pool_pos += 1
        samples = self.queue.pop()
        size = len(samples)  # `size` + `pairs`
        L = max(s["ids"].shape[0] for s in samples)
        pad = self.t.tokenizer.pad_token_id
        ids = torch.full((size, L), pad)
        labels = torch.full((size, L), -100)
        mask = torch.zeros((size, L), dtype=torch.long)
        grounded = torch.zeros((size, L), dtype=torch.bool)
        colour = torch.zeros((size, L), dtype=torch.long)
        named = torch.zeros((size, L), dtype=torch.long)
        event = torch.full((size, L, len(EVENT_CLASSES)), -1)
        carry = torch.full((size, L, len(EVENT_CLASSES)), -1)
        source = torch.full((size, L), -1)
        for i, s in enumerate(samples):
            n = s["ids"].shape[0]
            ids[i, :n], labels[i, :n], mask[i, :n], grounded[i, :n] = s["ids"], s["labels"], 1, s["grounded"]
            colour[i, :n], named[i, :n], event[i, :n], carry[i, :n] = s["colour"], s["named"], s["event"], s["carry"]
            source[i, :n] = s["source"]
        types = (ids == self.t.config.video_token_id).long() * 2
        return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, "labels": labels,
                "pixel_values_videos": torch.cat([s["pixels"] for s in samples]),
                "video_grid_thw": torch.cat([s["grid"] for s in samples]),
                "second_per_grid_ts": torch.cat([s["sgt"] for s in samples]),
                "cells": torch.cat([s["cells"] for s in samples]), "grounded": grounded, "colour": colour,
                "named": named, "event": event, "carry": carry, "source": source,
                "row_weight": torch.tensor([float(s["weight"]) for s in samples]),
                **({"track": torch.cat([s["track"] for s in samples]), "end": torch.stack([s["end"] for s in samples])}
                   if self.track else {})}


class _Draws(torch.utils.data.IterableDataset):
    """One `Batcher` per DataLoader worker (`make(worker)`), started at `states[worker]` where given; yields
    (worker, the Batcher's state after the batch, batch) for ever."""

    def __init__(self, make, size: int, states: list):
        self.make, self.size, self.states = make, size, states

    def __iter__(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's: it checkpoints, then ends
        w = torch.utils.data.get_worker_info().id
        batcher = self.make(w)
        if self.states[w] is not None:
            batcher.restore(self.states[w], self.size)
        while True:
            batch = batcher.batch(self.size)
            yield w, batcher.state(), batch


class BatchStream:
    """Batches drawn by `workers` processes next to the training step, for a GPU, whose step takes less time than
    drawing a batch on one core (rendering, preprocessing and tokenising 8 clips of about 300 visual tokens:
    about 0.2 s). Worker w draws with its own `Batcher` (`make(w)`), and the batches are served in turn (worker 0,
    1, ..., 0, ...), so a run with the same seed and number of workers draws the same batches, and `state()` (each
    worker's Batcher state after its last batch served) resumes exactly: `BatchStream(make, size, workers,
    state)`, with the `state()` of a stream of as many workers. The workers are forked when the stream is made:
    make it while the model is still on the CPU.
    """

    def __init__(self, make, size: int, workers: int, state: dict | None = None):
        self.states = list((state or {}).get("workers") or [None] * workers)
        loader = torch.utils.data.DataLoader(_Draws(make, size, self.states), batch_size=None, num_workers=workers,
                                             prefetch_factor=4, persistent_workers=True)
        self.it = iter(loader)

    def batch(self, size: int) -> dict:
        w, state, batch = next(self.it)
        self.states[w] = state
        return batch

    def state(self) -> dict:
        return {"workers": list(self.states)}


def _keep_attention_input(saved: dict):
    """A forward pre-hook (with_kwargs) for a text layer's attention that keeps its input (B, L, hidden) as
    saved["x"] and its rotary embeddings (cos, sin) as saved["pe"], for `_head_qk`."""
    def keep(module, args, kwargs):
        saved["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        saved["pe"] = kwargs["position_embeddings"]
    return keep


def _keep_layer_output(saved: dict):
    """A forward hook for a decoder layer that keeps its output hidden states (B, L, hidden) as saved["out"]."""
    def keep(module, args, output):
        saved["out"] = output[0] if isinstance(output, tuple) else output
    return keep


def _head_qk(attn, x: torch.Tensor, pe: tuple, head: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of one attention head as the layer computes them: x (B, L, hidden) the layer's input,
    pe its (cos, sin) -> q, k (B, 1, L, head_dim) each, after the projections and mRoPE."""
    d, kv = attn.head_dim, head // attn.num_key_value_groups
    qs, ks = slice(head * d, (head + 1) * d), slice(kv * d, (kv + 1) * d)
    q = torch.nn.functional.linear(x, attn.q_proj.weight[qs], attn.q_proj.bias[qs])
    k = torch.nn.functional.linear(x, attn.k_proj.weight[ks], attn.k_proj.bias[ks])
    return rope(q[:, None], k[:, None], *pe)


def _fetch_loss(logits: torch.Tensor, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log(the attention mass on `target`): logits (words, L) of one head at text rows `rows` (words,) over every
    key, target (words, L) bool; the causal mask is applied here, as in the real softmax."""
    logits = logits.masked_fill(torch.arange(logits.shape[1], device=logits.device)[None] > rows[:, None], -1e9)
    return torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~target, -1e9), 1)


class _HeadSupervision:
    """What the attention supervisions share: a forward pre-hook on text layer `layer`'s attention keeps its input
    (B, L, hidden) and rotary embeddings in `saved`, from which `_head_qk` recomputes a head's queries and keys;
    `remove` detaches every hook in `hooks`."""

    def __init__(self, model, layer: int):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        self.block = model.model.language_model.layers[layer]
        self.attn, self.rope, self.saved = self.block.self_attn, apply_rotary_pos_emb, {}
        self.hooks = [self.attn.register_forward_pre_hook(_keep_attention_input(self.saved), with_kwargs=True)]

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self.hooks:
            h.remove()
        self.saved.clear()


class BindingLoss(_HeadSupervision):
    """Attention supervision for one head of the language model (a training aid; nothing of it is shipped).

    A forward pre-hook on layer `layer`'s attention keeps its input (B, L, hidden) and rotary embeddings; after
    the forward, `__call__` recomputes head `head`'s queries and keys exactly as the layer does (projections,
    mRoPE) and, at each colour word, takes the cross-entropy of "attend to a visual token of this colour":
    -log(the head's attention mass, over every earlier token as in the real softmax, on the visual tokens whose
    `cell_labels` colour is the word's). Colour words with no visual token of their colour are skipped. A linear
    probe (as `VisionProbe`) on the layer's output at the colour word then predicts the fetched object's
    attributes (the most common `cell_labels` of the matching tokens), so that the fetch carries the object into
    the word's residual stream, where the next words (shape, motion) are read from.
    """

    def __init__(self, model, layer: int, head: int = 0):
        super().__init__(model, layer)
        self.head = head
        self.hooks.append(self.block.register_forward_hook(_keep_layer_output(self.saved)))
        self.probe = VisionProbe(model.config.text_config.hidden_size)  # reads the fetched object at the word

    def __call__(self, input_ids: torch.Tensor, colour: torch.Tensor, cells: torch.Tensor,
                 video_token: int) -> torch.Tensor:
        """input_ids, colour (B, L) (colour: `ColourWords`), cells (N, 6) `cell_labels` of the batch's
        N visual tokens in order -> scalar loss (0 when the batch has no colour word with a matching visual token)."""
        a = self.attn
        x, pe = self.saved.pop("x"), self.saved.pop("pe")
        q, k = _head_qk(a, x, pe, self.head, self.rope)
        vis_cells = torch.zeros(input_ids.shape + (cells.shape[1],), dtype=torch.long,
                                device=input_ids.device)  # 0 off the visual tokens
        vis_cells[input_ids == video_token] = cells
        out = self.saved.pop("out")
        losses, words, labels = [], [], []
        for b in range(input_ids.shape[0]):
            rows = colour[b].nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            logits = (q[b, 0, rows].float() @ k[b, 0].float().T) * a.scaling  # (words, L): every key, as the head
            match = vis_cells[b, :, 0][None] == colour[b, rows][:, None]  # (words, L): visual tokens of the colour
            ok = match.any(1)
            if ok.any():
                losses.append(_fetch_loss(logits[ok], rows[ok], match[ok]))
                for r, m in zip(rows[ok].tolist(), match[ok]):  # the fetched object's attributes: the mode
                    words.append(out[b, r])
                    labels.append(vis_cells[b, m].mode(0).values)
        if not losses:
            return torch.zeros(())
        return torch.cat(losses).mean() + self.probe(torch.stack(words), torch.stack(labels))


class TimeBindingLoss(_HeadSupervision):
    """Attention supervision for two heads of one text layer (a training aid, not shipped): at each colour word
    that names exactly one object (`named_objects`), head `heads[0]` learns to attend to that object's visual
    tokens in the clip's first temporal group and head `heads[1]` to those in its last group, each to
    <|vision_start|> where the object is not there (not come yet, or gone).

    Why: the vision tower sees each pair of frames alone and attention values carry no position, so whether an
    object appears, disappears or changes colour is read only by a head that picks the object's tokens at one
    time. With one head on the start and one on the end, the layer's output at the word holds the object as it
    was first and last seen, or nothing: appears, disappears and the colour after a change become a readout of
    it, which `EventLoss` (on the same layer) asks for. The probe alone, without this (layer 3, from the stage-1f
    target: stage 1g), stayed at or above the labels' prior entropy (about 1.6 nats) for 800 steps and ended at
    1.47 after 2000. With this loss too (weight 1, 1000 steps from stage 1g) the probe reached 1.09, yet greedy
    event order on 200 held-out clips at 512 visual tokens stayed at 0.50 (attributes 0.706 against 0.71). Stage
    1h kept it for 1500 more steps, on descriptions that name objects in `object_order`: attributes 0.75, event
    order 0.485 (the probe's loss about 0.8 nats); the gain came with the order, not with the events.
    With `--time-clause` the rows also include every token of the object's clause (`clause_named`), up to the word
    that says whether an event follows; stage 1n (300 steps from 1k, not shipped) took the loss from 4.6 to 0.86
    nats, yet that word's " and" against "." kept an AUC of 0.81 and attribute accuracy at 512 visual tokens fell
    from 0.781 to 0.761.

    Args: model: the Qwen2.5-VL model; layer: text layer; heads: (first, last) query heads of that layer.
    Call: input_ids, named (B, L), cells (N, 6) `cell_labels` of the batch's N visual tokens in order, grid
        (B, 3) video_grid_thw, video_token and start_token ids -> scalar loss (0 without a named object).
    """

    def __init__(self, model, layer: int, heads: tuple[int, int] = (0, 2)):
        super().__init__(model, layer)
        self.heads = heads

    @staticmethod
    def targets(input_ids: torch.Tensor, named: torch.Tensor, cells: torch.Tensor, grid: torch.Tensor,
                video_token: int, start_token: int) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Where the two heads should look: per sample b with a named object, (b, rows (words,), first (words, L),
        last (words, L)): the text rows of the named colour words and, for each, the keys of the object in the
        first / last temporal group, or <|vision_start|> alone where there are none."""
        when = []  # per visual token: 1 in the clip's first temporal group, 2 in its last, 3 when it has one group
        for t, h, w in grid.tolist():
            hw = (h // 2) * (w // 2)
            idx = torch.arange(t * hw, device=input_ids.device)
            when.append((idx < hw).long() + 2 * (idx >= (t - 1) * hw).long())
        vis_obj, vis_when = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
        video = input_ids == video_token
        vis_obj[video], vis_when[video] = cells[:, 5], torch.cat(when)
        out = []
        for b in range(input_ids.shape[0]):
            rows = named[b].nonzero()[:, 0]
            start = (input_ids[b] == start_token).nonzero()[:, 0]
            if rows.numel() == 0 or start.numel() == 0:
                continue
            pair = []
            for bit in (1, 2):
                target = (vis_obj[b][None] == named[b, rows][:, None]) & ((vis_when[b] & bit) > 0)[None]
                target[~target.any(1), start[0]] = True  # not there at that time: <|vision_start|>
                pair.append(target)
            out.append((b, rows, *pair))
        return out

    def __call__(self, input_ids: torch.Tensor, named: torch.Tensor, cells: torch.Tensor, grid: torch.Tensor,
                 video_token: int, start_token: int) -> torch.Tensor:
        x, pe = self.saved.pop("x"), self.saved.pop("pe")
        todo = self.targets(input_ids, named, cells, grid, video_token, start_token)
        if not todo:
            return torch.zeros(())
        qk = [_head_qk(self.attn, x, pe, h, self.rope) for h in self.heads]
        losses = []
        for b, rows, *targets in todo:
            for (q, k), target in zip(qk, targets):
                logits = (q[b, 0, rows].float() @ k[b, 0].float().T) * self.attn.scaling  # (words, L): every key
                losses.append(_fetch_loss(logits, rows, target))
        return torch.cat(losses).mean()


class CopyLoss(_HeadSupervision):
    """Attention supervision for one head of one text layer (a training aid, not shipped): at every token of a
    clause about one object (`carry_sources`), head `head` of layer `layer` learns to attend to the clause's colour
    word, where the layer below has read what happens to the object (`EventLoss`).

    Why: the event probe reads at the colour word whether the object appears, disappears or changes colour (stage
    1k: AUC 0.97), but the description writes it at the token after the object's motion, and there the model's
    own " and" against "." separates the objects with and without an event at only 0.81. A probe asking for the
    labels at every token of the clause (`--carry-weight` on layer 5, stage 1l, 300 steps) took that to 0.77:
    the probe says what should be there, not where to fetch it from. This says where: one head, one key.
    Stage 1m (300 steps from 1k, `--carry-layer 4 --copy-weight 0.5 --copy-head 3`, lr 3e-4, not shipped) took
    this loss from 16.1 to 0.08 nats (the head puts about 0.9 of its attention on the colour word), but the event
    did not come with it: the carried probe reads "any event" at the token before the decision at AUC 0.75 (60
    clips at 512 visual tokens; the event probe at the colour word: 0.99), the target's " and" against "." at
    0.75, and greedy attribute accuracy fell from 0.78 to 0.75 (200 clips at 512). Extended to 600 steps and
    stopped at 506: 0.775, 0.78 and 0.747.

    Args: model: the Qwen2.5-VL model; layer: text layer (the one above the event probe's, so that its input at
        the colour word holds the event); head: query head of that layer.
    Call: source (B, L) long, `carry_sources` (-1: none) -> scalar loss, the mean over the pointing tokens of
        -log(the head's attention mass on the colour word); 0 without any.
    """

    def __init__(self, model, layer: int, head: int = 0):
        super().__init__(model, layer)
        self.head = head

    def __call__(self, source: torch.Tensor) -> torch.Tensor:
        x, pe = self.saved.pop("x"), self.saved.pop("pe")
        if not (source >= 0).any():
            return torch.zeros(())
        q, k = _head_qk(self.attn, x, pe, self.head, self.rope)
        losses = []
        for b in range(source.shape[0]):
            rows = (source[b] >= 0).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            logits = (q[b, 0, rows].float() @ k[b, 0].float().T) * self.attn.scaling  # (words, L): every key
            target = torch.zeros_like(logits, dtype=torch.bool)
            target[torch.arange(rows.numel(), device=rows.device), source[b, rows]] = True
            losses.append(_fetch_loss(logits, rows, target))
        return torch.cat(losses).mean()


class EventLoss(torch.nn.Module):
    """Event supervision (a training aid, not shipped): a linear probe on text layer `layer`'s output at each
    colour word predicts what happens to the object the word names over the whole clip (`event_labels`).

    Why: the vision tower sees each pair of frames alone and attention values carry no position, so whether an
    object appears, disappears or changes colour exists only once some head of the language model compares the
    object's visual tokens across time. Trained on the description alone, that comparison is decided at one word
    of the event sentence, long after the object was named, and the stage-1f target got the event order of 34%
    of clips right (200 clips at 512 visual tokens). The probe asks for it where the object is first named, so
    that the event sentence can copy it from there, as the binding supervision does for shape and motion.
    The shipped target's last stage (1g: 2000 steps, `--event-weight 1 --event-layer 3`) trained with it: the
    probe's loss stayed at about the labels' prior entropy (1.6 nats) for 800 steps and ended at 1.47, and on the
    same 200 clips event order went from 0.34 to 0.49 and attribute accuracy from 0.65 to 0.71 (no control run
    without the probe, so the gain is not split between the probe and the extra steps).

    Args: model: the Qwen2.5-VL model; layer: the text layer whose output (B, L, hidden) the probe reads.
    Call: (B, L, 4) labels (-1: no label) after the model's forward -> scalar loss (0 without labels).
    """

    def __init__(self, model, layer: int):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.head = torch.nn.Linear(hidden, sum(EVENT_CLASSES))
        self.saved: dict = {}
        self.hook = model.model.language_model.layers[layer].register_forward_hook(_keep_layer_output(self.saved))

    def remove(self) -> None:
        """Detach the hook from the model."""
        self.hook.remove()
        self.saved.clear()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        out, sel = self.saved.pop("out"), labels[..., 0] >= 0
        if not sel.any():
            return torch.zeros(())
        logits = self.head(self.norm(out[sel].float())).split(EVENT_CLASSES, dim=-1)
        return sum(torch.nn.functional.cross_entropy(lg, labels[sel][:, k]) for k, lg in enumerate(logits))


class TrackLoss(torch.nn.Module):
    """Track supervision (a training aid, not shipped): two linear probes on text layer `layer`'s output.

    At every visual token an object covers, one predicts what that object has done up to the token's time
    (`track_labels`: it appeared, it has changed colour, its first colour); at <|vision_end|> the other predicts
    which objects the last frame shows (`end_labels`). Why: the vision tower sees each pair of frames alone, and
    from a text token far after the video the temporal section of mRoPE (the highest frequencies) cannot single out
    the first or the last frames. A visual token can: it sees the earlier frames of its object a few positions
    back, and <|vision_end|> sits right after the last frames. Once these facts are in the visual tokens' own
    states, a colour word fetches them with the object, by content alone.
    Stage 2c (900 steps from 1x, `--track-weight 1 --track-layer 3`; not shipped) refuted it: on 60 held-out clips
    at 512 visual tokens the trained probes read "it appeared" at AUC 0.77 and "it has changed colour" at 0.89 on
    the visual tokens of scenes of two or three objects (a lone object: 1.00 and 0.92), and which of the scene's
    objects the last frame shows at 0.80; the descriptions wrote hardly more of those scenes' events (16 of 72
    appearances against 9, the colour changes and disappearances as rarely as before; docs/embedded_target.md, 2c).

    Args: model: the Qwen2.5-VL model; layer: the text layer whose output (B, L, hidden) the probes read.
    Call: input_ids (B, L), every row with one video; track (N, 3) `track_labels` of the batch's N visual tokens in
        order; end (B, K) `end_labels`; the video and <|vision_end|> token ids; after the model's forward -> scalar
        loss: the three cross-entropies plus 8 x the mean binary cross-entropy of the K end classes.
    """

    def __init__(self, model, layer: int):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.head = torch.nn.Linear(hidden, 2 + 2 + len(COLOURS))
        self.end = torch.nn.Linear(hidden, len(COLOURS) * len(OBJECT_SHAPES))
        torch.nn.init.constant_(self.end.bias, math.log(2 / (len(COLOURS) * len(OBJECT_SHAPES) - 2)))  # ~2 shown
        self.saved: dict = {}
        self.hook = model.model.language_model.layers[layer].register_forward_hook(_keep_layer_output(self.saved))

    def remove(self) -> None:
        """Detach the hook from the model."""
        self.hook.remove()
        self.saved.clear()

    def forward(self, input_ids: torch.Tensor, track: torch.Tensor, end: torch.Tensor, video_token: int,
                end_token: int) -> torch.Tensor:
        out = self.saved.pop("out")
        vis = self.norm(out[input_ids == video_token].float())  # (N, hidden), the batch's visual tokens in order
        sel = track[:, 0] >= 0
        loss = torch.zeros((), device=out.device)
        if sel.any():
            logits = self.head(vis[sel]).split((2, 2, len(COLOURS)), dim=-1)
            loss = sum(torch.nn.functional.cross_entropy(lg, track[sel][:, k]) for k, lg in enumerate(logits))
        at = (input_ids == end_token).float().argmax(1)  # (B,) the <|vision_end|> of each row
        stop = self.norm(out[torch.arange(out.shape[0], device=out.device), at].float())
        return loss + 8 * torch.nn.functional.binary_cross_entropy_with_logits(self.end(stop), end)


def answer_weights(labels: torch.Tensor, grounded: torch.Tensor, weight: float,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L - 1) float: how much each next-token prediction counts in `answer_loss` (0: not scored); `rows` (B,)
    multiplies each row's (the `Batcher` batch's "row_weight": `pairs_weight` on its pairs clips)."""
    w = (labels[:, 1:] >= 0).float() * (1 + (weight - 1) * grounded[:, 1:].float())
    return w if rows is None else w * rows.to(w.dtype)[:, None]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, grounded: torch.Tensor, weight: float,
                total: float | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens, (B, L, V) logits and (B, L) labels (-100: not scored,
    aligned with the inputs), where the tokens flagged in `grounded` (B, L) count `weight` times and row b's
    `rows[b]` times ((B,), default 1). Divided by the rows' own total weight, or by `total` (the whole batch's, when
    these rows are one of its `length_groups`, so that the groups' losses add up to the batch's)."""
    w = answer_weights(labels, grounded, weight, rows)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].clamp(min=0),
                                           reduction="none")
    return (ce * w).sum() / (w.sum().clamp(min=1) if total is None else max(total, 1.0))


GROUP_OVERHEAD = 300  # tokens: what one more forward costs, in padded tokens of work (measured on 2 CPU cores)


def length_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Split a batch's rows into groups that run as separate forwards, each padded only to its own longest row:
    the split of the rows, taken in order of length, that minimises the padded tokens (rows x longest row, summed
    over groups) plus `overhead` per group. A batch of the `longer` mix holds a 3k-token clip beside 300-600-token
    ones, and padding all of them to 3k makes most of the step's work padding.
    Returns: lists of row indices, shortest rows first; one group of every row when splitting saves nothing."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for i in range(1, n + 1):  # best[i]: the cheapest split of the i shortest rows
        for j in range(i):
            cost = best[j] + (i - j) * lengths[order[i - 1]] + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i:
        groups.append(order[cut[i]:i])
        i = cut[i]
    return groups[::-1]


def row_group(batch: dict, rows: list[int]) -> dict:
    """The model inputs and loss targets of some rows of a Batcher batch (which has an attention_mask: it gives each
    row's length), cut to their longest row: input_ids, attention_mask, mm_token_type_ids, labels, grounded
    (R, L'), their row_weight (R,), and those rows' videos (pixel_values_videos, video_grid_thw,
    second_per_grid_ts). One video per row, in row order."""
    length = int(batch["attention_mask"][rows].sum(1).max())
    sizes = batch["video_grid_thw"].prod(1).tolist()  # patches of each row's video
    starts = [0] + list(np.cumsum(sizes))
    index = torch.tensor(rows)
    out = {k: batch[k][index, :length] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels",
                                                    "grounded")}
    out["row_weight"] = batch["row_weight"][index]
    out["pixel_values_videos"] = torch.cat([batch["pixel_values_videos"][starts[r]:starts[r + 1]] for r in rows])
    out["video_grid_thw"] = batch["video_grid_thw"][index]
    out["second_per_grid_ts"] = batch["second_per_grid_ts"][index]
    return out


def without_padding_mask(batch: dict) -> dict:
    """`batch` without its (B, L) `attention_mask`, which a right-padded batch does not need: under causal attention
    no real token attends to a pad after it, the pads come after every real token's mRoPE position, and
    `answer_loss` scores no pad. So the loss and its gradients are those of the masked forward, up to rounding
    (bf16: about 0.3% of the gradient's norm), while sdpa, given no mask, takes its fused causal kernel instead of
    writing out every masked score: a step on 8 clips of 3k visual tokens takes half the time on 2 CPU cores.
    Raises SparrowError if some row is padded on the left (a 1 after a 0 in the mask)."""
    mask = batch["attention_mask"]
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise SparrowError("a training batch is padded on the left; the Batcher pads on the right, which the "
                           "unmasked forward needs (or train with --padding-mask)")
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def lr_at(step: int, total: int, peak: float, warmup: int = 300) -> float:
    """Learning rate at step `step` of `total`: linear warm-up to `peak`, then cosine to 0.1 x peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def save_checkpoint(run: str, model, opt, step: int, batcher: Batcher, log: list, probe=None,
                    bind_probe=None, event_probe=None, carry_probe=None, track_probe=None) -> None:
    """Atomic: write to a temporary directory, then rename over the previous checkpoint."""
    tmp, final = os.path.join(run, "ckpt.tmp"), os.path.join(run, "ckpt")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "probe": probe.state_dict() if probe is not None else None,
                "bind_probe": bind_probe.state_dict() if bind_probe is not None else None,
                "event_probe": event_probe.state_dict() if event_probe is not None else None,
                "carry_probe": carry_probe.state_dict() if carry_probe is not None else None,
                "track_probe": track_probe.state_dict() if track_probe is not None else None,
                "batcher": batcher.state(), "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "log.json"), "w") as f:
        json.dump(log, f)
    old = os.path.join(run, "ckpt.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def video_preprocessor_config() -> dict:
    """The frame sizes the target is trained on, as a Qwen2-VL video processor config (what a real checkpoint ships
    in video_preprocessor_config.json): frames are resized to an area within [112^2, 224^2] pixels. Without it the
    Qwen default bounds ([128, 768] x 28^2 pixels) would scale a 224 x 224 clip up to 336 x 336, a frame size the
    target never saw, with 2.25x the visual tokens."""
    lo, hi = min(h * w for _, h, w in SHAPES), max(h * w for _, h, w in SHAPES)
    return {"video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": lo, "max_pixels": hi,
            "size": {"shortest_edge": lo, "longest_edge": hi}, "patch_size": VISION["patch_size"],
            "temporal_patch_size": VISION["temporal_patch_size"], "merge_size": VISION["spatial_merge_size"],
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True}


def export(model, tokenizer, out: str, wording: dict | None = None, shard_mb: int | None = None) -> None:
    """save_pretrained in bf16 (the shipped default stays small), with the tokenizer, the video preprocessor
    config (`video_preprocessor_config`) and the description wording it was trained on (`describe`'s options, in
    `text.WORDING_FILE`, read back by `text.target_wording`); loads back in fp32 on CPU. `shard_mb` splits the
    weights into safetensors files of at most that many megabytes (HF's sharded format, which `load_target`
    reads as it reads one file): for carrying an export off a machine that limits the size of a file."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, **({"max_shard_size": f"{shard_mb}MB"} if shard_mb else {}))
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "video_preprocessor_config.json"), "w") as f:
        json.dump(video_preprocessor_config(), f, indent=2)
    with open(os.path.join(tmp, WORDING_FILE), "w") as f:
        json.dump(wording or {}, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv=None):
    from tqdm import tqdm

    import sparrow

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="run directory (checkpoints, tokenizer, log)")
    ap.add_argument("--steps", type=int, default=12000, help="steps of the learning-rate schedule (see --until)")
    ap.add_argument("--batch", type=int, default=8, help="clips per step")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the clips drawn")
    ap.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this wall time")
    ap.add_argument("--until", type=int, default=None,
                    help="stop (and checkpoint) at this step, the learning-rate schedule still planned for --steps "
                         "(a resumable stage of a longer recipe, reproducible where --minutes is not)")
    ap.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (and on SIGINT/SIGTERM)")
    ap.add_argument("--resume", action="store_true", help="go on from --out's checkpoint")
    ap.add_argument("--export", help="write the trained model here (save_pretrained, bf16)")
    ap.add_argument("--export-shard-mb", type=int, default=None, metavar="MB",
                    help="split the exported weights into files of at most MB megabytes (default: one file)")
    ap.add_argument("--layers", type=int, default=TEXT["layers"],
                    help="text layers (the default target: 12; its small sibling for HF assisted generation: 2)")
    ap.add_argument("--heads", type=int, default=TEXT["heads"],
                    help="a new model's attention heads per text layer (default %(default)s, of head_dim hidden / "
                         "heads); more heads of a smaller head_dim give a layer more attention patterns at the same "
                         "parameter count")
    ap.add_argument("--kv-heads", type=int, default=TEXT["kv_heads"],
                    help="a new model's key/value heads per text layer (GQA; default %(default)s; must divide "
                         "--heads)")
    ap.add_argument("--tokenizer", help="reuse this tokenizer directory (e.g. the target's, for a sibling model)")
    ap.add_argument("--aux-weight", type=float, default=1.0,
                    help="weight of the dense vision supervision (per-token object attributes; 0 turns it off)")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="first train only the vision tower and the probe for this many steps (about 4x cheaper "
                         "than a full step), so that the language model then reads features that already carry "
                         "the objects; counted in --steps")
    ap.add_argument("--grounded-weight", type=float, default=1.0,
                    help="weight, in the language loss, of the answer words that only the frames decide (colours, "
                         "shapes, sizes, counts, directions, events; see GROUNDED); 1 is the plain loss")
    ap.add_argument("--bind-weight", type=float, default=0.0,
                    help="weight of the binding supervision (one attention head learns to fetch, at each colour word, "
                         "the visual tokens of that colour; see BindingLoss); 0 turns it off")
    ap.add_argument("--bind-layer", type=int, default=1,
                    help="the text layer whose head 0 the binding supervision trains")
    ap.add_argument("--event-weight", type=float, default=0.0,
                    help="weight of the event supervision (a probe on a text layer at each colour word predicts "
                         "whether that object appears, disappears or changes colour; see EventLoss); 0 turns it off")
    ap.add_argument("--event-layer", type=int, default=3,
                    help="the text layer the event probe reads and whose heads 0 and 2 --time-weight trains")
    ap.add_argument("--carry-weight", type=float, default=0.0,
                    help="weight of the carried event supervision (a probe on --carry-layer at each token between a "
                         "colour word and the end of its clause predicts what happens to that object, so that the "
                         "word that says whether an event follows can read it; see carried_labels); 0 turns it off")
    ap.add_argument("--carry-layer", type=int, default=5,
                    help="the text layer the carried event probe reads (and whose head --copy-head --copy-weight "
                         "teaches)")
    ap.add_argument("--copy-weight", type=float, default=0.0,
                    help="weight of the copy supervision (at each token between a colour word and the end of its "
                         "clause, head --copy-head of --carry-layer attends to the colour word; see CopyLoss); 0 "
                         "turns it off")
    ap.add_argument("--copy-head", type=int, default=0, help="the query head that --copy-weight teaches")
    ap.add_argument("--time-weight", type=float, default=0.0,
                    help="weight of the time binding (at each colour word, one head of --event-layer fetches the "
                         "object as first seen, one as last seen; see TimeBindingLoss); 0 turns it off")
    ap.add_argument("--time-clause", action="store_true",
                    help="apply the time binding also at every token of an object's clause after its colour word "
                         "(`clause_named`), up to the word that says whether an event follows, so that layer "
                         "--event-layer reads the event there itself rather than through a copy")
    ap.add_argument("--track-weight", type=float, default=0.0,
                    help="weight of the track supervision (probes on --track-layer: at each visual token, what its "
                         "object has done so far; at <|vision_end|>, what the last frame shows; see TrackLoss); 0 "
                         "turns it off")
    ap.add_argument("--track-layer", type=int, default=3, help="the text layer the track probes read")
    ap.add_argument("--events-first", action="store_true",
                    help="describe each object's own events right after its name, before its motion (see "
                         "`describe`): an experiment, not the shipped wording")
    ap.add_argument("--colour-last", action="store_true",
                    help="name objects colour last ('a large circle in red'; see `describe`); with --events-first the "
                         "output at the colour word says whether the object has an event: an experiment")
    ap.add_argument("--restate", choices=("mention", "one"), default="",
                    help="end each object's sentence by naming it again colour last ('the large circle in red' or "
                         "'the one in red'), then its events or 'stays in view' (see `describe`), so that the output "
                         "at that colour word says whether the object has an event: an experiment")
    ap.add_argument("--size-last", action="store_true",
                    help="give an object's size and texture after its shape ('a red circle, large and striped,'; see "
                         "`describe`), so that its colour, the word that fetches it, is its first word: an experiment")
    ap.add_argument("--states", action="store_true",
                    help="after the opening, say what the frame shows at first and at the end (see "
                         "`scene_states`), which the objects' events then follow from: an experiment")
    ap.add_argument("--mix", choices=sorted(MIXES), default="short",
                    help="clip lengths drawn: short (mostly 4-8 frames), long (16-32 frames twice as often), "
                         "longer (long plus 48- and 96-frame clips at 224 px) or pairs (only 4 frames at 224 px, "
                         "an experiment's)")
    ap.add_argument("--init-probes", metavar="STATE_PT",
                    help="start the probes (--aux/--bind/--event-weight; not part of an exported target) from this "
                         "checkpoint of an earlier stage (RUN/ckpt/state.pt) instead of random weights, whose "
                         "large early losses would otherwise jolt the model while they learn")
    ap.add_argument("--hard", type=float, default=0.0,
                    help="this share of the clips (of 4 frames or more) is drawn again until its scene is of "
                         "--hard-kind (`is_hard`), each object's own events asked as well")
    ap.add_argument("--hard-kind", choices=HARD_KINDS, default="multi-event",
                    help="what --hard draws: 2-3 objects and an event, 2-3 objects with the world's own events, or "
                         "a scene with a colour change")
    ap.add_argument("--hard-ask", choices=HARD_ASK, default="after",
                    help="a --hard clip's per-object questions: after the description and questions (where the "
                         "description may already state the answer) or alone, the first right after the video")
    ap.add_argument("--pairs", type=int, default=0,
                    help="each batch also holds this many clips at 224 px (--pairs-frames frames, cheap: 128 visual "
                         "tokens at 4 frames) of 2-3 objects and an event, asked as --pairs-ask says, beside --batch "
                         "clips of --mix")
    ap.add_argument("--pairs-frames", default="4",
                    help="the --pairs clips' frame counts, comma-separated, drawn uniformly (4: two frame pairs)")
    ap.add_argument("--pairs-ask", choices=PAIRS_ASK, default="alone",
                    help="what a --pairs clip is asked: its objects' own events alone, or to describe the video")
    ap.add_argument("--pairs-weight", type=float, default=1.0,
                    help="how many times the --pairs clips' answer tokens count in the language loss (their answers "
                         "are short: a few tokens against a description's hundred)")
    ap.add_argument("--device", default="cpu",
                    help="where the model trains: cpu (the shipped target's stages), cuda, cuda:N or auto (cuda when "
                         "there is one); clips are drawn on the CPU")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="bf16: under bf16 autocast, as the shipped stages trained; fp32: in float32; auto (default): "
                         "bf16 where the device computes it fast (`fast_bf16`: a GPU, a CPU with AVX-512 or AMX), "
                         "else fp32 (on an AVX2-only CPU, bf16 autocast makes a step about 40x slower)")
    ap.add_argument("--workers", type=int, default=0,
                    help="draw batches in this many processes next to the step (`BatchStream`; for a GPU); 0: in the "
                         "training process, the stream of the shipped stages; a run resumes with the same number")
    ap.add_argument("--padding-mask", action="store_true",
                    help="give the language model the batch's padding mask, as every shipped stage trained (to rerun "
                         "one bit for bit); by default the right-padded batch goes unmasked (`without_padding_mask`: "
                         "the same loss up to rounding, up to twice as fast on long clips)")
    ap.add_argument("--whole-batches", action="store_true",
                    help="run each batch as one forward padded to its longest clip, as every shipped stage trained; by "
                         "default, when the language loss is the only loss (--aux-weight 0, no other probe), a batch "
                         "runs as `length_groups`, each padded to its own longest clip: the same gradient up to "
                         "rounding, a step of the longer mix in about half the time")
    ap.add_argument("--warmup", type=int, default=300, help="linear warm-up steps of the learning rate")
    ap.add_argument("--log-every", type=int, default=50,
                    help="log the smoothed losses every N steps (RUN_DIR/ckpt/log.json, saved with each checkpoint)")
    ap.add_argument("--init", help="start from these weights (an exported target, e.g. to continue training the "
                                   "shipped one with a fresh optimiser) instead of a random initialisation")
    ap.add_argument("--mrope-section", default=None, metavar="T,H,W",
                    help="rotary pairs of time, height and width (summing to head_dim / 2; default 8,12,12 for a new "
                         "model, the --init model's own otherwise). Time takes the highest frequencies: 16,8,8 gives "
                         "it lower ones, which a text token can aim at the first or last frames with "
                         "(scripts/mrope_time_reach.py); for a text token the three are equal, so an --init model "
                         "computes its text as before")
    ap.add_argument("--fps", default=",".join(f"{f:g}" for f in FPS), metavar="F,F,...",
                    help="frame rates a clip is drawn at (uniformly; default %(default)s, every shipped stage's); a "
                         "lower rate spreads the same frames over more temporal mRoPE positions (at 0.5 fps a "
                         "96-frame clip spans 376, a 25k-token clip at 4 fps 391)")
    ap.add_argument("--grow-layers", type=int, default=None, metavar="N",
                    help="with --init: first deepen the model to N text layers, the new ones spread through the "
                         "stack and starting as identities (see grow_depth)")
    a = ap.parse_args(argv)
    section = None
    if a.mrope_section is not None:
        try:
            section = [int(x) for x in a.mrope_section.split(",")]
        except ValueError:
            section = []
        if len(section) != 3 or min(section) < 1:
            raise SparrowError(f"--mrope-section {a.mrope_section!r}: give three positive pair counts like 16,8,8")
    try:
        fps = tuple(float(x) for x in a.fps.split(","))
    except ValueError:
        fps = ()
    if not fps or not all(0 < f < float("inf") for f in fps):  # (a NaN fails the comparison too)
        raise SparrowError(f"--fps {a.fps!r}: give positive frame rates separated by commas, like 0.5,1,2,4,8")
    for flag, path, need in (("--init", a.init, "config.json"), ("--tokenizer", a.tokenizer, "tokenizer_config.json")):
        if path is not None and not os.path.isfile(os.path.join(path, need)):
            raise SparrowError(f"{flag} {path}: no {need} there; give an exported target's directory (a stage's "
                               f"--export)")
    at_least(1, ("--steps", a.steps), ("--until", a.until), ("--batch", a.batch))
    if a.grow_layers is not None and not a.init:
        raise SparrowError("--grow-layers deepens the model of --init; give --init DIR too (or --layers N for a "
                           "new model)")
    check_attention_shape(TEXT["hidden"], a.heads, a.kv_heads, ("--heads", "--kv-heads", "the hidden size"))
    if a.init and (a.heads, a.kv_heads) != (TEXT["heads"], TEXT["kv_heads"]):
        raise SparrowError("--heads and --kv-heads shape a new model; --init keeps its model's own heads (drop them)")
    if a.restate and a.events_first:
        raise SparrowError("--restate and --events-first both place the object's events; pass one of them")
    if a.size_last and a.colour_last:
        raise SparrowError("--size-last and --colour-last both reorder an object's name; pass one of them")
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    except RuntimeError:
        raise SparrowError(f"--device {a.device} is not a device; give cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparrowError(f"--device {a.device}, but torch sees no CUDA device here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SparrowError(f"--device {a.device}: train on cpu or cuda")
    bf16 = a.precision == "bf16" or (a.precision == "auto" and fast_bf16(device))
    if a.precision == "auto" and not bf16:
        print(f"train-target: {device.type} has no fast bf16 here; training in float32 (--precision bf16 to force it)")
    if a.workers < 0:
        raise SparrowError(f"--workers {a.workers}: give 0 (draw in the training process) or more")
    if not 0 <= a.hard <= 1:
        raise SparrowError(f"--hard {a.hard} is not a share; give a number from 0 to 1")
    try:
        pairs_frames = tuple(int(f) for f in a.pairs_frames.split(","))
    except ValueError:
        raise SparrowError(f"--pairs-frames {a.pairs_frames!r}: give frame counts, e.g. 4,8,16") from None
    if any(f < 4 or f % 2 for f in pairs_frames):
        raise SparrowError(f"--pairs-frames {a.pairs_frames}: give even frame counts of 4 or more (an event lies "
                           f"between two frame pairs)")
    if a.pairs < 0 or a.pairs_weight <= 0:
        raise SparrowError(f"--pairs {a.pairs} / --pairs-weight {a.pairs_weight}: give 0 or more clips and a "
                           f"positive weight")
    if a.export_shard_mb is not None and a.export_shard_mb < 1:
        raise SparrowError(f"--export-shard-mb {a.export_shard_mb}: give a size of 1 MB or more")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(a.out, exist_ok=True)
    tok_dir = os.path.join(a.out, "tokenizer")
    if a.tokenizer and not os.path.isdir(tok_dir):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(a.tokenizer).save_pretrained(tok_dir)
    if not os.path.isdir(tok_dir) and not a.init:
        build_tokenizer(corpus(), QWEN_SPECIALS, QWEN_CHAT_TEMPLATE, vocab_size=VOCAB).save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.init or tok_dir)
    if a.init:
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(a.init)
        if section is not None:
            set_mrope_section(config.text_config, section)
        model = AutoModelForImageTextToText.from_pretrained(a.init, config=config, dtype=torch.float32)
        if model.config.text_config.hidden_size != TEXT["hidden"]:
            raise SparrowError(f"--init {a.init}: hidden size {model.config.text_config.hidden_size} is not "
                               f"{TEXT['hidden']}; give an export of train-target")
        if a.grow_layers is not None:
            depth = model.config.text_config.num_hidden_layers
            if a.grow_layers < depth:
                raise SparrowError(f"--grow-layers {a.grow_layers} is fewer than the {depth} layers of "
                                   f"{a.init}; give {depth} or more")
            model = grow_depth(model, a.grow_layers)
        torch.manual_seed(a.seed)  # the fresh probes below: a rerun of the stage starts them alike
    else:
        model = build_model(tokenizer, a.seed, section, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads)
    target = sparrow.wrap_model(model, tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    probe = VisionProbe(TEXT["hidden"])
    feats = {}
    model.model.visual.register_forward_hook(lambda m, i, o: feats.__setitem__("v", o.pooler_output))
    vision = list(model.model.visual.parameters()) + (list(probe.parameters()) if a.aux_weight > 0 else [])
    seen = {id(p) for p in vision}
    language = [p for p in model.parameters() if id(p) not in seen]
    params = vision + language
    opt = torch.optim.AdamW([{"params": vision}, {"params": language}], lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def make_batcher(seed: int) -> Batcher:
        return Batcher(target, seed, mix=a.mix, events_first=a.events_first, colour_last=a.colour_last,
                       restate=a.restate, size_last=a.size_last, hard=a.hard, hard_kind=a.hard_kind,
                       hard_ask=a.hard_ask, states=a.states, track=a.track_weight > 0, fps=fps, pairs=a.pairs,
                       pairs_weight=a.pairs_weight, pairs_frames=pairs_frames, pairs_ask=a.pairs_ask)

    batcher = make_batcher(a.seed)  # with --workers, BatchStream draws instead (below)
    wording = batcher.wording
    layers = model.config.text_config.num_hidden_layers
    if a.bind_weight > 0 and not 0 <= a.bind_layer < layers:
        raise SparrowError(f"--bind-layer {a.bind_layer} is not a layer of this {layers}-layer model; "
                           f"pick one in 0..{layers - 1}")
    if (a.event_weight > 0 or a.time_weight > 0) and not 0 <= a.event_layer < layers:
        raise SparrowError(f"--event-layer {a.event_layer} is not a layer of this {layers}-layer model; "
                           f"pick one in 0..{layers - 1}")
    binding = BindingLoss(model, a.bind_layer) if a.bind_weight > 0 else None
    if (a.carry_weight > 0 or a.copy_weight > 0) and not 0 <= a.carry_layer < layers:
        raise SparrowError(f"--carry-layer {a.carry_layer} is not a layer of this {layers}-layer model; "
                           f"pick one in 0..{layers - 1}")
    events = EventLoss(model, a.event_layer) if a.event_weight > 0 else None
    carry = EventLoss(model, a.carry_layer) if a.carry_weight > 0 else None
    timing = TimeBindingLoss(model, a.event_layer) if a.time_weight > 0 else None
    heads = model.config.text_config.num_attention_heads
    if a.copy_weight > 0 and not 0 <= a.copy_head < heads:
        raise SparrowError(f"--copy-head {a.copy_head} is not a head of this {heads}-head model; "
                           f"pick one in 0..{heads - 1}")
    copying = CopyLoss(model, a.carry_layer, a.copy_head) if a.copy_weight > 0 else None
    if a.track_weight > 0 and not 0 <= a.track_layer < layers:
        raise SparrowError(f"--track-layer {a.track_layer} is not a layer of this {layers}-layer model; "
                           f"pick one in 0..{layers - 1}")
    tracking = TrackLoss(model, a.track_layer) if a.track_weight > 0 else None
    for extra in (binding.probe if binding else None, events, carry, tracking):  # probes learn with the language model
        if extra is not None:
            opt.add_param_group({"params": list(extra.parameters())})
            params += list(extra.parameters())
    # the language loss alone splits each batch into `length_groups` (the same gradient up to rounding); the
    # auxiliary losses read the whole batch's hidden states, so with any of them on, a batch is one forward
    grouped = not (a.whole_batches or a.padding_mask) and a.aux_weight == 0 and all(
        m is None for m in (binding, events, carry, timing, copying, tracking))
    step, log = 0, []

    def load_probes(state: dict) -> None:
        """The probes saved in a checkpoint (those this run trains), into this run's probes."""
        for module, key in ((probe, "probe"), (binding.probe if binding else None, "bind_probe"), (events, "event_probe"),
                            (carry, "carry_probe"), (tracking, "track_probe")):
            if key == "carry_probe" and state.get(key) is None:
                key = "event_probe"  # same labels on a deeper layer of the same residual stream: a better start than noise
            if module is not None and state.get(key) is not None:
                module.load_state_dict(state[key])

    if a.init_probes:
        if not os.path.isfile(a.init_probes):
            raise SparrowError(f"--init-probes {a.init_probes} is not a file; give an earlier stage's "
                               "RUN/ckpt/state.pt")
        state = torch.load(a.init_probes, weights_only=False, map_location="cpu")
        try:
            load_probes(state)
        except (RuntimeError, KeyError) as e:
            raise SparrowError(f"the probes of {a.init_probes} do not fit this model "
                               f"({str(e).splitlines()[0][:120]}); drop --init-probes") from None
    ckpt = os.path.join(a.out, "ckpt", "state.pt")
    state = torch.load(ckpt, weights_only=False, map_location="cpu") if a.resume and os.path.exists(ckpt) else None
    if state is not None and "batcher" not in state:
        raise SparrowError(f"{ckpt} was written by an older version; start a new --out or drop --resume")
    drawn = len(state["batcher"].get("workers", [])) if state is not None else a.workers
    if drawn != a.workers:
        raise SparrowError(f"{ckpt} was drawn with --workers {drawn}; resume with --workers {drawn}")
    if a.workers:  # forked now, while the model is on the CPU: the workers only draw
        batcher = BatchStream(lambda w: make_batcher(a.seed * 1000 + w), a.batch, a.workers,
                              state["batcher"] if state else None)
    for module in (model, probe, binding.probe if binding else None, events, carry, tracking):
        if module is not None:
            module.to(device)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            load_probes(state)
            opt.load_state_dict(state["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise SparrowError(f"{ckpt} was written by another version or model shape "
                               f"({str(e).splitlines()[0][:120]}); start a new --out or drop --resume") from None
        step = state["step"]
        if not a.workers:
            batcher.restore(state["batcher"], a.batch)
        torch.set_rng_state(state["torch_rng"])
        log = json.load(open(os.path.join(a.out, "ckpt", "log.json")))
        print(f"resumed at step {step}")
    t0 = time.time()
    bar = tqdm(total=a.steps, initial=step, desc="train-target", dynamic_ncols=True)
    ema, emas = None, {}  # the answer loss's and each auxiliary loss's moving average
    end = min(a.steps, a.until or a.steps)
    with stop_on_signals() as stop:
        while step < end and not stop["now"]:
            batch = {k: v.to(device, non_blocking=True) for k, v in batcher.batch(a.batch).items()}
            cells, grounded, labels = batch.pop("cells"), batch.pop("grounded"), batch.pop("labels")
            colour, named, event = batch.pop("colour"), batch.pop("named"), batch.pop("event")
            carried = batch.pop("carry")
            source = batch.pop("source")
            track, end_seen = batch.pop("track", None), batch.pop("end", None)  # with --track-weight only
            row_weight = batch.pop("row_weight")  # (B,): --pairs-weight on the --pairs clips, else 1
            opt.param_groups[0]["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
            lm_step = step - a.vision_steps  # the language model warms up again when it starts to train
            opt.param_groups[1]["lr"] = lr_at(max(0, lm_step), a.steps - a.vision_steps, a.lr, a.warmup)
            for g in opt.param_groups[2:]:  # the binding and event probes learn with the language model
                g["lr"] = opt.param_groups[1]["lr"]
            vision_only = step < a.vision_steps and a.aux_weight > 0
            if grouped and not vision_only:  # the language loss alone: one forward per group of similar lengths
                opt.zero_grad(set_to_none=True)
                whole = {**batch, "labels": labels, "grounded": grounded, "row_weight": row_weight}
                total = float(answer_weights(labels, grounded, a.grounded_weight, row_weight).sum())
                loss = torch.zeros(())
                for rows in length_groups(batch["attention_mask"].sum(1).tolist()):
                    part = without_padding_mask(row_group(whole, rows))
                    part_labels, part_grounded = part.pop("labels"), part.pop("grounded")
                    part_rows = part.pop("row_weight")
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        part_loss = answer_loss(model(**part).logits, part_labels, part_grounded, a.grounded_weight,
                                                total, part_rows)
                    part_loss.backward()
                    loss = loss + part_loss.detach()
                aux = bind = ev = cr = tm = cp = tk = torch.zeros(())
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    if vision_only:
                        model.model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])
                        loss = torch.zeros(())
                    else:
                        inputs = batch if a.padding_mask else without_padding_mask(batch)
                        loss = answer_loss(model(**inputs).logits, labels, grounded, a.grounded_weight,
                                           rows=row_weight)
                    aux = probe(feats.pop("v"), cells) if a.aux_weight > 0 else torch.zeros(())
                    bind = binding(batch["input_ids"], colour, cells, model.config.video_token_id) \
                        if binding is not None and not vision_only else torch.zeros(())
                    ev = events(event) if events is not None and not vision_only else torch.zeros(())
                    cr = carry(carried) if carry is not None and not vision_only else torch.zeros(())
                    about = clause_named(named, source) if a.time_clause else named  # where the time binding fetches
                    tm = timing(batch["input_ids"], about, cells, batch["video_grid_thw"], model.config.video_token_id,
                                model.config.vision_start_token_id) \
                        if timing is not None and not vision_only else torch.zeros(())
                    cp = copying(source) if copying is not None and not vision_only else torch.zeros(())
                    tk = tracking(batch["input_ids"], track, end_seen, model.config.video_token_id,
                                  model.config.vision_end_token_id) \
                        if tracking is not None and not vision_only else torch.zeros(())
                opt.zero_grad(set_to_none=True)
                (loss + a.aux_weight * aux + a.bind_weight * bind + a.event_weight * ev + a.carry_weight * cr
                 + a.time_weight * tm + a.copy_weight * cp + a.track_weight * tk).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if not vision_only:
                ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            terms = {"aux": aux, "bind": bind if binding is not None else None,
                     "event": ev if events is not None else None, "carry": cr if carry is not None else None,
                     "time": tm if timing is not None else None, "copy": cp if copying is not None else None,
                     "track": tk if tracking is not None else None}
            for k, v in terms.items():
                if v is not None:
                    emas[k] = v.item() if k not in emas else 0.98 * emas[k] + 0.02 * v.item()
            bar.update(1)
            bar.set_postfix(loss="-" if ema is None else f"{ema:.3f}", **{k: f"{v:.3f}" for k, v in emas.items()})
            if step % a.log_every == 0:
                log.append({"step": step, "loss": None if ema is None else round(ema, 4),
                            **{k: round(v, 4) for k, v in emas.items()}, "s": round(time.time() - t0, 1)})
            if a.minutes and time.time() - t0 > a.minutes * 60:
                stop["now"] = True
            if step % a.save_every == 0 or stop["now"] or step == end:
                save_checkpoint(a.out, model, opt, step, batcher, log, probe, binding.probe if binding else None,
                                events, carry, tracking)
    bar.close()
    if stop["signal"] and step < end:  # a stop asked for (Ctrl-C, SIGTERM), not a planned one (--until, --minutes)
        print(f"train-target: interrupted at step {step} of {end}: checkpoint saved in {a.out}; run the same "
              "command again (with --resume) to finish" + (" and export" if a.export else ""), file=sys.stderr)
        return 128 + stop["signal"]  # a script that chains stages (set -e) stops here, not on half-trained weights
    if a.export:
        model.eval()
        export(model.cpu(), tokenizer, a.export, wording, a.export_shard_mb)
        print(f"exported to {a.export}")


if __name__ == "__main__":
    sys.exit(main())
