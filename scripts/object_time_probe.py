"""Can the target tell what happened to one object of several, even in the shortest clip?

    .venv/bin/python scripts/object_time_probe.py [--target DIR] [--clips 80] [--probe-clips 300]
        [--out benchmarks/results/object_time_probe.json]          (needs scikit-learn)

Held-out clips of two or three objects at 224 px and 4 fps (seeds apart from the evaluation's), without
generating. Three measurements:

1. Asked. Each object's own question, "What happens to the red circle?", right after the video (the first turn:
   only the frames can answer). P(event) = P("It") / (P("It") + P("Nothing")) at the answer's first token; AUC of
   the objects with an event of each kind against all objects without one, for clips of 4, 8 and 16 frames (2, 4
   and 8 frame pairs: temporal grids). In a 4-frame clip an event lies between two frame pairs or inside one.
2. When. A ridge probe (fit on two thirds of the clips, scored on the rest) on every layer's hidden state at the
   visual tokens, for the token's temporal grid: R^2 and the share of tokens whose rounded prediction is their
   grid, at 4 and 16 frames. Whether a visual token knows when it was seen.
3. Which. A logistic probe on every layer's hidden state at the question's "?" (4-frame clips), for whether the
   asked object appears, disappears or changes colour, scored only among the objects of clips that hold such an
   event (the other objects of the same clips are the negatives): whether the question has gathered the asked
   object's own event, not the clip's.

Writes JSON and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import islice

import numpy as np

KINDS = ("appears", "disappears", "changes colour")


def _clips(frames: int, first_seed: int):
    """Yields (clip, video) of two or three objects, `frames` frames at 224 px and 4 fps, seeds from first_seed + 1."""
    from sparrow.synthetic.world import make_clip
    from sparrow.video import Video

    seed = first_seed
    while True:
        seed += 1
        clip = make_clip(seed, frames, 224, 224, fps=4.0)
        if len(clip.truth["objects"]) >= 2:
            yield clip, Video(frames=clip.frames, fps=4.0, indices=np.arange(frames), total_frames=frames)


def _ask(target, clip, video, obj, hidden: bool = False):
    """The first-turn question about `obj`: (P(event), hidden states (layers + 1, hidden) at its "?" or None)."""
    import torch

    from sparrow.synthetic.text import mention

    tok = target.tokenizer
    inputs = target.prepare(video, f"What happens to the {mention(obj, full=False)}?", max_pixels=224 * 224,
                            min_pixels=224 * 224)
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("It", "Nothing"))
    with torch.no_grad():
        out = target.model(**inputs, output_hidden_states=hidden)
    p = out.logits[0, -1].float().softmax(-1)
    at = None
    if hidden:
        ids = inputs["input_ids"][0]
        q = int((ids == tok("?", add_special_tokens=False)["input_ids"][-1]).nonzero()[-1])
        at = torch.stack(out.hidden_states)[:, 0, q].float().numpy()
    return float(p[yes] / (p[yes] + p[no])), at


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def asked(target, clips: int) -> dict:
    """Measurement 1: {frames: {"objects", kind: {"n", "auc"}, "any": {...}}}."""
    out = {}
    for frames in (4, 8, 16):
        rows = []
        for clip, video in islice(_clips(frames, 610_000_000), clips):
            for o in clip.truth["objects"]:
                kinds = [e["type"] for e in clip.truth["events"] if e["object"] == o["id"]]
                rows.append((kinds[0] if kinds else "", _ask(target, clip, video, o)[0]))
        kind = np.array([r[0] for r in rows])
        p = np.array([r[1] for r in rows])
        neg = p[kind == ""]
        out[frames] = {"objects": len(rows), "any": {"n": int((kind != "").sum()), "auc": _auc(p[kind != ""], neg)}}
        for k in KINDS:
            out[frames][k] = {"n": int((kind == k).sum()), "auc": _auc(p[kind == k], neg)}
    return out


def when(target, clips: int) -> dict:
    """Measurement 2: {frames: {"r2": [per layer], "grid_exact": [per layer]}}."""
    import torch
    from sklearn.linear_model import Ridge

    pad = target.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    rng = np.random.default_rng(0)
    out = {}
    for frames in (4, 16):
        xs, ys, cs = [], [], []
        for n, (clip, video) in enumerate(islice(_clips(frames, 620_000_000), clips)):
            inputs = target.prepare(video, "Describe the video.", max_pixels=224 * 224, min_pixels=224 * 224)
            t = int(inputs["video_grid_thw"][0, 0])
            where = (inputs["input_ids"][0] == pad).nonzero()[:, 0]
            with torch.no_grad():
                hs = torch.stack(target.model(**inputs, output_hidden_states=True).hidden_states)[:, 0].float()
            pick = rng.choice(len(where), 48, replace=False)
            xs.append(hs[:, where[pick]].permute(1, 0, 2).numpy())
            ys.append(pick // (len(where) // t) / (t - 1))
            cs.append(np.full(len(pick), n))
        x, y, c = np.concatenate(xs), np.concatenate(ys), np.concatenate(cs)
        train = c < clips * 2 // 3
        r2, exact = [], []
        for layer in range(x.shape[1]):
            z = x[:, layer]
            z = (z - z[train].mean(0)) / (z[train].std(0) + 1e-6)
            pred = Ridge(alpha=10.0).fit(z[train], y[train]).predict(z[~train])
            r2.append(round(float(1 - ((pred - y[~train]) ** 2).mean() / y[~train].var()), 3))
            right = np.round(np.clip(pred, 0, 1) * (t - 1)) == np.round(y[~train] * (t - 1))
            exact.append(round(float(right.mean()), 3))
        out[frames] = {"grids": t, "r2": r2, "grid_exact": exact}
    return out


def which(target, clips: int) -> dict:
    """Measurement 3: {kind: {"n", "negatives", "auc": [per layer]}}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    xs, own, held, cs = [], [], [], []
    for n, (clip, video) in enumerate(islice(_clips(4, 630_000_000), clips)):
        in_clip = [any(e["type"] == k for e in clip.truth["events"]) for k in KINDS]
        for o in clip.truth["objects"]:
            xs.append(_ask(target, clip, video, o, hidden=True)[1])
            own.append([any(e["type"] == k and e["object"] == o["id"] for e in clip.truth["events"]) for k in KINDS])
            held.append(in_clip)
            cs.append(n)
    x, own, held, c = np.stack(xs), np.array(own), np.array(held), np.array(cs)
    train = c < clips * 2 // 3
    out = {}
    for j, k in enumerate(KINDS):
        scored = ~train & held[:, j]
        aucs = []
        for layer in range(x.shape[1]):
            z = x[:, layer]
            z = (z - z[train].mean(0)) / (z[train].std(0) + 1e-6)
            m = LogisticRegression(C=0.05, max_iter=3000).fit(z[train], own[train, j])
            aucs.append(round(float(roc_auc_score(own[scored, j], m.decision_function(z[scored]))), 3))
        out[k] = {"n": int(own[scored, j].sum()), "negatives": int((~own[scored, j]).sum()), "auc": aucs}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="a target directory (default: the embedded one)")
    ap.add_argument("--clips", type=int, default=80, help="clips per frame count for measurements 1 and 2")
    ap.add_argument("--probe-clips", type=int, default=300, help="4-frame clips for measurement 3")
    ap.add_argument("--out", default="benchmarks/results/object_time_probe.json")
    a = ap.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit("object_time_probe: needs scikit-learn (pip install scikit-learn)") from None
    import torch

    import sparrow
    from sparrow.synthetic.evaluate import weights_digest

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    target = sparrow.load_target(a.target, device="cpu")
    result = {"target": target.path, "weights": weights_digest(target.path), "asked": asked(target, a.clips),
              "when": when(target, a.clips), "which": which(target, a.probe_clips)}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for frames, v in result["asked"].items():
        print(f"asked, {frames} frames: " + "; ".join(f"{k} {v[k]['auc']:.2f} ({v[k]['n']})" for k in ("any",) + KINDS))
    for frames, v in result["when"].items():
        print(f"when, {frames} frames ({v['grids']} grids): best R2 {max(v['r2']):.3f}, "
              f"grid exact {max(v['grid_exact']):.3f}")
    for k, v in result["which"].items():
        print(f"which, {k} ({v['n']} against {v['negatives']} in the same clips): best AUC {max(v['auc']):.2f} "
              f"(layer {int(np.argmax(v['auc']))})")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
