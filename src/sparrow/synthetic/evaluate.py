"""Quality of a target on the synthetic world: attribute accuracy of its descriptions per visual-token bucket,
the blank-frames control, and how much descriptions of different clips differ.

    python -m sparrow.synthetic.evaluate --target DIR [--buckets 512,1536,3072,8192] [--clips 200]
        [--long-clips 20] [--out benchmarks/results/target_eval] [--resume]

Clips are held out (seeds from 10**9 on; training draws seeds below 2**31 at random, so overlap is negligible and
the seeds are never the ones listed here). Frames are 224 x 224 (64 visual tokens per 2 frames); the frame count
sets the bucket: 16 frames = 512 tokens, 784 frames = 25,088 tokens. Greedy decoding through `sparrow.generate`
(method "ar"). Scores: `text.score_description` (per-attribute accuracy, the headline, and the all-or-nothing
"exact" score). Controls: the same clips with blank frames, and chance (each clip scored against another clip's
true description). `--reading N` adds what the model reads with the true description fed in (`reading`, in
the wording the target was trained on). Writes JSON (per clip and summary, saved after every clip with a digest
of the target's weights) and a PNG of accuracy by bucket; `--resume` continues an interrupted run of the same
target where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from tqdm import tqdm

from ..errors import SparrowError, at_least, positive_list
from .text import STATE_OPENINGS, score_description
from .world import COLOURS, SHAPES, make_clip

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


def held_out_video(bucket: int, seed: int, blank: bool = False, declared_fps: float = 4.0, edit=None):
    """A held-out clip (224 x 224 frames at 4 fps, `frames_for_bucket(bucket)` of them) and the `Video` that gives
    it to a target: (clip, video). `declared_fps` is the frame rate the video is given to the target at: the same
    frames, other temporal mRoPE positions (scripts/frame_rate_probe.py); `edit` renders a variant of the clip
    (`make_clip`'s, scripts/event_alone.py). Render it once, then `held_out_prepare` per question."""
    from ..video import Video

    frames = frames_for_bucket(bucket)
    clip = make_clip(seed, frames, SIDE, SIDE, fps=4.0, blank=blank, edit=edit)
    return clip, Video(frames=clip.frames, fps=declared_fps, indices=np.arange(frames), total_frames=frames)


def held_out_prepare(target, video, prompt: str):
    """The target's inputs for a held-out `video` (`held_out_video`) and a prompt, at the evaluation's pixel size."""
    return target.prepare(video, prompt, max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE)


def held_out_inputs(target, bucket: int, seed: int, prompt: str, blank: bool = False,
                    declared_fps: float = 4.0, edit=None):
    """A held-out clip and the target's inputs for it and the prompt: (clip, inputs). `held_out_video`'s clip,
    prepared once; to ask several questions of one clip, call `held_out_video` once and `held_out_prepare` per
    question."""
    clip, video = held_out_video(bucket, seed, blank, declared_fps, edit)
    return clip, held_out_prepare(target, video, prompt)


def evaluate(target, bucket: int, clips: int, blank: bool = False, max_new_tokens: int = 160,
             prompt: str = "Describe the video.", draft=None, done: dict | None = None, on_row=None) -> list[dict]:
    """Greedy descriptions of `clips` held-out clips of a bucket, scored against their truth: a list of rows
    (seed, text, and the `score_description` fields). With a `draft` (attached to `target`) the text comes from
    lossless speculative decoding, the same text as plain decoding, sooner. `done` ({seed: row}, rows of an
    interrupted run of the same target) are reused instead of generated again; `on_row(rows)` is called after
    each clip (to save the rows so far)."""
    from .. import generate

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


READING = {"count": ("one", "two", "three"), "size": ("small", "large"), "colour": tuple(COLOURS),
           "shape": tuple(SHAPES), "motion": ("left", "right", "up", "down", "leftward", "rightward", "upward",
                                              "downward", "top", "bottom", "still", "place", "move"),
           # how many events (the opener of the sentence after the objects) and which (the verb)
           "events": ("Nothing", "Then", "First", "Finally", "appears", "disappears", "changes")}


def reading(target, bucket: int, clips: int) -> dict:
    """What the language model reads from the frames, free of generation errors: the true description of each
    held-out clip is fed (teacher forcing) and, at each word of a category in READING, the target's top next
    token is compared with the true word. A mention's first colour is a free choice among the clip's objects;
    its shape, once the colour is written, is decided by the frames alone, so shape accuracy near 1/len(SHAPES)
    means the model does not read shapes at all.

    The description is written in the wording the target was trained on (`text.target_wording`: the usual one
    for a checkpoint without that file). It also scores the word that says whether an object's event is written
    (`event_decisions`): after each object's motion, " and" (an event of that object follows) against "." (none);
    in the restate wording, after the restated colour, an event verb against " stays". "event_follows" and
    "no_event_follows" are the top-1 accuracies there, and "event_auc" how well P(event) / (P(event) + P(none))
    separates the two (1: perfectly, 0.5: not at all); "event_auc_multi" and "event_follows_multi" are the same
    over the objects of scenes of two or three objects only, where the descriptions' events go wrong.

    Returns: {category: accuracy} over all such words of `clips` clips (224 x 224 frames, as `evaluate`), plus
        the event-decision scores of `decision_scores` (nan where a clip set has none, and for the events-first
        wording, whose decision is not at one word).
    """
    import torch

    from ..training.losses import extend_inputs
    from .text import EVENT_VERBS, describe, first_token_id, one_token_ids, target_wording

    tok = target.tokenizer
    wording = target_wording(target.path)
    ids = one_token_ids(tok, [w for ws in READING.values() for w in ws])
    words = {ids[w]: k for k, ws in READING.items() for w in ws if w in ids}
    hits: dict = {k: [] for k in READING}
    if wording.get("restate"):  # the word after the restated colour: an event verb, or " stays"
        yes_ids = sorted({first_token_id(tok, " " + v) for vs in EVENT_VERBS.values() for v in vs})
        no_ids = [first_token_id(tok, " stays")]
    else:
        yes_ids, no_ids = [first_token_id(tok, " and")], [first_token_id(tok, ".")]
    THE = first_token_id(tok, " the")
    decisions = []  # (an event follows, P(event) / (P(event) + P(none)), top-1 right, a scene of 2-3 objects)
    for i in tqdm(range(clips), desc=f"{bucket} tokens, teacher-forced", leave=False):
        seed = held_out_seed(bucket, i)
        clip, inputs = held_out_inputs(target, bucket, seed, "Describe the video.")
        text = describe(clip.truth, seed, **wording)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        answer = torch.tensor(enc["input_ids"])
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            logits = target.model(**extend_inputs(inputs, enc["input_ids"])).logits[0, n - 1:-1]
        for j, (t, p) in enumerate(zip(answer.tolist(), logits.argmax(-1).tolist())):
            if t in words and not (words[t] == "count" and j and answer[j - 1] == THE):  # "the one in red": no count
                hits[words[t]].append(p == t)
        for start, event in ([] if wording.get("events_first") else event_decisions(text, wording.get("restate"))):
            k = next(j for j, (a, b) in enumerate(enc["offset_mapping"]) if a <= start < b or a == start)
            word = int(answer[k])
            if (word in yes_ids) != event or word not in yes_ids + no_ids:
                raise AssertionError(f"event decision misplaced in {text!r}")  # the wording changed
            p = logits[k].float().softmax(-1)
            yes, no = float(p[yes_ids].sum()), float(p[no_ids].sum())
            top = int(p.argmax())
            decisions.append((event, yes / (yes + no), top in yes_ids if event else top in no_ids,
                              len(clip.truth["objects"]) > 1))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    return {**out, **decision_scores(decisions)}


def decision_scores(decisions: list[tuple[bool, float, bool, bool]]) -> dict:
    """The event-decision scores of `reading` from its decisions (an event follows, P(event) / (P(event) +
    P(none)), the top-1 word right, the object is one of a scene of 2-3 objects): "event_follows" and
    "no_event_follows" (top-1 accuracy where an event follows / none does), "event_auc" (how well P(event)
    separates the two; ties count half), and "event_follows_multi" and "event_auc_multi" over the objects of scenes
    of two or three only. nan where a side has no decision."""

    def auc(ds: list) -> float:
        yes, no = np.array([d[1] for d in ds if d[0]]), np.array([d[1] for d in ds if not d[0]])
        return float((yes[:, None] > no[None]).mean() + 0.5 * (yes[:, None] == no[None]).mean()) \
            if len(yes) and len(no) else float("nan")

    def follows(ds: list, event: bool) -> float:
        right = [d[2] for d in ds if d[0] == event]
        return float(np.mean(right)) if right else float("nan")

    multi = [d for d in decisions if d[3]]
    return {"event_follows": follows(decisions, True), "no_event_follows": follows(decisions, False),
            "event_auc": auc(decisions), "event_follows_multi": follows(multi, True), "event_auc_multi": auc(multi)}


def event_decisions(text: str, restate: str = "") -> list[tuple[int, bool]]:
    """Where a description says whether an object's event is written: for each object sentence, the character
    offset of the " and" that goes on to its event, or of the "." that ends it (no event); with `restate` (the
    `describe` wording), of the word after the restated colour (" appears", ... or " stays"); with whether an
    event follows. The object sentences are those after the first (the scene) and before the one that opens the
    events ("Then", "First", "Nothing"), less the state sentences of the `states` wording.
    Raises: ValueError naming the sentence when a restate sentence has no restated object."""
    import re

    out = []
    for m in list(re.finditer(r"[^.]*\.", text))[1:]:
        sentence = m.group().strip()
        if sentence.startswith(("Then", "First", "Finally", "Nothing", "In total")):
            break
        if sentence.lower().startswith(STATE_OPENINGS):  # the state sentences (`text.scene_states`)
            continue
        if restate:
            again = re.search(r", and the [^,.]*? in \w+( \w+)", m.group())
            if not again:
                raise ValueError(f"event_decisions: no restated object in {sentence!r}; is the text restate wording?")
            out.append((m.start() + again.start(1), again.group(1) != " stays"))
            continue
        ev = re.search(r" and (appears|disappears|changes)", m.group())
        out.append((m.start() + ev.start(), True) if ev else (m.end() - 1, False))
    return out


def chance(bucket: int, clips: int) -> list[dict]:
    """The chance level: each held-out clip's truth scored against the correct description of another clip
    (right format, wrong video), which is what a model that ignores the frames can at best produce."""
    from .text import describe

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
    """The (bucket, clips) pairs that `evaluate-target` runs, in order, from its flags as given: `--buckets`,
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

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", help="the target to evaluate (required unless --rescore)")
    ap.add_argument("--buckets", default="512,1536,3072,8192", help="visual-token lengths of the held-out clips")
    ap.add_argument("--clips", default="200", help="clips per bucket: one number, or one per bucket (200,200,100,50)")
    ap.add_argument("--long-buckets", default="25088", help="longer buckets, run on --long-clips clips ('' for none)")
    ap.add_argument("--long-clips", type=int, default=20, help="clips per long bucket")
    ap.add_argument("--blank-clips", type=int, default=50,
                    help="clips described with their frames blanked (accuracy should fall to chance; 0 for none)")
    ap.add_argument("--reading", type=int, default=0, metavar="N",
                    help="also measure, on N clips per bucket, what the model reads from the frames with the true "
                         "description fed in (teacher forcing; see `reading`)")
    ap.add_argument("--draft", help="generate through lossless speculative decoding with this Sparrow draft of the "
                                    "target (the same greedy text, faster on long clips)")
    ap.add_argument("--out", default="benchmarks/results/target_eval",
                    help="where to write OUT.json (summary and every clip's text) and OUT.png (accuracy by bucket); "
                         "a trailing .json is dropped (default benchmarks/results/target_eval)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the texts already in OUT.json (saved after every clip) when the same target wrote "
                         "them, and generate only the missing ones")
    ap.add_argument("--rescore", action="store_true",
                    help="no generation: score the texts stored in OUT.json again (after a change of the scorer) "
                         "and rewrite its summary and plot")
    a = ap.parse_args(argv)
    a.out = a.out[:-len(".json")] if a.out.endswith(".json") else a.out  # --out x.json writes x.json, not x.json.json
    if a.rescore:
        return rescore(a.out)
    if not a.target:
        ap.error("--target DIR is required (or --rescore to score stored texts again)")
    try:  # bad counts fail here, before the target loads
        plan = clip_plan(a.buckets, a.clips, a.long_buckets, a.long_clips)
        at_least(0, ("--blank-clips", a.blank_clips), ("--reading", a.reading))
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
        if a.reading:
            summary["buckets"][str(bucket)]["reading"] = reading(target, bucket, a.reading)
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


def rescore(out: str) -> dict:
    """Score the texts of OUT.json again against their clips' ground truth (regenerated from the seeds) and
    rewrite its summary, chance level and plot. Returns the new summary."""
    try:
        old = json.load(open(out + ".json"))
        rows = old["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SparrowError(f"cannot rescore {out}.json ({e}); run the evaluation first") from None
    truths = {}
    for r in rows:
        key = (r["seed"], r["bucket"])
        if key not in truths:
            truths[key] = truth_of(*key)
        r.update(scene=scene(truths[key]), **score_description(r["text"], truths[key]))
    summary = {"buckets": {}, "blank": {}}
    for blank, part in ((False, "buckets"), (True, "blank")):
        for b in sorted({r["bucket"] for r in rows if r["blank"] == blank}):
            summary[part][str(b)] = summarise([r for r in rows if r["bucket"] == b and r["blank"] == blank])
    smallest = min(r["bucket"] for r in rows)
    summary["chance"] = {str(smallest): summarise(chance(smallest, len([r for r in rows if r["bucket"] == smallest
                                                                         and not r["blank"]])))}
    _write(out + ".json", {"target": old.get("target"), "summary": summary, "rows": rows})
    plot(summary, out + ".png")
    return summary


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


if __name__ == "__main__":
    main()
