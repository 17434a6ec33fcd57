"""Natural-language targets rendered from a clip's ground truth: detailed descriptions (varied templates and
word order), short answers to questions, and the parser that scores a description against the truth.

Object mentions always read "[size] [striped] <colour> <shape>" so that a description can be parsed back; the
rest of the wording (openings, sentence forms, motion verbs, connectives, time phrases) varies per seed; objects
are named in one fixed order (`object_order`), each with its own events, then all events in time order.
"""

from __future__ import annotations

import re

import numpy as np

from .world import COLOURS, SHAPES

NUMBER = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
WORD_NUMBER = {v: k for k, v in NUMBER.items()}
DESCRIBE_PROMPTS = ("Describe the video.", "Describe the video in detail.", "What happens in this video?",
                    "Describe what you see in the clip.")
MOTION_PHRASES = {
    "left": ("moves to the left", "drifts left", "slides toward the left side", "travels leftward"),
    "right": ("moves to the right", "drifts right", "slides toward the right side", "travels rightward"),
    "up": ("moves up", "rises toward the top", "drifts upward", "travels up the frame"),
    "down": ("moves down", "sinks toward the bottom", "drifts downward", "travels down the frame"),
    "still": ("stays still", "does not move", "remains in place", "keeps still"),
}
CONNECTIVES = ("First,", "Then", "After that,", "Later,", "Next,", "Finally,")
# Grounded first, style after: every fact that only the frames decide is settled by the first word of its phrase,
# and the free choices of wording come after it. Where alternatives of wording open with different words, greedy
# decoding compares each alternative alone against the other facts' whole mass, so a fact written three ways loses
# to one written one way even when the model believes it more (events were hallucinated that way: "Then" against
# three openings of "no events", "appears" against three verbs of a colour change).
EVENT_VERBS = {"appears": ("appears", "appears in the frame", "appears in view"),
               "disappears": ("disappears", "disappears from view", "disappears from the frame"),
               "changes colour": ("changes colour to", "changes to", "changes its colour to")}
NO_EVENTS = ("Nothing appears or disappears.", "Nothing else happens.",
             "Nothing appears, disappears or changes colour.")


def one_token_ids(tokenizer, words) -> dict:
    """{word: token id} for the words that the tokenizer writes as one token after a space (the form they take
    inside a sentence); words written as several tokens are left out."""
    pieces = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words}
    return {w: ids[0] for w, ids in pieces.items() if len(ids) == 1}


def first_token_id(tokenizer, text: str) -> int:
    """The id of the first token the tokenizer writes for `text` as given (" and", ".", "Yes"): the token that
    decides a word where the word may span several."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def mention(obj: dict, rng: np.random.Generator | None = None, full: bool = True, colour_last: bool = False,
            size_last: bool = False) -> str:
    """'large striped red circle' (full) or 'red circle'; colour_last: 'large striped circle in red' or 'circle in
    red'; size_last (full only): 'red circle, large and striped,' (see `describe`)."""
    if size_last and full:
        traits = obj["size"] + (" and striped" if obj["texture"] == "striped" else "")
        return f"{obj['colour']} {obj['shape']}, {traits},"
    words = ([obj["size"]] if full else []) + (["striped"] if full and obj["texture"] == "striped" else [])
    return " ".join(words + ([obj["shape"], "in", obj["colour"]] if colour_last else [obj["colour"], obj["shape"]]))


def object_order(objects: list[dict]) -> list[dict]:
    """The order in which descriptions and lists name a clip's objects: by colour as first seen, in `COLOURS`
    order (red, green, blue, yellow, purple, orange, white, cyan), then by shape in `SHAPES` order.

    Why: in a free order the next object is a choice that only the words already written constrain, and the tiny
    target described an object twice instead of the next one (stage 1g, 200 held-out clips at 512 visual tokens:
    67 descriptions named the right count but fewer distinct objects). In this order the next object is the first
    one in the clip after the last one named, which the frames and the previous mention decide. Stage 1h, the first
    target trained on it (its last 1407 of 2500 steps), named fewer distinct objects than its count in 43 of the
    same 200 clips.
    """
    colours, shapes = list(COLOURS), list(SHAPES)
    return sorted(objects, key=lambda o: (colours.index(o["colour"]), shapes.index(o["shape"])))


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _event_verb(e: dict, rng) -> str:
    """'appears in view', 'changes to white': what an event does, one wording drawn from EVENT_VERBS."""
    verb = str(rng.choice(EVENT_VERBS[e["type"]]))
    return verb + (f" {e['colour']}" if e["type"] == "changes colour" else "")


