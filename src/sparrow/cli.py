"""Command line: `sparrow generate | demo | bench | analyze | regenerate | capture | train-draft | init-draft | ...`.

Bad input prints one line `sparrow: error: ...` and exits with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import SparrowError

class Help(argparse.HelpFormatter):
    """Every command's help: each option's default after its description, unless the description gives it or
    there is none to give (a flag off, an unset value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


DEMO_CLIP = 2  # the example clip `demo` describes by default: two moving objects, which the shipped target gets right
DEMO_LONG = 8192  # visual tokens of the demo's long clip (256 frames at 224 px): a 9-second prefill on 2 CPU cores


def _add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", help="video file (mp4/mkv/webm/avi...) or directory of frames; omit for text only")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--prompt", default="Describe the video.", help="the user's question")
    q.add_argument("--prompt-file", help="read the question from this text file instead")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-frames", type=int, help="sample this many frames uniformly (default: as --fps says)")
    g.add_argument("--fps", type=float, help="or sample at this rate, frames per second (default: the checkpoint's "
                   "video_preprocessor_config.json: its fps, min_frames and max_frames, else 2 fps, 4 to 768 frames, "
                   "fewer where the video would not fit the context)")
    p.add_argument("--max-pixels", type=int, help="upper bound of each frame's area after resizing (default: the "
                   "checkpoint's; Qwen-VL)")
    p.add_argument("--min-pixels", type=int, help="lower bound of each frame's area after resizing (default: the "
                   "checkpoint's; Qwen-VL)")


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tree-top-k", type=int, help="a fixed tree: children per expanded node / frontier width "
                   "(default 8)")
    p.add_argument("--tree-depth", type=int, help="a fixed tree: draft levels below the root (default 5)")
    p.add_argument("--tree-tokens", type=int,
                   help="a fixed tree: draft tokens verified every cycle (default 30). With none of the three the tree "
                        "is chosen each cycle (at most 30 tokens) from the verify cost measured on this machine and "
                        "the draft's acceptance, with plain decode steps where speculation does not pay")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparrow", description="Lossless speculative decoding for video LLMs (Sparrow).",
                                 formatter_class=Help)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", formatter_class=Help, help="answer a prompt about a video with speculative decoding")
    g.add_argument("--target", help="local HF checkpoint directory of the target (default: the embedded one)")
    g.add_argument("--draft", help="draft directory (from init-draft / train-draft; default: the shipped draft of "
                                   "--method for the embedded target); not needed for --method ar")
    _add_video_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256, help="new tokens, at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 = off (default)")
    g.add_argument("--top-k", type=int, default=0,
                   help="0 = off (default; transformers' generate defaults to 50 when not told top_k)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition penalty, 1.0 = off (default: the checkpoint's generation_config, "
                        "as model.generate applies it)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--method", choices=["sparrow", "eagle", "ar"], default="sparrow",
                   help="sparrow (text-only draft cache), eagle (the baseline draft) or ar (plain decoding)")
    g.add_argument("--position-mode", choices=["compact", "absolute"], help="override the draft's position mode")
    g.add_argument("--window", type=int, help="override the draft's text window (sparrow mode)")
    _add_tree_args(g)
    g.add_argument("--compile-draft", action="store_true",
                   help="compile the draft's tree step with torch.compile at load (about 15 s the first time on a "
                        "CPU, then torch's disk cache; meant for GPUs, where it cuts kernel launches)")
    g.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--compare", action="store_true",
                   help="also decode plainly (method ar) and report the speedup (DSR, ESR) and the seconds saved; "
                        "greedy, the two outputs must be identical (exit code 1 if not)")
    g.add_argument("--check-hf", action="store_true",
                   help="greedy only: also decode with transformers' own model.generate and check that the tokens "
                        "are identical (exit code 1 if not)")
    g.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: this package's loop on transformers (trees, the tree policy); vllm: vLLM with the draft "
                        "as its EAGLE proposer (chains of --num-speculative-tokens; needs an environment from "
                        "scripts/install-vllm.sh)")
    g.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="--engine vllm: draft tokens a step (vLLM drafts chains, not trees)")

    i = sub.add_parser("init-draft", formatter_class=Help, help="write an untrained draft for a target")
    i.add_argument("--target", help="target checkpoint (default: the embedded one)")
    i.add_argument("--out", required=True, help="the draft directory to write")
    i.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    i.add_argument("--mode", choices=["sparrow", "eagle"], default="sparrow",
                   help="sparrow (text-only draft cache) or eagle (every position)")
    i.add_argument("--position-mode", choices=["compact", "absolute"], default="compact",
                   help="draft positions: compact (text entries renumbered) or absolute (the target's)")
    i.add_argument("--window", type=int, default=None, help="text entries the draft sees (default: all)")
    i.add_argument("--mid-layer", type=int, default=None, help="target layer m for IVSB (default L // 2)")

    sub.add_parser("make-tiny", help="write a tiny random checkpoint of a family (see --help)", add_help=False)
    sub.add_parser("regenerate", help="replace a dataset's answers with the target's own (see --help)",
                   add_help=False)
    sub.add_parser("capture", help="store the target's hidden states for offline draft training (see --help)",
                   add_help=False)
    sub.add_parser("train-draft", help="train a Sparrow / EAGLE draft with IVSB + MTP (see --help)", add_help=False)
    sub.add_parser("bench", help="benchmark methods per visual-token bucket: tau, DSR, ESR, tables, plots (see "
                                 "--help)", add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible vLLM server with the Sparrow draft (see --help)",
                   add_help=False)
    sub.add_parser("analyze", help="the paper's observations on a target: visual internalization, negative "
                                   "visual gain, attention dilution (see --help)", add_help=False)
    d = sub.add_parser("demo", formatter_class=Help,
                       help="the embedded target and drafts on an example clip: speculative decoding vs "
                            "plain decoding, identical output")
    d.add_argument("--clip", type=int, default=DEMO_CLIP,
                   help=f"which shipped example clip to describe (0-4; default {DEMO_CLIP}, one the target describes "
                        "right; 0 and 3 show what it gets wrong)")
    d.add_argument("--max-new-tokens", type=int, default=128, help="new tokens, at most")
    d.add_argument("--long", type=int, default=DEMO_LONG,
                   help="then a synthetic clip of about this many visual tokens, where the text-only draft's lead over "
                        "eagle shows (0: none)")
    return ap


