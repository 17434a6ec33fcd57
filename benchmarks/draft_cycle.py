"""Does the sparrow draft's time per cycle depend on the video length? Measured with the lengths interleaved.

    python benchmarks/draft_cycle.py [--visual-tokens 512,8192,25088] [--tree-tokens 8] [--repeats 200]
                                     [--shape tiny|7b] [--out benchmarks/results/draft_cycle_cpu]

One target (random weights, `gpu_timing.SHAPES`) with one KV cache per length (visual tokens + ~80 text tokens),
and one sparrow-mode `DraftRunner` per length, fed as in generation. Each repeat visits every length in turn and
times one draft cycle (EAGLE-2 tree of top-k 8, depth 5, N tokens, then the catch-up on 4 accepted tokens):
- alone: the draft's own work. Its cache holds the same text entries at every length (VATA), so this should not
  move with the length; timing the lengths one after another instead of interleaved lets machine drift pass for a
  length effect;
- after a verification: the target's forward over N + 1 tree tokens against the whole cache runs first (untimed),
  as it does in generation. On a CPU that pass streams the whole KV cache (about 300 MB at 25k visual tokens for
  the tiny shape in fp32) through the CPU caches and evicts the draft's weights, so the next cycle starts cold.
Medians in milliseconds; writes JSON and a markdown table. CPU (fp32) or CUDA (bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from types import SimpleNamespace

import torch

from gpu_timing import (CACHE_KW, SHAPES, TEXT_TOKENS, build_target, device_for, make_draft, once_ms,
                        random_prompt_cache, random_tree_mask)
from sparrow.draft import DraftRunner
from sparrow.targets.base import Prefill
from sparrow.tree import TreeConfig, build_tree


class Length:
    """One context length: the target's KV cache (random prompt), a verification closure and a draft runner."""

    def __init__(self, model, draft, visual: int, N: int, device, dtype):
        H = model.config.text_config.hidden_size
        L = visual + TEXT_TOKENS
        lm = model.model
        self.cache = random_prompt_cache(model, L, N + 16, device, dtype)
        n = self.cache.length
        mask = random_tree_mask(N, n, torch.Generator().manual_seed(0), device)
        vpos = torch.arange(n, n + N + 1, device=device).view(1, 1, -1).expand(3, 1, -1)
        ids = torch.zeros(1, N + 1, dtype=torch.long, device=device)

        def verify():
            out = lm(input_ids=ids, position_ids=vpos, attention_mask=mask, **{CACHE_KW: self.cache}, use_cache=True)
            model.lm_head(out.last_hidden_state)
            self.cache.truncate(n)

        self.verify = verify
        vis = torch.zeros(L, dtype=torch.bool, device=device)
        vis[TEXT_TOKENS // 2: TEXT_TOKENS // 2 + visual] = True
        pre = Prefill(logits=torch.zeros(model.config.text_config.vocab_size, device=device),
                      hidden_top=torch.randn(L, H, device=device, dtype=dtype), hidden_mid=None, input_embeds=None,
                      positions=torch.arange(L, device=device).expand(3, -1), visual_mask=vis)
        self.tree = TreeConfig(top_k=8, depth=5, tokens=N)
        self.runner = DraftRunner(draft, SimpleNamespace(device=device, dtype=dtype, rope_delta=0), pre, "sparrow",
                                  64, self.tree)
        self.logp = self.runner.prefill(torch.zeros(L, dtype=torch.long, device=device), pre, 0)
        self.acc = torch.zeros(4, dtype=torch.long, device=device)
        self.hidden = torch.randn(4, H, device=device, dtype=dtype)
        self.index = L + 1

    def cycle(self):
        build_tree(0, self.logp, self.runner.expand, self.tree)
        self.logp = self.runner.catch_up(self.acc, self.hidden, self.index)
        c = self.runner.cache  # forget the 4 caught-up entries: every cycle sees the same cache
        c.committed -= 4
        c.length = c.committed


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--visual-tokens", default="512,8192,25088")
    ap.add_argument("--tree-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--out", default="benchmarks/results/draft_cycle_cpu")
    a = ap.parse_args()
    device, dtype = device_for(a.shape)
    torch.manual_seed(0)
    model = build_target(a.shape, device, dtype)
    draft = make_draft(model, device, dtype)
    visual = [int(x) for x in a.visual_tokens.split(",")]
    lengths = {v: Length(model, draft, v, a.tree_tokens, device, dtype) for v in visual}
    alone = {v: [] for v in visual}
    after = {v: [] for v in visual}
    for r in range(a.repeats + 5):  # the first 5 rounds warm up
        for v in visual[r % len(visual):] + visual[: r % len(visual)]:
            x = lengths[v]
            t_alone = once_ms(x.cycle, device)
            x.verify()
            t_after = once_ms(x.cycle, device)
            if r >= 5:
                alone[v].append(t_alone)
                after[v].append(t_after)
    rows = [{"visual_tokens": v, "draft_alone_ms": round(statistics.median(alone[v]), 3),
             "draft_after_verify_ms": round(statistics.median(after[v]), 3)} for v in visual]
    base = rows[0]
    for row in rows:
        for k in ("draft_alone_ms", "draft_after_verify_ms"):
            row[k.replace("_ms", "_vs_first")] = round(row[k] / base[k], 3)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype), "shape": a.shape,
            "tree_tokens": a.tree_tokens, "repeats": a.repeats, "mode": "sparrow"}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"{meta['device']}, {a.shape} target, {dtype}, sparrow draft, tree of {a.tree_tokens} tokens; ms per "
             f"cycle (medians of {a.repeats}, lengths interleaved)", "",
             "| visual tokens | draft alone | vs first | draft after a verification | vs first |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['visual_tokens']} | {row['draft_alone_ms']:.2f} | {row['draft_alone_vs_first']:.2f}x | "
                     f"{row['draft_after_verify_ms']:.2f} | {row['draft_after_verify_vs_first']:.2f}x |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
