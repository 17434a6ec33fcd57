"""Compare a candidate target's gate against the shipped target's evaluation, clip by clip.

    .venv/bin/python scripts/compare_gate.py GATE.json [GATE2.json ...] [--base benchmarks/results/target_eval.json]

A gate is the `evaluate-target --out` file (JSON) of a candidate on some of the same held-out clips (same buckets and
seeds); several files (e.g. one per process) are read as one. Both evaluations describe the same clips, so the
difference in attribute accuracy is taken per clip and its standard error is that of the mean of the paired
differences, far smaller than the spread of either accuracy over 200 clips (about +-0.015). Prints, per bucket, the
candidate's fields with the base's in brackets and the paired difference; then, over the clips with exactly one
event, how often each side writes that event exactly right, by kind and by lone object against a scene of two or
three objects; last, per scene (objects/events), how many clips each side gets the events of exactly right and how
the rest go wrong (`event_error`; docs/embedded_target.md quotes these lines).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os

from sparrow.synthetic.evaluate import FIELDS, truth_of
from sparrow.synthetic.text import parse_description, true_events


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for fewer than two values)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def rows_of(path: str) -> list[dict]:
    """The rows of an `evaluate-target --out` JSON file. Raises SystemExit (one line) for anything else."""
    if not os.path.isfile(path):
        raise SystemExit(f"compare_gate: {path}: no such file (evaluate-target --out OUT writes OUT.json)")
    try:
        rows = json.load(open(path))["rows"]
        if all({"bucket", "seed", "blank", "text", *FIELDS} <= set(r) for r in rows):
            return rows
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise SystemExit(f"compare_gate: {path} is not an evaluate-target result (JSON with rows of bucket, seed, text "
                     "and scores); give the file that evaluate-target --out wrote")


ERRORS = ("said none", "invented", "too few or too many", "wrong order", "wrong kind", "wrong object")


def event_error(claimed: list[tuple], want: list[tuple]) -> str | None:
    """How a description's events (`parse_description`'s [(kind, colour, shape)]) miss the true ones: None when
    exactly right, else one of ERRORS, the first that applies (an event-free description of an eventful clip is
    "said none", never "too few")."""
    if claimed == want:
        return None
    if not claimed:
        return "said none"
    if not want:
        return "invented"
    if len(claimed) != len(want):
        return "too few or too many"
    kinds, wanted = [c[0] for c in claimed], [w[0] for w in want]
    if kinds == wanted:
        return "wrong object"
    return "wrong order" if sorted(kinds) == sorted(wanted) else "wrong kind"


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
    errors = collections.defaultdict(lambda: [collections.Counter(), collections.Counter()])  # scene -> per side
    for bucket in pairs:
        for r, b in pairs[bucket]:
            truth = truth_of(r["seed"], bucket)
            want = true_events(truth)
            claims = [parse_description(x["text"])["events"] for x in (r, b)]
            for side, claimed in enumerate(claims):
                errors[f"{len(truth['objects'])}/{len(want)}"][side][event_error(claimed, want) or "right"] += 1
            if len(want) != 1:
                continue
            k = right["lone" if len(truth["objects"]) == 1 else "two or three objects", want[0][0]]
            k[0] += claims[0] == want
            k[1] += claims[1] == want
            k[2] += 1
    for (scene, kind), (new, old, n) in sorted(right.items()):
        print(f"one event, {scene}, {kind}: right in {new} of {n} clips (base {old})")
    for scene, (new, old) in sorted(errors.items()):
        wrong = ", ".join(f"{e} {new[e]} ({old[e]})" for e in ERRORS if new[e] or old[e])
        print(f"events, {scene} objects/events: right in {new['right']} of {sum(new.values())} clips "
              f"(base {old['right']})" + (f"; {wrong}" if wrong else ""))


if __name__ == "__main__":
    main()
