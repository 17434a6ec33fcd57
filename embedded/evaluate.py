"""Quality of a target on the synthetic world: attribute accuracy of its descriptions per visual-token bucket,
with the blank-frames control and chance.

    python -m embedded evaluate --target DIR [--buckets 512,1536,3072,8192] [--clips 200] [--long-clips 20]
        [--draft DIR] [--out benchmarks/results/target_eval] [--resume]

Clips are held out (seeds from 10**9 on; training draws seeds below 2**31 at random, so overlap is negligible and
the seeds are never the ones listed here). Frames are 224 x 224 (64 visual tokens per 2 frames); the frame count
sets the bucket: 16 frames = 512 tokens, 784 frames = 25,088 tokens. Greedy decoding through `sparrow.generate`
(plain, or speculative with `--draft`: the same text). Scores: `score_description` (per-attribute accuracy, the
headline, and the all-or-nothing "exact" score). Controls: the same clips with blank frames, and chance (each clip
scored against another clip's true description). Writes JSON (per clip and summary, saved after every clip with a
digest of the target's weights) and a PNG of accuracy by bucket; `--resume` continues an interrupted run of the
same target where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from tqdm import tqdm

from sparrow.errors import at_least, positive_list
from sparrow.synthetic.text import describe, score_description
from sparrow.synthetic.world import make_clip

SIDE = 224
TOKENS_PER_PAIR = (SIDE // 28) ** 2
HELD_OUT = 10**9


def frames_for_bucket(visual_tokens: int) -> int:
    """Frames (even, at least 2) of a SIDE x SIDE clip that give about `visual_tokens` visual tokens."""
    return max(2, 2 * round(visual_tokens / TOKENS_PER_PAIR))


def held_out_seed(bucket: int, i: int) -> int:
    """The seed of the i-th held-out clip of a bucket."""
    return HELD_OUT + bucket * 1000 + i


def truth_of(seed: int, bucket: int) -> dict:
    """A held-out clip's ground truth without its full-size frames (the truth the scorer reads does not depend
    on the frame size, so the clip is rendered at 56 px)."""
    return make_clip(seed, frames_for_bucket(bucket), 56, 56, fps=4.0).truth


def held_out_video(bucket: int, seed: int, blank: bool = False, declared_fps: float = 4.0):
    """A held-out clip (224 x 224 frames at 4 fps, `frames_for_bucket(bucket)` of them) and the `Video` that gives
    it to a target: (clip, video). `declared_fps` is the frame rate the video is given to the target at."""
    from sparrow.video import Video

    frames = frames_for_bucket(bucket)
    clip = make_clip(seed, frames, SIDE, SIDE, fps=4.0, blank=blank)
    return clip, Video(frames=clip.frames, fps=declared_fps, indices=np.arange(frames), total_frames=frames)


def held_out_prepare(target, video, prompt: str):
    """The target's inputs for a held-out `video` (`held_out_video`) and a prompt, at the evaluation's pixel size."""
    return target.prepare(video, prompt, max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE)


def held_out_inputs(target, bucket: int, seed: int, prompt: str, blank: bool = False, declared_fps: float = 4.0):
    """A held-out clip and the target's inputs for it and the prompt: (clip, inputs). `held_out_video`'s clip,
    prepared once; to ask several questions of one clip, call `held_out_video` once and `held_out_prepare` per
    question."""
    clip, video = held_out_video(bucket, seed, blank, declared_fps)
    return clip, held_out_prepare(target, video, prompt)


def evaluate(target, bucket: int, clips: int, blank: bool = False, max_new_tokens: int = 160,
             prompt: str = "Describe the video.", draft=None, done: dict | None = None, on_row=None) -> list[dict]:
    """Greedy descriptions of `clips` held-out clips of a bucket, scored against their truth: a list of rows
    (seed, text, and the `score_description` fields). With a `draft` (attached to `target`) the text comes from
    lossless speculative decoding, the same text as plain decoding, sooner. `done` ({seed: row}, rows of an
    interrupted run of the same target) are reused instead of generated again; `on_row(rows)` is called after
    each clip (to save the rows so far)."""
    from sparrow import generate

    rows, done = [], done or {}
    for i in tqdm(range(clips), desc=f"{bucket} tokens{' blank' if blank else ''}", leave=False):
        seed = held_out_seed(bucket, i)
        if seed in done:
            rows.append(done[seed])
            continue
        clip, inputs = held_out_inputs(target, bucket, seed, prompt, blank)
        out = generate(target, draft, inputs, max_new_tokens=max_new_tokens, method="ar" if draft is None else "sparrow")
        rows.append({"seed": seed, "bucket": bucket, "visual_tokens": out.stats.visual_tokens, "blank": blank,
                     "scene": scene(clip.truth), "text": out.text, **score_description(out.text, clip.truth)})
        if on_row is not None:
            on_row(rows)
    return rows


def weights_digest(path: str) -> str:
    """A short digest (sha256, 16 hex digits) of a model directory's safetensors weights: which target wrote an
    evaluation file, so that `--resume` never mixes the texts of two targets."""
    import glob
    import hashlib

    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def chance(bucket: int, clips: int) -> list[dict]:
    """The chance level: each held-out clip's truth scored against the correct description of another clip
    (right format, wrong video), which is what a model that ignores the frames can at best produce."""
    truths = [truth_of(held_out_seed(bucket, i), bucket) for i in range(clips + 1)]
    return [{"seed": t["seed"], "bucket": bucket, "visual_tokens": bucket, "scene": scene(t),
             "text": (d := describe(o, o["seed"])),
             **score_description(d, t)} for t, o in zip(truths[:-1], truths[1:])]


# the attribute scores of a description (`score_description`: the headline and its five parts), then the others
FIELDS = ("attributes", "count", "colour", "shape", "motion", "events")
KEYS = (*FIELDS, "exact", "objects", "motion_all")


def scene(truth: dict) -> str:
    """A clip's kind of scene, "objects/events": "2/1" is two objects and one event."""
    return f"{len(truth['objects'])}/{len(truth['events'])}"