def _summary(out) -> str:
    s = out.stats
    tree = ""
    if s.policy:  # what the tree policy did: cycles per tree size, plain steps
        c = s.policy["choices"]
        tree = " | trees " + ", ".join(f"{k}x{v}" for k, v in c.items() if k != "0") \
            + (f", plain steps {c['0']}" if "0" in c else "")
    return (f"[{s.method}] visual tokens {s.visual_tokens} | new tokens {s.new_tokens} | tau {s.tau:.2f} | "
            f"prefill {s.prefill_s:.3f}s | decode {s.decode_s:.3f}s | {s.tokens_per_s:.1f} tok/s" + tree
            + (f" | repetition penalty {s.repetition_penalty:g}" if s.repetition_penalty != 1.0 else "")
            + (f" | verify cost measured for this length in {s.calibration_s:.2f}s (once)" if s.calibration_s > 0.01
               else ""))


def _sampled(target, video, inputs: dict, a) -> str:
    """One line: what was taken from the video (frames and rate, of how many, the frame size before and after
    resizing, the visual tokens), and how it was chosen."""
    t, h, w = video.frames.shape[:3]
    rh, rw = target.resized_size(h, w, a.max_pixels, a.min_pixels)
    d = target.sampling_defaults()
    how = ("--num-frames" if a.num_frames else "--fps" if a.fps else
           f"the checkpoint's defaults: {d['fps']:g} fps, {d['min_frames']}-{d['max_frames']} frames")
    visual = int(target.visual_mask(inputs["input_ids"][0]).sum())
    return (f"video: {t} of {video.total_frames} frames ({video.fps:.2f} fps over {t / video.fps:.1f} s; {how}), "
            f"{w}x{h} -> {rw}x{rh}, {visual} visual tokens" + ("; prefilling..." if visual > 4000 else ""))


