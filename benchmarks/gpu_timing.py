"""GPU timing of a Qwen2.5-VL-7B-shaped target and its draft (random weights: timing does not depend on them).

    python benchmarks/gpu_timing.py [--visual-tokens 512,1536,3072,8192,16384,25088] [--tree-tokens 8,16,30,45,60]
                                    [--out benchmarks/results/gpu_timing] [--shape 7b|tiny]

For each context length (visual tokens + ~80 text tokens in the KV cache), through sparrow's own code paths
(KVCache + the GQA-folded "sparrow" attention for the target; DraftRunner + build_tree for the draft), bf16:
- the target's decode step (1 token) and tree verification (N + 1 tokens) in ms, with one dense tree mask and
  split (`sparrow.cache.split_tree_attention`: the cache by the fused kernel unmasked, the tree block by its mask),
  and the largest difference between the two paths' top states;
- the draft's time per cycle (EAGLE-2 tree of top-k 8, depth 5, N tokens, plus the catch-up on 4 accepted
  tokens) in `sparrow` mode (text-only cache) and `eagle` mode (every visual position cached);
- the projected DSR for tau = 3, 4, 5: tau x decode step / (draft cycle + verify).
Writes JSON and a markdown table. Any CUDA machine; `--shape tiny` runs a small model on CPU (smoke test). The
lengths are measured one after another, so on a CPU machine drift can pass for a length effect on the draft:
`draft_cycle.py` measures that with the lengths interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import Qwen2_5_VLModel

from sparrow.cache import KVCache, register_attention
from sparrow.draft import DraftConfig, SparrowDraft
from sparrow.draft import DraftRunner
from sparrow.targets.base import Prefill, cache_kwarg
from sparrow.tree import TreeConfig, build_tree, tree_from_parents

SHAPES = {  # Qwen2.5-VL-7B-Instruct text config; vision is irrelevant to decoding and kept minimal
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=12, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
TEXT_TOKENS = 80  # system prompt, question and template around the video
CACHE_KW = cache_kwarg(Qwen2_5_VLModel.forward)


def device_for(shape: str):
    """(device, dtype): CUDA in bf16 where there is one, else the CPU in fp32 (the 7b shape needs CUDA)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shape == "7b" and device.type != "cuda":
        raise SystemExit("the 7b shape needs a CUDA device; use --shape tiny on a CPU")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def build_target(shape: str, device, dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText

    t = SHAPES[shape]
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    text = dict(t, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]})
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=t["hidden_size"])
    cfg = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation=register_attention())
    return model.eval()


def once_ms(fn, device) -> float:
    """Milliseconds of one fn() call (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds of fn() over repeats (after 2 warm-up calls)."""
    for _ in range(2):
        fn()
    return statistics.median(once_ms(fn, device) for _ in range(repeats))


def make_draft(model, device, dtype) -> SparrowDraft:
    """A random one-layer draft of the target's text shape, sharing its embedding and LM head (as a trained one does)."""
    tc = model.config.text_config
    H = tc.hidden_size
    cfg = DraftConfig(family="qwen2_5_vl", hidden_size=H, intermediate_size=tc.intermediate_size,
                      num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
                      head_dim=H // tc.num_attention_heads, vocab_size=tc.vocab_size,
                      mrope_section=list(tc.rope_parameters["mrope_section"]), target_num_layers=tc.num_hidden_layers,
                      mid_layer=tc.num_hidden_layers // 2)
    draft = SparrowDraft(cfg).to(device=device, dtype=dtype).eval()
    draft._frozen = (model.model.language_model.embed_tokens, model.lm_head)
    return draft


def random_prompt_cache(model, L: int, room: int, device, dtype) -> KVCache:
    """A KV cache holding L prompt positions of random input embeddings (only the cache contents matter for
    timing), prefilled in chunks of 8192, with room for `room` more entries."""
    H = model.config.text_config.hidden_size
    cache = KVCache(model.config.text_config.num_hidden_layers, L + room)
    pos = torch.arange(L, device=device).view(1, 1, L).expand(3, 1, L)
    for s in range(0, L, 8192):
        e = min(L, s + 8192)
        model.model(inputs_embeds=torch.randn(1, e - s, H, device=device, dtype=dtype), position_ids=pos[:, :, s:e],
                    **{CACHE_KW: cache}, use_cache=True)
    return cache


def random_tree_mask(N: int, n: int, g: torch.Generator, device) -> torch.Tensor:
    """(1, 1, N + 1, n + N + 1) bool attention mask of a random tree of N + 1 tokens after n cached entries."""
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, N + 1)])
    t = tree_from_parents(torch.zeros(N + 1, dtype=torch.long), parents)
    mask = torch.ones(1, 1, N + 1, n + N + 1, dtype=torch.bool, device=device)
    mask[0, 0, :, n:] = t.mask.to(device)
    return mask


