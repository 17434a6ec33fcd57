"""`sparrow regenerate`: replace the answers of a JSONL dataset with the target's own output (the standard
recipe for draft training: the draft learns the target's distribution, not the dataset's).

    sparrow regenerate --target PATH --data train.jsonl --out regen.jsonl [--temperature 0] [--max-new-tokens 256]
        [--method sparrow --draft DRAFT]

With a draft (`--method sparrow|eagle`) the answers come from lossless speculative decoding: greedy, the same
answers as plain decoding (`--method ar`, the default) sooner; sampling, answers from the same distribution (not the
same samples). The same command describes a folder's worth of videos: one JSONL line per video and prompt.

Resumable: samples whose id is already in --out are skipped; each answer is appended (and flushed) as soon as
it is generated, so an interrupted run loses at most the sample in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from ..cli import Help
from ..errors import SparrowError, at_least
from ..verify import Sampling
from .data import read_jsonl, write_sample


def regenerate(target, data: str, out: str, max_new_tokens: int = 256, temperature: float = 0.0,
               num_frames: int | None = 16, max_pixels: int | None = None, seed: int = 0, strict: bool = False,
               log=None, shard: tuple[int, int] = (0, 1), draft=None, method: str = "ar",
               totals: dict | None = None) -> int:
    """Write the target's answers for every sample of `data` to `out` (JSONL, same ids, video paths relative to
    `out`). shard (i, n): only samples i, i + n, ... (run n processes, then concatenate their outputs).
    Sampling (temperature > 0) seeds each sample with `seed` + its line number in `data`, so a resumed or sharded
    run writes the answers that one uninterrupted run would. method "sparrow" | "eagle" decodes with `draft`
    (`sparrow.generate`, lossless). `totals`, if given, gains new_tokens, accepted and forwards (tokens emitted by,
    and the number of, target forwards after the prefills) and decode_s (seconds) over the samples written.
    Returns the number of samples written in this call."""
    from .. import generate
    from ..video import load_video

    samples = read_jsonl(data, strict=strict, log=log)[shard[0]::shard[1]]
    done = set()
    if os.path.exists(out):
        with open(out, "rb+") as f:  # drop a torn last line left by an interrupted run (that sample is redone)
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        with open(out) as f:
            for line in f:
                done.add(json.loads(line)["id"])
    base = os.path.dirname(os.path.abspath(out))
    written = 0
    with open(out, "a") as f:
        for s in tqdm([s for s in samples if s.id not in done], desc="regenerate"):
            try:
                video = load_video(s.video, max_frames=num_frames) if s.video else None
            except SparrowError as e:
                if strict:
                    raise
                print(f"sparrow: skipping sample {s.id} (line {s.line}): {e}", file=log or sys.stderr)
                continue
            inputs = target.prepare(video, s.prompt, max_pixels=max_pixels)
            o = generate(target, draft, inputs, max_new_tokens=max_new_tokens, method=method, temperature=temperature,
                         seed=seed + s.line)
            if totals is not None:
                for k, v in (("new_tokens", o.stats.new_tokens), ("accepted", sum(o.stats.accept_lengths)),
                             ("forwards", len(o.stats.accept_lengths)), ("decode_s", o.stats.decode_s)):
                    totals[k] = totals.get(k, 0) + v
            rel = os.path.relpath(s.video, base) if s.video else None
            write_sample(f, s.id, rel, s.prompt, o.text)
            f.flush()
            written += 1
    return written


def main(argv=None) -> int:
    from .. import load_draft, load_target

    ap = argparse.ArgumentParser(prog="sparrow regenerate", description=__doc__.split("\n\n")[0],
                                 formatter_class=Help)
    ap.add_argument("--target", help="target checkpoint (default: the embedded one)")
    ap.add_argument("--data", required=True, help="JSONL (LLaVA-Video style) whose answers are replaced")
    ap.add_argument("--out", required=True, help="JSONL written with the target's answers (appended, resumable)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    ap.add_argument("--num-frames", type=int, default=16, help="at most this many frames per video")
    ap.add_argument("--max-pixels", type=int, default=None, help="resize frames to at most this many pixels")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (each sample adds its line number)")
    ap.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    ap.add_argument("--shard", default="0/1", help="i/n: this process handles samples i, i+n, ... (default 0/1)")
    ap.add_argument("--method", choices=["ar", "sparrow", "eagle"], default="ar",
                    help="ar = plain decoding (default); sparrow / eagle = lossless speculative decoding with --draft")
    ap.add_argument("--draft", help="draft directory for --method sparrow|eagle (default: the embedded target's "
                                    "shipped draft of that method)")
    a = ap.parse_args(argv)
    try:
        shard = tuple(int(x) for x in a.shard.split("/"))
        assert len(shard) == 2 and 0 <= shard[0] < shard[1]
    except (ValueError, AssertionError):
        raise SparrowError(f"--shard must look like i/n with 0 <= i < n, got {a.shard!r}") from None
    at_least(1, ("--max-new-tokens", a.max_new_tokens), ("--num-frames", a.num_frames), ("--max-pixels", a.max_pixels))
    Sampling(temperature=a.temperature)  # a negative temperature fails here, before the target loads
    if a.draft and a.method == "ar":
        raise SparrowError("--draft is for speculative decoding; add --method sparrow (or eagle)")
    if a.method != "ar" and not a.draft and a.target:
        raise SparrowError(f"--method {a.method} with --target needs --draft PATH, a draft made for that target")
    target = load_target(a.target)  # None: the embedded target
    draft = None if a.method == "ar" else load_draft(a.draft, target, mode=a.method)
    totals = {}
    n = regenerate(target, a.data, a.out, a.max_new_tokens, a.temperature, a.num_frames, a.max_pixels, a.seed,
                   a.strict, shard=shard, draft=draft, method=a.method, totals=totals)
    done = f"wrote {n} answers to {a.out}"
    if totals.get("forwards"):  # tau and tokens/s as generate reports them, over every answer written
        done += (f" ({totals['new_tokens']} tokens, tau {totals['accepted'] / totals['forwards']:.2f}, "
                 f"{totals['accepted'] / max(totals['decode_s'], 1e-9):.1f} tokens/s decoding)")
    print(done)
    return 0