WORDING_FILE = "description_wording.json"  # in a target's directory: the `describe` options it was trained on


def target_wording(path: str | None) -> dict:
    """The `describe` options (events_first, colour_last, restate, size_last, states) of the descriptions a
    synthetic-world target was trained on, read from `WORDING_FILE` in its directory (written by `train-target
    --export`); {} (the usual wording) where the file is absent (earlier exports, real checkpoints) or path is None.

    Raises: ValueError naming the file when it holds an option `describe` does not take.
    """
    import json
    import os

    f = os.path.join(path, WORDING_FILE) if path else ""
    if not f or not os.path.isfile(f):
        return {}
    with open(f) as fh:
        wording = json.load(fh)
    unknown = set(wording) - {"events_first", "colour_last", "restate", "size_last", "states"}
    if unknown:
        raise ValueError(f"{f}: unknown wording options {sorted(unknown)}; expected events_first, colour_last, "
                         "restate, size_last, states")
    return wording


def _event_clause(e: dict, objs: dict, rng, colour_last: bool = False) -> str:
    return f"the {mention(objs[e['object']], full=False, colour_last=colour_last)} {_event_verb(e, rng)}"


def scene_states(truth: dict) -> list[str]:
    """The two state sentences of the `states` wording: what the frame shows at first and at the end of the
    clip, each object named by its colour (at the end: its last colour) and its shape, in `object_order` at that
    time ("At first, the frame shows the red circle and the blue square.", "At the end, it shows no object.").
    Every word that the frames decide is one token of the embedded target's tokenizer: " the" or " no" (whether
    anything is in view), the colour, the shape, " and" or "." (whether another object follows).

    Why: an object's event is seen by comparing it across time, and in a scene of two or three objects the tiny
    target rarely did (1x wrote no event for 63 of the 112 events of such clips at 512 visual tokens). Each state
    sentence asks only what the frames show at one time, as the object list asks it over the whole clip; the
    object's sentence can then read its event off the two lists (an object missing from the start appears, one
    missing from the end disappears, one whose colour differs changes colour). An object that appears and then
    disappears is in neither list. Stage 2b (300 steps from 1x on it) refuted it: -0.017 +- 0.006 against 1x
    over 600 held-out clips, and in the clips of two or three objects whose first and last frames differ, its two
    lists differed in only 100 of 265: it does not read what the frame shows at one time
    (docs/embedded_target.md, 2b)."""
    objects = truth["objects"]
    first = [o for o in objects if o["appear"] == 0]
    last = [{**o, "colour": o["final_colour"]} for o in objects if o["disappear"] >= truth["num_frames"]]
    out = []
    for opening, objs in (("At first, the frame", first), ("At the end, it", last)):
        names = [f"the {o['colour']} {o['shape']}" for o in object_order(objs)]
        out.append(f"{opening} shows {' and '.join(names) if names else 'no object'}.")
    return out