@torch.inference_mode()
def measure(model, L: int, visual: int, tree_sizes, repeats: int, device, dtype, compile_mode=None) -> dict:
    H = model.config.text_config.hidden_size
    lm = model.model
    cache = random_prompt_cache(model, L, max(tree_sizes) + 16, device, dtype)
    n = cache.length

    def forward(q: int, mask, **split):
        p = torch.arange(n, n + q, device=device).view(1, 1, q).expand(3, 1, q)
        ids = torch.arange(1, q + 1, device=device).view(1, q)  # distinct tokens: the mask changes the states
        out = lm(input_ids=ids, position_ids=p, attention_mask=mask,
                 **{CACHE_KW: cache}, use_cache=True, **split)
        model.lm_head(out.last_hidden_state)
        cache.truncate(n)
        return out.last_hidden_state

    row = {"context": L, "visual_tokens": visual, "decode_ms": timed(lambda: forward(1, None), device, repeats)}
    g = torch.Generator().manual_seed(0)
    for N in tree_sizes:
        mask = random_tree_mask(N, n, g, device)
        block = mask[0, 0, :, n:].contiguous()
        row[f"verify_{N}_ms"] = timed(lambda: forward(N + 1, mask), device, repeats)
        row[f"verify_{N}_split_ms"] = timed(lambda: forward(N + 1, None, sparrow_tree=block), device, repeats)
        row[f"split_max_diff_{N}"] = float((forward(N + 1, mask).float()
                                            - forward(N + 1, None, sparrow_tree=block).float()).abs().max())

    # the draft, through DraftRunner and build_tree as in generation
    tc = model.config.text_config
    draft = make_draft(model, device, dtype)
    vis = torch.zeros(L, dtype=torch.bool, device=device)
    vis[TEXT_TOKENS // 2: TEXT_TOKENS // 2 + visual] = True
    pre = Prefill(logits=torch.zeros(tc.vocab_size, device=device), hidden_top=torch.randn(L, H, device=device, dtype=dtype),
                  hidden_mid=None, input_embeds=torch.randn(L, H, device=device, dtype=dtype),
                  positions=torch.arange(L, device=device).expand(3, -1), visual_mask=vis)
    fake_target = SimpleNamespace(device=device, dtype=dtype, rope_delta=0)
    ids = torch.zeros(L, dtype=torch.long, device=device)
    def first_level(mode: str) -> torch.Tensor:  # the first tree level's log-probabilities from a fresh runner
        runner = DraftRunner(draft, fake_target, pre, mode, 256, TreeConfig(top_k=8, depth=5, tokens=30))
        root_logp = runner.prefill(ids, pre, 0)
        return runner.expand(root_logp.topk(8).indices, None).float()

    variants = [("sparrow", ""), ("eagle", "")] + ([("sparrow", "_compiled")] if compile_mode else [])
    for mode, suffix in variants:
        if suffix:  # the same draft, its tree levels compiled (the CUDA graphs of mode reduce-overhead)
            eager = first_level(mode)
            draft.compile_tree(compile_mode)
            t0 = time.perf_counter()
            row["compiled_max_logp_diff"] = float((first_level(mode) - eager).abs().max())  # compiles here
            row["compile_s"] = round(time.perf_counter() - t0, 2)
        for N in tree_sizes:
            tree = TreeConfig(top_k=8, depth=5 if N <= 40 else 8, tokens=N)
            runner = DraftRunner(draft, fake_target, pre, mode, 256, tree)
            root_logp = runner.prefill(ids, pre, 0)
            state = {"i": L + 1, "logp": root_logp}

            def cycle():
                build_tree(0, state["logp"], runner.expand, tree)
                acc = torch.zeros(4, dtype=torch.long, device=device)
                state["logp"] = runner.catch_up(acc, torch.randn(4, H, device=device, dtype=dtype), state["i"])
                state["i"] += 4
                if state["i"] > L + 200:  # stay within the draft cache's room for new tokens
                    runner.cache.committed -= 4 * 30
                    runner.cache.length = runner.cache.committed
                    state["i"] -= 4 * 30

            row[f"draft_{mode}_{N}{suffix}_ms"] = timed(cycle, device, repeats)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--visual-tokens", default="512,1536,3072,8192,16384,25088")
    ap.add_argument("--tree-tokens", default="8,16,30,45,60")
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/gpu_timing")
    ap.add_argument("--compile-draft", metavar="MODE",
                    help="also time the sparrow draft with its tree levels compiled in this torch.compile mode "
                         "(reduce-overhead: CUDA graphs)")
    a = ap.parse_args()
    device, dtype = device_for(a.shape)
    model = build_target(a.shape, device, dtype)
    sizes = [int(x) for x in a.tree_tokens.split(",")]
    rows = []
    for v in [int(x) for x in a.visual_tokens.split(",")]:
        row = measure(model, v + TEXT_TOKENS, v, sizes, a.repeats, device, dtype, a.compile_draft)
        for tau in (3, 4, 5):
            for mode in ("sparrow", "eagle"):
                best = max(sizes, key=lambda N: tau / (row[f"draft_{mode}_{N}_ms"] + row[f"verify_{N}_ms"]))
                row[f"dsr_{mode}_tau{tau}"] = round(tau * row["decode_ms"] /
                                                   (row[f"draft_{mode}_{best}_ms"] + row[f"verify_{best}_ms"]), 3)
                row[f"dsr_{mode}_tau{tau}_tree"] = best
        rows.append(row)
        print(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
            "torch": torch.__version__, "dtype": str(dtype), "shape": a.shape, **SHAPES[a.shape],
            "compile_draft": a.compile_draft,
            "note": "random weights; projected DSR assumes the given tau at the best measured tree size "
                    "(verify cost does not depend on which tokens are drafted)"}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump({"meta": meta, "rows": rows}, open(a.out + ".json", "w"), indent=1)
    N = 30 if 30 in sizes else sizes[len(sizes) // 2]
    lines = [f"{meta['device']}, {a.shape} target, {dtype}; ms (medians of {a.repeats})", "",
             f"| visual tokens | decode | verify {N}+1 | verify {N}+1 split | draft sparrow | draft eagle | "
             "draft sparrow compiled | DSR sparrow tau 3/4/5 | DSR eagle tau 3/4/5 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['visual_tokens']} | {r['decode_ms']:.2f} | {r[f'verify_{N}_ms']:.2f} | "
                     f"{r[f'verify_{N}_split_ms']:.2f} | "
                     f"{r[f'draft_sparrow_{N}_ms']:.2f} | {r[f'draft_eagle_{N}_ms']:.2f} | "
                     f"{r.get(f'draft_sparrow_{N}_compiled_ms', float('nan')):.2f} | "
                     + "/".join(f"{r[f'dsr_sparrow_tau{t}']:.2f}" for t in (3, 4, 5)) + " | "
                     + "/".join(f"{r[f'dsr_eagle_tau{t}']:.2f}" for t in (3, 4, 5)) + " |")
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