class _progress:
    """A progress bar on stderr over the new tokens while `--json` keeps stdout for its one object (the streamed
    text is the progress otherwise): `with _progress(json, total, name) as bar:` gives an `on_tokens` callback,
    or None when there is no bar."""

    def __init__(self, on: bool, total: int, name: str):
        self.on, self.total, self.name, self.bar = on, total, name, None

    def __enter__(self):
        if not self.on:
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.name, unit="tok", file=sys.stderr, leave=False,
                        dynamic_ncols=True)
        return lambda ids: self.bar.update(len(ids))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _speedup_line(spec, base) -> str:
    from .timing import speedup

    x = speedup(spec.stats, base.stats)
    return (f"{spec.stats.method} against plain decoding: tau {x['tau']:.2f}, decoding {x['dsr']:.2f}x as fast (DSR), "
            f"end to end {x['esr']:.2f}x (ESR), {x['saved_s']:.2f} s saved")


def cmd_generate(a) -> int:
    from . import TreeConfig, defaults, generate, load_draft, load_target, warm_up
    from .verify import Sampling, check_repetition_penalty

    if a.prompt_file:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                a.prompt = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SparrowError(f"--prompt-file {a.prompt_file}: cannot read it ({e.__class__.__name__}); give a UTF-8 "
                               "text file") from None
    if not a.prompt.strip():
        raise SparrowError('--prompt is empty; give the question about the video (e.g. --prompt "Describe the video.")')
    if a.engine == "vllm":
        from .serving import cmd_generate_vllm

        return cmd_generate_vllm(a)
    sampling = Sampling(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)  # bad settings fail before loading
    if a.repetition_penalty is not None:
        check_repetition_penalty(a.repetition_penalty)  # before loading
    if a.check_hf and not sampling.greedy:
        raise SparrowError("--check-hf compares greedy outputs token for token; drop --temperature (sampled outputs "
                           "follow the same distribution, not the same tokens)")
    if a.compare and a.method == "ar":
        raise SparrowError("--compare sets a speculative method against plain decoding; give --method sparrow or eagle")
    # any of the three fixes the tree (bad values fail here, before loading); none: the policy chooses each cycle
    fixed = (a.tree_top_k, a.tree_depth, a.tree_tokens) != (None, None, None)
    pick = lambda v, default: default if v is None else v  # noqa: E731
    tree = TreeConfig(pick(a.tree_top_k, 8), pick(a.tree_depth, 5), pick(a.tree_tokens, 30)) if fixed else None
    target = load_target(a.target, dtype=a.dtype, device=a.device)  # None: the embedded target
    draft = None
    if a.method != "ar":
        if not a.draft and not a.target:
            a.draft = defaults.draft_path(a.method) or defaults.draft_path("sparrow")
        if not a.draft:
            raise SparrowError(f"--method {a.method} needs --draft PATH (or use --method ar)")
        overrides = {k: v for k, v in (("position_mode", a.position_mode), ("window", a.window)) if v is not None}
        draft = load_draft(a.draft, target, **overrides)
        if a.compile_draft:
            draft.compile_tree()
    # a first CUDA generation runs 3-10x slower, and a compiled draft compiles at its first tree: paid here, not in
    # the answer
    if target.device.type == "cuda" or a.compile_draft:
        if a.compile_draft and draft is not None:
            print("compiling the draft's tree step (torch.compile: about 15 s the first time, seconds after)...",
                  file=sys.stderr, flush=True)
        warm_up(target, draft, None if a.method == "ar" else a.method)
    video = None
    if a.video:
        video = target.sample_video(a.video, a.num_frames, a.fps, a.max_pixels, a.min_pixels)
    inputs = target.prepare(video=video, prompt=a.prompt, max_pixels=a.max_pixels, min_pixels=a.min_pixels)
    if video is not None:
        print(_sampled(target, video, inputs, a), file=sys.stderr, flush=True)
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
    with _progress(a.json, a.max_new_tokens, f"{a.method}") as bar:
        out = generate(target, draft, inputs, method=a.method, tree=tree, on_tokens=bar or (None if a.json else stream),
                       **kw)
    base = None
    if a.compare:
        with _progress(a.json, a.max_new_tokens, "ar (for --compare)") as bar:
            base = generate(target, None, inputs, method="ar", on_tokens=bar, **kw)
    same = base is None or not sampling.greedy or base.token_ids == out.token_ids
    ref = target.hf_greedy(inputs, a.max_new_tokens, a.stop, a.repetition_penalty) if a.check_hf else None
    same_hf = ref is None or ref == out.token_ids
    if a.json:
        res = out.to_dict()
        if base:
            from .timing import speedup

            res["compare"] = {**speedup(out.stats, base.stats), "ar": base.to_dict(),
                              # sampled outputs differ by design: the same distribution, not the same tokens
                              "identical": base.token_ids == out.token_ids if sampling.greedy else None}
            if not sampling.greedy:
                res["compare"]["note"] = "sampled: the same distribution as plain decoding, not the same tokens"
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

    from .errors import at_least

    at_least(1, ("--max-new-tokens", a.max_new_tokens))
    at_least(0, ("--long", a.long))
    n = len(glob.glob(os.path.join(defaults.CLIPS, "clip*.mp4")))
    if not 0 <= a.clip < n:
        raise SparrowError(f"--clip {a.clip}: the shipped example clips are 0 to {n - 1}")
    target, video = load_target(device="cpu"), defaults.example_clip(a.clip)
    with open(video[:-len(".mp4")] + ".json") as f:
        truth = json.load(f)
    drafts = {}
    for m in ("sparrow", "eagle"):
        if not defaults.draft_path(m):
            raise SparrowError(f"no shipped {m} draft in {defaults.DRAFTS[m]}; rebuild with embedded/build.sh")
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
    if a.long > 0:
        same = _demo_long(target, drafts, a.long, a.max_new_tokens) and same
    return 0 if same else 1


