"""The synthetic video world: determinism, ground truth against rendered pixels, text round trip, mp4 round trip."""

import numpy as np
import pytest

from sparrow.errors import SparrowError
from sparrow.synthetic.text import describe, parse_description, questions, score_description
from sparrow.synthetic.world import BACKGROUNDS, COLOURS, SIZES, _shape_mask, make_clip, visible_share
from sparrow.video import load_video, write_video


def test_same_seed_same_clip_other_seed_other_clip():
    a, b, c = make_clip(7, 12), make_clip(7, 12), make_clip(8, 12)
    assert np.array_equal(a.frames, b.frames) and a.truth == b.truth
    assert not np.array_equal(a.frames, c.frames)


def test_hand_checked_clips():
    """Seeds 1 and 2 at 16 frames, 112 px, looked at frame by frame (frames 0, 5, 10, 15)."""
    t = make_clip(1, 16).truth
    assert t["background"] == "black"
    objs = [(o["colour"], o["shape"], o["size"], o["texture"], o["motion"]) for o in t["objects"]]
    assert objs == [("cyan", "square", "small", "striped", "left"), ("red", "diamond", "small", "solid", "still")]
    assert [(e["frame"], e["type"], e["object"]) for e in t["events"]] == [(8, "changes colour", 1), (11, "disappears", 0)]
    assert t["events"][0]["colour"] == "white"
    t = make_clip(2, 16).truth
    assert [(o["colour"], o["shape"], o["motion"]) for o in t["objects"]] == [
        ("cyan", "circle", "left"), ("green", "square", "left"), ("yellow", "circle", "left")]
    assert t["events"] == []


def _near(pixel, rgb, tol=40):
    return np.abs(pixel.astype(int) - np.array(rgb)).max() <= tol


@pytest.mark.parametrize("seed", range(40))
def test_truth_matches_pixels(seed):
    """At every frame, an unoccluded solid object's centre shows its colour (the new one after a colour change)
    while it is visible, and the background when it is not."""
    clip = make_clip(seed, 20, 112, 140)
    t = clip.truth
    change = {e["object"]: (e["frame"], e["colour"]) for e in t["events"] if e["type"] == "changes colour"}
    for o in t["objects"]:
        if o["texture"] != "solid":
            continue
        for f in range(t["num_frames"]):
            x, y = o["track"][f]
            others = [p for p in t["objects"] if p is not o and np.hypot(p["track"][f][0] - x, p["track"][f][1] - y) < 60]
            if others:
                continue
            pixel = clip.frames[f, int(round(y)), int(round(x))]
            assert 0 <= x < 140 and 0 <= y < 112  # never leaves the frame
            if o["appear"] <= f < o["disappear"]:
                colour = change[o["id"]][1] if o["id"] in change and f >= change[o["id"]][0] else o["colour"]
                assert _near(pixel, COLOURS[colour]), (seed, f, o["id"], pixel, colour)
            else:
                assert not any(_near(pixel, c, 30) for c in COLOURS.values())


def test_visible_share_of_hand_built_and_rendered_clips():
    """A small square under a large one shows nothing, beside it all of itself; on rendered clips the share equals
    the share of the object's pixels that show its colour (solid objects of a colour no other object has)."""
    square = {"shape": "square", "appear": 0, "disappear": 2}
    truth = {"height": 40, "width": 40, "objects": [
        {**square, "id": 0, "size": "small", "track": [[20, 20], [5, 5]]},  # under object 1, then clear of it
        {**square, "id": 1, "size": "large", "track": [[20, 20], [33, 33]]},
        {**square, "id": 2, "size": "small", "track": [[5, 35], [5, 35]], "appear": 1, "disappear": 1}]}  # never in
    assert visible_share(truth) == {0: 0.5, 1: 1.0, 2: 0.0}
    checked = covered = 0
    for seed in range(30):
        clip = make_clip(seed, 12, 112, 140)
        t, share = clip.truth, visible_share(clip.truth)
        yy, xx = np.mgrid[0:112, 0:140].astype(np.float32)
        for o in t["objects"]:
            same = [p for p in t["objects"] if p["colour"] == o["colour"] or p["final_colour"] == o["colour"]]
            if o["texture"] != "solid" or o["final_colour"] != o["colour"] or len(same) > 1:
                continue
            shown = [np.all(clip.frames[f][_shape_mask(o["shape"], xx, yy, *o["track"][f], SIZES[o["size"]] * 112)]
                            == COLOURS[o["colour"]], axis=-1).mean() for f in range(o["appear"], o["disappear"])]
            assert abs(share[o["id"]] - (np.mean(shown) if shown else 0.0)) < 0.03, (seed, o["id"])
            checked += 1
            covered += share[o["id"]] < 0.99
    assert checked > 30 and covered >= 3  # the check saw objects partly covered, not only clear ones


def test_motion_direction_in_track():
    for seed in range(30):
        for o in make_clip(seed, 10).truth["objects"]:
            (x0, y0), (x1, y1) = o["track"][0], o["track"][-1]
            dx, dy = x1 - x0, y1 - y0
            want = {"left": dx < -20, "right": dx > 20, "up": dy < -20, "down": dy > 20,
                    "still": abs(dx) + abs(dy) < 1}[o["motion"]]
            assert want, (seed, o["motion"], dx, dy)


