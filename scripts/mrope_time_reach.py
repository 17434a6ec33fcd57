"""Can a text token point at the first (or last) frames of a video by position alone, under a target's mRoPE?

    .venv/bin/python scripts/mrope_time_reach.py [--target DIR] [--out FILE.json]   (needs scipy)

In Qwen2.5-VL's mRoPE the temporal section takes the first `mrope_section[0]` rotary pairs, the highest
frequencies (omega_i = theta^(-2i / head_dim)); a text token has all three coordinates equal to its position p,
a visual token of temporal grid g has temporal coordinate g * step. Over the temporal pairs, the score of a query
whose content is fixed against keys that differ only in their time is s(p, g) = sum_i a_i cos(omega_i (p - g step))
+ b_i sin(omega_i (p - g step)). The margin is the largest m, with every |a_i|, |b_i| <= 1, such that
s(p, first) - s(p, g) >= m for every other grid g and every query position p in [p_from, p_to) (a linear
program). Zero means that no fixed query content prefers the first grid over the others all along a description:
whatever reads time there has to carry it in the content of the hidden states instead (docs/embedded_target.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def time_reach_margin(theta: float, head_dim: int, temporal_pairs: int, grids: int, p_from: int, p_to: int,
                      step: float = 1.0, which: str = "first") -> float:
    """The margin above (>= 0) for the temporal pairs of one attention head.

    Args:
        theta: rope_theta; head_dim: the attention head's size (head_dim / 2 rotary pairs).
        temporal_pairs: mrope_section[0], the pairs that rotate with time (the highest frequencies).
        grids: temporal grids of the video (frames / temporal_patch_size), at times 0, step, 2 step, ...
        p_from, p_to: the query positions, counted from the first grid's temporal coordinate.
        which: "first" or "last": the grid the query must prefer.
    Raises: ValueError for an empty range or fewer than two grids; SystemExit when scipy is missing.
    """
    try:
        from scipy.optimize import linprog
    except ImportError:
        raise SystemExit("mrope_time_reach: needs scipy (pip install scipy)") from None
    if p_to <= p_from or grids < 2 or which not in ("first", "last"):
        raise ValueError(f"need p_from < p_to, 2 or more grids and which first|last; got {p_from}, {p_to}, {grids}, "
                         f"{which}")
    omega = theta ** (-2 * np.arange(temporal_pairs) / head_dim)  # (pairs,)
    times = np.arange(grids) * step
    target = 0 if which == "first" else grids - 1
    p = np.arange(p_from, p_to)[:, None, None]  # (P, 1, 1)
    phase = omega[None, None, :] * (p - times[None, :, None])  # (P, grids, pairs)
    feats = np.concatenate([np.cos(phase), np.sin(phase)], axis=-1)  # (P, grids, 2 pairs)
    diff = feats[:, target:target + 1] - np.delete(feats, target, axis=1)  # (P, grids - 1, 2 pairs)
    rows = diff.reshape(-1, diff.shape[-1])
    n = rows.shape[1]
    # variables (a, b, m): maximise m subject to m - diff . (a, b) <= 0, |a_i|, |b_i| <= 1
    res = linprog(c=np.r_[np.zeros(n), -1.0], A_ub=np.c_[-rows, np.ones(len(rows))], b_ub=np.zeros(len(rows)),
                  bounds=[(-1, 1)] * n + [(None, None)], method="highs")
    return max(0.0, float(-res.fun))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", help="checkpoint whose config.json to read (default: the embedded target)")
    ap.add_argument("--out", help="also write the table as JSON here")
    a = ap.parse_args(argv)
    if a.target is None:
        from sparrow.defaults import target_path

        a.target = target_path()
    path = os.path.join(a.target, "config.json")
    if not os.path.isfile(path):
        print(f"mrope_time_reach: {path} not found; give --target DIR of a Qwen2.5-VL checkpoint", file=sys.stderr)
        return 2
    text = json.load(open(path))["text_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    section = list(rope["mrope_section"])
    # the evaluation's 512- and 3072-token clips: 8 grids a step apart; 48 grids half a step apart (8 fps), of
    # which HF's integer positions keep 24 distinct times. Descriptions run from ~10 to ~200 tokens past the video.
    cases = [("512 tokens", 8, 1.0), ("3072 tokens", 24, 1.0)]
    configs = [("this target", theta, section[0])] + [(f"{k} temporal pairs", theta, k)
                                                      for k in (12, 16) if k != section[0]]
    table = []
    print(f"theta {theta:g}, head_dim {head_dim}, mrope_section {section}; margin over query positions 10-200 past "
          f"the video (0 = position alone cannot single out that grid)")
    for name, th, pairs in configs:
        for case, grids, step in cases:
            row = {"config": name, "temporal_pairs": pairs, "theta": th, "clip": case,
                   **{w: round(time_reach_margin(th, head_dim, pairs, grids, grids + 10, grids + 200, step, w), 4)
                      for w in ("first", "last")}}
            table.append(row)
            print(f"  {name:22s} {case:12s} first grid {row['first']:.3f}   last grid {row['last']:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"theta": theta, "head_dim": head_dim, "mrope_section": section, "rows": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