def describe(truth: dict, seed: int, events_first: bool = False, colour_last: bool = False,
             restate: str = "", size_last: bool = False, states: bool = False) -> str:
    """A detailed description (about 40-200 tokens) of a clip from its ground truth.

    events_first: in each object's sentence, write its own events right after its name, before its motion ("A
    large red circle appears in view and moves left.") instead of after the motion ("... moves left and appears
    in view."), so that the word that says whether the object has an event comes next to its colour word (an
    experiment: `train-target --events-first`; stage 1o, 258 steps from 1k on it, left the event out in 58 of 98
    one-event clips at 512 visual tokens, against 1k's 64); the same draws, so the other wording is unchanged.
    colour_last: every mention puts the colour last ("a large circle in red", "the circle in red"), and with
    events_first the word after the colour says whether the object has an event ("A large circle in red appears
    and moves left."; the "There is ... that" form becomes "A ..."): the word that decides is then written
    by the output at the colour word itself, where the event probe reads the event (an experiment:
    `train-target --colour-last`); the same draws. Stage 1p, trained on it, named the object's shape before its
    colour badly (shape 0.43 at 512 visual tokens), so:
    restate: each object's sentence ends by naming the object again, colour last, then its own events or "stays
    in view": "mention" (".. moves left, and the large circle in red appears.") or "one" ("... moves left, and the
    one in red appears."), so that the output at that colour word says whether the object has an event, while the
    first mention keeps the shape after its colour (`train-target --restate`; an experiment); the same draws.
    Stage 1q ("mention", 300 steps) left events out in 33 of 98 one-event clips (1k: 64), but often restated
    another size and shape, which is again a shape named before its colour (shape 0.79, attributes 0.745); "one"
    restates only the colour; 1r ("one", 300 steps) matched 1k (attributes 0.777, 0.751 and 0.730 at 0.5k, 1.5k
    and 3k visual tokens; 1k: 0.78, 0.755, 0.73).
    size_last: an object's first mention gives its size and texture after its shape ("A red circle, large and
    striped, moves left."), so that its colour, the word that fetches the object, comes first: the size, written
    before it, was right for only 0.82 of the objects 1k named with the right colour (200 held-out clips at 512
    visual tokens), and where 1k named the previous object again instead of the next one, it had mostly written
    a size that is not the next object's (19 of 29); the same draws (`train-target --size-last`; an experiment).
    Stage 1s (300 steps from 1k on it) refuted that: attributes 0.722 at 512 visual tokens (1k: 0.78), 58 clips
    with an object named twice (33), and teacher-forced the size after the colour and shape was right for 0.78:
    the size is seen (1k gets it right on every one-object clip) but bound to the wrong object.
    states: after the opening, say what the frame shows at first and at the end (`scene_states`), so that an
    object's event is written after the state sentences that show it (`train-target --states`; an experiment);
    the same draws, so the other wording is unchanged.
    Raises: ValueError for an unknown restate, or for restate with events_first, or size_last with colour_last."""
    if size_last and colour_last:
        raise ValueError("describe: size_last and colour_last both reorder the first mention; pass one of them")
    if restate not in ("", "mention", "one"):
        raise ValueError(f"describe: restate={restate!r} is not a wording; use '', 'mention' or 'one'")
    if restate and events_first:
        raise ValueError("describe: restate and events_first both place the object's events; pass one of them")
    rng = np.random.default_rng(seed)
    objs = {o["id"]: o for o in truth["objects"]}
    n = len(objs)
    noun = "object" if n == 1 else "objects"
    bg = truth["background"]
    opening = str(rng.choice([
        f"The video shows {NUMBER[n]} {noun} on a {bg} background.",
        f"On a {bg} background, there {'is' if n == 1 else 'are'} {NUMBER[n]} {noun}.",
        f"This clip has a {bg} background with {NUMBER[n]} {noun}.",
        f"We see {NUMBER[n]} {noun} in front of a {bg} background.",
    ]))
    sentences = [opening] + (scene_states(truth) if states else [])
    events = truth["events"]
    for o in object_order(list(objs.values())):
        phrase = mention(o, colour_last=colour_last, size_last=size_last)
        motion = str(rng.choice(MOTION_PHRASES[o["motion"]]))
        # the object's own events, in time order, where it is named: "... moves left and appears in view, then
        # changes to white"; the event sentences after the objects put every event in time order
        own = [_event_verb(e, rng) for e in events if e["object"] == o["id"]]
        if restate:
            again = f"{o['size']} {mention(o, full=False, colour_last=True)}" if restate == "mention" \
                else f"one in {o['colour']}"
            motion += f", and the {again} " + (", then ".join(own) if own else "stays in view")
        elif own and events_first:
            motion = ", then ".join(own) + " and " + motion
        elif own:
            motion += " and " + ", then ".join(own)
        form = int(rng.integers(3))
        if form == 0 or form == 1 and colour_last:  # "... in red that appears": the word after the colour is "that"
            sentences.append(f"{_article(phrase).capitalize()} {phrase} {motion}.")
        elif form == 1:
            sentences.append(f"There is {_article(phrase)} {phrase} that {motion}.")
        else:
            sentences.append(f"The {phrase} {motion}.")
    if events:
        conn = list(CONNECTIVES[1:-1])
        rng.shuffle(conn)
        for i, e in enumerate(events):
            clause = _event_clause(e, objs, rng, colour_last)
            if rng.random() < 0.35:
                clause += f" after about {max(1, round(e['time_s']))} seconds"
            if len(events) > 1 and i == len(events) - 1:
                lead = "Finally,"
            elif i == 0:
                lead = "First," if len(events) > 1 else "Then"  # the event count is read at this word
            else:
                lead = conn[i % len(conn)]
            sentences.append(f"{lead} {clause}.")
    else:
        sentences.append(str(rng.choice(NO_EVENTS)))
    if rng.random() < 0.4:
        sentences.append(f"In total, {NUMBER[n]} {noun} {'is' if n == 1 else 'are'} seen.")
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def questions(truth: dict, seed: int) -> list[tuple[str, str]]:
    """Short question-answer pairs: how many, what colour, where did X go, which came first (the issue's), and
    what shape / how large / which objects / what happens to each object / which events, which tie each attribute
    to the frames directly."""
    rng = np.random.default_rng(seed)
    objs = truth["objects"]
    n = len(objs)
    qa = [("How many objects are there?", f"There {'is' if n == 1 else 'are'} {NUMBER[n]} {'object' if n == 1 else 'objects'}.")]
    for o in objs:
        same_shape = [p for p in objs if p["shape"] == o["shape"]]
        if len(same_shape) == 1:
            answer = f"It is {o['colour']}." if o["final_colour"] == o["colour"] else \
                f"It is {o['colour']} at first and later turns {o['final_colour']}."
            qa.append((f"What colour is the {o['shape']}?", answer))
        where = {"left": "It moved to the left.", "right": "It moved to the right.", "up": "It moved up.",
                 "down": "It moved down.", "still": "It stayed in place."}[o["motion"]]
        qa.append((f"Where did the {mention(o, full=False)} go?", where))
    for o in objs:
        if sum(p["colour"] == o["colour"] for p in objs) == 1:
            qa.append((f"What shape is the {o['colour']} object?", f"It is {_article(o['shape'])} {o['shape']}."))
        qa.append((f"Is the {mention(o, full=False)} large or small?", f"It is {o['size']}."))
    listed = [f"{_article(p := mention(o))} {p}" for o in object_order(objs)]
    qa.append(("Which objects are in the video?", (" and ".join(listed) if n <= 2 else
               ", ".join(listed[:-1]) + " and " + listed[-1]).capitalize() + "."))
    ev = truth["events"]
    by_id = {o["id"]: o for o in objs}
    for o in objs:  # each object's own events, in order: whether and what happened is the answer's first word
        own = [e for e in ev if e["object"] == o["id"]]
        did = [("It " if i == 0 else "then it ") + _event_verb(e, rng) for i, e in enumerate(own)]
        qa.append((f"What happens to the {mention(o, full=False)}?", ", ".join(did) + "." if own else
                   "Nothing happens to it."))
    qa.append(("Does anything appear, disappear or change colour?",
               "No, nothing does." if not ev else
               "Yes: " + ", then ".join(_event_clause(e, by_id, rng) for e in ev) + "."))
    if len(ev) >= 2:
        a, b = ev[0], ev[1]
        ca, cb = _event_clause(a, by_id, rng), _event_clause(b, by_id, rng)
        first, second = (ca, cb) if rng.random() < 0.5 else (cb, ca)
        qa.append((f"Which came first: {first}, or {second}?", f"First {ca}, then {cb}."))
    return qa


