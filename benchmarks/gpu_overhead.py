"""Where the time of one generation goes on a GPU, for the embedded (tiny) target: a diagnostic.

    python benchmarks/gpu_overhead.py [--device cuda] [--visual-tokens 3072] [--repeats 5] [--out runs/gpu/overhead]
        [--no-profile] [--warm-up] [--compile-draft MODE]

Prints and writes (OUT.json):
- the cost of one host-device synchronisation (`.item()` of a scalar on the device), in microseconds;
- the target's decode step through `Target.forward` (our cache, no sync inside), ms, median and spread of 50;
- transformers' `generate` and our `generate` (ar, sparrow, eagle) on one clip, each `repeats` times in turn: decode
  ms per new token, and for the drafts ms per cycle of drafting and verification, so that one-off costs of a first
  run show apart from the steady state;
- the synchronisations in one sparrow generation (torch's sync debug mode counts them), per cycle;
- OUT_profile.txt: torch's profiler tables (operators by their own CPU time) of a sparrow generation on a new clip,
  its first run and its second, to tell where a first run's extra time goes (not with --no-profile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

from sparrow import defaults, generate, load_draft, load_target, warm_up
from sparrow.bench import build_inputs, frames_for, synthetic_samples

from gpu_timing import once_ms  # benchmarks/, the script's own folder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--visual-tokens", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/gpu/overhead")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled first and second runs (OUT_profile.txt)")
    ap.add_argument("--warm-up", action="store_true",
                    help="call sparrow.warm_up with each draft after loading, as `sparrow generate` does on CUDA: "
                         "repeat 0 should then decode within 20%% of the later repeats")
    ap.add_argument("--compile-draft", metavar="MODE",
                    help="compile each draft's tree step (SparrowDraft.compile_tree) in this torch.compile mode, e.g. "
                         "default or reduce-overhead (CUDA graphs); implies --warm-up")
    a = ap.parse_args()
    target = load_target(dtype=a.dtype, device=a.device)
    dev = target.device
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(target.dtype),
           "compile_draft": a.compile_draft}
    drafts = {m: load_draft(defaults.draft_path(m), target) for m in ("sparrow", "eagle")}
    if a.compile_draft:
        for d in drafts.values():
            d.compile_tree(a.compile_draft)
    if a.warm_up or a.compile_draft:
        res["warm_up_s"] = round(sum(warm_up(target, d, m) for m, d in drafts.items()), 3)

    x = torch.ones((), device=dev)
    for _ in range(10):
        x.item()
    t0 = time.perf_counter()
    for _ in range(1000):
        (x + 1).item()
    res["sync_us"] = round(1e3 * (time.perf_counter() - t0), 2)  # 1000 calls: ms total = us each
    print(json.dumps(res), flush=True)

    frames = frames_for(target, a.visual_tokens)
    inputs = build_inputs(target, synthetic_samples(1, frames, seed=9)[0], frames)
    L = inputs["input_ids"].shape[1]
    cache = target.new_cache(L + 80)
    with torch.inference_mode():
        target.prefill(inputs, cache)
        n = cache.length
        tok = torch.zeros(1, dtype=torch.long, device=dev)
        times = []
        for _ in range(55):
            times.append(once_ms(lambda: target.forward(tok, None, None, cache), dev))
            cache.truncate(n)
    times = sorted(times[5:])
    res["decode_step_ms"] = {"median": round(statistics.median(times), 3), "min": round(times[0], 3),
                             "p90": round(times[int(0.9 * len(times))], 3)}
    print(json.dumps({"decode_step_ms": res["decode_step_ms"]}), flush=True)

    runs = []
    for r in range(a.repeats):
        t = once_ms(lambda: target.hf_greedy(inputs, a.max_new_tokens, None), dev)
        runs.append({"repeat": r, "method": "hf_generate", "total_ms": round(t, 1)})
        print(json.dumps(runs[-1]), flush=True)
        for m in ("ar", "sparrow", "eagle"):
            out = generate(target, drafts.get(m), inputs, method=m, max_new_tokens=a.max_new_tokens)
            st = out.stats
            cyc = max(1, len(st.accept_lengths))
            runs.append({"repeat": r, "method": m, "new_tokens": st.new_tokens, "tau": round(st.tau, 2),
                         "prefill_ms": round(1e3 * st.prefill_s, 1),
                         "decode_ms_per_token": round(1e3 * st.decode_s / max(1, st.new_tokens - 1), 2),
                         "draft_ms_per_cycle": round(1e3 * (st.draft_s - st.draft_prefill_s) / cyc, 2),
                         "verify_ms_per_cycle": round(1e3 * st.verify_s / cyc, 2)})
            print(json.dumps(runs[-1]), flush=True)
    res["runs"] = runs

    if dev.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            out = generate(target, drafts["sparrow"], inputs, method="sparrow", max_new_tokens=a.max_new_tokens)
            torch.cuda.set_sync_debug_mode(0)
        where = {}
        for w in caught:
            key = f"{os.path.basename(w.filename)}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
        cycles = max(1, len(out.stats.accept_lengths))
        res["syncs"] = {"total": len(caught), "cycles": cycles, "per_cycle": round(len(caught) / cycles, 1),
                        "where": dict(sorted(where.items(), key=lambda kv: -kv[1])[:25])}
        print(json.dumps({"syncs": res["syncs"]}), flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump(res, open(a.out + ".json", "w"), indent=1)

    if a.no_profile:
        return
    # a first run on a new clip against a second run on it, under torch's profiler: where a first run's time goes
    fresh_inputs = build_inputs(target, synthetic_samples(1, frames, seed=10)[0], frames)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if dev.type == "cuda" else [])
    tables = []
    for label in ("first run on a new clip", "second run on it"):
        with torch.profiler.profile(activities=activities) as prof:
            t = once_ms(lambda: generate(target, drafts["sparrow"], fresh_inputs, method="sparrow",
                                         max_new_tokens=a.max_new_tokens), dev)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        tables.append(f"== sparrow, {label}: {t:.1f} ms (profiled)\n{table}")
        print(f"{label}: {t:.1f} ms (profiled)", flush=True)
    open(a.out + "_profile.txt", "w").write("\n\n".join(tables))


if __name__ == "__main__":
    main()
