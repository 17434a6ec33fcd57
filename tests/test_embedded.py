"""The embedded default (target trained on the synthetic world, its drafts, example clips) and its trainer."""

import json
import os
import re

import pytest

import sparrow
from sparrow import defaults
from sparrow.errors import SparrowError


def test_embedded_target_describes_an_example_clip():
    assert defaults.has_target(), "the embedded target is missing from src/sparrow/assets/target"
    target = sparrow.load_target()  # the default
    assert target.family == "qwen2_5_vl" and 5e6 < sum(p.numel() for p in target.model.parameters()) < 15e6
    truth = json.load(open(defaults.example_clip(0).replace(".mp4", ".json")))
    inputs = target.prepare(video=defaults.example_clip(0), prompt="Describe the video.", num_frames=16)
    ref = target.model.generate(**inputs, max_new_tokens=60, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    out = sparrow.generate(target, None, inputs, max_new_tokens=60, method="ar")
    assert out.token_ids == ref.tolist()
    assert truth["background"] in out.text and "object" in out.text
    for method in ("sparrow", "eagle"):
        path = defaults.draft_path(method)
        if path:  # shipped drafts are lossless on the embedded target
            spec = sparrow.generate(target, sparrow.load_draft(path, target), inputs, max_new_tokens=60, method=method)
            assert spec.token_ids == out.token_ids
    # like load_target(None), load_draft(None) is the embedded target's shipped draft (of the mode asked)
    for mode in ("sparrow", "eagle"):
        assert sparrow.load_draft(None, target, mode=mode).config.mode == mode
    assert sparrow.load_draft(None, target).config.mode == "sparrow"
    with pytest.raises(SparrowError, match="tree must be a TreeConfig"):
        sparrow.generate(target, sparrow.load_draft(None, target), inputs, max_new_tokens=4, tree=(8, 5, 30))


def test_embedded_target_resizes_frames_to_its_training_sizes():
    import numpy as np

    from sparrow.video import Video

    target = sparrow.load_target()

    def grid(h, w):
        frames = np.zeros((4, h, w, 3), dtype=np.uint8)
        video = Video(frames=frames, fps=4.0, indices=np.arange(4), total_frames=4)
        return target.prepare(video, "Describe the video.")["video_grid_thw"][0].tolist()

    # its video_preprocessor_config.json bounds a frame's area to [112^2, 224^2]: a 224-px clip keeps its size (the
    # Qwen defaults would scale it up to 336 px), a larger video is scaled down to the sizes the target learned
    assert grid(224, 224) == [2, 16, 16]
    t, h, w = grid(480, 640)
    assert h * w * 14 * 14 <= 224 * 224 and w > h
    assert grid(56, 56) == [2, 8, 8]  # a small one is scaled up to 112 px


def test_example_clips_ship_with_truth():
    for i in range(5):
        clip = defaults.example_clip(i)
        assert os.path.getsize(clip) < 150_000
        v = sparrow.load_video(clip)
        truth = json.load(open(clip.replace(".mp4", ".json")))
        assert v.frames.shape[0] == truth["num_frames"]
        assert v.frames.shape[1:3] == (truth["height"], truth["width"])


def test_train_target_stopped_by_a_signal_exits_nonzero_without_exporting(tmp_path, monkeypatch):
    import signal

    import torch

    from sparrow.synthetic import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    run, export = str(tmp_path / "run"), str(tmp_path / "export")
    save = train_target.save_checkpoint

    def save_then_terminate(run_dir, model, opt, step, *rest):  # SIGTERM arrives as step 1 is saved
        save(run_dir, model, opt, step, *rest)
        if step == 1:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(train_target, "save_checkpoint", save_then_terminate)
    handler = signal.getsignal(signal.SIGTERM)
    args = ["--out", run, "--steps", "4", "--batch", "2", "--save-every", "1", "--resume", "--export", export]
    assert train_target.main(args) == 128 + signal.SIGTERM  # a chain of stages (set -e) stops here
    assert torch.load(os.path.join(run, "ckpt", "state.pt"), weights_only=False)["step"] == 1
    assert not os.path.exists(export)  # no half-trained weights where the finished ones go
    monkeypatch.setattr(train_target, "save_checkpoint", save)
    assert not train_target.main(args)  # resumed and finished
    assert os.path.isfile(os.path.join(export, "config.json"))
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


def test_train_target_trains_in_float32_where_bf16_is_slow(tmp_path, monkeypatch, capsys):
    import torch

    from sparrow.synthetic import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    seen = []
    real = torch.autocast

    def recording(*args, enabled=True, **kw):  # what each training forward asked for
        seen.append(enabled)
        return real(*args, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", recording)
    for precision, fast, bf16 in (("auto", False, False), ("auto", True, True), ("bf16", False, True),
                                  ("fp32", True, False)):
        monkeypatch.setattr(train_target, "fast_bf16", lambda device, fast=fast: fast)
        seen.clear()
        run = str(tmp_path / f"{precision}{fast}")
        assert not train_target.main(["--out", run, "--steps", "1", "--batch", "2", "--precision", precision])
        assert seen and set(seen) == {bf16}, (precision, fast)
        assert ("training in float32" in capsys.readouterr().out) == (precision == "auto" and not fast)


def test_train_target_runs_resumes_and_exports(tmp_path, monkeypatch):
    import torch

    from sparrow.synthetic import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    run, export = str(tmp_path / "run"), str(tmp_path / "export")
    state = os.path.join(run, "ckpt", "state.pt")
    bind = ["--bind-weight", "1", "--bind-layer", "1", "--event-weight", "1", "--event-layer", "1",
            "--time-weight", "1", "--carry-weight", "1", "--carry-layer", "0", "--copy-weight", "1", "--copy-head", "1",
            "--time-clause", "--log-every", "1"]
    train_target.main(["--out", run, "--steps", "3", "--until", "2", "--batch", "2", "--save-every", "5", *bind])
    assert torch.load(state, weights_only=False)["step"] == 2  # --until stops and checkpoints there
    train_target.main(["--out", run, "--steps", "3", "--batch", "2", "--resume", "--export", export, *bind])
    log = json.load(open(os.path.join(run, "ckpt", "log.json")))
    assert [r["step"] for r in log] == [1, 2, 3]
    from sparrow.synthetic.text import target_wording

    wording = {"events_first": False, "colour_last": False, "restate": "", "size_last": False}
    assert target_wording(export) == wording  # the wording trained
    assert all(r["bind"] >= 0 and r["event"] >= 0 and r["time"] >= 0 and r["carry"] >= 0 and r["copy"] >= 0 for r in log)
    saved = torch.load(state, weights_only=False)
    assert saved["step"] == 3 and all(saved[k] is not None for k in ("bind_probe", "event_probe", "carry_probe"))
    # the next stage starts its probes where this one left them (with lr 0 they keep those weights exactly)
    for init, same in ((["--init-probes", state], True), ([], False)):
        nxt = str(tmp_path / f"next{same}")
        train_target.main(["--out", nxt, "--init", export, *init, "--steps", "1", "--batch", "2", "--lr", "0", *bind])
        probes = torch.load(os.path.join(nxt, "ckpt", "state.pt"), weights_only=False)
        for key in ("probe", "bind_probe", "event_probe", "carry_probe"):
            assert torch.equal(probes[key]["head.weight"], saved[key]["head.weight"]) == same, key
    # a stage from --init is repeatable: its fresh probes start from --seed, so a rerun trains to the same weights
    again = []
    for k in range(2):
        train_target.main(["--out", str(tmp_path / f"again{k}"), "--init", export, "--steps", "1", "--batch", "2",
                           "--seed", "3", *bind])
        again.append(torch.load(str(tmp_path / f"again{k}" / "ckpt" / "state.pt"), weights_only=False))
    for key in ("model", "probe", "bind_probe", "event_probe", "carry_probe"):
        assert all(torch.equal(v, again[1][key][n]) for n, v in again[0][key].items()), key
    # a stage that adds the carried probe starts it from the earlier stage's event probe
    older = {**saved, "carry_probe": None}
    torch.save(older, str(tmp_path / "older.pt"))
    nxt = str(tmp_path / "from_older")
    train_target.main(["--out", nxt, "--init", export, "--init-probes", str(tmp_path / "older.pt"), "--steps", "1",
                       "--batch", "2", "--lr", "0", *bind])
    probes = torch.load(os.path.join(nxt, "ckpt", "state.pt"), weights_only=False)
    assert torch.equal(probes["carry_probe"]["head.weight"], saved["event_probe"]["head.weight"])
    with pytest.raises(SparrowError, match="--init-probes .* is not a file"):
        train_target.main(["--out", str(tmp_path / "other"), "--steps", "1", "--init-probes", str(tmp_path / "no")])
    for bad, message in ((["--init", str(tmp_path)], "--init .*: no config.json there"),
                         (["--tokenizer", str(tmp_path)], "--tokenizer .*: no tokenizer_config.json there"),
                         (["--steps", "0"], "--steps 0: give 1 or more"),
                         (["--until", "0"], "--until 0: give 1 or more"),
                         (["--batch", "0"], "--batch 0: give 1 or more"),
                         (["--heads", "3"], "--heads 3 / --kv-heads 2: give positive counts, --kv-heads dividing"),
                         (["--heads", "64", "--kv-heads", "4"],  # head_dim 4 would leave mRoPE's time no pair
                          "the hidden size [0-9]+: give a multiple of 128 from 512 up"),
                         (["--heads", "8", "--kv-heads", "3"], "--heads 8 / --kv-heads 3"),
                         (["--init", export, "--heads", "8", "--kv-heads", "4"], "--init keeps its model's own heads")):
        with pytest.raises(SparrowError, match=message):  # bad input: one line, before anything is written
            train_target.main(["--out", str(tmp_path / "bad"), "--steps", "1", *bad])
        assert not (tmp_path / "bad").exists()
    with pytest.raises(SparrowError, match="--bind-layer 2 is not a layer"):
        train_target.main(["--out", str(tmp_path / "other"), "--steps", "1", "--batch", "2", "--bind-weight", "1",
                           "--bind-layer", "2"])
    with pytest.raises(SparrowError, match="--copy-head 4 is not a head"):
        train_target.main(["--out", str(tmp_path / "other"), "--steps", "1", "--batch", "2", "--copy-weight", "1",
                           "--carry-layer", "1", "--copy-head", "4"])
    # a new model of more, smaller heads: the same parameter count (q, k, v and o keep their sizes), its own mRoPE split
    heads = str(tmp_path / "heads8_export")
    train_target.main(["--out", str(tmp_path / "heads8"), "--steps", "1", "--batch", "2", "--heads", "8", "--kv-heads",
                       "4", "--export", heads])
    tc = json.load(open(os.path.join(heads, "config.json")))["text_config"]
    assert (tc["num_attention_heads"], tc["num_key_value_heads"]) == (8, 4)
    assert tc["rope_parameters"]["mrope_section"] == [1, 1, 2]  # head_dim 8: 4 rotary pairs
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))
    assert abs(size(heads) - size(export)) < 4096  # the same tensors but for the header
    target = sparrow.load_target(export, device="cpu")
    assert target.tokenizer.chat_template and target.eos_token_ids
    assert (target.settings["min_pixels"], target.settings["max_pixels"]) == (112 * 112, 224 * 224)
    assert sparrow.generate(target, None, target.prepare(None, "Describe the video."), max_new_tokens=3,
                            method="ar").stats.new_tokens >= 1