# ---- scoring a description against the truth ----
_C, _S = "(" + "|".join(COLOURS) + ")", "(" + "|".join(SHAPES) + ")"
_VERB = r"(appears|shows up|disappears|vanishes|turns|changes colour to|changes its colour to|changes to|becomes)"
_MENTION = re.compile(r"\b(?:(small|large) )?(?:(striped) )?" + _C + " " + _S + r"\b")
_MENTION_LAST = re.compile(r"\b(?:(small|large) )?(?:(striped) )?" + _S + " in " + _C + r"\b")  # colour_last
_EVENT = re.compile("the " + _C + " " + _S + " " + _VERB + "(?: " + _C + ")?")
_EVENT_LAST = re.compile("the " + _S + " in " + _C + " " + _VERB + "(?: " + _C + ")?")


def _mentions(sentence: str):
    """(colour, shape) of each object mention in a sentence, in either wording, in text order."""
    hits = [(m.start(), m.group(3), m.group(4)) for m in _MENTION.finditer(sentence)]
    hits += [(m.start(), m.group(4), m.group(3)) for m in _MENTION_LAST.finditer(sentence)]
    return [(c, s) for _, c, s in sorted(hits)]


def _events(text: str):
    """(verb, colour, shape) of each event clause of a text, in either wording, in text order."""
    hits = [(m.start(), m.group(3), m.group(1), m.group(2)) for m in _EVENT.finditer(text)]
    hits += [(m.start(), m.group(3), m.group(2), m.group(1)) for m in _EVENT_LAST.finditer(text)]
    return [h[1:] for h in sorted(hits)]


