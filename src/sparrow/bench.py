"""`sparrow bench`: speculative decoding against plain decoding and other draft designs, per visual-token bucket.

    sparrow bench [--target PATH] [--drafts sparrow=PATH,eagle=PATH,...] [--data clips.jsonl | --synthetic N]
                  [--visual-tokens 500,1500,3000,8000] [--methods ar,sparrow,eagle,...] [--max-new-tokens 256]
                  [--temperature 0] [--tree auto] [--out results/bench] [--resume] [--baseline sparrow]

For every bucket, frames are sampled so that the prompt holds about that many visual tokens (the frame area is
fixed, the frame count sets the bucket); `--synthetic 5,5,5,5,4` gives each bucket its own clip count. Every method
answers the same samples in the same run, interleaved (the method order rotates from sample to sample), from one
prefill of each sample (`sparrow.prefill_prompt`: at 25k visual tokens the prefill is a minute on 2 CPU cores).
Per sample and method: prefill time, decode time, new tokens, tau (bonus token included), draft and verify time per
cycle, peak memory, and the lossless check (greedy: the output equals `ar`'s token for token, else the row is
marked and the run fails after writing its results).

Methods:
    ar                   plain decoding through the same cache and timing code (the baseline of DSR / ESR)
    NAME                 a draft given in --drafts, run in its own mode (sparrow: text-only cache; eagle: all
                         positions)
    NAME:absolute        the same draft with target positions instead of compact ones
    NAME:wN              the same draft with a text window of N entries
    NAME:eagle / :sparrow   the same draft run in the other mode
    hf-assisted          transformers' own `generate(assistant_model=...)` with the --assistant checkpoint

Metrics (Spec-Bench conventions): tau = tokens per target forward after the prefill (plain decode steps the tree
policy takes count 1); tau/cycle = tokens per speculative cycle (the draft's acceptance, plain steps left out);
DSR = ar decode time / method decode time (after the first token); ESR = the
same end to end (prefill included); DSR / tau = the share of the ideal speedup reached (drafting free and a
verification as cheap as a decode step would give DSR = tau); bound = tau x the ar step / (verify + draft per
cycle), what the measured cycle allows. Paired differences: per sample, each method's tau and DSR minus those of
--baseline (default: sparrow) on the same sample, mean +- standard error over the bucket's samples.

Tree: `--tree auto` (the default) runs each speculative method as `sparrow generate` does: every cycle's tree
size chosen by `sparrow.policy.TreePolicy` from the verify cost measured on this machine at the bucket's context
length and the acceptance the draft shows, with plain decode steps where speculation cannot pay; the table's
"tree" column is the size it chose most. `--tree K,D,N` fixes the tree instead.

Outputs in --out: samples.jsonl (one row per sample and method, written as it goes), summary.json (machine,
versions, dtype, seeds, tree choice, aggregates), table.md, and tau.png, dsr.png, cycle.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .cli import Help
from .decode import GenerateOutput, Prompt, generate, prefill_prompt, warm_up
from .errors import SparrowError, at_least, positive_list
from .timing import Clock, Stats
from .tree import TreeConfig
from .verify import Sampling

DEFAULT_BUCKETS = (500, 1500, 3000, 8000)
SIDE = 224  # synthetic frames (and the pixel budget of real ones): 64 visual tokens per 2 frames on Qwen-VL


# ---------------------------------------------------------------- methods
@dataclass
class Method:
    """One way to generate. kind "ar" | "spec" (our loop with `draft` in `mode`) | "hf-assisted".
    `run(target, inputs, ...)` returns a `GenerateOutput` whose stats follow `sparrow.Stats`."""

    name: str
    kind: str
    draft: object = None
    mode: str = "ar"
    assistant: object = None
    tree: TreeConfig | None = None  # None: the run's tree (auto: the policy's choice each cycle)

    def run(self, target, inputs: dict, max_new_tokens: int, temperature: float, seed: int,
            tree: TreeConfig | None, prompt: Prompt | None = None) -> GenerateOutput:
        if self.kind == "hf-assisted":
            return hf_assisted(target, self.assistant, inputs, max_new_tokens, temperature, seed)
        return generate(target, self.draft, inputs, max_new_tokens=max_new_tokens, method=self.mode,
                        temperature=temperature, seed=seed, tree=tree, prompt=prompt)


def hf_assisted(target, assistant, inputs: dict, max_new_tokens: int, temperature: float, seed: int) -> GenerateOutput:
    """transformers' assisted generation (`generate(assistant_model=...)`), timed like our loop: prefill_s is a
    separate 1-token generate of the target, decode_s the rest; tau = tokens after the first per target forward.
    Runs with the target's `plain_generation_config` plus its repetition penalty, so that it decodes as our loop
    does: no other setting of the checkpoint's, and sampling with temperature alone (generate's own top_k 50 off)."""
    model, clock = target.model, Clock(target.device)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=target.tokenizer.pad_token_id,
              repetition_penalty=target.repetition_penalty)
    if temperature > 0:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    try:
        with torch.inference_mode(), target.plain_generation_config():
            t0 = clock.now()
            model.generate(**inputs, **{**kw, "max_new_tokens": 1, "do_sample": False})
            t1 = clock.now()
            calls.clear()
            torch.manual_seed(seed)
            out = model.generate(**inputs, assistant_model=assistant, **kw)
            t2 = clock.now()
    finally:
        hook.remove()
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    s = Stats(method="hf-assisted", new_tokens=len(ids), prompt_tokens=inputs["input_ids"].shape[1],
              visual_tokens=int(target.visual_mask(inputs["input_ids"][0]).sum()),
              repetition_penalty=target.repetition_penalty)
    s.prefill_s, s.decode_s = t1 - t0, max(1e-9, (t2 - t1) - (t1 - t0))
    cycles = max(1, len(calls) - 1)
    s.tau = max(1.0, (len(ids) - 1) / cycles)
    s.verify_s = s.decode_s  # the assistant's time is not separable from outside transformers
    s.accept_lengths = [0] * cycles
    s.tokens_per_s = (len(ids) - 1) / s.decode_s
    return GenerateOutput(token_ids=ids, text=target.tokenizer.decode(ids, skip_special_tokens=True), stats=s)


def parse_methods(spec: str, drafts: dict, target, assistant_path: str | None) -> list[Method]:
    """'ar,sparrow,eagle,sparrow:absolute,sparrow:w64,hf-assisted' -> [Method]; `drafts` maps names to paths.
    Raises SparrowError for an unknown name or variant, naming the fix."""
    from .draft import load_draft

    methods, loaded = [], {}
    for item in [m.strip() for m in spec.split(",") if m.strip()]:
        name, _, variant = item.partition(":")
        if name == "ar":
            methods.append(Method("ar", "ar"))
            continue
        if name == "hf-assisted":
            if not assistant_path:
                raise SparrowError("method hf-assisted needs --assistant PATH (a small checkpoint with the target's "
                                   "tokenizer)")
            from transformers import AutoModelForImageTextToText

            asst = AutoModelForImageTextToText.from_pretrained(assistant_path, dtype=target.dtype).to(target.device)
            if asst.config.get_text_config().vocab_size != target.vocab_size:
                raise SparrowError(f"--assistant {assistant_path}: vocabulary {asst.config.get_text_config().vocab_size}"
                                   f" differs from the target's {target.vocab_size}; it must share the tokenizer")
            methods.append(Method("hf-assisted", "hf-assisted", assistant=asst.eval()))
            continue
        if name not in drafts:
            raise SparrowError(f"method {item!r}: no draft named {name!r}; give it with --drafts {name}=PATH "
                               f"(known: {', '.join(['ar', 'hf-assisted', *drafts])})")
        overrides = {}
        if variant in ("absolute", "compact"):
            overrides["position_mode"] = variant
        elif variant in ("sparrow", "eagle"):
            overrides["mode"] = variant
        elif variant.startswith("w") and variant[1:].isdigit():
            overrides["window"] = int(variant[1:])
        elif variant:
            raise SparrowError(f"method {item!r}: unknown variant {variant!r}; use :absolute, :compact, :wN, "
                               f":sparrow or :eagle")
        key = (name, tuple(sorted(overrides.items())))
        if key not in loaded:
            loaded[key] = load_draft(drafts[name], target, **overrides)
        d = loaded[key]
        methods.append(Method(item, "spec", draft=d, mode=d.config.mode))
    if not any(m.kind == "ar" for m in methods):
        methods.insert(0, Method("ar", "ar"))  # the baseline of every speedup and of the lossless check
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise SparrowError(f"--methods lists a method twice: {spec}")
    return methods


def parse_drafts(spec: str | None, target_is_embedded: bool) -> dict:
    """'sparrow=PATH,eagle=PATH' -> {name: path}; without it, the embedded target's shipped drafts."""
    from . import defaults

    if not spec:
        if not target_is_embedded:
            return {}
        return {m: p for m in ("sparrow", "eagle", "no_mtp", "no_ivsb") if (p := defaults.draft_path(m))}
    out = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SparrowError(f"--drafts {item!r}: expected NAME=PATH, e.g. --drafts sparrow=runs/draft")
        out[name.strip()] = path.strip()
    return out


