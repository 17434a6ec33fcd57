"""`sparrow analyze`: the paper's three observations, measured on any supported target (docs/method.md section 1).

    sparrow analyze [--target PATH] [--draft EAGLE_DRAFT] [--what internalization,visual-gain,dilution]
                    [--clips 3] [--visual-tokens 500,3000] [--out results/analyze]

- internalization: (a) remove the visual tokens' KV from layer x onward (every text query after the video,
  instruction and answer, stops seeing the visual positions in layers >= x; x = 0..L, x = L removes nothing) and
  measure the top-1 agreement of the teacher-forced next-token predictions with the unmodified model's greedy
  answer; (b) per layer, the attention mass from the last instruction token onto visual tokens (mean over
  heads); (c) per layer, the cosine similarity of visual and of text hidden states to their input embeddings.
- visual-gain ("negative visual gain"): tau of the eagle draft (full-visual design) when only 100/25/10/5/1/0%
  of the visual positions are kept in its cache, chosen by the last instruction token's attention (mean over the
  target's layers and heads) or uniformly over time.
- dilution ("attention dilution"): the eagle draft's attention mass on visual vs text positions (its first
  generated token's query over the prompt, mean over heads) at a short and a long video.

Each writes NAME.json and NAME.png into --out. Clips are held-out synthetic clips (224 x 224 frames,
"Describe the video.").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from .cli import Help
from .errors import SparrowError, at_least

KEEP_FRACTIONS = (1.0, 0.25, 0.10, 0.05, 0.01, 0.0)
ANALYSES = ("internalization", "visual-gain", "dilution")


def _clip_inputs(target, visual_tokens: int, i: int):
    from .bench import build_inputs, frames_for, synthetic_samples

    frames = frames_for(target, visual_tokens)
    sample = synthetic_samples(i + 1, frames, seed=11)[i]
    return build_inputs(target, sample, frames)


def _sequence_inputs(target, inputs: dict, answer: list[int]) -> tuple[dict, torch.Tensor]:
    """Model kwargs for prompt + answer in one forward (explicit positions), and the (T,) visual mask."""
    from .training.losses import extend_inputs

    positions, delta = target.prompt_positions(inputs)
    L = inputs["input_ids"].shape[1]
    tail = (L + delta + torch.arange(len(answer), device=positions.device)).expand(3, -1)
    kw = {k: v for k, v in extend_inputs(inputs, answer).items() if k != "attention_mask"}
    kw["position_ids"] = target._prompt_position_ids(torch.cat((positions, tail), dim=1))
    return kw, target.visual_mask(kw["input_ids"][0])


@torch.inference_mode()
def internalization(target, inputs: dict, max_new_tokens: int = 64) -> dict:
    """Agreement with the unmodified model when visual KV is removed from layer x on, x = 0..num_layers.

    Returns {"layers": [x...], "agreement": [...], "answer_tokens": n}: agreement[x] is the fraction of answer
    positions whose next-token argmax equals the unmodified greedy answer (teacher forcing)."""
    from . import generate

    answer = generate(target, None, inputs, max_new_tokens=max_new_tokens, method="ar").token_ids
    kw, vis = _sequence_inputs(target, inputs, answer[:-1] if len(answer) > 1 else answer)
    T, L = vis.shape[0], inputs["input_ids"].shape[1]
    after = torch.zeros(T, dtype=torch.bool)
    after[int(vis.nonzero().max()) + 1:] = True  # text queries after the video
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    blocked = causal & ~(after.view(-1, 1) & vis.view(1, -1))
    layers = target.language_model.layers
    want = torch.tensor(answer)
    out = {"layers": [], "agreement": [], "answer_tokens": len(answer)}
    for x in range(len(layers) + 1):
        hooks = []

        def swap(_mod, args, kwargs):
            kwargs["attention_mask"] = blocked.view(1, 1, T, T).to(target.device)
            return args, kwargs

        for layer in layers[x:]:
            hooks.append(layer.self_attn.register_forward_pre_hook(swap, with_kwargs=True))
        try:
            hidden = target.model.model(**kw, use_cache=False).last_hidden_state[0]
        finally:
            for h in hooks:
                h.remove()
        pred = target.lm_head(hidden[L - 1:]).argmax(-1)[: len(answer)]
        out["layers"].append(x)
        out["agreement"].append(float((pred == want[: len(pred)]).float().mean()))
    return out


@torch.inference_mode()
def attention_and_similarity(target, inputs: dict) -> dict:
    """Per layer: attention mass from the last instruction token onto visual tokens (mean over heads), and mean
    cosine similarity of visual / text hidden states to the input embeddings. One eager forward of the prompt."""
    from .cache import register_attention

    kw, vis = _sequence_inputs(target, inputs, [])
    target.model.set_attn_implementation("eager")
    try:
        out = target.model.model(**kw, use_cache=False, output_attentions=True, output_hidden_states=True)
    finally:
        target.model.set_attn_implementation(register_attention())
    # the last prompt token is the chat template's assistant header; the instruction's last token precedes it
    last = _last_instruction_index(target, inputs)
    mass = [float(a[0, :, last, vis].sum(-1).mean()) for a in out.attentions]
    h0 = out.hidden_states[0][0].float()
    cos_v, cos_t = [], []
    for h in out.hidden_states[1:]:
        c = torch.nn.functional.cosine_similarity(h[0].float(), h0, dim=-1)
        cos_v.append(float(c[vis].mean()))
        cos_t.append(float(c[~vis].mean()))
    weights = torch.stack([a[0, :, last].float().mean(0) for a in out.attentions]).mean(0)  # (L,) over layers
    return {"attention_to_visual": mass, "cosine_visual": cos_v, "cosine_text": cos_t,
            "last_instruction_index": last, "_weights": weights}


def _last_instruction_index(target, inputs: dict) -> int:
    """Index of the user's last token (before <|im_end|> and the assistant header), or the last prompt token."""
    ids = inputs["input_ids"][0].tolist()
    end = target.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ids) if t == end]
    return ends[-1] - 1 if ends else len(ids) - 1