STATE_OPENINGS = ("at first, the frame shows", "at the end, it shows")  # `scene_states`' sentences, lower case


def parse_description(text: str) -> dict:
    """Extract what a description claims: count (from the number word), objects {(colour, shape): motion or None},
    events [(type, colour, shape)] in text order. The state sentences of the `states` wording name objects by
    their colour at one time (an object that changes colour is named in both colours) and are left out of the
    objects."""
    t = text.lower()
    m = re.search(r"\b(" + "|".join(WORD_NUMBER) + r") objects?\b", t)
    count = WORD_NUMBER[m.group(1)] if m else None
    objects: dict = {}
    for sent in re.split(r"(?<=\.)\s+", t):
        if sent.startswith(STATE_OPENINGS):  # what the frame shows at one time (`scene_states`), not the objects
            continue
        if _events(sent) and not any(p in sent for ps in MOTION_PHRASES.values() for p in ps):
            continue
        for colour, shape in _mentions(sent):
            motion = next((d for d, ps in MOTION_PHRASES.items() if any(p in sent for p in ps)), None)
            objects.setdefault((colour, shape), motion)
    events = []
    for verb, colour, shape in _events(t):
        kind = "appears" if verb in ("appears", "shows up") else "disappears" if verb in ("disappears", "vanishes") \
            else "changes colour"
        events.append((kind, colour, shape))
    return {"count": count, "objects": objects, "events": events}


def _attribute_matches(claimed: list[tuple], truth: list[tuple]) -> tuple[int, int, int]:
    """Best one-to-one matching of claimed objects to true ones, each (colour, shape, motion): the numbers of
    matched colours, shapes and motions (the matching maximises their sum). Tries every assignment of a claimed
    object (or none) to each true object: at most 32 x 31 x 30 for the world's 3 objects and 32 kinds."""
    from itertools import permutations

    claimed = list(claimed) + [None] * max(0, len(truth) - len(claimed))
    best = (0, 0, 0)
    for chosen in permutations(claimed, len(truth)):
        hits = [0, 0, 0]
        for t, c in zip(truth, chosen):
            if c is not None:
                for a in range(3):
                    hits[a] += c[a] == t[a]
        if sum(hits) > sum(best):
            best = tuple(hits)
    return best


def true_events(truth: dict) -> list[tuple[str, str, str]]:
    """A clip's events as `parse_description` gives a description's: [(kind, colour, shape)] in the truth's order,
    each object named by its colour and shape in the truth."""
    by_id = {o["id"]: o for o in truth["objects"]}
    return [(e["type"], by_id[e["object"]]["colour"], by_id[e["object"]]["shape"]) for e in truth["events"]]


def score_description(text: str, truth: dict) -> dict:
    """Score a description against the truth, two ways.

    Attribute accuracy (the headline, `attributes`): the object count (1 or 0); the colour, shape and motion of
    each object, after the best one-to-one matching of the described objects to the true ones, each divided by
    max(true objects, described objects) so that a missing or an invented object costs as much as a wrong one;
    and the event order (1 if the described events are exactly the true ones in the true order, else 0).
    `attributes` is the mean of count, colour, shape, motion and events.

    Exact (all-or-nothing per field, `exact`): `objects` (the set of colour + shape pairs is exactly right),
    `motion_all` (every object's motion is right) and, with `count` and `events`, their mean.

    Returns: a dict of floats in [0, 1].
    """
    claim = parse_description(text)
    objs = truth["objects"]
    want = {(o["colour"], o["shape"]): o["motion"] for o in objs}
    found = claim["objects"]
    want_events = true_events(truth)
    count = float(claim["count"] == len(objs))
    events = float(claim["events"] == want_events)
    n = max(len(objs), len(found))
    colour, shape, motion = _attribute_matches([(c, s, m) for (c, s), m in found.items()],
                                               [(o["colour"], o["shape"], o["motion"]) for o in objs])
    scores = {"count": count, "colour": colour / n, "shape": shape / n, "motion": motion / n, "events": events}
    scores["attributes"] = sum(scores.values()) / len(scores)
    scores["objects"] = float(set(found) == set(want))
    scores["motion_all"] = float(all(found.get(k) == v for k, v in want.items()))
    scores["exact"] = (count + scores["objects"] + scores["motion_all"] + events) / 4
    return scores
