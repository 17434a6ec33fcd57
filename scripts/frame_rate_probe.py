"""Is a target's fall on long clips the temporal span of their positions, or what their frames show?

    .venv/bin/python scripts/frame_rate_probe.py [--target DIR] [--bucket 8192] [--clips 20] [--fps 4,8,16]
        [--out benchmarks/results/frame_rate_probe.json]

The held-out clips of an `evaluate-target` bucket (the same seeds and frames) are described with the video's frame
rate declared as each of `--fps`. The visual tokens stay the same; only the temporal mRoPE positions change, a
frame pair's stepping by 2 / fps x tokens_per_second (2): at 4 fps, the evaluation's rate, an 8192-token clip spans
127 positions, at 8 fps 63, at 16 fps 31 (the training clips span up to 94). If accuracy comes back at the higher
rates, the span is what the target cannot read; if not, it is the frames. Greedy, plain decoding; the rows at 4
fps are the evaluation's own texts. Writes JSON (rows, and per rate the mean of each score) after every clip, and
prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os

from sparrow.synthetic.evaluate import FIELDS  # the score fields summarised per rate


def describe_at(target, bucket: int, i: int, fps: float, max_new_tokens: int = 160) -> dict:
    """The i-th held-out clip of `bucket` (rendered as `evaluate-target` renders it, at 4 fps) described with its
    frame rate declared as `fps`: the row {seed, fps, text, temporal_span, score fields}."""
    from sparrow import generate
    from sparrow.synthetic.evaluate import held_out_inputs, held_out_seed
    from sparrow.synthetic.text import score_description

    seed = held_out_seed(bucket, i)
    clip, inputs = held_out_inputs(target, bucket, seed, "Describe the video.", declared_fps=fps)
    out = generate(target, None, inputs, max_new_tokens=max_new_tokens, method="ar")
    tps = target.model.config.vision_config.tokens_per_second
    span = int((int(inputs["video_grid_thw"][0, 0]) - 1) * float(inputs["second_per_grid_ts"][0]) * tps)
    return {"seed": seed, "fps": fps, "temporal_span": span, "text": out.text,
            **score_description(out.text, clip.truth)}


def summarise(rows: list[dict]) -> dict:
    """Per declared frame rate: the clips and the mean of each score field."""
    out = {}
    for fps in sorted({r["fps"] for r in rows}):
        rs = [r for r in rows if r["fps"] == fps]
        out[f"{fps:g}"] = {"clips": len(rs), "temporal_span": rs[0]["temporal_span"],
                           **{k: sum(r[k] for r in rs) / len(rs) for k in FIELDS}}
    return out


def main(argv=None) -> dict:
    import sparrow

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="default: the embedded target")
    ap.add_argument("--bucket", type=int, default=8192, help="visual tokens of the held-out clips")
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--fps", default="4,8,16", help="frame rates to declare, comma-separated")
    ap.add_argument("--out", default="benchmarks/results/frame_rate_probe.json")
    a = ap.parse_args(argv)
    try:
        rates = [float(x) for x in a.fps.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < float("inf") for r in rates) or a.clips < 1 or a.bucket < 1:
        raise SystemExit(f"frame_rate_probe.py: give positive --fps rates (got {a.fps!r}), --clips and --bucket")
    target = sparrow.load_target(a.target, device="cpu")
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    from tqdm import tqdm

    for i in tqdm(range(a.clips), desc=f"{a.bucket} tokens"):
        for fps in rates:
            rows.append(describe_at(target, a.bucket, i, fps))
            result = {"target": a.target or "embedded", "bucket": a.bucket, "summary": summarise(rows), "rows": rows}
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    for fps, s in result["summary"].items():
        print(f"{fps} fps (temporal span {s['temporal_span']}): " + " ".join(
            f"{k} {s[k]:.3f}" for k in FIELDS))
    return result


if __name__ == "__main__":
    main()