def keep_mask(vis: torch.Tensor, weights: torch.Tensor, fraction: float, how: str) -> torch.Tensor:
    """(L,) bool: the visual positions to keep. how "attention" (highest weights) or "uniform" (evenly spaced)."""
    idx = vis.nonzero(as_tuple=True)[0]
    k = int(round(fraction * len(idx)))
    keep = torch.zeros_like(vis)
    if k == 0:
        return keep
    if how == "attention":
        chosen = idx[weights[idx].topk(k).indices]
    else:
        chosen = idx[torch.linspace(0, len(idx) - 1, k).round().long()]
    keep[chosen] = True
    return keep


def visual_gain(target, draft, inputs: dict, max_new_tokens: int = 96) -> dict:
    """tau of the eagle-mode draft with a fraction of visual positions in its cache, per selection rule.
    Raises SparrowError when an output differs from ar (the analysis must stay lossless)."""
    from . import TreeConfig, generate

    ref = generate(target, None, inputs, max_new_tokens=max_new_tokens, method="ar").token_ids
    att = attention_and_similarity(target, inputs)
    vis = target.visual_mask(inputs["input_ids"][0])
    out = {}
    for how in ("attention", "uniform"):
        out[how] = []
        for frac in KEEP_FRACTIONS:
            draft.visual_keep = keep_mask(vis, att["_weights"], frac, how)
            try:
                o = generate(target, draft, inputs, max_new_tokens=max_new_tokens, method="eagle", tree=TreeConfig())
            finally:
                draft.visual_keep = None
            if o.token_ids != ref:
                raise SparrowError("eagle output with a reduced visual cache differs from ar: a lossless bug")
            out[how].append(o.stats.tau)
    return out