def summarise(rows: list[dict]) -> dict:
    """Mean scores of rows, their count, how many distinct texts, and `by_scene`: the mean scores per kind of
    scene ("objects/events", `scene`) where the rows record it (evaluation files written before it do not)."""
    out = {**{k: float(np.mean([r[k] for r in rows])) for k in KEYS}, "clips": len(rows),
           "distinct_texts": len({r["text"] for r in rows}), "visual_tokens": rows[0]["visual_tokens"]}
    groups: dict = {}
    for r in rows:
        if "scene" in r:
            groups.setdefault(r["scene"], []).append(r)
    if groups:
        out["by_scene"] = {k: {**{m: float(np.mean([r[m] for r in g]))
                                  for m in FIELDS},
                               "clips": len(g)} for k, g in sorted(groups.items())}
    return out


def clip_plan(buckets: str, clips: str, long_buckets: str, long_clips: int) -> list[tuple[int, int]]:
    """The (bucket, clips) pairs that `evaluate` runs, in order, from its flags as given: `--buckets`,
    `--clips` (one count, or one per bucket), `--long-buckets` and `--long-clips`. Raises ValueError (the message
    names the flag) on a bucket or count that is not a positive whole number, or a list of the wrong length."""
    sizes = positive_list("--buckets", buckets, "512,1536", empty_ok=True)
    longs = positive_list("--long-buckets", long_buckets, "25088", empty_ok=True)
    counts = positive_list("--clips", clips, "200 or 200,200,100,40", empty_ok=True)
    if len(counts) not in (1, len(sizes)):
        raise ValueError(f"--clips {clips}: give one number or one per bucket ({len(sizes)})")
    if longs and long_clips < 1:
        raise ValueError(f"--long-clips {long_clips}: give 1 or more (or --long-buckets '' for none)")
    return list(zip(sizes, counts * len(sizes) if len(counts) == 1 else counts)) + [(b, long_clips) for b in longs]


