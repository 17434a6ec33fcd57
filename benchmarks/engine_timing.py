"""Engine timing on a tiny random Qwen2.5-VL: decode step, tree verification (HF default path vs ours), and the
share of a speculative cycle spent in the draft (sparrow vs eagle mode), at several visual-token lengths.

    python benchmarks/engine_timing.py [--visual-tokens 1024,4096,16384] [--out benchmarks/results/engine_cpu]

HF default path: `DynamicCache` (concatenates on every update) + transformers' sdpa (repeats KV heads under a
mask). Ours: `sparrow.cache.KVCache` (preallocated, in-place accept) + the "sparrow" attention (GQA folded).
Times are medians over repeats, in milliseconds. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import DynamicCache

import sparrow
from sparrow.targets.base import cache_kwarg
from sparrow.tiny import make_tiny_target


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def frames_for(visual_tokens: int, side: int = 224) -> np.ndarray:
    per_pair = (side // 28) ** 2  # visual tokens per 2 frames
    n = 2 * max(1, round(visual_tokens / per_pair))
    return (np.random.RandomState(0).rand(n, side, side, 3) * 255).astype(np.uint8)


def tree_mask(q: int) -> torch.Tensor:
    """A representative tree mask: a random tree of q nodes (parents before children)."""
    g = torch.Generator().manual_seed(q)
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, q)])
    return sparrow.tree.tree_from_parents(torch.zeros(q, dtype=torch.long), parents)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--visual-tokens", default="1024,4096,16384")
    ap.add_argument("--tree-tokens", default="8,16,30")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/engine_cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    path = make_tiny_target(os.path.join(tmp, "t"), "qwen2_5_vl", hidden=a.hidden, layers=a.layers, heads=8,
                            kv_heads=2, init_std=0.05)
    ours = sparrow.load_target(path, device="cpu")
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    draft = sparrow.init_draft(ours, seed=0)
    rows = []
    for vt in [int(x) for x in a.visual_tokens.split(",")]:
        inputs = ours.prepare(frames_for(vt), "Describe the video.", max_pixels=224 * 224, min_pixels=224 * 224)
        L = inputs["input_ids"].shape[1]
        row = {"visual_tokens": int(ours.visual_mask(inputs["input_ids"][0]).sum()), "prompt_tokens": L}
        print(f"--- {row['visual_tokens']} visual tokens ({L} prompt tokens)", flush=True)
        with torch.inference_mode():
            # ours
            cache = ours.new_cache(L + 128)
            t = time.perf_counter()
            ours.prefill(inputs, cache)
            row["prefill_s"] = time.perf_counter() - t
            n = cache.length

            def ours_step(q):
                tr = tree_mask(q)

                def run():
                    ours.forward(torch.zeros(q, dtype=torch.long), tr.depths, tr.mask if q > 1 else None, cache)
                    cache.truncate(n)
                return run

            row["decode_ms_ours"] = median_ms(ours_step(1), a.repeats)
            # HF default
            dc = DynamicCache(config=hf.config)
            ckw = cache_kwarg(hf.model.forward)
            pos, _ = ours.prompt_positions(inputs)
            hf.model(**{k: v for k, v in inputs.items()}, position_ids=pos.unsqueeze(1), **{ckw: dc},
                     use_cache=True)

            def hf_step(q):
                tr = tree_mask(q)
                p = (n + ours.rope_delta + tr.depths).view(1, 1, -1).expand(3, 1, -1)
                mask = None
                if q > 1:
                    mask = torch.ones(1, 1, q, n + q, dtype=torch.bool)
                    mask[0, 0, :, n:] = tr.mask

                def run():
                    out = hf.model(input_ids=torch.zeros(1, q, dtype=torch.long), position_ids=p, attention_mask=mask,
                                   **{ckw: dc}, use_cache=True)
                    hf.lm_head(out.last_hidden_state)
                    dc.crop(-q)
                return run

            row["decode_ms_hf"] = median_ms(hf_step(1), a.repeats)
            for q in [int(x) for x in a.tree_tokens.split(",")]:
                row[f"verify{q}_ms_ours"] = median_ms(ours_step(q + 1), a.repeats)
                row[f"verify{q}_ms_hf"] = median_ms(hf_step(q + 1), a.repeats)
            del dc
        for method in ("sparrow", "eagle"):
            per = []  # (draft ms/cycle, verify ms/cycle, draft prompt pass s) of each run
            for _ in range(3):
                s = sparrow.generate(ours, draft, inputs, max_new_tokens=a.new_tokens, method=method,
                                     tree=sparrow.TreeConfig(8, 5, 30)).stats
                cycles = len(s.accept_lengths)
                per.append(((s.draft_s - s.draft_prefill_s) / cycles * 1e3, s.verify_s / cycles * 1e3,
                            s.draft_prefill_s))
            d_ms, v_ms, d_pre = (statistics.median(x) for x in zip(*per))
            row[f"{method}_draft_ms_per_cycle"] = d_ms
            row[f"{method}_verify_ms_per_cycle"] = v_ms
            row[f"{method}_draft_share"] = d_ms / (d_ms + v_ms)
            row[f"{method}_draft_prefill_s"] = d_pre
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": "float32", "hidden": a.hidden, "layers": a.layers,
            "heads": 8, "kv_heads": 2, "params_M": sum(p.numel() for p in ours.model.parameters()) / 1e6}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump({"meta": meta, "rows": rows}, open(a.out + ".json", "w"), indent=2)
    tts = [int(x) for x in a.tree_tokens.split(",")]
    lines = [f"Tiny random Qwen2.5-VL ({meta['params_M']:.1f}M params, {a.layers} layers, hidden {a.hidden}, GQA 8/2), "
             f"fp32, {meta['threads']} CPU threads. Times in ms (median of {a.repeats}).", "",
             "| visual tokens | decode HF | decode ours | " + " | ".join(f"verify {q}+1 HF | verify {q}+1 ours" for q in tts)
             + " | draft share sparrow | draft share eagle | draft ms/cycle sparrow | draft ms/cycle eagle |",
             "|---" * (3 + 2 * len(tts) + 4) + "|"]
    for r in rows:
        lines.append(f"| {r['visual_tokens']} | {r['decode_ms_hf']:.1f} | {r['decode_ms_ours']:.1f} | "
                     + " | ".join(f"{r[f'verify{q}_ms_hf']:.1f} | {r[f'verify{q}_ms_ours']:.1f}" for q in tts)
                     + f" | {r['sparrow_draft_share']:.0%} | {r['eagle_draft_share']:.0%} | "
                     f"{r['sparrow_draft_ms_per_cycle']:.1f} | {r['eagle_draft_ms_per_cycle']:.1f} |")
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
