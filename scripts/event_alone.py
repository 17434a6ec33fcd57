"""Does the target miss an event because of the other objects? The held-out clips of two or three objects and one
event, described as drawn and in controlled variants of the same clip.

    .venv/bin/python scripts/event_alone.py [--target DIR] [--bucket 512] [--clips 200] [--variants V,...] [--out F]

Each variant is the same clip (`world.make_clip(..., edit=...)`: the same background, noise, positions and event)
with its plan edited: `scene`, as drawn; `alone`, the event's object without the others; `on-top`, the event's
object painted last, so that no other object covers it; `named-first` and `named-last`, the event's object in a
free colour that the description names before or after the others (`text.object_order`; clips where no colour is
left are skipped); `others-still`, the other objects kept still. For each, the target's greedy description is
scored on its events (`compare_gate.event_error`: right, said none, ...) by scene (objects/events), beside the
same clips as drawn. On the shipped target (2026-12-03, 512 visual tokens; benchmarks/results/event_alone_2ec.json):
of the 34 clips of two objects and the 34 of three, right as drawn 8 and 2, alone 26 and 29, on top 10 and 1; the
naming order and the others' motion change little. `--ask` also puts the training's event questions to each
one-event clip as drawn: the shipped target answers "Yes" to "Does anything appear, disappear or change colour?"
in 24 of the 34 three-object clips, and the right event to "What happens to the ...?" of its object in 2
(docs/embedded_target.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # compare_gate, beside this file

from compare_gate import event_error  # noqa: E402

from sparrow.synthetic.evaluate import (  # noqa: E402
    held_out_inputs, held_out_prepare, held_out_seed, held_out_video, truth_of)
from sparrow.synthetic.text import mention, parse_description, true_events  # noqa: E402
from sparrow.synthetic.world import COLOURS  # noqa: E402


def _renumber(objects: list[dict], events: list[dict]) -> dict:
    """A plan of these objects, in this (painting) order, with ids 0.. and the events pointed at the new ids."""
    ids = {o["id"]: i for i, o in enumerate(objects)}
    return {"objects": [{**o, "id": ids[o["id"]]} for o in objects],
            "events": [{**e, "object": ids[e["object"]]} for e in events]}


def alone(plan: dict) -> dict:
    """The plan with only the object of its (first) event."""
    who = plan["events"][0]["object"]
    return _renumber([o for o in plan["objects"] if o["id"] == who], plan["events"][:1])


def on_top(plan: dict) -> dict:
    """The plan with the object of its (first) event painted last, over the others."""
    who = plan["events"][0]["object"]
    return _renumber([o for o in plan["objects"] if o["id"] != who] + [o for o in plan["objects"] if o["id"] == who],
                     plan["events"])


class NotPossible(Exception):
    """Raised by a variant that this clip's plan does not allow (no colour left to name its object first)."""


def _recoloured(plan: dict, first: bool) -> dict:
    """The plan with the event's object in a colour that `text.object_order` names before (first=True) or after
    every other object's, from those no other object starts or ends in and, for a colour change, not the one it
    changes to. Raises NotPossible when no colour is left for that."""
    who = plan["events"][0]["object"]
    others = [o for o in plan["objects"] if o["id"] != who]
    obj = next(o for o in plan["objects"] if o["id"] == who)
    order = list(COLOURS)
    taken = {c for o in others for c in (o["colour"], o["final_colour"])} | \
        ({obj["final_colour"]} if obj["final_colour"] != obj["colour"] else set())
    edge = [order.index(o["colour"]) for o in others]
    free = [c for c in order if c not in taken and (order.index(c) < min(edge) if first else order.index(c) > max(edge))]
    if not free:
        raise NotPossible
    colour = free[0] if first else free[-1]
    final = obj["final_colour"] if obj["final_colour"] != obj["colour"] else colour
    return {"objects": [{**o, "colour": colour, "final_colour": final} if o["id"] == who else o
                        for o in plan["objects"]], "events": plan["events"]}


def named_first(plan: dict) -> dict:
    """The event's object in a colour that the description names first (`text.object_order`)."""
    return _recoloured(plan, first=True)


def named_last(plan: dict) -> dict:
    """The event's object in a colour that the description names last."""
    return _recoloured(plan, first=False)


def others_still(plan: dict) -> dict:
    """The plan with every object but the event's kept still."""
    who = plan["events"][0]["object"]
    return {"objects": [o if o["id"] == who else {**o, "motion": "still"} for o in plan["objects"]],
            "events": plan["events"]}


VARIANTS = {"scene": None, "alone": alone, "on-top": on_top, "named-first": named_first, "named-last": named_last,
            "others-still": others_still}