def test_blank_clip_has_only_background():
    clip = make_clip(3, 8, blank=True)
    bg = np.array(BACKGROUNDS[clip.truth["background"]])
    assert np.abs(clip.frames.reshape(-1, 3).mean(0) - bg).max() < 20
    assert clip.truth == make_clip(3, 8).truth | {"objects": clip.truth["objects"]}


def test_descriptions_parse_back_and_vary():
    texts = set()
    for seed in range(200):
        truth = make_clip(seed, 16).truth
        text = describe(truth, seed)
        texts.add(text)
        scores = score_description(text, truth)
        assert scores["attributes"] == scores["exact"] == 1.0, text
        assert 15 <= len(text.split()) <= 160
        assert questions(truth, seed)
    assert len(texts) == 200
    truth = make_clip(1, 16).truth
    wrong = describe(truth, 1).replace("cyan square", "blue square")
    scores = score_description(wrong, truth)
    assert scores["objects"] == 0.0 and scores["exact"] <= 0.75  # all-or-nothing
    n = len(truth["objects"])
    assert scores["colour"] == (n - 1) / n and scores["shape"] == scores["motion"] == 1.0  # partial credit


def test_descriptions_settle_each_event_fact_at_one_word():
    """Grounded first: the word after the object sentences decides the event count (none / one / two) and the
    verb's first word decides the event type, the same word whatever wording follows, so greedy decoding never
    weighs one fact against a fraction of another split over several wordings."""
    import re

    opener = {0: set(), 1: set(), 2: set()}
    verb = {"appears": set(), "disappears": set(), "changes colour": set()}
    for seed in range(300):
        truth = make_clip(seed, 16).truth
        sentences = re.split(r"(?<=\.) ", describe(truth, seed))
        k = 1 + len(truth["objects"])  # the opening, then one sentence per object
        opener[len(truth["events"])].add(sentences[k].split()[0])
        names = {o["id"]: f"{o['colour']} {o['shape']}" for o in truth["objects"]}
        for e, s in zip(truth["events"], sentences[k:]):
            verb[e["type"]].add(s.split(names[e["object"]] + " ")[1].split()[0].rstrip("."))
    assert opener == {0: {"Nothing"}, 1: {"Then"}, 2: {"First,"}}
    assert verb == {"appears": {"appears"}, "disappears": {"disappears"}, "changes colour": {"changes"}}


def test_descriptions_give_each_object_its_own_events_where_it_is_named():
    """An object's sentence ends with what happens to it, in time order ("... and appears, then changes to
    white"), and nothing for an object without events: whether and how it changes is written where the object is
    named, before the event sentences order all events in time."""
    import re

    from sparrow.synthetic.text import _MENTION, object_order

    with_events = 0
    for seed in range(300):
        truth = make_clip(seed, 16).truth
        text = describe(truth, seed)
        sentences = re.split(r"(?<=\.) ", text)[1:1 + len(truth["objects"])]
        for o, s in zip(object_order(truth["objects"]), sentences):
            m = _MENTION.search(s.lower())
            assert (m.group(3), m.group(4)) == (o["colour"], o["shape"]), (seed, s)
            own = [e["type"].split()[0] for e in truth["events"] if e["object"] == o["id"]]
            said = [c.split()[0] for c in re.split(r" and |, then ", s.rstrip("."))[1:]]
            assert said == own, (seed, s, own)
            with_events += bool(own)
        assert score_description(text, truth)["events"] == 1.0
    assert with_events > 100


def test_events_first_wording_names_the_event_right_after_the_object():
    """events_first: the word after an object's name is its first event's verb, or its motion's first word when
    it has none; it scores as the usual wording does, which the option leaves unchanged (same draws)."""
    import re

    from sparrow.synthetic.text import EVENT_VERBS, MOTION_PHRASES, _MENTION, object_order

    event_words = {v.split()[0] for vs in EVENT_VERBS.values() for v in vs}
    motion_words = {p.split()[0] for ps in MOTION_PHRASES.values() for p in ps}
    assert not event_words & motion_words  # one word tells whether the object has an event
    with_events = 0
    for seed in range(200):
        truth = make_clip(seed, 16).truth
        usual, first = describe(truth, seed), describe(truth, seed, events_first=True)
        scores = score_description(first, truth)
        assert scores == score_description(usual, truth) and scores["attributes"] == 1.0, first
        assert first.split(". ")[0] == usual.split(". ")[0]  # same draws: the same opening
        for o, s in zip(object_order(truth["objects"]), re.split(r"(?<=\.) ", first)[1:]):
            after = s[_MENTION.search(s.lower()).end():].split()
            nxt = (after[1] if after[0] == "that" else after[0]).rstrip(".,")
            own = [e for e in truth["events"] if e["object"] == o["id"]]
            assert (nxt in event_words) == bool(own), (seed, s)
            if own:
                assert nxt == own[0]["type"].split()[0], (seed, s)  # its first event, in time order
            with_events += bool(own)
    assert with_events > 60