# ---------------------------------------------------------------- samples and buckets
@dataclass
class Sample:
    """A benchmark prompt: frames (T, H, W, 3) uint8 at `fps` (or a video path), and the user's question."""

    id: str
    prompt: str
    frames: np.ndarray | None = None
    path: str | None = None
    fps: float = 4.0


def frames_for(target, visual_tokens: int, side: int = SIDE) -> int:
    """Frame count whose prompt holds about `visual_tokens` visual tokens at side x side pixels (measured on
    this target with 2 and 4 blank frames, so it holds for any family). Always even, at least 2."""
    counts = []
    for n in (2, 4):
        blank = np.zeros((n, side, side, 3), dtype=np.uint8)
        ids = target.prepare(blank, "x", max_pixels=side * side, min_pixels=side * side)["input_ids"][0]
        counts.append(int(target.visual_mask(ids).sum()))
    per_pair = max(1, counts[1] - counts[0])
    return max(2, 2 * round(visual_tokens / per_pair))


def synthetic_samples(n: int, frames: int, seed: int) -> list[Sample]:
    """n held-out clips of the synthetic world (seeds disjoint from training), 'Describe the video.'"""
    from .synthetic.world import make_clip

    out = []
    for i in range(n):
        s = 7 * 10**9 + seed * 10**6 + frames * 1000 + i
        out.append(Sample(id=f"synthetic-{s}", prompt="Describe the video.",
                          frames=make_clip(s, frames, SIDE, SIDE, fps=4.0).frames))
    return out


