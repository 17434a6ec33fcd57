"""Command line: `sparrow generate | demo | bench | analyze | regenerate | train-draft | train-target | ...`.

Bad input prints one line `sparrow: error: ...` and exits with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import SparrowError

DEMO_CLIP = 2  # the example clip `demo` describes by default: two moving objects, which the shipped target gets right


def _add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", help="video file (mp4/mkv/webm/avi...) or directory of frames; omit for text only")
    p.add_argument("--prompt", default="Describe the video.", help="the user's question")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-frames", type=int, help="sample this many frames uniformly")
    g.add_argument("--fps", type=float, help="or sample at this rate (frames per second)")
    p.add_argument("--max-pixels", type=int, help="upper bound of each frame's area after resizing (Qwen-VL)")
    p.add_argument("--min-pixels", type=int, help="lower bound of each frame's area after resizing (Qwen-VL)")


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tree-top-k", type=int, default=8, help="children per expanded node / frontier width (8)")
    p.add_argument("--tree-depth", type=int, default=5, help="draft levels below the root (5)")
    p.add_argument("--tree-tokens", type=int, default=30, help="draft tokens verified per cycle (30)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparrow", description="Lossless speculative decoding for video LLMs (Sparrow).")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about a video with speculative decoding")
    g.add_argument("--target", help="local HF checkpoint directory of the target (default: the embedded one)")
    g.add_argument("--draft", help="draft directory (from init-draft / train-draft; default: the shipped draft of "
                                   "--method for the embedded target); not needed for --method ar")
    _add_video_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 = off (default)")
    g.add_argument("--top-k", type=int, default=0,
                   help="0 = off (default; transformers' generate defaults to 50 when not told top_k)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition penalty, 1.0 = off (default: the checkpoint's generation_config, "
                        "as model.generate applies it)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--method", choices=["sparrow", "eagle", "ar"], default="sparrow")
    g.add_argument("--position-mode", choices=["compact", "absolute"], help="override the draft's position mode")
    g.add_argument("--window", type=int, help="override the draft's text window (sparrow mode)")
    _add_tree_args(g)
    g.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--compare", action="store_true",
                   help="also decode plainly (method ar) and report the speedup (DSR, ESR) and the seconds saved; "
                        "greedy, the two outputs must be identical (exit code 1 if not)")
    g.add_argument("--check-hf", action="store_true",
                   help="greedy only: also decode with transformers' own model.generate and check that the tokens "
                        "are identical (exit code 1 if not)")

    i = sub.add_parser("init-draft", help="write an untrained draft for a target")
    i.add_argument("--target", help="target checkpoint (default: the embedded one)")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--mode", choices=["sparrow", "eagle"], default="sparrow")
    i.add_argument("--position-mode", choices=["compact", "absolute"], default="compact")
    i.add_argument("--window", type=int, default=None)
    i.add_argument("--mid-layer", type=int, default=None, help="target layer m for IVSB (default L // 2)")

    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint of a family (tests, benchmarks)")
    t.add_argument("--family", choices=["qwen2_5_vl", "qwen2_vl", "llava_onevision"], default="qwen2_5_vl")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=4)
    sub.add_parser("regenerate", help="replace a dataset's answers with the target's own (see --help)",
                   add_help=False)
    sub.add_parser("capture", help="store the target's hidden states for offline draft training (see --help)",
                   add_help=False)
    sub.add_parser("train-draft", help="train a Sparrow / EAGLE draft with IVSB + MTP (see --help)", add_help=False)
    sub.add_parser("train-target", help="train the embedded target on the synthetic world (see --help)",
                   add_help=False)
    sub.add_parser("evaluate-target", help="description accuracy of a target on the synthetic world (see --help)",
                   add_help=False)
    sub.add_parser("bench", help="benchmark methods per visual-token bucket: tau, DSR, ESR, tables, plots (see "
                                 "--help)", add_help=False)
    sub.add_parser("analyze", help="the paper's observations on a target: visual internalization, negative "
                                   "visual gain, attention dilution (see --help)", add_help=False)
    d = sub.add_parser("demo", help="the embedded target and drafts on an example clip: speculative decoding vs "
                                     "plain decoding, identical output")
    d.add_argument("--clip", type=int, default=DEMO_CLIP,
                   help=f"which shipped example clip to describe (0-4; default {DEMO_CLIP}, one the target describes "
                        "right; 0 and 3 show what it gets wrong)")
    d.add_argument("--max-new-tokens", type=int, default=128)
    return ap


def _summary(out) -> str:
    s = out.stats
    return (f"[{s.method}] visual tokens {s.visual_tokens} | new tokens {s.new_tokens} | tau {s.tau:.2f} | "
            f"prefill {s.prefill_s:.3f}s | decode {s.decode_s:.3f}s | {s.tokens_per_s:.1f} tok/s"
            + (f" | repetition penalty {s.repetition_penalty:g}" if s.repetition_penalty != 1.0 else ""))


def _speedup_line(spec, base) -> str:
    from .generate import speedup

    x = speedup(spec.stats, base.stats)
    return (f"{spec.stats.method} against plain decoding: tau {x['tau']:.2f}, decoding {x['dsr']:.2f}x as fast (DSR), "
            f"end to end {x['esr']:.2f}x (ESR), {x['saved_s']:.2f} s saved")


def cmd_generate(a) -> int:
    from . import TreeConfig, defaults, generate, load_draft, load_target
    from .verify import Sampling, check_repetition_penalty

    if not a.prompt.strip():
        raise SparrowError('--prompt is empty; give the question about the video (e.g. --prompt "Describe the video.")')
    sampling = Sampling(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)  # bad settings fail before loading
    if a.repetition_penalty is not None:
        check_repetition_penalty(a.repetition_penalty)  # before loading
    if a.check_hf and not sampling.greedy:
        raise SparrowError("--check-hf compares greedy outputs token for token; drop --temperature (sampled outputs "
                           "follow the same distribution, not the same tokens)")
    if a.compare and a.method == "ar":
        raise SparrowError("--compare sets a speculative method against plain decoding; give --method sparrow or eagle")
    tree = TreeConfig(top_k=a.tree_top_k, depth=a.tree_depth, tokens=a.tree_tokens)
    target = load_target(a.target, dtype=a.dtype, device=a.device)  # None: the embedded target
    draft = None
    if a.method != "ar":
        if not a.draft and not a.target:
            a.draft = defaults.draft_path(a.method) or defaults.draft_path("sparrow")
        if not a.draft:
            raise SparrowError(f"--method {a.method} needs --draft PATH (or use --method ar)")
        overrides = {k: v for k, v in (("position_mode", a.position_mode), ("window", a.window)) if v is not None}
        draft = load_draft(a.draft, target, **overrides)
    inputs = target.prepare(video=a.video, prompt=a.prompt, num_frames=a.num_frames, fps=a.fps,
                            max_pixels=a.max_pixels, min_pixels=a.min_pixels)
    printed = []

    def stream(ids):
        printed.extend(ids)
        text = target.tokenizer.decode(printed, skip_special_tokens=True)
        shown = stream.shown
        if len(text) > shown and not text.endswith("\ufffd"):
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            stream.shown = len(text)

    stream.shown = 0
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, stop=a.stop,
              seed=a.seed, repetition_penalty=a.repetition_penalty)
    out = generate(target, draft, inputs, method=a.method, tree=tree, on_tokens=None if a.json else stream, **kw)
    base = generate(target, None, inputs, method="ar", **kw) if a.compare else None
    same = base is None or not sampling.greedy or base.token_ids == out.token_ids
    ref = target.hf_greedy(inputs, a.max_new_tokens, a.stop, a.repetition_penalty) if a.check_hf else None
    same_hf = ref is None or ref == out.token_ids
    if a.json:
        res = out.to_dict()
        if base:
            from .generate import speedup

            res["compare"] = {**speedup(out.stats, base.stats), "identical": base.token_ids == out.token_ids,
                              "ar": base.to_dict()}
        if ref is not None:
            res["hf_identical"] = same_hf
        print(json.dumps(res))
    else:
        sys.stdout.write(out.text[stream.shown:] + "\n")
        print(_summary(out), file=sys.stderr)
        if base:
            print(_summary(base), file=sys.stderr)
            print(_speedup_line(out, base), file=sys.stderr)
            print("output: " + ("sampled, so the same distribution as plain decoding rather than the same tokens"
                                if not sampling.greedy else "identical to plain decoding" if same else
                                "DIFFERS from plain decoding (a bug: please report it)"), file=sys.stderr)
        if ref is not None:
            at = next((i for i, (x, y) in enumerate(zip(ref, out.token_ids)) if x != y),
                      min(len(ref), len(out.token_ids)))  # the first token that differs
            print(f"transformers' generate: identical ({len(ref)} tokens)" if same_hf else
                  f"transformers' generate: DIFFERS from token {at} on (a bug: please report it)", file=sys.stderr)
    return 0 if same and same_hf else 1


def cmd_init_draft(a) -> int:
    from . import init_draft, load_target

    target = load_target(a.target, device="cpu")
    kw = dict(mode=a.mode, position_mode=a.position_mode, window=a.window)
    if a.mid_layer is not None:
        kw["mid_layer"] = a.mid_layer
    init_draft(target, seed=a.seed, **kw).save(a.out)
    print(f"wrote an untrained {a.mode} draft for {target.path} to {a.out}")
    return 0


def cmd_make_tiny(a) -> int:
    from .tiny import make_tiny_target

    make_tiny_target(a.out, a.family, seed=a.seed, hidden=a.hidden, layers=a.layers)
    print(f"wrote a tiny random {a.family} checkpoint to {a.out}")
    return 0


def cmd_demo(a) -> int:
    """Answer "Describe the video." about an example clip with --method sparrow, eagle and ar on the embedded
    target and its shipped drafts, through the same code a real checkpoint takes; check the outputs agree with each
    other and with transformers' own greedy decoding (`Target.hf_greedy`), and report each draft's speedup over
    plain decoding. Prints the clip's reference description (rendered from its ground truth into clipN.json) and the
    answer's attribute accuracy (`sparrow.synthetic.text.score_description`), so that what the target gets wrong is
    in plain sight."""
    import glob
    import json

    from . import defaults, generate, load_draft, load_target
    from .synthetic.text import score_description

    n = len(glob.glob(os.path.join(defaults.CLIPS, "clip*.mp4")))
    if not 0 <= a.clip < n:
        raise SparrowError(f"--clip {a.clip}: the shipped example clips are 0 to {n - 1}")
    target, video = load_target(device="cpu"), defaults.example_clip(a.clip)
    with open(video[:-len(".mp4")] + ".json") as f:
        truth = json.load(f)
    drafts = {}
    for m in ("sparrow", "eagle"):
        if not defaults.draft_path(m):
            raise SparrowError(f"no shipped {m} draft in {defaults.DRAFTS[m]}; rebuild with scripts/build_embedded.sh")
        drafts[m] = load_draft(defaults.draft_path(m), target)
    inputs = target.prepare(video=video, prompt="Describe the video.", num_frames=16)
    print(f"video: {video}")
    print(f"truth: {truth['reference_description']}")
    for method in ("sparrow", "eagle", "ar"):  # untimed warm-up, as bench does: a first run's one-off costs
        generate(target, drafts.get(method), inputs, max_new_tokens=4, method=method)
    outs = {}
    for method in ("sparrow", "eagle", "ar"):
        outs[method] = generate(target, drafts.get(method), inputs, max_new_tokens=a.max_new_tokens, method=method)
        if method == "sparrow":
            print(f"answer: {outs[method].text}")
            sc = score_description(outs[method].text, truth)
            print(f"attribute accuracy {sc['attributes']:.2f} (count {sc['count']:.0f}, colour {sc['colour']:.2f}, "
                  f"shape {sc['shape']:.2f}, motion {sc['motion']:.2f}, event order {sc['events']:.0f})")
        print(_summary(outs[method]))
    for method in ("sparrow", "eagle"):
        print(_speedup_line(outs[method], outs["ar"]))
    ref = target.hf_greedy(inputs, a.max_new_tokens)  # transformers' own greedy decoding, the reference of all three
    same = outs["sparrow"].token_ids == outs["ar"].token_ids == outs["eagle"].token_ids == ref
    print(f"lossless: {'identical output' if same else 'OUTPUT DIFFERS'} for sparrow, eagle, ar and transformers' "
          f"generate ({len(ref)} tokens).")
    return 0 if same else 1


SCRIPTS = {  # subcommands with their own argument parsers: module, function
    "train-target": ("sparrow.synthetic.train_target", "main"),
    "evaluate-target": ("sparrow.synthetic.evaluate", "main"),
    "regenerate": ("sparrow.training.regenerate", "main"),
    "train-draft": ("sparrow.training.trainer", "main"),
    "capture": ("sparrow.training.offline", "main"),
    "bench": ("sparrow.bench", "main"),
    "analyze": ("sparrow.analyze", "main"),
}


def run_guarded(fn, *args) -> int:
    """Run a command; a SparrowError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return fn(*args) or 0
    except SparrowError as e:
        print(f"sparrow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparrow: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SCRIPTS:
        import importlib

        module, fn = SCRIPTS[argv[0]]
        return run_guarded(getattr(importlib.import_module(module), fn), argv[1:])
    a = build_parser().parse_args(argv)
    commands = {"generate": cmd_generate, "init-draft": cmd_init_draft, "make-tiny": cmd_make_tiny, "demo": cmd_demo}
    return run_guarded(commands[a.command], a)


if __name__ == "__main__":
    sys.exit(main())