def test_colour_last_wording_puts_the_event_right_after_the_colour_word():
    """colour_last with events_first: every mention ends with its colour ("a large circle in red", "the circle
    in red"), the word after an object sentence's colour is its first event's verb exactly when it has an event,
    and the description parses back to a perfect score (the scorer reads both wordings)."""
    import re

    from sparrow.synthetic.text import EVENT_VERBS, MOTION_PHRASES, _MENTION, _MENTION_LAST, object_order

    event_words = {v.split()[0] for vs in EVENT_VERBS.values() for v in vs}
    motion_words = {p.split()[0] for ps in MOTION_PHRASES.values() for p in ps}
    with_events = 0
    for seed in range(200):
        truth = make_clip(seed, 16).truth
        text = describe(truth, seed, events_first=True, colour_last=True)
        assert score_description(text, truth)["attributes"] == 1.0, text
        assert _MENTION.search(text.lower()) is None, text  # no mention puts the colour first
        sentences = re.split(r"(?<=\.) ", text)
        for o, s in zip(object_order(truth["objects"]), sentences[1:]):
            m = _MENTION_LAST.search(s.lower())
            assert (m.group(3), m.group(4)) == (o["shape"], o["colour"]), (seed, s)
            nxt = s[m.end():].split()[0].rstrip(".,")
            own = [e for e in truth["events"] if e["object"] == o["id"]]
            assert nxt in (event_words if own else motion_words), (seed, s)
            with_events += bool(own)
    assert with_events > 60


def test_restate_wording_names_the_object_again_and_then_says_whether_it_has_an_event():
    """restate: each object sentence names the object as usual, then again with its colour last ("the large
    circle in red" or "the one in red"); the word after that colour is its first event's verb, or "stays" when it
    has none; the description parses back to a perfect score (the restated name is not read as an event
    sentence), the other wording is unchanged, and an unknown wording is refused."""
    import re

    from sparrow.synthetic.text import _MENTION, object_order

    with_events = 0
    for restate in ("mention", "one"):
        for seed in range(100):
            truth = make_clip(seed, 16).truth
            text = describe(truth, seed, restate=restate)
            assert score_description(text, truth)["attributes"] == 1.0, text
            assert text.split(". ")[0] == describe(truth, seed).split(". ")[0]  # same draws: the same opening
            for o, s in zip(object_order(truth["objects"]), re.split(r"(?<=\.) ", text)[1:]):
                first = _MENTION.search(s.lower())
                assert (first.group(3), first.group(4)) == (o["colour"], o["shape"]), (seed, s)
                again = f"the {o['size']} {o['shape']} in {o['colour']} " if restate == "mention" \
                    else f"the one in {o['colour']} "
                assert s.index(again) > first.end(), (seed, s)
                nxt = s[s.index(again) + len(again):].split()[0].rstrip(".,")
                own = [e for e in truth["events"] if e["object"] == o["id"]]
                assert nxt == (own[0]["type"].split()[0] if own else "stays"), (seed, s)
                with_events += bool(own)
    assert with_events > 60
    with pytest.raises(ValueError, match="restate='once' is not a wording"):
        describe(make_clip(0, 16).truth, 0, restate="once")
    with pytest.raises(ValueError, match="restate and events_first both place"):
        describe(make_clip(0, 16).truth, 0, events_first=True, restate="one")


def test_size_last_wording_names_the_colour_first_and_the_size_after_the_shape():
    """size_last: every object sentence's mention opens with the object's colour and gives its size (and "striped")
    after its shape ("A red circle, large and striped, moves left."); the event decision (" and" or ".") is still
    found, the description parses back to a perfect score, the draws are the usual wording's, and size_last with
    colour_last is refused."""
    import re

    from sparrow.synthetic.evaluate import event_decisions
    from sparrow.synthetic.text import _MENTION, object_order

    for seed in range(100):
        truth = make_clip(seed, 16).truth
        text = describe(truth, seed, size_last=True)
        assert score_description(text, truth)["attributes"] == 1.0, text
        usual = describe(truth, seed)
        assert text.split(". ")[0] == usual.split(". ")[0] and text.count(".") == usual.count(".")  # same draws
        objects = object_order(truth["objects"])
        for o, s in zip(objects, re.split(r"(?<=\.) ", text)[1:]):
            traits = o["size"] + (" and striped" if o["texture"] == "striped" else "")
            assert re.match(rf"(A|An|The|There is an?) {o['colour']} {o['shape']}, {traits},", s), (seed, s)
            assert not _MENTION.search(s.lower()).group(1), (seed, s)  # no size before the colour
        assert [e for _, e in event_decisions(text)] == [e for _, e in event_decisions(usual)]
    with pytest.raises(ValueError, match="size_last and colour_last"):
        describe(make_clip(0, 16).truth, 0, size_last=True, colour_last=True)


def test_states_wording_says_what_the_frame_shows_at_first_and_at_the_end():
    """states: after the opening, two sentences name what the frame shows at first and at the end, in the
    fixed order, each object in its colour at that time; they agree with the rendered first and last frames
    (seed 1: the red diamond turns white and the cyan square disappears), the rest of the description is the
    usual one word for word, it parses back to a perfect score (an object that changes colour, named in both
    colours in the state sentences, is still one object), and each object keeps its one event decision."""
    import re

    from sparrow.synthetic.evaluate import event_decisions
    from sparrow.synthetic.text import scene_states

    clip = make_clip(1, 16)
    assert scene_states(clip.truth) == ["At first, the frame shows the red diamond and the cyan square.",
                                        "At the end, it shows the white diamond."]
    for f, colours in ((0, ("cyan", "red")), (15, ("white",))):  # the colours the first and last frames show
        shown = {c for c, rgb in COLOURS.items() if (np.abs(clip.frames[f].astype(int) - rgb).sum(-1) < 30).sum() > 20}
        assert shown == set(colours), (f, shown)
    kinds, states = set(), []
    for seed in range(150):
        truth = make_clip(seed, 16).truth
        text, usual = describe(truth, seed, states=True), describe(truth, seed)
        first, second = re.split(r"(?<=\.) ", text)[1:3]
        states += [first, second]
        assert text == usual.replace(". ", f". {first} {second} ", 1), text
        assert first.startswith("At first, the frame shows ") and second.startswith("At the end, it shows ")
        assert score_description(text, truth)["attributes"] == 1.0, text
        assert [e for _, e in event_decisions(text)] == [e for _, e in event_decisions(usual)]
        for o in truth["objects"]:
            start, end = f"{o['colour']} {o['shape']}" in first, f"{o['final_colour']} {o['shape']}" in second
            kinds.add((start, end))
            assert start == (o["appear"] == 0) and end == (o["disappear"] == 16), (seed, text)
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}  # appears then disappears too
    assert any(s.endswith("shows no object.") for s in states)