def data_samples(path: str, n: int | None) -> list[Sample]:
    """The first n samples of a LLaVA-Video style JSONL (video + first human turn)."""
    from .training.data import read_jsonl

    rows = [s for s in read_jsonl(path) if s.video]
    if not rows:
        raise SparrowError(f"{path}: no sample with a video")
    return [Sample(id=s.id, prompt=s.prompt, path=s.video) for s in rows[: n or len(rows)]]


def sample_video(sample: Sample, frames: int):
    """A sample's `Video`: its in-memory frames, or `frames` frames sampled from its file."""
    from .video import Video, load_video

    if sample.frames is not None:
        return Video(frames=sample.frames, fps=sample.fps, indices=np.arange(len(sample.frames)),
                     total_frames=len(sample.frames))
    return load_video(sample.path, num_frames=frames)


def build_inputs(target, sample: Sample, frames: int) -> dict:
    """`target.prepare` inputs for a sample (`sample_video`) at the bench's fixed frame size (SIDE x SIDE pixels)."""
    return target.prepare(sample_video(sample, frames), sample.prompt, max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE)


# ---------------------------------------------------------------- helpers
def parse_visual_tokens(text: str) -> list[int]:
    """`--visual-tokens` "500,1500,8000" -> [500, 1500, 8000] (bench and analyze). Raises SparrowError unless it
    is one or more positive whole numbers."""
    return positive_list("--visual-tokens", text, "500,1500,8000")