def main(argv=None):
    import sparrow

    ap = argparse.ArgumentParser(prog="python -m embedded evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="the target to evaluate (an exported directory)")
    ap.add_argument("--buckets", default="512,1536,3072,8192", help="visual-token lengths of the held-out clips")
    ap.add_argument("--clips", default="200", help="clips per bucket: one number, or one per bucket (200,200,100,50)")
    ap.add_argument("--long-buckets", default="25088", help="longer buckets, run on --long-clips clips ('' for none)")
    ap.add_argument("--long-clips", type=int, default=20, help="clips per long bucket")
    ap.add_argument("--blank-clips", type=int, default=50,
                    help="clips described with their frames blanked (accuracy should fall to chance; 0 for none)")
    ap.add_argument("--draft", help="generate through lossless speculative decoding with this Sparrow draft of the "
                                    "target (the same greedy text, faster on long clips)")
    ap.add_argument("--out", default="benchmarks/results/target_eval",
                    help="where to write OUT.json (summary and every clip's text) and OUT.png (accuracy by bucket); "
                         "a trailing .json is dropped (default benchmarks/results/target_eval)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the texts already in OUT.json (saved after every clip) when the same target wrote "
                         "them, and generate only the missing ones")
    a = ap.parse_args(argv)
    a.out = a.out[:-len(".json")] if a.out.endswith(".json") else a.out  # --out x.json writes x.json, not x.json.json
    try:  # bad counts fail here, before the target loads
        plan = clip_plan(a.buckets, a.clips, a.long_buckets, a.long_clips)
        at_least(0, ("--blank-clips", a.blank_clips))
    except ValueError as e:
        ap.error(str(e))
    target = sparrow.load_target(a.target, device="cpu")
    draft = sparrow.load_draft(a.draft, target) if a.draft else None
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    digest = weights_digest(target.path) if getattr(target, "path", None) else None
    done = _resumable(a.out + ".json", digest) if a.resume else {}
    rows, summary = [], {"buckets": {}, "blank": {}}
    head = {"target": digest}
    earlier = [r for d in done.values() for r in d.values()]

    def save(part: list, final: bool = False) -> None:
        """Write the rows so far, and until the end the earlier run's rows not reached yet (an interrupted
        resume loses nothing)."""
        now = rows + part
        seen = {(r["bucket"], r["blank"], r["seed"]) for r in now}
        rest = [] if final else [r for r in earlier if (r["bucket"], r["blank"], r["seed"]) not in seen]
        _write(a.out + ".json", {**head, "summary": summary, "rows": now + rest})

    for bucket, n in plan:
        r = evaluate(target, bucket, n, draft=draft, done=done.get((bucket, False)), on_row=save)
        rows += r
        summary["buckets"][str(bucket)] = summarise(r)
        print(bucket, json.dumps(summary["buckets"][str(bucket)]), flush=True)
        save([])
    smallest = plan[0][0]
    if a.blank_clips:
        b = evaluate(target, smallest, a.blank_clips, blank=True, draft=draft, done=done.get((smallest, True)),
                     on_row=save)
        rows += b
        summary["blank"][str(smallest)] = summarise(b)
        print("blank", json.dumps(summary["blank"][str(smallest)]), flush=True)
    summary["chance"] = {str(smallest): summarise(chance(smallest, plan[0][1]))}
    print("chance", json.dumps(summary["chance"][str(smallest)]), flush=True)
    save([], final=True)
    plot(summary, a.out + ".png")
    return 0


def _resumable(path: str, digest: str | None) -> dict:
    """{(bucket, blank): {seed: row}} from an earlier run's OUT.json written by the same target, else {}."""
    try:
        old = json.load(open(path))
    except (OSError, ValueError):
        return {}
    if digest is None or old.get("target") != digest:
        print(f"sparrow: {path} was written by another target (or before --resume existed); starting afresh")
        return {}
    done: dict = {}
    for r in old.get("rows", []):
        done.setdefault((r["bucket"], r["blank"]), {})[r["seed"]] = r
    print(f"sparrow: resuming from {path}: {len(old.get('rows', []))} clips already described")
    return done


def _write(path: str, obj) -> None:
    """Atomic JSON write (an interrupted run keeps the previous complete file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def plot(summary: dict, path: str) -> None:
    """Each field of the summary by bucket (attributes, count, colour, shape, motion, events, exact), with blank
    frames and chance as lines, as a PNG at `path`; prints a note instead when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("sparrow: no plot written (matplotlib missing: pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = sorted(summary["buckets"], key=int)
    x = [summary["buckets"][b]["visual_tokens"] for b in buckets]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, style in (("attributes", "o-"), ("count", "s--"), ("colour", "^--"), ("shape", "v--"),
                       ("motion", "<--"), ("events", "d--"), ("exact", "x:")):
        ax.plot(x, [summary["buckets"][b][key] for b in buckets], style, label=key)
    for b, s in summary["blank"].items():
        ax.axhline(s["attributes"], color="gray", lw=1, ls=":", label=f"blank frames ({b} tokens)")
    for b, s in summary.get("chance", {}).items():
        ax.axhline(s["attributes"], color="black", lw=1, ls="-.", label="chance (another clip's description)")
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Embedded target: description accuracy by video length")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)