def test_descriptions_and_lists_name_objects_in_one_fixed_order():
    """Objects come by colour in COLOURS order, then by shape, whatever the seed: the next object is decided by
    the frames and the last one named, never a free choice (a free order made the target repeat objects)."""
    import re

    from sparrow.synthetic.text import _MENTION
    from sparrow.synthetic.world import SHAPES

    rank = {(c, s): (i, j) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)}
    reordered = 0
    for seed in range(200):
        truth = make_clip(seed, 16).truth
        drawn = [(o["colour"], o["shape"]) for o in truth["objects"]]
        sentences = re.split(r"(?<=\.) ", describe(truth, seed))[1:1 + len(drawn)]
        named = [(m.group(3), m.group(4)) for m in map(_MENTION.search, sentences)]
        assert named == sorted(drawn, key=rank.get), (seed, sentences)
        listed = dict(questions(truth, seed))["Which objects are in the video?"].lower()
        assert [(m.group(3), m.group(4)) for m in _MENTION.finditer(listed)] == named, (seed, listed)
        reordered += named != drawn
    assert reordered > 20  # the world draws objects in any order; the text does not follow it


def test_questions_ask_what_happens_to_each_object():
    truth = make_clip(1, 16).truth  # the cyan square disappears; the red diamond turns white
    qa = dict(questions(truth, 1))
    assert qa["What happens to the cyan square?"].startswith("It disappears")
    assert qa["What happens to the red diamond?"] in ("It changes colour to white.", "It changes to white.",
                                                       "It changes its colour to white.")
    truth = make_clip(2, 16).truth  # no events
    assert dict(questions(truth, 2))["What happens to the green square?"] == "Nothing happens to it."


def test_attribute_score_counts_invented_and_missing_objects():
    truth = {"objects": [{"id": 0, "colour": "red", "shape": "circle", "motion": "left"},
                         {"id": 1, "colour": "blue", "shape": "square", "motion": "still"}], "events": []}
    text = "We see two objects. A blue square stays still. A red circle moves to the left. A green diamond moves up."
    s = score_description(text, truth)
    assert s["count"] == 1.0 and s["colour"] == s["shape"] == s["motion"] == 2 / 3 and s["objects"] == 0.0
    s = score_description("We see two objects. A red square moves to the left.", truth)
    assert (s["colour"], s["shape"], s["motion"]) == (0.5, 0.0, 0.5)  # red->circle or square->square, not both
    assert parse_description("The video shows two objects.")["count"] == 2


def test_long_clip_spreads_events(tmp_path):
    clip = make_clip(11, 400, 56, 56)
    assert clip.frames.shape == (400, 56, 56, 3)
    for e in clip.truth["events"]:
        assert 400 // 6 <= e["frame"] < 400 - 400 // 6


def test_mp4_round_trip(tmp_path):
    clip = make_clip(5, 12)
    path = str(tmp_path / "c.mp4")
    write_video(path, clip.frames, fps=4, crf=12)
    v = load_video(path)
    assert v.frames.shape == clip.frames.shape
    assert np.abs(v.frames.astype(int) - clip.frames.astype(int)).mean() < 6


@pytest.mark.parametrize("seed", [0, 4, 9])
def test_cell_labels_match_rendered_pixels(seed):
    """A token labelled with an object shows that object's colour over at least a fifth of its 28 x 28 cell."""
    from sparrow.synthetic.train_target import cell_labels
    from sparrow.synthetic.world import MOTIONS

    clip = make_clip(seed, 8, 224, 224)
    lab = cell_labels(clip.truth, (4, 8, 8)).reshape(4, 8, 8, -1)
    assert lab[..., 0].gt(0).sum() >= 2  # every clip here shows an object
    for g, i, j in lab[..., 0].nonzero().tolist():
        colour = list(COLOURS)[lab[g, i, j, 0] - 1]
        cell = clip.frames[2 * g, 28 * i:28 * i + 28, 28 * j:28 * j + 28].reshape(-1, 3).astype(float)
        rgb = np.array(COLOURS[colour], dtype=float)
        near = np.minimum(np.abs(cell - rgb).max(1), np.abs(cell - rgb * 0.55).max(1)) < 30  # solid or stripe
        assert near.mean() >= 0.2, (seed, g, i, j, colour, near.mean())
        motions = {list(MOTIONS).index(o["motion"]) + 1 for o in clip.truth["objects"]}
        assert int(lab[g, i, j, 4]) in motions