# ---------------------------------------------------------------- the run
def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def _tree_size(s: Stats, tree: TreeConfig | None) -> int:
    """The tree size of a run: the fixed tree's, or the size the policy chose most (0: plain steps)."""
    if tree is not None:
        return tree.tokens
    choices = {int(k): v for k, v in s.policy.get("choices", {}).items()}
    return max(choices, key=choices.get) if choices else 0


def row_for(bucket: int, sample: Sample, method: Method, out: GenerateOutput, ref: GenerateOutput | None,
            greedy: bool, mem_mb: float, tree: TreeConfig | None) -> dict:
    """One line of samples.jsonl: the run's timings (seconds), tau, tokens and, against the `ar` reference
    output `ref`, whether it is lossless (greedy: the same tokens)."""
    s = out.stats
    cycles = max(1, len(s.accept_lengths))
    lossless = (out.token_ids == ref.token_ids) if (greedy and ref is not None) else None
    return {"bucket": bucket, "sample": sample.id, "method": method.name, "visual_tokens": s.visual_tokens,
            "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "tau": round(s.tau, 4),
            "prefill_s": s.prefill_s, "decode_s": s.decode_s, "cycles": len(s.accept_lengths),
            "spec_cycles": len(s.accept_lengths) - s.plain_steps, "spec_tokens": sum(s.accept_lengths) - s.plain_steps,
            "draft_ms_per_cycle": 1e3 * (s.draft_s - s.draft_prefill_s) / cycles if method.kind == "spec" else 0.0,
            "verify_ms_per_cycle": 1e3 * s.verify_s / cycles, "draft_prefill_s": s.draft_prefill_s,
            "tree_tokens": _tree_size(s, tree) if method.kind == "spec" else 0,
            "plain_steps": s.plain_steps, "policy": s.policy, "peak_memory_mb": round(mem_mb, 1),
            "lossless": lossless, "stop_reason": s.stop_reason, "text": out.text}


def _sample_dsr(r: dict, ar: dict | None) -> float:
    """One sample's DSR: ar's time per token after the first over the method's (nan without an ar row)."""
    if ar is None or r["new_tokens"] < 2 or ar["new_tokens"] < 2 or r["decode_s"] <= 0:
        return float("nan")
    return (ar["decode_s"] / (ar["new_tokens"] - 1)) / (r["decode_s"] / (r["new_tokens"] - 1))


def paired(rows: list[dict], bucket, name: str, baseline: str) -> dict | None:
    """Per-sample differences method - baseline in tau and DSR over the samples both ran in `bucket`: {"n",
    "tau_diff", "tau_se", "dsr_diff", "dsr_se"} (mean and standard error of the mean), or None with fewer than 2."""
    per = {}
    for r in rows:
        if r["bucket"] == bucket:
            per.setdefault(r["sample"], {})[r["method"]] = r
    pairs = [(x[name], x[baseline], x.get("ar")) for x in per.values() if name in x and baseline in x]
    if len(pairs) < 2:
        return None
    out = {"n": len(pairs)}
    for key, fn in (("tau", lambda r, ar: r["tau"]), ("dsr", _sample_dsr)):
        d = np.array([fn(m, ar) - fn(b, ar) for m, b, ar in pairs], dtype=float)
        d = d[np.isfinite(d)]
        out[f"{key}_diff"] = round(float(d.mean()), 3) if len(d) else float("nan")
        out[f"{key}_se"] = round(float(d.std(ddof=1) / np.sqrt(len(d))), 3) if len(d) > 1 else float("nan")
    return out