@torch.inference_mode()
def draft_attention(target, draft, inputs: dict) -> dict:
    """The eagle-mode draft's attention from its first generated token's query over the prompt entries: mass on
    visual and on text positions (mean over heads)."""
    from .draft import DraftRunner
    from .tree import TreeConfig

    cache = target.new_cache(inputs["input_ids"].shape[1] + 8)
    pre = target.prefill(inputs, cache, capture_embeds=True)
    runner = DraftRunner(draft, target, pre, "eagle", 8, TreeConfig())
    x, pos, idx = runner.prompt_inputs(inputs["input_ids"][0], pre, int(pre.logits.argmax()))
    qs, ks, _ = draft.layer.project_kv(x.unsqueeze(0), pos.unsqueeze(1))
    g = qs.shape[1] // ks.shape[1]
    k = ks.repeat_interleave(g, dim=1)[0]  # (Hq, q, D)
    w = torch.softmax((qs[0, :, -1:] @ k.transpose(-1, -2)) / qs.shape[-1] ** 0.5, dim=-1)[:, 0]  # (Hq, q)
    vis = torch.cat((pre.visual_mask, pre.visual_mask.new_zeros(1)))[idx]
    m = w.mean(0)
    return {"visual_mass": float(m[vis].sum()), "text_mass": float(m[~vis].sum()),
            "visual_entries": int(vis.sum()), "text_entries": int((~vis).sum()),
            "mean_weight_per_visual_entry": float(m[vis].mean()) if vis.any() else 0.0,
            "mean_weight_per_text_entry": float(m[~vis].mean())}


# ---------------------------------------------------------------- plots and CLI
def _plot(path: str, draw) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sparrow: matplotlib is not installed; skipping the plot (pip install matplotlib)", file=sys.stderr)
        return
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(out: str, name: str, data: dict, draw) -> None:
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    _plot(os.path.join(out, name + ".png"), draw)


def run_internalization(target, buckets, clips, out, max_new_tokens):
    """Per bucket (visual tokens), averaged over `clips` synthetic clips: agreement with the full target when the
    visual KV is removed from layer x on, attention mass on visual tokens and cosine to the input embedding per
    layer. Writes OUT/internalization.{json,png}; returns the per-bucket dict."""
    per = {}
    for b in buckets:
        inputs = [_clip_inputs(target, b, i) for i in range(clips)]
        runs = [internalization(target, x, max_new_tokens) for x in inputs]
        atts = [attention_and_similarity(target, x) for x in inputs]
        per[str(b)] = {"layers": runs[0]["layers"],
                       "agreement": np.mean([r["agreement"] for r in runs], 0).round(4).tolist(),
                       "attention_to_visual": np.mean([a["attention_to_visual"] for a in atts], 0).round(4).tolist(),
                       "cosine_visual": np.mean([a["cosine_visual"] for a in atts], 0).round(4).tolist(),
                       "cosine_text": np.mean([a["cosine_text"] for a in atts], 0).round(4).tolist(),
                       "clips": clips}

    def draw(plt):
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
        for b, r in per.items():
            ax[0].plot(r["layers"], r["agreement"], marker="o", label=f"{b} visual tokens")
            ax[1].plot(range(1, len(r["attention_to_visual"]) + 1), r["attention_to_visual"], marker="o", label=b)
            ax[2].plot(range(1, len(r["cosine_visual"]) + 1), r["cosine_visual"], marker="o", label=f"visual {b}")
            ax[2].plot(range(1, len(r["cosine_text"]) + 1), r["cosine_text"], ls="--", label=f"text {b}")
        ax[0].set(xlabel="visual KV removed from layer x on", ylabel="agreement with the full model", ylim=(0, 1.05))
        ax[1].set(xlabel="layer", ylabel="attention mass on visual tokens", title="last instruction token")
        ax[2].set(xlabel="layer", ylabel="cosine to input embedding")
        for a in ax:
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        return fig

    _write(out, "internalization", per, draw)
    return per


def run_visual_gain(target, draft, buckets, clips, out, max_new_tokens):
    """Per bucket: tau of the eagle-mode `draft` keeping a fraction (KEEP_FRACTIONS) of the visual positions in its
    cache, chosen by attention or uniformly. Writes OUT/visual_gain.{json,png}; returns the per-bucket dict."""
    per = {}
    for b in buckets:
        runs = [visual_gain(target, draft, _clip_inputs(target, b, i), max_new_tokens) for i in range(clips)]
        per[str(b)] = {"keep_fraction": list(KEEP_FRACTIONS), "clips": clips,
                       **{how: np.mean([r[how] for r in runs], 0).round(3).tolist() for how in ("attention", "uniform")}}

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [f"{int(f * 100)}%" for f in KEEP_FRACTIONS]
        for b, r in per.items():
            ax.plot(xs, r["attention"], marker="o", label=f"{b} tokens, by attention")
            ax.plot(xs, r["uniform"], marker="s", ls="--", label=f"{b} tokens, uniform")
        ax.set(xlabel="visual positions kept in the eagle draft's cache", ylabel="tau")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return fig

    _write(out, "visual_gain", per, draw)
    return per