def test_evaluate_rescore_scores_stored_texts_again(tmp_path):
    from sparrow.synthetic import evaluate as ev

    seed = ev.HELD_OUT + 512 * 1000
    truth = ev.truth_of(seed, 512)
    rows = [{"seed": seed, "bucket": 512, "visual_tokens": 512, "blank": False, "text": describe(truth, 7),
             "attributes": 0.0},
            {"seed": seed, "bucket": 512, "visual_tokens": 512, "blank": True, "text": "We see six objects.",
             "attributes": 1.0}]
    out = str(tmp_path / "eval")
    (tmp_path / "eval.json").write_text(__import__("json").dumps({"summary": {}, "rows": rows}))
    ev.main(["--rescore", "--out", out + ".json"])  # --out OUT.json names the same file as --out OUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.png"]
    summary = __import__("json").loads((tmp_path / "eval.json").read_text())["summary"]
    assert summary["buckets"]["512"]["attributes"] == 1.0 and summary["blank"]["512"]["attributes"] == 0.0
    assert summary["chance"]["512"]["clips"] == 1 and (tmp_path / "eval.png").stat().st_size > 0
    kind = f"{len(truth['objects'])}/{len(truth['events'])}"  # the breakdown by scene: objects / events
    assert ev.scene(truth) == kind
    assert summary["buckets"]["512"]["by_scene"] == {kind: {**{k: 1.0 for k in ("attributes", "count", "colour",
                                                                                  "shape", "motion", "events")},
                                                            "clips": 1}}
    with pytest.raises(SparrowError, match="run the evaluation first"):
        ev.main(["--rescore", "--out", str(tmp_path / "missing")])


def test_reading_scores_the_true_description_word_by_word():
    import sparrow
    from sparrow.synthetic.evaluate import READING, reading

    target = sparrow.load_target()  # the embedded target counts objects right ~90% of the time with the truth fed
    acc = reading(target, 128, 3)
    assert set(acc) == set(READING) | {"event_follows", "no_event_follows", "event_auc", "event_follows_multi",
                                         "event_auc_multi"}
    assert all(0 <= acc[k] <= 1 for k in ("count", "colour", "shape", "size", "no_event_follows"))
    assert acc["count"] >= 0.5  # a shifted alignment of logits and words would score ~0


def test_decision_scores_split_the_scenes_of_several_objects():
    import math

    from sparrow.synthetic.evaluate import decision_scores

    lone = [(True, 0.9, True, False), (False, 0.1, True, False)]  # a lone object: told apart
    multi = [(True, 0.3, False, True), (True, 0.6, True, True), (False, 0.4, True, True), (False, 0.4, True, True)]
    s = decision_scores(lone + multi)
    assert s["event_follows_multi"] == 0.5 and s["event_auc_multi"] == 0.5  # 0.3 < 0.4 twice, 0.6 > 0.4 twice
    assert s["event_follows"] == 2 / 3 and s["no_event_follows"] == 1.0
    assert s["event_auc"] == (3 + 3 + 1) / 9  # 0.9 and 0.6 above all three nones; 0.3 above only 0.1
    assert math.isnan(decision_scores(lone)["event_auc_multi"])


def test_reading_feeds_the_wording_the_target_was_trained_on(tmp_path, monkeypatch):
    """A target whose directory records the restate wording is fed restate descriptions, and its event decision
    is read at the word after the restated colour (a decision at any other word raises)."""
    import json
    import shutil

    import sparrow
    from sparrow.defaults import target_path
    from sparrow.synthetic import evaluate
    from sparrow.synthetic.text import WORDING_FILE

    shutil.copytree(target_path(), tmp_path / "t")
    (tmp_path / "t" / WORDING_FILE).write_text(json.dumps({"restate": "one"}))
    fed, original = [], evaluate.event_decisions
    monkeypatch.setattr(evaluate, "event_decisions",
                        lambda text, restate="": fed.append(text) or original(text, restate))
    acc = evaluate.reading(sparrow.load_target(str(tmp_path / "t")), 128, 3)
    assert len(fed) == 3 and all(", and the one in " in t for t in fed)
    assert 0 <= acc["no_event_follows"] <= 1 and acc["count"] >= 0.5


def test_event_decisions_in_the_restate_wording_point_at_the_word_after_the_restated_colour():
    """restate: the decision is the word after the restated colour, an event verb exactly when the object has an
    event, one per object in the description's order; text without a restated object is refused."""
    from sparrow.synthetic.evaluate import event_decisions
    from sparrow.synthetic.text import object_order

    seen = set()
    for restate in ("mention", "one"):
        for seed in range(40):
            truth = make_clip(seed, 16).truth
            text = describe(truth, seed, restate=restate)
            got = event_decisions(text, restate)
            objs = object_order(truth["objects"])
            assert len(got) == len(objs), text
            for (i, event), o in zip(got, objs):
                own = any(e["object"] == o["id"] for e in truth["events"])
                word = text[i:].split()[0].rstrip(".,")
                assert event == own and (word == "stays") == (not own), (text, i)
                assert text[i] == " " and text[:i].rsplit(" ", 1)[-1] == o["colour"], (text, i)
                seen.add(event)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="no restated object"):
        event_decisions("We see one object on a gray background. A small red circle moves up.", "one")