def _demo_long(target, drafts: dict, visual_tokens: int, max_new_tokens: int) -> bool:
    """The demo's second part: a synthetic clip of about `visual_tokens` visual tokens, prefilled once
    (`prefill_prompt`) and decoded with sparrow, eagle and ar; prints each one's draft cost a cycle and speedup.
    Returns whether the three outputs are identical."""
    from . import generate, prefill_prompt
    from .bench import SIDE, build_inputs, frames_for, synthetic_samples

    n = frames_for(target, visual_tokens)
    inputs = build_inputs(target, synthetic_samples(1, n, 0)[0], n)
    visual = int(target.visual_mask(inputs["input_ids"][0]).sum())
    print(f"\nlong video: a synthetic clip of {n} frames at {SIDE}x{SIDE} ({visual} visual tokens), prefilled once for "
          "all three methods")
    prompt = prefill_prompt(target, inputs, max_new_tokens)
    print(f"prefill {prompt.prefill_s:.1f} s")
    outs = {m: generate(target, drafts.get(m), inputs, max_new_tokens=max_new_tokens, method=m, prompt=prompt)
            for m in ("sparrow", "eagle", "ar")}
    print(f"answer: {outs['sparrow'].text}")
    for m in ("sparrow", "eagle"):
        s = outs[m].stats
        cycles = max(1, len(s.accept_lengths) - s.plain_steps)
        print(f"{m}: the draft reads {'the text only' if m == 'sparrow' else 'every position'}: its prefill "
              f"{1e3 * s.draft_prefill_s:.0f} ms, {1e3 * (s.draft_s - s.draft_prefill_s) / cycles:.1f} ms a cycle; "
              + _speedup_line(outs[m], outs["ar"]).split(": ", 1)[1])
    same = outs["sparrow"].token_ids == outs["eagle"].token_ids == outs["ar"].token_ids
    print(f"lossless: {'identical output' if same else 'OUTPUT DIFFERS'} for sparrow, eagle and ar "
          f"({len(outs['ar'].token_ids)} tokens).")
    return same


SCRIPTS = {  # subcommands with their own argument parsers: module, function
    "make-tiny": ("sparrow.tiny", "main"),
    "regenerate": ("sparrow.training.regenerate", "main"),
    "train-draft": ("sparrow.training.trainer", "main"),
    "capture": ("sparrow.training.offline", "main"),
    "bench": ("sparrow.bench", "main"),
    "analyze": ("sparrow.analyze", "main"),
    "serve": ("sparrow.serving", "serve_main"),
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
    commands = {"generate": cmd_generate, "init-draft": cmd_init_draft, "demo": cmd_demo}
    return run_guarded(commands[a.command], a)


if __name__ == "__main__":
    sys.exit(main())