def summarise(rows: list[dict], baseline: str | None = "sparrow") -> dict:
    """Aggregates per bucket and method: sums of times over the bucket's samples, tau over all cycles, the bound
    tau x ar step / (verify + draft per cycle), and the paired differences to `baseline` (`paired`)."""
    out = {}
    for b in sorted({r["bucket"] for r in rows}):
        ar = [r for r in rows if r["bucket"] == b and r["method"] == "ar"]
        ar_dec = sum(r["decode_s"] for r in ar)
        ar_all = sum(r["decode_s"] + r["prefill_s"] for r in ar)
        ar_step_ms = 1e3 * ar_dec / max(1, sum(r["new_tokens"] - 1 for r in ar))
        for name in dict.fromkeys(r["method"] for r in rows if r["bucket"] == b):
            rs = [r for r in rows if r["bucket"] == b and r["method"] == name]
            dec, cycles = sum(r["decode_s"] for r in rs), sum(r["cycles"] for r in rs)
            tau = sum(r["new_tokens"] - 1 for r in rs) / max(1, cycles) if name != "hf-assisted" else \
                float(np.mean([r["tau"] for r in rs]))
            dsr = ar_dec / dec if dec and ar else float("nan")
            checks = [r["lossless"] for r in rs if r["lossless"] is not None]
            out.setdefault(str(b), {})[name] = {
                "visual_tokens": int(np.mean([r["visual_tokens"] for r in rs])), "samples": len(rs),
                "tau": round(tau, 3), "dsr": round(dsr, 3),
                "tau_spec": round(sum(r.get("spec_tokens", 0) for r in rs) / max(1, sum(r.get("spec_cycles", 0)
                                                                                         for r in rs)), 3),
                "esr": round(ar_all / sum(r["decode_s"] + r["prefill_s"] for r in rs), 3) if ar else float("nan"),
                "dsr_over_tau": round(dsr / tau, 3) if tau else float("nan"),
                "prefill_s": round(float(np.mean([r["prefill_s"] for r in rs])), 4),
                "decode_s": round(float(np.mean([r["decode_s"] for r in rs])), 4),
                "new_tokens": round(float(np.mean([r["new_tokens"] for r in rs])), 1),
                "draft_ms_per_cycle": round(float(np.mean([r["draft_ms_per_cycle"] for r in rs])), 3),
                "verify_ms_per_cycle": round(float(np.mean([r["verify_ms_per_cycle"] for r in rs])), 3),
                "tree_tokens": max(r["tree_tokens"] for r in rs),
                "peak_memory_mb": max(r["peak_memory_mb"] for r in rs),
                "lossless": all(checks) if checks else None}
            s = out[str(b)][name]
            cycle_ms = s["draft_ms_per_cycle"] + s["verify_ms_per_cycle"]
            s["bound"] = round(tau * ar_step_ms / cycle_ms, 3) if ar and cycle_ms and name != "ar" else float("nan")
            if baseline and name not in ("ar", baseline):
                s["vs_baseline"] = paired(rows, b, name, baseline)
    return out


