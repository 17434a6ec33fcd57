"""vLLM serving benchmark: plain vLLM, vLLM with the eagle draft (visual entries in its cache) and vLLM with the
Sparrow draft (text entries only), on the embedded target, at several numbers of concurrent requests and video
lengths; and the draft's prompt pass against the video's length.

    VENV/bin/python benchmarks/vllm_bench.py [--visual-tokens 512,8192] [--concurrency 1,4,16]
        [--prefill-lengths 512,2048,8192] [--max-new-tokens 96] [--out benchmarks/results/vllm_cpu]

(VENV from scripts/install-vllm.sh.) For each method one engine (speculation: 4 draft tokens a step, greedy), and
for each length and concurrency N one batch of N different synthetic clips submitted together, after an untimed
warm-up batch: output tokens/s = the batch's new tokens / its wall time (prefill included), decode tokens/s a
request (vLLM's first-to-last-token times), tau = 1 + accepted / drafts (vLLM's counters), and whether every
speculative answer equals plain vLLM's. The draft's prompt pass: the proposer's first call for one request at each
length (seconds of the whole proposal at the prefill step: the draft's pass over the prompt's entries and its
3 chain steps), with the entries it holds. Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import sparrow
from sparrow import bench, defaults, serving

METHODS = ("ar", "eagle", "sparrow")


def requests_for(target, visual_tokens: int, n: int, seed: int) -> list:
    frames = bench.frames_for(target, visual_tokens)
    side = bench.SIDE * bench.SIDE
    out = []
    for s in bench.synthetic_samples(n, frames, seed=seed):
        out.append(serving.request(target, bench.sample_video(s, frames), s.prompt, max_pixels=side, min_pixels=side))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--visual-tokens", default="512,8192")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prefill-lengths", default="512,2048,8192")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/vllm_cpu")
    a = ap.parse_args()
    lengths = [int(x) for x in a.visual_tokens.split(",")]
    conc = [int(x) for x in a.concurrency.split(",")]
    pre_lengths = [int(x) for x in a.prefill_lengths.split(",")]
    from sparrow.vllm_plugin import SparrowProposer

    target = sparrow.load_target(None, device="cpu")
    reqs = {(vt, n): requests_for(target, vt, n, seed=11 + n) for vt in lengths for n in conc}
    single = {vt: requests_for(target, vt, 1, seed=5) for vt in pre_lengths}
    rows, prefill, answers = [], [], {}
    max_len = max(lengths + pre_lengths) + 512
    for method in METHODS:
        llm = serving.make_engine(defaults.TARGET, defaults.draft_path(method) if method != "ar" else None,
                                  method=method, max_model_len=max_len, num_speculative_tokens=a.num_speculative_tokens,
                                  max_num_seqs=max(conc))
        serving.generate_vllm(llm, target, requests_for(target, 512, 2, seed=1), max_new_tokens=8)  # warm-up
        if method != "ar":
            for vt in pre_lengths:
                SparrowProposer.passes.clear()
                serving.generate_vllm(llm, target, single[vt], max_new_tokens=2, method=method)
                first = list(SparrowProposer.passes)[0]
                prefill.append({"method": method, "visual_tokens": vt, "prompt_tokens": first["entries"],
                                "draft_entries": first["kept"], "visual_entries": first["visual_kept"],
                                "ms": round(1e3 * first["seconds"], 2)})
                print(json.dumps(prefill[-1]), flush=True)
        for (vt, n), rs in reqs.items():
            t0 = time.perf_counter()
            res = serving.generate_vllm(llm, target, rs, max_new_tokens=a.max_new_tokens, method=method)
            wall = time.perf_counter() - t0
            answers[(method, vt, n)] = [r["token_ids"] for r in res]
            new = sum(r["new_tokens"] for r in res)
            rows.append({"method": method, "visual_tokens": vt, "concurrency": n, "new_tokens": new,
                         "wall_s": round(wall, 3), "tokens_per_s": round(new / wall, 2),
                         "decode_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in res), 2),
                         "tau": round(res[0]["tau"], 3),
                         "prefill_s": round(statistics.median(r["prefill_s"] for r in res), 3)})
            print(json.dumps(rows[-1]), flush=True)
        serving.shutdown_engine(llm)
    for r in rows:
        r["identical_to_plain"] = answers[(r["method"], r["visual_tokens"], r["concurrency"])] == \
            answers[("ar", r["visual_tokens"], r["concurrency"])]
        base = next(b for b in rows if b["method"] == "ar" and b["visual_tokens"] == r["visual_tokens"]
                    and b["concurrency"] == r["concurrency"])
        r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
    import torch
    import vllm

    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "vllm": vllm.__version__, "torch": torch.__version__, "dtype": "float32",
            "num_speculative_tokens": a.num_speculative_tokens, "max_new_tokens": a.max_new_tokens}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "draft_prompt_pass": prefill}, f, indent=1)
    lines = ["| visual tokens | concurrent requests | method | output tok/s | speedup | tau | decode tok/s a request | "
             "identical |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['visual_tokens']} | {r['concurrency']} | {r['method']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['tau']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{'yes' if r['identical_to_plain'] else 'NO'} |")
    lines += ["", "| visual tokens | method | draft prompt pass (ms) | draft entries | visual entries among them |",
              "|---|---|---|---|---|"]
    for p in prefill:
        lines.append(f"| {p['visual_tokens']} | {p['method']} | {p['ms']:.1f} | {p['draft_entries']} | "
                     f"{p['visual_entries']} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHODS:
        for vt in lengths:
            pts = [(r["concurrency"], r["tokens_per_s"]) for r in rows if r["method"] == m and r["visual_tokens"] == vt]
            ax[0].plot(*zip(*pts), marker="o", label=f"{m}, {vt} visual")
    ax[0].set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s", title="vLLM on CPU (fp32)")
    ax[0].legend(fontsize=7)
    for m in ("eagle", "sparrow"):
        pts = [(p["visual_tokens"], p["ms"]) for p in prefill if p["method"] == m]
        ax[1].plot(*zip(*pts), marker="o", label=m)
    ax[1].set(xscale="log", yscale="log", xlabel="visual tokens", ylabel="ms", title="the draft's prompt pass")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