def test_target_wording_is_read_from_the_target_directory(tmp_path):
    """The wording a target was trained on comes back from its directory: {} (usual) without the file or without
    a path, the options as written, and an unknown option is refused (export writes the file: test_embedded)."""
    import json

    from sparrow.synthetic.text import WORDING_FILE, target_wording

    assert target_wording(None) == {} and target_wording(str(tmp_path)) == {}
    (tmp_path / WORDING_FILE).write_text(json.dumps({"restate": "one"}))
    assert target_wording(str(tmp_path)) == {"restate": "one"}
    truth = make_clip(3, 16).truth
    assert "the one in" in describe(truth, 3, **target_wording(str(tmp_path)))
    (tmp_path / WORDING_FILE).write_text(json.dumps({"size_last": True}))
    size = truth["objects"][0]["size"]
    assert f", {size}" in describe(truth, 3, **target_wording(str(tmp_path))) and f", {size}" not in describe(truth, 3)
    (tmp_path / WORDING_FILE).write_text(json.dumps({"restated": "one"}))
    with pytest.raises(ValueError, match="unknown wording options"):
        target_wording(str(tmp_path))


def test_event_decisions_find_the_word_that_says_whether_an_event_follows():
    from sparrow.synthetic.evaluate import event_decisions

    text = ("We see two objects in front of a gray background. The large orange circle stays still and disappears "
            "from the frame. A small red square moves up. Then the orange circle disappears from the frame.")
    got = event_decisions(text)
    assert [(text[i:i + 4], ev) for i, ev in got] == [(" and", True), (". Th", False)]
    none = ("The video shows one object on a gray background. A small white circle stays still. Nothing appears, "
            "disappears or changes colour.")
    assert event_decisions(none) == [(none.index("still.") + 5, False)]


def test_evaluate_main_with_a_draft_writes_the_same_texts_as_plain_decoding(tmp_path):
    import json

    from sparrow import defaults
    from sparrow.synthetic import evaluate as ev

    common = ["--target", defaults.target_path(), "--buckets", "64", "--clips", "2", "--long-buckets", "",
              "--blank-clips", "1"]
    ev.main(common + ["--out", str(tmp_path / "ar")])
    ev.main(common + ["--draft", defaults.draft_path("sparrow"), "--out", str(tmp_path / "sp")])
    ar, sp = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ar", "sp"))
    assert [r["text"] for r in ar["rows"]] == [r["text"] for r in sp["rows"]] and len(ar["rows"]) == 3
    assert ar["summary"]["buckets"]["64"]["clips"] == 2 and ar["summary"]["chance"]["64"]["clips"] == 2
    with pytest.raises(SystemExit):
        ev.main(common[:4] + ["--clips", "2,2", "--out", str(tmp_path / "x")])  # two counts for one bucket


def test_evaluate_resume_reuses_the_same_targets_texts_only(tmp_path):
    import json

    from sparrow import defaults
    from sparrow.synthetic import evaluate as ev

    out = tmp_path / "eval"
    common = ["--target", defaults.target_path(), "--buckets", "64", "--clips", "2", "--long-buckets", "",
              "--blank-clips", "0", "--out", str(out), "--resume"]
    ev.main(common)
    first = json.loads((tmp_path / "eval.json").read_text())
    assert first["target"] == ev.weights_digest(defaults.target_path()) and len(first["rows"]) == 2
    # an interrupted run: one clip saved, with a text the model would not write
    marked = {**first["rows"][0], "text": "We see four objects."}
    (tmp_path / "eval.json").write_text(json.dumps({**first, "rows": [marked]}))
    ev.main(common)
    again = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert again[0]["text"] == "We see four objects." and again[1]["text"] == first["rows"][1]["text"]
    # written by another target: nothing is reused
    (tmp_path / "eval.json").write_text(json.dumps({**first, "target": "0" * 16, "rows": [marked]}))
    ev.main(common)
    assert json.loads((tmp_path / "eval.json").read_text())["rows"][0]["text"] == first["rows"][0]["text"]


def test_evaluate_resume_keeps_the_earlier_rows_not_reached_yet_in_every_save(tmp_path, monkeypatch):
    import json

    from sparrow import defaults
    from sparrow.synthetic import evaluate as ev

    out = tmp_path / "eval"
    digest = ev.weights_digest(defaults.target_path())
    later = {"seed": ev.held_out_seed(64, 1), "bucket": 64, "visual_tokens": 64, "blank": False,
             "text": "We see four objects.", **ev.score_description("We see four objects.", ev.truth_of(
                 ev.held_out_seed(64, 1), 64))}
    (tmp_path / "eval.json").write_text(json.dumps({"target": digest, "summary": {}, "rows": [later]}))
    writes, real = [], ev._write
    monkeypatch.setattr(ev, "_write", lambda path, obj: (writes.append(json.loads(json.dumps(obj))),
                                                         real(path, obj)))
    ev.main(["--target", defaults.target_path(), "--buckets", "64", "--clips", "2", "--long-buckets", "",
             "--blank-clips", "0", "--out", str(out), "--resume"])
    # the first save (after clip 0, generated) still holds clip 1 of the interrupted run, which is then reused
    assert [r["text"] for r in writes[0]["rows"]][1] == "We see four objects."
    assert [r["text"] for r in writes[-1]["rows"]][1] == "We see four objects." and len(writes[-1]["rows"]) == 2