def write_table(summary: dict, path: str) -> str:
    """Write the per-bucket, per-method summary as a Markdown table (tau, DSR, ESR, ms per cycle, lossless) to
    `path` and return it."""
    methods = list(dict.fromkeys(m for b in summary.values() for m in b))
    lines = ["| visual tokens | method | samples | tau | tau/cycle | DSR | bound | ESR | DSR/tau | draft ms/cycle | "
             "verify ms/cycle | tree | lossless | tau, DSR - baseline (paired, +- SE) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, per in summary.items():
        for m in methods:
            if m not in per:
                continue
            s = per[m]
            ok = {True: "yes", False: "NO", None: "n/a"}[s["lossless"]]
            p = s.get("vs_baseline")
            diff = f"{p['tau_diff']:+.2f} +- {p['tau_se']:.2f}, {p['dsr_diff']:+.2f} +- {p['dsr_se']:.2f}" if p else ""
            bound = f"{s['bound']:.2f}x" if np.isfinite(s.get("bound", float("nan"))) else "-"
            spec = f"{s['tau_spec']:.2f}" if s.get("tau_spec") else "-"
            lines.append(f"| {s['visual_tokens']} | {m} | {s['samples']} | {s['tau']:.2f} | {spec} | {s['dsr']:.2f}x | "
                         f"{bound} | {s['esr']:.2f}x | {s['dsr_over_tau']:.2f} | {s['draft_ms_per_cycle']:.1f} | "
                         f"{s['verify_ms_per_cycle']:.1f} | {s['tree_tokens'] or '-'} | {ok} | {diff} |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_plots(summary: dict, out: str) -> list[str]:
    """tau.png, dsr.png (vs visual tokens, one line per method) and cycle.png (draft / verify ms per cycle)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sparrow: matplotlib is not installed; skipping the plots (pip install matplotlib)", file=sys.stderr)
        return []
    buckets = list(summary)
    methods = list(dict.fromkeys(m for b in summary.values() for m in b))
    files = []
    for key, label, fname in (("tau", "accepted length tau", "tau.png"), ("dsr", "decoding speedup (DSR)", "dsr.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            pts = [(summary[b][m]["visual_tokens"], summary[b][m][key]) for b in buckets if m in summary[b]]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("visual tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        files.append(fname)
    spec = [m for m in methods if any(summary[b].get(m, {}).get("draft_ms_per_cycle") for b in buckets)] or methods
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(buckets) * len(spec)), 4))
    width = 0.8 / max(1, len(spec))
    for j, m in enumerate(spec):
        xs = [i + j * width for i, b in enumerate(buckets) if m in summary[b]]
        d = [summary[b][m]["draft_ms_per_cycle"] for b in buckets if m in summary[b]]
        v = [summary[b][m]["verify_ms_per_cycle"] for b in buckets if m in summary[b]]
        ax.bar(xs, v, width, label=f"{m} verify", alpha=0.8)
        ax.bar(xs, d, width, bottom=v, label=f"{m} draft", alpha=0.8, hatch="//")
    ax.set_xticks([i + width * (len(spec) - 1) / 2 for i in range(len(buckets))],
                  [str(summary[b][spec[0]]["visual_tokens"]) if spec[0] in summary[b] else b for b in buckets])
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("ms per cycle")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cycle.png"), dpi=110)
    plt.close(fig)
    return files + ["cycle.png"]


def run_bench(target, methods: list[Method], buckets, samples_for, out: str, max_new_tokens: int = 256,
              temperature: float = 0.0, tree: TreeConfig | str = "auto", seed: int = 0, resume: bool = False,
              meta: dict | None = None, progress: bool = True, warmup: int = 0,
              baseline: str | None = "sparrow") -> dict:
    """Run every method on every bucket's samples; write samples.jsonl, summary.json, table.md and the plots.

    Args:
        target: a loaded `Target`; methods: from `parse_methods` (must include "ar").
        buckets: visual-token counts; samples_for(frames) -> list[Sample] for a bucket's frame count.
        tree: "auto" or a fixed `TreeConfig`.
        warmup: untimed runs of each method on each input before its timed run (0: none). On an H200 the first
            runs on a new input took 2-10x the steady state's time a token (README, "On a GPU").
        baseline: the method the paired differences are taken against (`paired`), or None for none.
    Returns: the summary dict. Raises SparrowError (after writing everything) when a greedy speculative output
    differs from ar's.
    """
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "samples.jsonl")
    done_rows = []
    if resume and os.path.exists(jsonl):
        with open(jsonl) as f:
            for line in f:
                try:
                    done_rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a torn last line from an interrupted run
    done = {(r["bucket"], r["sample"], r["method"]) for r in done_rows}
    rows = list(done_rows)
    greedy = temperature == 0
    names = [m.name for m in methods]
    plan = [(b, frames_for(target, b)) for b in buckets]
    bucket_samples = {b: samples_for(n) for b, n in plan}
    total = sum(len(s) for s in bucket_samples.values()) * len(methods)
    bar = tqdm(total=total, initial=len(done), desc="bench", disable=not progress, dynamic_ncols=True)
    with open(jsonl, "a" if resume else "w") as f:
        for b, frames in plan:
            samples = bucket_samples[b]
            for i, sample in enumerate(samples):
                if all((b, sample.id, n) in done for n in names):
                    continue
                inputs = build_inputs(target, sample, frames)
                trees = [m.tree or (tree if isinstance(tree, TreeConfig) else TreeConfig()) for m in methods]
                prompt = prefill_prompt(target, inputs, max_new_tokens, max(t.tokens for t in trees))
                if i == 0:
                    generate(target, None, inputs, max_new_tokens=2, method="ar", prompt=prompt)  # warm-up
                order = methods[i % len(methods):] + methods[: i % len(methods)]
                outs = {}
                for m in order:
                    t = m.tree or (tree if isinstance(tree, TreeConfig) else None)
                    for _ in range(warmup):
                        m.run(target, inputs, max_new_tokens, temperature, seed + i, t, prompt)
                    if target.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(target.device)
                    outs[m.name] = (m, m.run(target, inputs, max_new_tokens, temperature, seed + i, t, prompt), t,
                                    _peak_memory_mb(target.device))
                ref = outs["ar"][1]
                for name in names:
                    if (b, sample.id, name) in done:
                        continue
                    m, o, t, mem = outs[name]
                    row = row_for(b, sample, m, o, ref, greedy and m.kind != "ar", mem, t)
                    rows.append(row)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    bar.update(1)
                    bar.set_postfix_str(f"{b} tok {name} tau {row['tau']:.2f}")
    bar.close()
    summary = summarise(rows, baseline)
    meta = {**(meta or {}), "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": str(target.dtype).replace("torch.", ""), "device": str(target.device), "seed": seed,
            "max_new_tokens": max_new_tokens, "temperature": temperature,
            "repetition_penalty": target.repetition_penalty, "buckets": list(buckets),
            "frames": {str(b): n for b, n in plan}, "methods": names,
            "tree": "auto" if tree == "auto" else asdict(tree), "warmup": warmup, "baseline": baseline}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    result = {"meta": meta, "summary": summary}
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "summary.json"))
    write_table(summary, os.path.join(out, "table.md"))
    write_plots(summary, out)
    bad = sorted({r["method"] for r in rows if r["lossless"] is False})
    if bad:
        n = sum(1 for r in rows if r["lossless"] is False)
        raise SparrowError(f"lossless check failed: {', '.join(bad)} differ from ar on {n} sample(s) "
                           f"(rows marked lossless=false in {jsonl})")
    return result


def main(argv=None) -> int:
    from . import defaults, load_target

    ap = argparse.ArgumentParser(prog="sparrow bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=Help)
    ap.add_argument("--target", help="local HF checkpoint (default: the embedded target)")
    ap.add_argument("--drafts", help="NAME=PATH,... (default: the embedded target's shipped drafts)")
    ap.add_argument("--assistant", help="checkpoint for hf-assisted (default: the embedded assistant)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", help="LLaVA-Video style JSONL of videos and prompts")
    src.add_argument("--synthetic", help="N synthetic clips per bucket, or one count per bucket (5,5,4) (default 3 "
                                          "without --data)")
    ap.add_argument("--samples", type=int, help="with --data: use the first N samples")
    ap.add_argument("--visual-tokens", default=",".join(map(str, DEFAULT_BUCKETS)), help="buckets, e.g. 500,8000")
    ap.add_argument("--methods", help="comma list (default: ar, every draft, hf-assisted when an assistant is "
                                      "there); variants NAME:absolute, NAME:wN, NAME:eagle")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per answer, at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (and the lossless check)")
    ap.add_argument("--tree", default="auto", help="auto (measure and pick per bucket) or TOPK,DEPTH,TOKENS")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic clips and of sampling")
    ap.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    ap.add_argument("--out", default="results/bench", help="directory of samples.jsonl, summary.json, table.md, plots")
    ap.add_argument("--resume", action="store_true", help="skip samples already in OUT/samples.jsonl")
    ap.add_argument("--baseline", help="the method paired differences are taken against (default: sparrow when it "
                                       "runs, else none)")
    ap.add_argument("--compile-draft", action="store_true",
                    help="run every draft's tree step compiled (torch.compile, paid before the first sample)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed runs of each method on each input before its timed run (default 0; on a GPU, "
                         "where first runs on an input are slow, 1 measures the steady state)")
    a = ap.parse_args(argv)
    buckets = parse_visual_tokens(a.visual_tokens)
    Sampling(temperature=a.temperature)  # a negative temperature fails here, before the target loads
    counts = positive_list("--synthetic", a.synthetic or "3", "5 or 5,5,4")
    if len(counts) not in (1, len(buckets)):
        raise SparrowError(f"--synthetic {a.synthetic}: give one count, or one per bucket ({len(buckets)})")
    counts = dict(zip(buckets, counts * len(buckets) if len(counts) == 1 else counts))
    at_least(1, ("--samples", a.samples), ("--max-new-tokens", a.max_new_tokens))
    at_least(0, ("--warmup", a.warmup))
    tree = "auto"
    if a.tree != "auto":
        try:
            k, d, n = (int(x) for x in a.tree.split(","))
            tree = TreeConfig(top_k=k, depth=d, tokens=n)
        except ValueError:
            raise SparrowError(f"--tree {a.tree!r}: expected auto or TOPK,DEPTH,TOKENS like 8,5,30") from None
    target = load_target(a.target, dtype=a.dtype, device=a.device)
    drafts = parse_drafts(a.drafts, a.target is None)
    assistant = a.assistant or (defaults.assistant_path() if a.target is None else None)
    spec = a.methods or ",".join(["ar", *drafts] + (["hf-assisted"] if assistant else []))
    methods = parse_methods(spec, drafts, target, assistant)
    if a.compile_draft:
        for m in methods:
            if m.draft is not None:
                warm_up(target, m.draft.compile_tree(), m.mode)
    if a.data:
        rows = data_samples(a.data, a.samples)
        samples_for = lambda frames: rows  # noqa: E731 (frames are sampled per bucket when loading)
    else:
        per_frames = {frames_for(target, b): counts[b] for b in buckets}
        samples_for = lambda frames: synthetic_samples(per_frames[frames], frames, a.seed)  # noqa: E731
    names = [m.name for m in methods]
    if a.baseline and a.baseline not in names:
        raise SparrowError(f"--baseline {a.baseline}: not among the methods ({', '.join(names)})")
    baseline = a.baseline or ("sparrow" if "sparrow" in names else None)
    run_bench(target, methods, buckets, samples_for, a.out, a.max_new_tokens, a.temperature, tree, a.seed,
              a.resume, meta={"target": target.path, "drafts": drafts, "assistant": assistant,
                              "data": a.data or f"synthetic x{a.synthetic or 3}",
                              "compile_draft": a.compile_draft}, warmup=a.warmup,
              baseline=baseline)
    print(open(os.path.join(a.out, "table.md")).read())
    print(f"wrote {a.out}/samples.jsonl, summary.json, table.md, tau.png, dsr.png, cycle.png")
    return 0
