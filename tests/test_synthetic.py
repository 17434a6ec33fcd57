"""The synthetic video world: determinism, ground truth against rendered pixels, text round trip, mp4 round trip."""

import numpy as np
import pytest

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
