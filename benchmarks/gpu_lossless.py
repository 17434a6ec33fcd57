"""Losslessness on a GPU: the embedded target's greedy output with sparrow, eagle and ar against transformers'
own `generate`, token for token, in float32 and bfloat16, on held-out synthetic clips at several visual-token lengths.

    python benchmarks/gpu_lossless.py [--device cuda] [--dtypes float32,bfloat16] [--clips 3]
                                      [--visual-tokens 512,3072,8192] [--max-new-tokens 96] [--out runs/gpu/lossless]

For each dtype, length, clip and method: whether the tokens equal `generate`'s, and where they first differ. In
float32 a difference is a bug. In bfloat16 tree verification (N + 1 query rows) and one-token decoding run different
kernels, whose rounding can flip a near-tie between two tokens: a difference there is reported with the target's
top-2 logit margin at that token under both computations, which tells a near-tie (margin ~ bf16 rounding) from a bug.
Writes OUT.json and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from sparrow import defaults, generate, load_draft, load_target
from sparrow.bench import build_inputs, frames_for, synthetic_samples


def margin_at(target, inputs: dict, tokens: list[int], at: int) -> float:
    """The target's top-1 minus top-2 logit after the prompt and tokens[:at], by one full forward (float)."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens[:at]], dtype=torch.long)], dim=1).to(target.device)
    kw = {k: (v.to(target.device) if torch.is_tensor(v) else v) for k, v in inputs.items() if k != "input_ids"}
    kw["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in kw:
        extra = torch.zeros(1, at, dtype=kw["mm_token_type_ids"].dtype, device=target.device)
        kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], extra], dim=1)
    with torch.inference_mode():
        logits = target.model(input_ids=ids, **kw).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--visual-tokens", default="512,3072,8192")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default="runs/gpu/lossless")
    a = ap.parse_args()
    rows = []
    for dtype in a.dtypes.split(","):
        target = load_target(dtype=dtype, device=a.device)
        drafts = {m: load_draft(defaults.draft_path(m), target) for m in ("sparrow", "eagle")}
        for v in [int(x) for x in a.visual_tokens.split(",")]:
            frames = frames_for(target, v)
            for s in synthetic_samples(a.clips, frames, seed=5):
                inputs = build_inputs(target, s, frames)
                ref = target.hf_greedy(inputs, a.max_new_tokens, None)
                for m in ("sparrow", "eagle", "ar"):
                    out = generate(target, drafts.get(m), inputs, method=m, max_new_tokens=a.max_new_tokens)
                    ids = out.token_ids
                    at = next((i for i, (x, y) in enumerate(zip(ref, ids)) if x != y), None)
                    if at is None and len(ref) != len(ids):
                        at = min(len(ref), len(ids))
                    row = {"dtype": dtype, "visual_tokens": int(target.visual_mask(inputs["input_ids"][0]).sum()),
                           "clip": s.id, "method": m, "tokens": len(ids), "hf_tokens": len(ref),
                           "identical": at is None, "first_difference": at, "tau": out.stats.tau}
                    if at is not None and at < min(len(ref), len(ids)):
                        row["margin_at_difference"] = margin_at(target, inputs, ref, at)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del target, drafts
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary = {}
    for r in rows:
        k = f"{r['dtype']} {r['method']}"
        summary.setdefault(k, [0, 0])
        summary[k][0] += r["identical"]
        summary[k][1] += 1
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump({"meta": meta, "identical": {k: f"{x}/{n}" for k, (x, n) in summary.items()}, "rows": rows},
              open(a.out + ".json", "w"), indent=1)
    for k, (x, n) in summary.items():
        print(f"{k}: identical to generate on {x} of {n}")


if __name__ == "__main__":
    main()