def test_compare_gate_pairs_clips_and_counts_events_written_right(tmp_path, capsys):
    """scripts/compare_gate.py: the paired difference is taken over the clips both files describe, and a one-event
    clip counts as right only when its event is written exactly, and each wrong clip's events are told apart by how
    they miss."""
    import importlib.util
    import json
    import os

    from sparrow.synthetic.evaluate import held_out_seed, truth_of

    spec = importlib.util.spec_from_file_location(
        "compare_gate", os.path.join(os.path.dirname(__file__), "..", "scripts", "compare_gate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seeds = [s for s in (held_out_seed(512, i) for i in range(40)) if len(truth_of(s, 512)["events"]) == 1][:2]
    assert len(seeds) == 2
    truth = truth_of(seeds[0], 512)
    right = describe(truth, 0)

    def row(seed, text, attributes):
        return {"bucket": 512, "seed": seed, "blank": False, "text": text, "attributes": attributes, "count": 1.0,
                "colour": 1.0, "shape": 1.0, "motion": 1.0, "events": 1.0}

    base, gate = tmp_path / "base.json", tmp_path / "gate.json"
    base.write_text(json.dumps({"rows": [row(seeds[0], "Nothing.", 0.5), row(seeds[1], "Nothing.", 0.6)]}))
    gate.write_text(json.dumps({"rows": [row(seeds[0], right, 0.9), row(seeds[1], "Nothing.", 0.4),
                                         row(held_out_seed(512, 199), "Nothing.", 1.0)]}))  # not in base: left out
    mod.main([str(gate), "--base", str(base)])
    out = capsys.readouterr().out
    assert "512 tokens, 2 clips" in out and "paired difference +0.100 +- 0.300" in out
    kind = truth["events"][0]["type"]
    scene = "lone" if len(truth["objects"]) == 1 else "two or three objects"
    assert f"one event, {scene}, {kind}: right in 1 of " in out and "(base 0)" in out
    objects = len(truth["objects"])
    assert f"events, {objects}/1 objects/events: right in 1 of 2 clips (base 0); said none 1 (2)" in out
    red, blue = ("appears", "red", "circle"), ("disappears", "blue", "square")
    assert mod.event_error([red], [red]) is None and mod.event_error([], [red]) == "said none"
    assert mod.event_error([red], []) == "invented" and mod.event_error([red], [red, blue]) == "too few or too many"
    assert mod.event_error([blue, red], [red, blue]) == "wrong order"
    assert mod.event_error([("appears", "blue", "square")], [red]) == "wrong object"
    assert mod.event_error([("changes colour", "red", "circle")], [red]) == "wrong kind"
    with pytest.raises(SystemExit, match="missing.json: no such file"):
        mod.main([str(tmp_path / "missing.json"), "--base", str(base)])
    (tmp_path / "other.json").write_text('{"summary": {}}')
    with pytest.raises(SystemExit, match="not an evaluate-target result"):
        mod.main([str(tmp_path / "other.json"), "--base", str(base)])


def test_occlusion_script_splits_one_event_clips_by_covered_event_object(tmp_path, capsys):
    """scripts/occlusion.py: held-out clip 15 at 512 tokens (three objects; its event's object shows 38% of itself)
    counts as covered, clip 1 (three objects, its event's object never covered) does not; a description counts as
    right only with the events exactly."""
    import importlib.util
    import json
    import os

    from sparrow.synthetic.evaluate import held_out_seed, truth_of

    spec = importlib.util.spec_from_file_location(
        "occlusion", os.path.join(os.path.dirname(__file__), "..", "scripts", "occlusion.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    covered, clear = held_out_seed(512, 15), held_out_seed(512, 1)
    rows = [{"bucket": 512, "seed": seed, "blank": False, "text": text, "attributes": 1.0, "count": 1.0,
             "colour": 1.0, "shape": 1.0, "motion": 1.0, "events": 1.0}
            for seed, text in ((covered, describe(truth_of(covered, 512), 0)), (clear, "Nothing."))]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"rows": rows}))
    mod.main([str(path)])
    out = capsys.readouterr().out
    assert "3/1: 2 clips, 1 covered | eval.json: right 1 of 1 covered, 0 of 1 not" in out, out


def test_edited_clip_keeps_the_rest_of_the_clip():
    """make_clip(edit=...) renders the edited plan over the same background: with every object removed it is the
    blank clip; scripts/event_alone.py's variants keep the event's object (alone, or painted last) and its event."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "event_alone", os.path.join(os.path.dirname(__file__), "..", "scripts", "event_alone.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seed = next(s for s in range(100) if len(make_clip(s, 16).truth["events"]) == 1
                and len(make_clip(s, 16).truth["objects"]) == 3)
    empty = make_clip(seed, 16, edit=lambda plan: {"objects": [], "events": []})
    assert np.array_equal(empty.frames, make_clip(seed, 16, blank=True).frames) and empty.truth["objects"] == []
    drawn = make_clip(seed, 16).truth
    who = drawn["objects"][drawn["events"][0]["object"]]
    for edit, at in ((mod.alone, 0), (mod.on_top, 2)):
        t = make_clip(seed, 16, edit=edit).truth
        assert len(t["objects"]) == (1 if at == 0 else 3) and t["events"][0]["object"] == at
        assert {k: v for k, v in t["objects"][at].items() if k != "id"} == {k: v for k, v in who.items() if k != "id"}
        assert t["events"][0]["type"] == drawn["events"][0]["type"] and t["background"] == drawn["background"]
    from sparrow.synthetic.text import mention, object_order

    named = 0
    for s in range(60):  # recoloured to be named first or last, where a colour is left for it
        plan = make_clip(s, 16).truth
        if len(plan["events"]) != 1 or len(plan["objects"]) == 1:
            continue
        for edit, at in ((mod.named_first, 0), (mod.named_last, -1)):
            try:
                t = make_clip(s, 16, edit=edit).truth
            except mod.NotPossible:
                continue
            named += 1
            assert object_order(t["objects"])[at]["id"] == t["events"][0]["object"]
            who = t["events"][0]["object"]
            mine = {c for o in t["objects"] if o["id"] == who for c in (o["colour"], o["final_colour"])}
            assert not mine & {c for o in t["objects"] if o["id"] != who for c in (o["colour"], o["final_colour"])}
        still = make_clip(s, 16, edit=mod.others_still).truth
        assert all(o["motion"] == "still" or o["id"] == still["events"][0]["object"] for o in still["objects"])
        assert [o["motion"] for o in still["objects"] if o["id"] == still["events"][0]["object"]] == \
            [o["motion"] for o in plan["objects"] if o["id"] == plan["events"][0]["object"]]
    assert named >= 10
    # --ask: the answers to the training's event questions, scored against the event's object and the others
    assert [mod.said_kind(x) for x in ("Nothing happens to it.", "It appears in view.", "It disappears.",
                                       "It changes to red.")] == [None, "appears", "disappears", "changes colour"]
    event = drawn["events"][0]
    kind = {"appears": "It appears.", "disappears": "It disappears.", "changes colour": "It changes to red."}
    answers = {f"What happens to the {mention(o, full=False)}?": kind[event["type"]] if k == 0 else "It disappears."
               for k, o in enumerate(o for o in drawn["objects"] if o["id"] != event["object"])}
    answers["Does anything appear, disappear or change colour?"] = "Yes: ..."
    got = mod.asked(lambda q: answers.get(q, kind[event["type"]]), drawn)  # the event's object: the right kind
    assert got == {"own": "right", "others": [True, True], "anything": True}
    assert mod.asked(lambda q: "Nothing happens to it." if q.startswith("What") else "No, nothing does.", drawn) == \
        {"own": "nothing", "others": [False, False], "anything": False}


def test_mrope_time_reach_margin():
    """scripts/mrope_time_reach.py: at one query position any grid can be singled out; along a description's 190
    positions the embedded target's 8 temporal pairs cannot, and 16 can."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "mrope_time_reach", os.path.join(os.path.dirname(__file__), "..", "scripts", "mrope_time_reach.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.time_reach_margin(1e5, 64, 8, 8, 100, 101) > 1.0
    assert mod.time_reach_margin(1e5, 64, 8, 8, 18, 208, which="last") == pytest.approx(0.0, abs=1e-6)
    assert mod.time_reach_margin(1e5, 64, 16, 8, 18, 208) > 0.03
    with pytest.raises(ValueError):
        mod.time_reach_margin(1e5, 64, 8, 1, 18, 208)


def test_frame_rate_probe_keeps_the_tokens_and_moves_only_the_temporal_span(tmp_path):
    """scripts/frame_rate_probe.py: at 4 fps a clip's description is the evaluation's own (the shipped
    target_eval.json row of that seed); at 8 fps the visual tokens are the same and the temporal span halves."""
    import importlib.util
    import json
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location("frame_rate_probe", os.path.join(root, "scripts",
                                                                                   "frame_rate_probe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "probe.json"
    result = mod.main(["--bucket", "512", "--clips", "1", "--fps", "4,8", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    at4, at8 = result["rows"]
    shipped = json.load(open(os.path.join(root, "benchmarks", "results", "target_eval.json")))
    row = next(r for r in shipped["rows"] if r["seed"] == at4["seed"] and not r["blank"])
    assert at4["text"] == row["text"] and at4["attributes"] == row["attributes"]
    assert (at4["temporal_span"], at8["temporal_span"]) == (7, 3)  # 8 frame pairs: 7 steps of 1, then of 0.5
    assert set(result["summary"]) == {"4", "8"}
    with pytest.raises(SystemExit, match="give positive --fps"):
        mod.main(["--fps", "0", "--out", str(out)])


@pytest.mark.parametrize("flags, message", [
    (["--clips", "0"], "--clips '0': give positive whole numbers"),
    (["--clips", "200,x"], "--clips '200,x': give positive whole numbers"),
    (["--clips", "5,5"], "--clips 5,5: give one number or one per bucket (4)"),
    (["--buckets", "512,-3"], "--buckets '512,-3': give positive whole numbers"),
    (["--long-clips", "0"], "--long-clips 0: give 1 or more"),
    (["--blank-clips", "-1"], "--blank-clips -1: give 0 or more"),
])
def test_evaluate_target_bad_counts_are_one_line_before_loading(tmp_path, capsys, flags, message):
    """Bad counts fail with one line and exit 2 before the target loads (here: a target that does not exist)."""
    from sparrow.synthetic import evaluate as ev

    with pytest.raises(SystemExit) as e:
        ev.main(["--target", str(tmp_path / "no_target"), "--out", str(tmp_path / "eval"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert ev.clip_plan("512,1536", "200,100", "", 0) == [(512, 200), (1536, 100)]
