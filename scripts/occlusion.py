"""How much of the events the frames show: in the held-out clips with one event, how often the event's object is
mostly covered by the objects drawn over it, and how often an evaluation writes the event right with and without.

    .venv/bin/python scripts/occlusion.py [EVAL.json ...] [--bucket 512] [--covered 0.5]

EVAL is an `evaluate-target --out` file (default: benchmarks/results/target_eval.json, the shipped target's). Each
clip is drawn again at 224 px from its seed (the held-out clips' size) and `world.visible_share` gives, per object,
the share of its pixels that show, averaged over its frames. Prints, per scene (objects/events, one-event scenes
only), how many event objects show less than `--covered` of themselves, and how many of those clips and of the
others each file gets the events of exactly right (`compare_gate.event_error`).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # compare_gate, beside this file

from compare_gate import event_error, rows_of  # noqa: E402

from sparrow.synthetic.evaluate import SIDE, frames_for_bucket  # noqa: E402
from sparrow.synthetic.text import parse_description, true_events  # noqa: E402
from sparrow.synthetic.world import make_clip, visible_share  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evals", nargs="*", default=["benchmarks/results/target_eval.json"])
    ap.add_argument("--bucket", type=int, default=512, help="the visual-token bucket to read (default 512)")
    ap.add_argument("--covered", type=float, default=0.5,
                    help="an event's object that shows less than this share of itself counts as covered")
    a = ap.parse_args(argv)
    files = {path: {r["seed"]: r for r in rows_of(path) if r["bucket"] == a.bucket and not r["blank"]}
             for path in a.evals}
    seeds = sorted(set.intersection(*(set(rows) for rows in files.values())))
    if not seeds:
        raise SystemExit(f"occlusion: no clip of bucket {a.bucket} is in all of {', '.join(a.evals)}")
    scenes = collections.defaultdict(lambda: {"clips": 0, "covered": 0, **{p: [0, 0] for p in files}})
    for seed in seeds:
        truth = make_clip(seed, frames_for_bucket(a.bucket), SIDE, SIDE, fps=4.0).truth
        if len(truth["events"]) != 1:
            continue
        covered = visible_share(truth)[truth["events"][0]["object"]] < a.covered
        s = scenes[f"{len(truth['objects'])}/1"]
        s["clips"] += 1
        s["covered"] += covered
        want = true_events(truth)
        for path, rows in files.items():
            right = event_error(parse_description(rows[seed]["text"])["events"], want) is None
            s[path][0 if covered else 1] += right
    print(f"bucket {a.bucket}: clips with one event, by scene; the event's object counts as covered when less than "
          f"{a.covered:.0%} of it shows on average")
    for name in sorted(scenes):
        s = scenes[name]
        parts = [f"{os.path.basename(p)}: right {s[p][0]} of {s['covered']} covered, {s[p][1]} of "
                 f"{s['clips'] - s['covered']} not" for p in files]
        print(f"  {name}: {s['clips']} clips, {s['covered']} covered | " + " | ".join(parts))


if __name__ == "__main__":
    main()
