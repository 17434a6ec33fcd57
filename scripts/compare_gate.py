"""Compare a candidate target's gate against the shipped target's evaluation, clip by clip.

    .venv/bin/python scripts/compare_gate.py GATE.json [GATE2.json ...] [--base benchmarks/results/target_eval.json]

A gate is the `evaluate-target --out` file (JSON) of a candidate on some of the same held-out clips (same buckets and
seeds); several files (e.g. one per process) are read as one. Both evaluations describe the same clips, so the
difference in attribute accuracy is taken per clip and its standard error is that of the mean of the paired
differences, far smaller than the spread of either accuracy over 200 clips (about +-0.015). Prints, per bucket, the
candidate's fields with the base's in brackets and the paired difference; then, over the clips with exactly one
event, how often each side writes that event exactly right, by kind and by lone object against a scene of two or
three objects (docs/embedded_target.md quotes these lines).
"""

from __future__ import annotations

import argparse
import collections
import json
import math

from sparrow.synthetic.evaluate import FIELDS, truth_of
from sparrow.synthetic.text import parse_description


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for fewer than two values)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def rows_of(path: str) -> list[dict]:
    """The rows of an `evaluate-target --out` JSON file. Raises SystemExit (one line) for anything else."""
    try:
        rows = json.load(open(path))["rows"]
        if all({"bucket", "seed", "blank", "text", *FIELDS} <= set(r) for r in rows):
            return rows
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise SystemExit(f"compare_gate: {path} is not an evaluate-target result (JSON with rows of bucket, seed, text "
                     "and scores); give the file that evaluate-target --out wrote")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gates", nargs="+", help="the candidate's evaluate-target JSON file(s)")
    ap.add_argument("--base", default="benchmarks/results/target_eval.json", help="the evaluation to compare against")
    a = ap.parse_args(argv)
    base = {(r["bucket"], r["seed"]): r for r in rows_of(a.base) if not r["blank"]}
    pairs = collections.defaultdict(list)
    for path in a.gates:
        for r in rows_of(path):
            if not r["blank"] and (r["bucket"], r["seed"]) in base:
                pairs[r["bucket"]].append((r, base[(r["bucket"], r["seed"])]))
    if not pairs:
        raise SystemExit(f"compare_gate: no clip of {', '.join(a.gates)} is in {a.base}; evaluate the same buckets "
                         "and clips (evaluate-target --buckets B --clips N)")
    every = []
    for bucket in sorted(pairs):
        d = [r["attributes"] - b["attributes"] for r, b in pairs[bucket]]
        every += d
        m, se = mean_se(d)
        fields = " ".join(f"{k} {sum(r[k] for r, _ in pairs[bucket]) / len(d):.3f} "
                          f"({sum(b[k] for _, b in pairs[bucket]) / len(d):.3f})" for k in FIELDS)
        print(f"{bucket} tokens, {len(d)} clips: {fields}; paired difference {m:+.3f} +- {se:.3f}")
    m, se = mean_se(every)
    print(f"all {len(every)} clips: paired difference {m:+.3f} +- {se:.3f}")
    right = collections.defaultdict(lambda: [0, 0, 0])  # (scene, kind) -> candidate right, base right, clips
    for bucket in pairs:
        for r, b in pairs[bucket]:
            truth = truth_of(r["seed"], bucket)
            if len(truth["events"]) != 1:
                continue
            e = truth["events"][0]
            o = next(o for o in truth["objects"] if o["id"] == e["object"])
            want = [(e["type"], o["colour"], o["shape"])]
            k = right["lone" if len(truth["objects"]) == 1 else "two or three objects", e["type"]]
            k[0] += parse_description(r["text"])["events"] == want
            k[1] += parse_description(b["text"])["events"] == want
            k[2] += 1
    for (scene, kind), (new, old, n) in sorted(right.items()):
        print(f"one event, {scene}, {kind}: right in {new} of {n} clips (base {old})")


if __name__ == "__main__":
    main()