def said_kind(answer: str) -> str | None:
    """The event kind that an answer to "What happens to the X?" gives (`text.questions`), None for "Nothing ..."."""
    a = answer.lower()
    if a.startswith("nothing"):
        return None
    return next((k for k in ("disappears", "appears", "changes colour") if k.split()[0] in a), "other")


def asked(ask, truth: dict) -> dict:
    """What the target answers, about a one-event clip, to the training's event questions: "What happens to the X?"
    of each object and "Does anything appear, disappear or change colour?". `ask(question) -> answer`. Returns
    {"own": "right" | "nothing" | "wrong kind" for the event's object, "others": [said an event?] for the other
    objects, "anything": True for an answer that opens "Yes"}."""
    event = truth["events"][0]
    own, others = None, []
    for o in truth["objects"]:
        kind = said_kind(ask(f"What happens to the {mention(o, full=False)}?"))
        if o["id"] == event["object"]:
            own = "right" if kind == event["type"] else "nothing" if kind is None else "wrong kind"
        else:
            others.append(kind is not None)
    anything = ask("Does anything appear, disappear or change colour?").lower().startswith("yes")
    return {"own": own, "others": others, "anything": anything}


def main(argv=None) -> None:
    import sparrow
    from sparrow import generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="the target (default: the embedded one)")
    ap.add_argument("--bucket", type=int, default=512, help="visual tokens of the held-out clips (default 512)")
    ap.add_argument("--clips", type=int, default=200, help="held-out clips to look through (default 200)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="some of " + ", ".join(VARIANTS))
    ap.add_argument("--ask", action="store_true",
                    help="also ask, of each one-event clip as drawn (lone objects included), the training's event "
                         "questions: what happens to each object, and whether anything happens (`asked`)")
    ap.add_argument("--out", help="write every clip's result here (JSON)")
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        raise SystemExit(f"event_alone: --variants {a.variants}: give some of {', '.join(VARIANTS)}")
    target = sparrow.load_target(a.target, device="cpu")
    rows = []
    for i in range(a.clips):
        seed = held_out_seed(a.bucket, i)
        truth = truth_of(seed, a.bucket)
        if len(truth["events"]) != 1 or (len(truth["objects"]) == 1 and not a.ask):
            continue
        scene = f"{len(truth['objects'])}/1"
        if a.ask:
            _, video = held_out_video(a.bucket, seed)

            def ask(question, video=video):
                inputs = held_out_prepare(target, video, question)
                return generate(target, None, inputs, max_new_tokens=24, method="ar").text

            rows.append({"seed": seed, "scene": scene, "variant": "asked", **asked(ask, truth)})
            print(f"clip {i} ({scene}) asked: {rows[-1]}", flush=True)
        for name in variants if len(truth["objects"]) > 1 else ():
            try:
                clip, inputs = held_out_inputs(target, a.bucket, seed, "Describe the video.", edit=VARIANTS[name])
            except NotPossible:
                continue
            text = generate(target, None, inputs, max_new_tokens=160, method="ar").text
            error = event_error(parse_description(text)["events"], true_events(clip.truth))
            rows.append({"seed": seed, "scene": scene, "variant": name, "text": text, "error": error})
            print(f"clip {i} ({scene}) {name}: {error or 'right'}", flush=True)
    if a.out:
        json.dump({"target": a.target or "embedded", "bucket": a.bucket, "rows": rows}, open(a.out, "w"), indent=1)
    table = collections.defaultdict(collections.Counter)
    for r in rows:
        if r["variant"] == "asked":
            continue
        table[(r["scene"], r["variant"])][r["error"] or "right"] += 1
    drawn = {r["seed"]: r["error"] is None for r in rows if r["variant"] == "scene"}
    print(f"bucket {a.bucket}: one-event clips of two or three objects, events written")
    for (scene, name), c in sorted(table.items()):
        seeds = [r["seed"] for r in rows if r["scene"] == scene and r["variant"] == name]
        paired = f" (as drawn, the same clips: {sum(drawn[s] for s in seeds)})" if name != "scene" and drawn else ""
        print(f"  {scene} {name}: right {c['right']} of {sum(c.values())}{paired}, said none {c['said none']}, "
              + ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("right", "said none")))
    for scene in sorted({r["scene"] for r in rows if r["variant"] == "asked"}):
        got = [r for r in rows if r["variant"] == "asked" and r["scene"] == scene]
        own = collections.Counter(r["own"] for r in got)
        others = [x for r in got for x in r["others"]]
        print(f"  {scene} asked: anything happens? yes in {sum(r['anything'] for r in got)} of {len(got)}; "
              f"what happens to the event's object? right {own['right']}, nothing {own['nothing']}, wrong kind "
              f"{own['wrong kind']}; to another object: an event in {sum(others)} of {len(others)}")


if __name__ == "__main__":
    main()
