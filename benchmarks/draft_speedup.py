"""Accepted length and wall-time speedup of the shipped drafts on held-out synthetic clips.

    python benchmarks/draft_speedup.py [--buckets 512,8192] [--clips 10] [--out benchmarks/results/drafts_cpu]

For each visual-token bucket (224 x 224 frames, 64 visual tokens per 2 frames), each clip is answered with
--method ar, sparrow and eagle (greedy, same inputs, interleaved); every speculative output is checked against
ar token for token. Reports tau (bonus token included), DSR (decode speedup over ar) and ESR (end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import torch

import sparrow
from sparrow import defaults
from sparrow.synthetic.evaluate import SIDE, frames_for_bucket
from sparrow.synthetic.world import make_clip
from sparrow.video import Video


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=None)
    ap.add_argument("--sparrow-draft", default=None)
    ap.add_argument("--eagle-draft", default=None)
    ap.add_argument("--buckets", default="512,8192")
    ap.add_argument("--clips", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", default="benchmarks/results/drafts_cpu")
    a = ap.parse_args()
    target = sparrow.load_target(a.target or defaults.target_path(), device="cpu")
    drafts = {"sparrow": sparrow.load_draft(a.sparrow_draft or defaults.draft_path("sparrow"), target),
              "eagle": sparrow.load_draft(a.eagle_draft or defaults.draft_path("eagle"), target)}
    rows = []
    for bucket in [int(b) for b in a.buckets.split(",")]:
        n = frames_for_bucket(bucket)
        for i in range(a.clips):
            clip = make_clip(3 * 10**9 + bucket * 100 + i, n, SIDE, SIDE, fps=4.0)
            video = Video(frames=clip.frames, fps=4.0, indices=np.arange(n), total_frames=n)
            inputs = target.prepare(video, "Describe the video.", max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE)
            outs = {m: sparrow.generate(target, drafts.get(m), inputs, max_new_tokens=a.max_new_tokens, method=m)
                    for m in ("ar", "sparrow", "eagle")}
            ar = outs["ar"].stats
            for m, o in outs.items():
                s = o.stats
                rows.append({"bucket": bucket, "clip": i, "method": m, "visual_tokens": s.visual_tokens,
                             "new_tokens": s.new_tokens, "tau": s.tau, "prefill_s": s.prefill_s,
                             "decode_s": s.decode_s, "draft_s": s.draft_s, "verify_s": s.verify_s,
                             "lossless": o.token_ids == outs["ar"].token_ids,
                             "dsr": ar.decode_s / s.decode_s, "esr": (ar.prefill_s + ar.decode_s) / (s.prefill_s + s.decode_s)})
            print(bucket, i, {m: round(o.stats.tau, 2) for m, o in outs.items()},
                  {m: round(ar.decode_s / o.stats.decode_s, 2) for m, o in outs.items()}, flush=True)
    summary = {}
    for bucket in sorted({r["bucket"] for r in rows}):
        for m in ("ar", "sparrow", "eagle"):
            rs = [r for r in rows if r["bucket"] == bucket and r["method"] == m]
            dec = sum(r["decode_s"] for r in rs)
            ar_dec = sum(r["decode_s"] for r in rows if r["bucket"] == bucket and r["method"] == "ar")
            ar_all = sum(r["decode_s"] + r["prefill_s"] for r in rows if r["bucket"] == bucket and r["method"] == "ar")
            summary[f"{bucket}/{m}"] = {
                "visual_tokens": int(np.mean([r["visual_tokens"] for r in rs])),
                "tau": float(np.mean([r["tau"] for r in rs])), "dsr": ar_dec / dec,
                "esr": ar_all / sum(r["decode_s"] + r["prefill_s"] for r in rs),
                "lossless": all(r["lossless"] for r in rs), "clips": len(rs),
                "draft_ms_per_token": 1e3 * sum(r["draft_s"] for r in rs) / sum(r["new_tokens"] for r in rs)}
    meta = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": "float32", "max_new_tokens": a.max_new_tokens, "tree": "top-k 8, depth 5, 30 tokens"}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    json.dump({"meta": meta, "summary": summary, "rows": rows}, open(a.out + ".json", "w"), indent=1)
    lines = ["| visual tokens | method | tau | DSR | ESR | lossless |", "|---|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {s['visual_tokens']} | {k.split('/')[1]} | {s['tau']:.2f} | {s['dsr']:.2f}x | "
                     f"{s['esr']:.2f}x | {'yes' if s['lossless'] else 'NO'} |")
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(s["lossless"] for s in summary.values()):
        raise SystemExit("a speculative output differed from ar")


if __name__ == "__main__":
    main()