def run_dilution(target, draft, buckets, clips, out):
    """Per bucket: the eagle-mode `draft`'s attention mass on text and on visual positions at the first generated
    token. Writes OUT/dilution.{json,png}; returns the per-bucket dict."""
    per = {}
    for b in buckets:
        runs = [draft_attention(target, draft, _clip_inputs(target, b, i)) for i in range(clips)]
        per[str(b)] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        per[str(b)]["clips"] = clips

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [f"{r['visual_entries']:.0f} visual" for r in per.values()]
        ax.bar(names, [r["text_mass"] for r in per.values()], label="text positions")
        ax.bar(names, [r["visual_mass"] for r in per.values()], bottom=[r["text_mass"] for r in per.values()],
               label="visual positions")
        ax.set(ylabel="eagle draft attention mass", title="first generated token's query")
        ax.legend()
        return fig

    _write(out, "dilution", per, draw)
    return per


def main(argv=None) -> int:
    from . import defaults, load_draft, load_target
    from .bench import parse_visual_tokens

    ap = argparse.ArgumentParser(prog="sparrow analyze", description=__doc__.split("\n\n")[0],
                                 formatter_class=Help)
    ap.add_argument("--target", help="local HF checkpoint (default: the embedded target)")
    ap.add_argument("--draft", help="an eagle-mode (full-visual) draft for visual-gain and dilution (default: the "
                                    "embedded target's shipped eagle draft)")
    ap.add_argument("--what", default=",".join(ANALYSES), help=f"comma list of {', '.join(ANALYSES)}")
    ap.add_argument("--visual-tokens", default="500,3000", help="short and long video buckets")
    ap.add_argument("--clips", type=int, default=3, help="clips per bucket")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per answer, at most")
    ap.add_argument("--out", default="results/analyze", help="directory of the JSON and PNG files")
    a = ap.parse_args(argv)
    what = [w.strip() for w in a.what.split(",") if w.strip()]
    unknown = [w for w in what if w not in ANALYSES]
    if unknown:
        raise SparrowError(f"--what {','.join(unknown)}: unknown analysis; choose from {', '.join(ANALYSES)}")
    buckets = parse_visual_tokens(a.visual_tokens)
    at_least(1, ("--clips", a.clips))
    target = load_target(a.target, device="cpu")
    draft = None
    if {"visual-gain", "dilution"} & set(what):
        path = a.draft or (defaults.draft_path("eagle") if a.target is None else None)
        if not path:
            raise SparrowError("visual-gain and dilution need an eagle-mode draft: pass --draft PATH")
        draft = load_draft(path, target, mode="eagle")
    os.makedirs(a.out, exist_ok=True)
    if "internalization" in what:
        r = run_internalization(target, buckets, a.clips, a.out, a.max_new_tokens)
        for b, v in r.items():
            print(f"internalization {b}: agreement by layer x " + " ".join(f"{x:.2f}" for x in v["agreement"]))
    if "visual-gain" in what:
        r = run_visual_gain(target, draft, buckets, a.clips, a.out, a.max_new_tokens)
        for b, v in r.items():
            print(f"visual gain {b}: tau at keep {list(KEEP_FRACTIONS)}: attention {v['attention']}, "
                  f"uniform {v['uniform']}")
    if "dilution" in what:
        r = run_dilution(target, draft, buckets, a.clips, a.out)
        for b, v in r.items():
            print(f"dilution {b}: visual mass {v['visual_mass']:.3f} over {v['visual_entries']:.0f} entries, "
                  f"text mass {v['text_mass']:.3f} over {v['text_entries']:.0f}")
    print(f"wrote {a.out}/*.json and *.png")
    return 0