def test_binding_loss_marks_colour_words_and_teaches_the_head_to_fetch_them():
    import torch

    from sparrow.synthetic.train_target import Batcher, BindingLoss, COLOURS

    target = sparrow.load_target()
    tok = target.tokenizer
    b = Batcher(target, seed=5, pool=1)
    ids = torch.tensor(tok(" a red circle on a dark green background", add_special_tokens=False)["input_ids"])
    marked = b.colour_words(ids)
    assert marked.tolist().count(list(COLOURS).index("red") + 1) == 1 and marked.count_nonzero() == 1
    model = target.model
    torch.manual_seed(0)
    binding = BindingLoss(model, layer=1)
    batch = b.batch(2)
    cells, colour = batch.pop("cells"), batch.pop("colour")
    for k in ("labels", "grounded"):
        batch.pop(k)
    attn = binding.attn
    params = [attn.q_proj.weight, attn.k_proj.weight]
    saved = [(p.detach().clone(), p.requires_grad) for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    try:
        for _ in range(8):  # only the supervised head's projections learn: its loss falls
            model(**batch)
            loss = binding(batch["input_ids"], colour, cells, model.config.video_token_id)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        with torch.no_grad():
            for p, (w, grad) in zip(params, saved):
                p.copy_(w)
                p.requires_grad_(grad)
            for p in model.parameters():
                p.grad = None
        binding.remove()
    assert colour.count_nonzero() > 0 and losses[0] > 0 and losses[-1] < losses[0] - 0.1


def test_event_labels_name_what_happens_to_the_object_of_each_colour_word():
    import torch

    from sparrow.synthetic.train_target import COLOURS, event_labels, named_objects

    names = list(COLOURS)
    truth = {"objects": [{"id": 0, "colour": "white", "final_colour": "cyan"},
                         {"id": 1, "colour": "red", "final_colour": "red"},
                         {"id": 2, "colour": "blue", "final_colour": "blue"},
                         {"id": 3, "colour": "blue", "final_colour": "blue"}],
             "events": [{"type": "appears", "object": 0}, {"type": "changes colour", "object": 0},
                        {"type": "disappears", "object": 1}]}
    words = ["white", None, "red", "blue", "cyan", "green"]  # "blue" names two objects; no object is green
    colour = torch.tensor([names.index(w) + 1 if w else 0 for w in words])
    named = named_objects(colour, truth)
    assert named.tolist() == [1, 0, 2, 0, 1, 0]
    got = event_labels(named, truth).tolist()
    cyan = names.index("cyan")
    assert got == [[1, 0, 1, cyan], [-1] * 4, [0, 1, 0, names.index("red")], [-1] * 4, [1, 0, 1, cyan], [-1] * 4]


def test_track_labels_say_what_each_visual_tokens_object_has_done_so_far():
    """Per visual token, only what a causal model can know there: whether the object was missing from the first
    frame, whether it has changed colour by the token's frame, and its first colour; and at <|vision_end|> what the
    last frame shows."""
    import torch

    from sparrow.synthetic.train_target import COLOURS, OBJECT_SHAPES, end_labels, track_labels

    names = list(COLOURS)
    truth = {"num_frames": 8,
             "objects": [{"id": 0, "colour": "white", "final_colour": "cyan", "shape": "circle", "appear": 0,
                          "disappear": 8},
                         {"id": 1, "colour": "red", "final_colour": "red", "shape": "square", "appear": 4,
                          "disappear": 8},
                         {"id": 2, "colour": "blue", "final_colour": "blue", "shape": "triangle", "appear": 0,
                          "disappear": 6}],
             "events": [{"type": "changes colour", "object": 0, "frame": 5}, {"type": "appears", "object": 1,
                                                                               "frame": 4},
                        {"type": "disappears", "object": 2, "frame": 6}]}
    cells = torch.zeros(8, 6, dtype=torch.long)  # grid (4, 1, 2): 4 groups of 2 frames, 2 tokens each
    cells[:, 5] = torch.tensor([1, 3, 1, 3, 1, 2, 1, 2])  # object 0 on the left; 2 then 1 on the right; 1-based
    white, red, blue, cyan = names.index("white"), names.index("red"), names.index("blue"), names.index("cyan")
    cells[:, 0] = torch.tensor([white, blue, white, blue, white, red, cyan, red]) + 1  # the colour at each token
    got = track_labels(truth, cells).tolist()
    assert got == [[0, 0, white], [0, 0, blue], [0, 0, white], [0, 0, blue],
                   [0, 0, white], [1, 0, red], [0, 1, white], [1, 0, red]]  # frames 0, 2, 4, 6: the change at 5
    cells[3, 5] = 0  # a token no object covers
    assert track_labels(truth, cells)[3].tolist() == [-1, -1, -1]
    end = end_labels(truth)
    shown = {(names[k // len(OBJECT_SHAPES)], OBJECT_SHAPES[k % len(OBJECT_SHAPES)]) for k in end.nonzero()[:, 0].tolist()}
    assert shown == {("cyan", "circle"), ("red", "square")} and end.sum() == 2


def test_track_loss_reads_the_visual_tokens_and_vision_end_and_its_probes_learn():
    import torch

    from sparrow.synthetic.train_target import Batcher, TrackLoss

    target = sparrow.load_target()
    model = target.model
    assert "track" not in Batcher(target, seed=5, pool=1).batch(2)  # drawn only for the track probes
    batch = Batcher(target, seed=5, pool=1, track=True).batch(2)
    track, end = batch["track"], batch["end"]
    assert track.shape[0] == (batch["input_ids"] == model.config.video_token_id).sum() == batch["cells"].shape[0]
    assert ((track[:, 0] >= 0) == (batch["cells"][:, 5] > 0)).all() and end.shape == (2, 32)
    for k in ("cells", "grounded", "labels", "colour", "named", "event", "carry", "source", "track", "end"):
        batch.pop(k)
    torch.manual_seed(0)
    loss = TrackLoss(model, layer=3)
    opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
    losses = []
    try:
        with torch.no_grad():
            model(**batch)
        out = loss.saved["out"]
        for _ in range(10):  # the same layer output each time: only the probes learn
            loss.saved["out"] = out
            value = loss(batch["input_ids"], track, end, model.config.video_token_id, model.config.vision_end_token_id)
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
    finally:
        loss.remove()
    assert not loss.saved and losses[-1] < losses[0] - 0.5, losses


def test_carried_labels_reach_the_word_that_says_whether_an_event_follows():
    """The event label of a colour word is carried over the rest of its clause, up to the token whose next token is
    " and" (an event follows) or "." (none), and no further."""
    import torch

    from sparrow.synthetic.train_target import (Batcher, carried_labels, carry_sources, clause_named, event_labels,
                                                named_objects)

    target = sparrow.load_target()
    tok = target.tokenizer
    b = Batcher(target, seed=5, pool=1)
    text = " The large orange circle stays still and disappears. A small red square moves up."
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    truth = {"objects": [{"id": 0, "colour": "orange", "final_colour": "orange"},
                         {"id": 1, "colour": "red", "final_colour": "red"}],
             "events": [{"type": "disappears", "object": 0}]}
    colour = b.colour_words(ids)
    event = event_labels(named_objects(colour, truth), truth)
    source = carry_sources(event, ids, colour, b.stops)
    got = carried_labels(event, source)
    words = [tok.decode([t]) for t in ids.tolist()]
    orange, red = words.index(" orange"), words.index(" red")
    assert {words[c] for c in source[source >= 0].tolist()} == {" orange", " red"}
    assert all(words[source[j]] == " orange" for j in range(orange + 1, red) if source[j] >= 0)
    carried = [words[j] for j in range(len(words)) if got[j, 0] >= 0]
    assert "".join(carried) == " circle stays still" + " square moves up", carried
    assert got[orange + 1].tolist() == event[orange].tolist() and got[orange + 1, 1] == 1  # disappears
    assert got[red + 1].tolist() == event[red].tolist() and got[red + 1, 1] == 0
    assert (got[orange] < 0).all() and (got[red] < 0).all()  # the colour words keep their own probe
    # --time-clause: the time binding fetches the clause's object at the colour word and at each of these tokens
    named = named_objects(colour, truth)
    about = clause_named(named, source)
    assert "".join(words[j] for j in range(len(words)) if about[j] == 1) == " orange circle stays still"
    assert "".join(words[j] for j in range(len(words)) if about[j] == 2) == " red square moves up"
    assert torch.equal(clause_named(named[None], source[None])[0], about)  # batched (B, L) as the trainer calls it


def test_copy_loss_is_the_real_attention_on_the_clauses_colour_word():
    """CopyLoss recomputes one head's attention outside the model: it must equal -log of the attention weight that
    the model's own (eager) forward gives that head from each token of a clause to the clause's colour word."""
    import torch

    from sparrow.synthetic.train_target import Batcher, CopyLoss

    target = sparrow.load_target()
    model = target.model
    batch = Batcher(target, seed=5, pool=1).batch(2)
    source = batch["source"]
    for k in ("cells", "grounded", "labels", "colour", "named", "event", "carry", "source"):
        batch.pop(k)
    assert (source >= 0).sum() > 10
    copy = CopyLoss(model, layer=4, head=3)
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
            got = copy(source)
    finally:
        model.set_attn_implementation(impl)
        copy.remove()
    att = out.attentions[4][:, 3].double()  # (B, L, L)
    want = []
    for b in range(2):
        rows = (source[b] >= 0).nonzero()[:, 0]
        want.append(-torch.log(att[b, rows, source[b, rows]]))
    assert torch.allclose(got.double(), torch.cat(want).mean(), rtol=1e-4)


def test_time_binding_targets_the_object_as_first_and_last_seen():
    import torch

    from sparrow.synthetic.train_target import TimeBindingLoss

    S, V = 7, 9  # <|vision_start|> and video token ids; the clip: 3 temporal groups of 2 x 2 merged tokens
    ids = torch.tensor([[1, S] + [V] * 12 + [3, 4, 5]])
    obj = torch.zeros(12, dtype=torch.long)
    obj[[0, 1, 4, 5]] = 1  # object 0 in the first two groups (it disappears)
    obj[[6, 10, 11]] = 2  # object 1 from the second group on (it appears)
    cells = torch.zeros(12, 6, dtype=torch.long)
    cells[:, 5] = obj
    named = torch.tensor([[0] * 15 + [1, 2]])  # the last two words name objects 0 and 1
    [(b, rows, first, last)] = TimeBindingLoss.targets(ids, named, cells, torch.tensor([[3, 4, 4]]), V, S)
    assert b == 0 and rows.tolist() == [15, 16]
    assert first[0].nonzero()[:, 0].tolist() == [2, 3] and last[0].nonzero()[:, 0].tolist() == [1]
    assert first[1].nonzero()[:, 0].tolist() == [1] and last[1].nonzero()[:, 0].tolist() == [12, 13]
    assert TimeBindingLoss.targets(ids, torch.zeros_like(named), cells, torch.tensor([[3, 4, 4]]), V, S) == []


def test_target_batches_supervise_every_answer_and_resume_exactly():
    import torch

    from sparrow.synthetic.train_target import Batcher

    target = sparrow.load_target()
    tok, video = target.tokenizer, target.config.video_token_id
    b = Batcher(target, seed=7, max_questions=2, pool=3)
    for _ in range(4):  # labels are the answers (each closed by <|im_end|>), never the prompt or the questions
        s = b.sample()
        text = tok.decode(s["labels"][s["labels"] >= 0])
        assert 1 <= text.count("<|im_end|>") <= 3 and "?" not in text and "<|im_start|>" not in text
        assert (s["labels"][s["labels"] >= 0] == s["ids"][s["labels"] >= 0]).all()
        assert (s["ids"] == video).sum() == s["cells"].shape[0]  # one probe label per visual token
    first = Batcher(target, seed=3, pool=3)
    lengths = []
    for _ in range(3):  # one pool, cut by length: the batches' length ranges do not overlap
        ids = first.batch(2)["input_ids"]
        lengths.append(sorted((ids != tok.pad_token_id).sum(1).tolist()))
    lengths.sort()
    assert all(a[-1] <= b[0] for a, b in zip(lengths, lengths[1:]))
    first = Batcher(target, seed=3, pool=3)
    first.batch(2)
    state = first.state()
    want = [first.batch(2)["input_ids"] for _ in range(3)]  # the rest of the pool, then a new one
    again = Batcher(target, seed=99, pool=3)
    again.restore(state, 2)
    assert all(torch.equal(again.batch(2)["input_ids"], w) for w in want)


def test_unmasked_training_forward_gives_the_masked_loss_and_refuses_left_padding():
    """train-target drops the padding mask of its right-padded batches (a faster sdpa kernel): the real tokens'
    logits and the answer loss must be those of the masked forward, and a left-padded batch must be refused."""
    import torch

    from sparrow.synthetic.train_target import Batcher, answer_loss, without_padding_mask

    target = sparrow.load_target()
    batch = Batcher(target, seed=5, pool=1).batch(3)
    mask = batch["attention_mask"]
    assert (mask == 0).any() and (mask.sum(1) > 0).all()  # some rows padded, so the check means something
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts")
    inputs = {k: batch[k] for k in keys}
    with torch.no_grad():
        masked = target.model(**inputs).logits
        free = target.model(**without_padding_mask(inputs)).logits
    real = mask.bool()
    assert torch.allclose(masked[real], free[real], atol=1e-4)
    loss = lambda logits: answer_loss(logits, batch["labels"], batch["grounded"], 4.0)  # noqa: E731
    assert abs(loss(masked).item() - loss(free).item()) < 1e-5
    left = {**inputs, "attention_mask": mask.flip(1)}  # the pads first
    with pytest.raises(SparrowError, match="padded on the left"):
        without_padding_mask(left)


def test_length_groups_give_the_whole_batch_gradient():
    """train-target runs a batch of the language loss alone as groups of similar lengths, each padded to its own
    longest row: the groups' losses must add up to the whole batch's loss and their gradients to its gradient, and
    the split must keep a long clip away from short ones but not split rows of one length."""
    import torch

    from sparrow.synthetic.train_target import (Batcher, answer_loss, answer_weights, length_groups, row_group,
                                                without_padding_mask)

    assert length_groups([320, 3000, 300, 310]) == [[2, 3, 0], [1]]
    assert length_groups([500] * 8) == [list(range(8))]
    target = sparrow.load_target()
    batch = Batcher(target, seed=5, pool=1).batch(3)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3  # rows of different lengths, so the groups differ from the batch
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts")
    model = target.model
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]

    def gradient(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None]), loss.item()

    for p in params:
        p.requires_grad_(True)
    try:
        whole, whole_loss = gradient(answer_loss(model(**without_padding_mask({k: batch[k] for k in keys})).logits,
                                                 batch["labels"], batch["grounded"], 4.0))
        total = float(answer_weights(batch["labels"], batch["grounded"], 4.0).sum())
        parts, parts_loss = torch.zeros_like(whole), 0.0
        for rows in ([0], [1, 2]):  # a split that cuts every row but the longest short of the batch's length
            part = without_padding_mask(row_group(batch, rows))
            assert part["input_ids"].shape[1] == max(lengths[r] for r in rows)
            labels, grounded, rows_w = part.pop("labels"), part.pop("grounded"), part.pop("row_weight")
            g, value = gradient(answer_loss(model(**part).logits, labels, grounded, 4.0, total, rows_w))
            parts, parts_loss = parts + g, parts_loss + value
    finally:
        model.zero_grad(set_to_none=True)
        for p, was in zip(params, trainable):
            p.requires_grad_(was)
    assert abs(parts_loss - whole_loss) < 1e-5
    assert (parts - whole).norm() < 1e-4 * whole.norm()


def test_train_target_steps_in_length_groups_as_in_whole_batches(tmp_path, monkeypatch):
    """Under the language loss alone, train-target's steps run a batch as length groups; from the same seed they
    must end where the whole-batch steps (--whole-batches) end, up to bf16 rounding."""
    import torch

    from sparrow.synthetic import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    split = train_target.length_groups
    groups = []
    monkeypatch.setattr(train_target, "length_groups", lambda lengths: groups.append(split(lengths, 0)) or groups[-1])
    common = ["--steps", "3", "--batch", "3", "--lr", "0.003", "--warmup", "1", "--aux-weight", "0",
              "--grounded-weight", "4", "--save-every", "10"]
    train_target.main(["--out", str(tmp_path / "groups"), *common])
    assert len(groups) == 3 and any(len(g) > 1 for g in groups)  # rows of other lengths ran apart
    train_target.main(["--out", str(tmp_path / "whole"), "--whole-batches", *common])
    assert len(groups) == 3
    a = torch.load(str(tmp_path / "groups" / "ckpt" / "state.pt"), weights_only=False)["model"]
    b = torch.load(str(tmp_path / "whole" / "ckpt" / "state.pt"), weights_only=False)["model"]
    train_target.main(["--out", str(tmp_path / "first"), "--whole-batches", "--until", "1", *common])
    start = torch.load(str(tmp_path / "first" / "ckpt" / "state.pt"), weights_only=False)["model"]
    moved = sum(float((b[k].float() - start[k].float()).norm()) for k in b)  # what steps 2 and 3 changed
    apart = sum(float((a[k].float() - b[k].float()).norm()) for k in a)
    assert moved > 0 and apart < 0.05 * moved


def test_grounded_words_cover_every_alternative_of_a_decision():
    """--grounded-weight must not tilt a choice that the frames decide: the verb that says whether an object moves,
    and the sentence that follows the last object (another object, an event, or "no events"), are weighted
    whichever way the clip goes, and so is the token after an object's motion or event, which says whether (another)
    event of that object follows."""
    from sparrow.synthetic.text import MOTION_PHRASES, describe
    from sparrow.synthetic.train_target import grounded_ids
    from sparrow.synthetic.world import make_clip

    tok = sparrow.load_target().tokenizer
    grounded = grounded_ids(tok)
    first = lambda text: tok(" " + text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    assert all(first(p) in grounded for ps in MOTION_PHRASES.values() for p in ps)
    openers, after = set(), set()
    for seed in range(40):
        truth = make_clip(seed, 8, 56, 56).truth
        text = describe(truth, seed)
        sentences = text.split(". ")
        openers.add(sentences[1 + len(truth["objects"])].split()[0])  # the one after the last object
        openers.update(s.split()[0] for s in sentences[1:1 + len(truth["objects"])])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ends = [m.end() for p in {p for ps in MOTION_PHRASES.values() for p in ps} for m in re.finditer(p, text)]
        ends += [m.start() for m in re.finditer(", then", text)]  # after an object's event, another one follows
        for end in ends:  # the token after the phrase: " and" (an event follows), "," or "."
            after.add(ids[len(tok(text[:end], add_special_tokens=False)["input_ids"])])
    assert {"Then", "Nothing", "There"} <= openers and all(first(w) in grounded for w in openers)
    assert {first("and"), tok(".")["input_ids"][0], tok(",")["input_ids"][0]} <= after <= grounded


def test_clip_mixes_keep_earlier_stages_draws_and_longer_reaches_the_3k_bucket():
    import numpy as np

    from sparrow.synthetic.train_target import MIXES, SHAPES, Batcher

    for name, p in MIXES.items():
        assert len(p) == len(SHAPES) and min(p) >= 0 and abs(sum(p) - 1) < 1e-9, name
    long_mass = {name: sum(q for q, (frames, _, _) in zip(p, SHAPES) if frames >= 48) for name, p in MIXES.items()}
    # the mixes of the shipped stages never draw the long shapes appended after them, so they draw as before
    assert long_mass["short"] == long_mass["long"] == 0 and long_mass["longer"] >= 0.05
    assert (96, 224, 224) in SHAPES  # the 3072 bucket's clips
    target = sparrow.load_target()
    b = Batcher(target, seed=4, pool=1, mix="longer")
    b.shape_p = np.eye(len(SHAPES))[SHAPES.index((48, 224, 224))]  # force the 1536 bucket's clip
    s = b.sample()
    assert s["grid"][0].tolist() == [24, 16, 16]  # 24 frame pairs of 16 x 16 patches: 24 x 64 visual tokens
    assert (s["ids"] == target.config.video_token_id).sum() == s["cells"].shape[0] == 24 * 64


def test_fps_choice_draws_as_before_by_default_and_spreads_time_when_lowered(tmp_path):
    """--fps: the default draws the very batches of the shipped stages; a lower rate gives the same frames longer
    seconds per frame pair (so wider temporal mRoPE spans); a bad list is one line."""
    import torch

    from sparrow.synthetic import train_target
    from sparrow.synthetic.train_target import FPS, Batcher

    target = sparrow.load_target()

    def draws(**kw):
        b = Batcher(target, seed=5, pool=1, **kw)
        return [b.sample() for _ in range(4)]

    old, same, slow = draws(), draws(fps=FPS), draws(fps=(0.5,))
    for x, y in zip(old, same):
        assert torch.equal(x["ids"], y["ids"]) and torch.equal(x["sgt"], y["sgt"])
    assert {float(s["sgt"][0]) for s in old} <= {2 / f for f in FPS}
    assert all(float(s["sgt"][0]) == 4.0 for s in slow)  # a frame pair is 4 seconds at 0.5 fps
    for bad in ("0,2", "two", "", "nan"):
        with pytest.raises(SparrowError, match="give positive frame rates"):
            train_target.main(["--out", str(tmp_path / "x"), "--fps", bad, "--steps", "1"])


def test_demo_checks_lossless_output_and_scores_it_against_the_clips_truth(capsys):
    from sparrow.cli import main

    assert main(["demo", "--clip", "1", "--max-new-tokens", "80"]) == 0
    out = capsys.readouterr().out
    truth = json.load(open(defaults.example_clip(1).replace(".mp4", ".json")))
    assert f"truth: {truth['reference_description']}\n" in out
    assert "lossless: identical output for sparrow, eagle, ar and transformers' generate (" in out
    acc = re.search(r"attribute accuracy (\d\.\d\d) \(count", out)
    assert acc and 0 <= float(acc.group(1)) <= 1
    assert "visual tokens 512 " in out  # 16 frames at the clip's own 224 px
    for method in ("sparrow", "eagle"):  # the time saved against plain decoding, per draft
        assert re.search(method + r" against plain decoding: tau \d\.\d\d, decoding \d+\.\d\dx as fast \(DSR\), end to "
                         r"end \d+\.\d\dx \(ESR\), -?\d+\.\d\d s saved", out), out
    assert main(["demo", "--clip", "9"]) == 2
    assert "--clip 9: the shipped example clips are 0 to 4" in capsys.readouterr().err
    # the README's first command: the default clip, which the shipped target describes right
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "clip2.mp4" in out and "attribute accuracy 1.00 " in out and "identical output" in out


def test_hard_share_draws_multi_object_event_clips_and_asks_what_happens_to_each_object():
    import numpy as np

    from sparrow.synthetic.train_target import Batcher, is_hard
    from sparrow.synthetic.world import make_clip, plan_clip

    assert is_hard({"objects": [{}, {}], "events": [{}]})
    assert not is_hard({"objects": [{}], "events": [{}]}) and not is_hard({"objects": [{}, {}, {}], "events": []})
    assert is_hard({"objects": [{}, {}, {}], "events": []}, "multi") and not is_hard({"objects": [{}], "events": [{}]},
                                                                                     "multi")
    change, other = {"type": "changes colour"}, {"type": "appears"}
    assert is_hard({"objects": [{}], "events": [other, change]}, "colour-change")
    assert not is_hard({"objects": [{}, {}], "events": [other]}, "colour-change")
    with pytest.raises(ValueError, match="not one of"):
        is_hard({"objects": [], "events": []}, "many")
    for seed in range(5):  # the seed check reads the plan that make_clip renders
        plan = plan_clip(np.random.default_rng(seed), 16)
        truth = make_clip(seed, 16, 56, 56).truth
        assert [(o["colour"], o["shape"]) for o in plan["objects"]] == [(o["colour"], o["shape"]) for o in truth["objects"]]
        assert [e["frame"] for e in plan["events"]] == [e["frame"] for e in truth["events"]]
    target = sparrow.load_target()
    tok = target.tokenizer
    b = Batcher(target, seed=11, pool=1, hard=1.0)
    seen = 0
    for _ in range(6):
        s = b.sample()
        if int(s["grid"][0, 0]) * 2 < 4:  # too short for events: drawn as usual
            continue
        seen += 1
        text = tok.decode(s["ids"])
        asked = text.split("What happens to the")[1:]
        assert len(asked) >= 2, text  # one question per object: two or three objects
        answers = [a.split("assistant\n")[1].split("<|im_end|>")[0] for a in asked]
        assert any(not a.startswith("Nothing") for a in answers), text  # at least one event
    assert seen >= 3
    b = Batcher(target, seed=12, pool=1, hard=1.0, hard_kind="multi")  # two or three objects, events or none
    for _ in range(4):
        s = b.sample()
        if int(s["grid"][0, 0]) * 2 >= 4:
            assert tok.decode(s["ids"]).count("What happens to the") >= 2
    # hard_ask="alone": a hard clip's conversation is its objects' own questions and nothing else, the first one
    # right after the video (no description before it to copy the answer from); a clip too short stays as drawn
    b = Batcher(target, seed=11, pool=1, hard=1.0, hard_ask="alone")
    seen = 0
    for _ in range(6):
        s = b.sample()
        if int(s["grid"][0, 0]) * 2 < 4:
            continue
        seen += 1
        text = tok.decode(s["ids"])
        users = text.split("<|im_start|>user\n")[1:]
        assert len(users) >= 2 and all("What happens to the" in u for u in users), text
        assert users[0].split("<|vision_end|>")[1].startswith("What happens to the"), text
    assert seen >= 3
    with pytest.raises(ValueError, match="hard_ask 'first' is not one of"):
        Batcher(target, seed=11, hard=1.0, hard_ask="first")
    # hard=0 (the default) draws the samples drawn before the option existed: the first three of seed 11 as the
    # code before it drew them (token count, sum and sum of squares mod 1000003)
    plain = Batcher(target, seed=11, pool=1)
    seen = [(len(ids), int(ids.sum()), int((ids * ids).sum() % 1000003)) for ids in
            (plain.sample()["ids"] for _ in range(3))]
    assert seen == [(271, 39179, 364730), (132, 15589, 85873), (171, 9844, 514435)]


def test_pairs_add_weighted_four_frame_clips_asked_alone_to_every_batch():
    """--pairs N adds to each batch N clips of 4 frames at 224 px with 2-3 objects and an event, asked only their
    objects' own events; their answer tokens count --pairs-weight times in the loss, and the batch's other clips
    are those drawn without the option."""
    import torch

    from sparrow.synthetic.train_target import Batcher, answer_loss, answer_weights

    target = sparrow.load_target()
    tok = target.tokenizer
    plain = Batcher(target, seed=11, pool=4)
    b = Batcher(target, seed=11, pool=4, pairs=2, pairs_weight=5.0)
    for _ in range(3):  # the same clips in the same batches, in the same order
        expect, batch = plain.batch(3), b.batch(3)
        assert torch.equal(batch["input_ids"][:3, :expect["input_ids"].shape[1]], expect["input_ids"])
    assert batch["input_ids"].shape[0] == 5 and batch["row_weight"].tolist() == [1, 1, 1, 5, 5]
    assert batch["video_grid_thw"][3:].tolist() == [[2, 16, 16]] * 2  # two frame pairs of 8 x 8 merged tokens
    for row in (3, 4):
        text = tok.decode(batch["input_ids"][row])
        users = text.split("<|im_start|>user\n")[1:]
        assert len(users) >= 2 and all("What happens to the" in u for u in users), text
        assert users[0].split("<|vision_end|>")[1].startswith("What happens to the"), text
        answers = [u.split("assistant\n")[1].split("<|im_end|>")[0] for u in users]
        assert any(not a.startswith("Nothing") for a in answers), text
    w = answer_weights(batch["labels"], batch["grounded"], 4.0, batch["row_weight"])
    w1 = answer_weights(batch["labels"], batch["grounded"], 4.0)
    assert torch.equal(w[:3], w1[:3]) and torch.equal(w[3:], 5 * w1[3:])
    logits = torch.randn(*batch["input_ids"].shape, len(tok))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:].clamp(min=0),
                                           reduction="none")
    expect = (ce * w).sum() / w.sum()
    assert torch.allclose(answer_loss(logits, batch["labels"], batch["grounded"], 4.0, rows=batch["row_weight"]),
                          expect)
    with pytest.raises(ValueError, match="pairs_weight"):
        Batcher(target, seed=11, pairs=1, pairs_weight=0)
    with pytest.raises(ValueError, match="even frame counts"):
        Batcher(target, seed=11, pairs=1, pairs_frames=(4, 5))
    mixed = Batcher(target, seed=11, pool=4, pairs=2, pairs_frames=(4, 16))
    grids = sorted({int(mixed.batch(3)["video_grid_thw"][r, 0]) for r in (3, 4) for _ in range(3)})
    assert grids == [2, 8]  # 4 and 16 frames: two and eight frame pairs
    described = Batcher(target, seed=11, pool=2, pairs=2, pairs_ask="describe").batch(3)
    for row in (3, 4):
        text = tok.decode(described["input_ids"][row])
        assert text.count("<|im_start|>user") == 1 and "What happens to the" not in text, text
        assert any(w in text for w in (" appears", " disappears", " changes")), text  # an event, described
    with pytest.raises(ValueError, match="pairs_ask 'ask' is not one of"):
        Batcher(target, seed=11, pairs=1, pairs_ask="ask")


def test_batcher_in_the_states_wording_writes_the_state_sentences_and_weighs_their_decisions():
    """states=True: every description carries the two state sentences, " the" and " no" (which open the list of
    what the frame shows, or "no object") weigh as grounded there, the clips and the rest of the wording are the
    usual draws, and the wording records it (the usual wording records no "states" key, so earlier exports keep
    their wording file)."""
    import torch

    from sparrow.synthetic.train_target import Batcher

    target = sparrow.load_target()
    tok = target.tokenizer
    states, plain = Batcher(target, seed=6, pool=1, states=True), Batcher(target, seed=6, pool=1)
    assert states.wording["states"] is True and "states" not in plain.wording
    ids = {tok(w, add_special_tokens=False)["input_ids"][0] for w in (" the", " no")}
    assert ids <= set(states.grounded.tolist()) and not ids & set(plain.grounded.tolist())
    described = 0
    for _ in range(6):
        s, p = states.sample(), plain.sample()
        assert torch.equal(s["pixels"], p["pixels"])  # the same clips
        text = tok.decode(s["ids"])
        if "At first, the frame shows" in text:
            described += 1
            k = text.index("At the end, it shows")
            states_text = text[text.index("At first, the frame"):text.index(".", k) + 2]
            assert tok.decode(p["ids"]) == text.replace(states_text, "")
    assert described >= 3


def test_train_target_draws_in_worker_processes_and_resumes_exactly(tmp_path, monkeypatch):
    """--workers N: batches drawn by N processes (for a GPU's short steps); a run stopped and resumed ends with the
    weights of the run that was not stopped, and a checkpoint resumes only with the number of workers it drew with."""
    import torch

    from sparrow.synthetic import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    aids = ["--bind-weight", "1", "--event-weight", "1", "--event-layer", "1", "--time-weight", "1"]
    common = ["--batch", "2", "--workers", "2", "--save-every", "10", "--lr", "0.01", "--warmup", "1", *aids]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train_target.main(["--out", whole, "--steps", "4", *common])
    train_target.main(["--out", parts, "--steps", "4", "--until", "2", *common])
    stopped = torch.load(os.path.join(parts, "ckpt", "state.pt"), weights_only=False)
    assert len(stopped["batcher"]["workers"]) == 2 and stopped["step"] == 2
    for other in ("0", "3"):
        with pytest.raises(SparrowError, match="drawn with --workers 2; resume with --workers 2"):
            train_target.main(["--out", parts, "--steps", "4", "--resume", *common[:2], "--workers", other, *common[4:]])
    train_target.main(["--out", parts, "--steps", "4", "--resume", *common])
    a = torch.load(os.path.join(whole, "ckpt", "state.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(parts, "ckpt", "state.pt"), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same run's steps 3-4 on batches drawn afresh (not where the workers stopped) end elsewhere
    fresh = str(tmp_path / "fresh")
    train_target.main(["--out", fresh, "--steps", "4", "--until", "2", *common])
    state = torch.load(os.path.join(fresh, "ckpt", "state.pt"), weights_only=False)
    state["batcher"] = {"workers": [None, None]}
    torch.save(state, os.path.join(fresh, "ckpt", "state.pt"))
    train_target.main(["--out", fresh, "--steps", "4", "--resume", *common])
    c = torch.load(os.path.join(fresh, "ckpt", "state.pt"), weights_only=False)["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for bad, message in ((["--device", "cuda:x"], "is not a device"), (["--workers", "-1"], "give 0")):
        with pytest.raises(SparrowError, match=message):
            train_target.main(["--out", str(tmp_path / "bad"), "--steps", "1", *bad])


def test_export_splits_the_weights_into_files_of_the_size_asked_and_loads_back(tmp_path):
    import glob

    import torch

    from sparrow.synthetic.train_target import export, main

    target = sparrow.load_target()
    out = str(tmp_path / "export")
    export(target.model, target.tokenizer, out, {}, shard_mb=8)
    shards = glob.glob(os.path.join(out, "*.safetensors"))
    assert len(shards) == 3 and all(os.path.getsize(f) <= 8e6 for f in shards)  # 21.6 MB of bf16 weights
    back = dict(sparrow.load_target(out).model.named_parameters())
    assert all(torch.equal(p.to(torch.bfloat16), back[k].to(torch.bfloat16)) for k, p in target.model.named_parameters())
    with pytest.raises(SparrowError, match="--export-shard-mb 0: give a size of 1 MB or more"):
        main(["--out", str(tmp_path / "run"), "--export-shard-mb", "0"])


def test_grow_depth_keeps_the_targets_output_and_the_new_layers_then_train(tmp_path, ckpt_dir, monkeypatch):
    import torch

    from conftest import clip, get_target, prepare
    from sparrow.synthetic import train_target
    from sparrow.synthetic.train_target import grow_depth

    target = get_target(ckpt_dir, "qwen2_5_vl")
    model = target.model
    assert model.dtype == torch.float32 and not model.training
    old = model.config.text_config.num_hidden_layers
    grown = grow_depth(model, old + 3).eval()
    layers = grown.model.language_model.layers
    assert grown.config.text_config.num_hidden_layers == len(layers) == old + 3
    assert len(grown.config.text_config.layer_types) == old + 3
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(old + 3))  # the cache indexes by it
    zero = [j for j, layer in enumerate(layers) if not layer.mlp.down_proj.weight.any()]
    assert len(zero) == 3 and all(not layers[j].self_attn.o_proj.weight.any() for j in zero)
    assert all(torch.equal(layers[j].mlp.up_proj.weight, layers[j - 1].mlp.up_proj.weight) for j in zero)
    inputs = prepare(target, clip(4))  # a video prompt: mRoPE positions, visual tokens and all
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, grown(**inputs).logits)
    assert grow_depth(model, old) is model
    with pytest.raises(ValueError, match="fewer than the model's"):
        grow_depth(model, old - 1)
    # through train-target: grown from an exported target, trained, resumed, exported deeper
    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    base, run, export = str(tmp_path / "base"), str(tmp_path / "run"), str(tmp_path / "export")
    train_target.main(["--out", str(tmp_path / "b"), "--steps", "1", "--batch", "2", "--export", base])
    grow = ["--init", base, "--grow-layers", "3", "--steps", "2", "--batch", "2", "--save-every", "1", "--lr", "1e-2"]
    train_target.main(["--out", run, *grow, "--until", "1"])
    train_target.main(["--out", run, *grow, "--resume", "--export", export])
    deeper = sparrow.load_target(export, device="cpu").model
    assert deeper.config.text_config.num_hidden_layers == 3
    assert deeper.model.language_model.layers[2].mlp.down_proj.weight.any()  # the new layer has learned
    for fewer in ("1", "0"):
        with pytest.raises(SparrowError, match=f"--grow-layers {fewer} is fewer than the 2 layers"):
            train_target.main(["--out", str(tmp_path / "x"), "--init", base, "--grow-layers", fewer, "--steps", "1"])
    with pytest.raises(SparrowError, match="give --init DIR too"):
        train_target.main(["--out", str(tmp_path / "y"), "--grow-layers", "3", "--steps", "1"])


def test_mrope_section_moves_time_to_other_pairs_and_leaves_text_alone(tmp_path, monkeypatch):
    """--mrope-section: an --init model with time on more rotary pairs computes a text-only prompt exactly as before
    (a text token's three coordinates are equal) and a video prompt differently; a bad split is one line."""
    import torch

    from conftest import clip, prepare
    from sparrow.synthetic import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    base, moved = str(tmp_path / "base"), str(tmp_path / "moved")  # head_dim 16: 8 pairs, split 2,3,3 by default
    train_target.main(["--out", str(tmp_path / "a"), "--steps", "1", "--batch", "2", "--export", base])
    train_target.main(["--out", str(tmp_path / "b"), "--init", base, "--mrope-section", "4,2,2", "--steps", "1",
                       "--batch", "2", "--lr", "0", "--export", moved])
    a, b = (sparrow.load_target(p, device="cpu") for p in (base, moved))
    assert a.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert b.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    with torch.no_grad():
        text = a.prepare(None, "What happens?")
        assert torch.equal(a.model(**text).logits, b.model(**text).logits)
        video = prepare(a, clip(4))
        assert not torch.allclose(a.model(**video).logits, b.model(**video).logits)
    for bad, message in (("4,2,3", "must sum to head_dim / 2 = 8"), ("4,4", "three positive pair counts")):
        with pytest.raises(SparrowError, match=message):
            train_target.main(["--out", str(tmp_path / "c"), "--init", base, "--mrope-section", bad, "--steps", "1"])
