"""The embedded target's recipe (embedded/): the trainer's losses, batches, resume and export, on tiny shapes."""

import json
import os
import re

import numpy as np
import pytest

import sparrow
from sparrow.errors import SparrowError

_CORPUS: list = []


@pytest.fixture(autouse=True)
def corpus_once(monkeypatch):
    """A new run builds its tokenizer from `corpus()` (about 10 s of text rendering): once per session here."""
    from embedded import train_target

    real = train_target.corpus

    def once(n: int = 4000) -> list[str]:
        if not _CORPUS:
            _CORPUS.append(real(n))
        return _CORPUS[0]

    monkeypatch.setattr(train_target, "corpus", once)


def test_train_target_stopped_by_a_signal_exits_nonzero_without_exporting(tmp_path, monkeypatch):
    import signal

    import torch

    from embedded import train_target

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

    from embedded import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    seen = []
    real = torch.autocast

    def recording(*args, enabled=True, **kw):  # what each training forward asked for, run in float32 (bf16 on a
        seen.append(enabled)                     # CPU without bf16 kernels takes minutes)
        return real(*args, enabled=False, **kw)

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

    from embedded import train_target

    monkeypatch.setattr(train_target, "TEXT", dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    run, export = str(tmp_path / "run"), str(tmp_path / "export")
    state = os.path.join(run, "ckpt", "state.pt")
    aids = ["--bind-weight", "1", "--bind-layer", "1", "--event-weight", "1", "--event-layer", "1",
            "--time-weight", "1", "--log-every", "1"]
    train_target.main(["--out", run, "--steps", "3", "--until", "2", "--batch", "2", "--save-every", "5", *aids])
    assert torch.load(state, weights_only=False)["step"] == 2  # --until stops and checkpoints there
    train_target.main(["--out", run, "--steps", "3", "--batch", "2", "--resume", "--export", export, *aids])
    log = json.load(open(os.path.join(run, "ckpt", "log.json")))
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["bind"] >= 0 and r["event"] >= 0 and r["time"] >= 0 for r in log)
    saved = torch.load(state, weights_only=False)
    assert saved["step"] == 3 and all(saved[k] is not None for k in ("probe", "bind_probe", "event_probe"))
    # the next stage starts its probes where this one left them (with lr 0 they keep those weights exactly)
    for init, same in ((["--init-probes", state], True), ([], False)):
        nxt = str(tmp_path / f"next{same}")
        train_target.main(["--out", nxt, "--init", export, *init, "--steps", "1", "--batch", "2", "--lr", "0", *aids])
        probes = torch.load(os.path.join(nxt, "ckpt", "state.pt"), weights_only=False)
        for key in ("probe", "bind_probe", "event_probe"):
            assert torch.equal(probes[key]["head.weight"], saved[key]["head.weight"]) == same, key
    # a stage from --init is repeatable: its fresh probes start from --seed, so a rerun trains to the same weights
    again = []
    for k in range(2):
        train_target.main(["--out", str(tmp_path / f"again{k}"), "--init", export, "--steps", "1", "--batch", "2",
                           "--seed", "3", *aids])
        again.append(torch.load(str(tmp_path / f"again{k}" / "ckpt" / "state.pt"), weights_only=False))
    for key in ("model", "probe", "bind_probe", "event_probe"):
        assert all(torch.equal(v, again[1][key][n]) for n, v in again[0][key].items()), key
    with pytest.raises(SparrowError, match="--init-probes .* is not a file"):
        train_target.main(["--out", str(tmp_path / "other"), "--steps", "1", "--init-probes", str(tmp_path / "no")])
    for bad, message in ((["--init", str(tmp_path)], "--init .*: no config.json there"),
                         (["--tokenizer", str(tmp_path)], "--tokenizer .*: no tokenizer_config.json there"),
                         (["--steps", "0"], "--steps 0: give 1 or more"),
                         (["--until", "0"], "--until 0: give 1 or more"),
                         (["--batch", "0"], "--batch 0: give 1 or more")):
        with pytest.raises(SparrowError, match=message):  # bad input: one line, before anything is written
            train_target.main(["--out", str(tmp_path / "bad"), "--steps", "1", *bad])
        assert not (tmp_path / "bad").exists()
    with pytest.raises(SparrowError, match="--bind-layer 2 is not a layer"):
        train_target.main(["--out", str(tmp_path / "other"), "--steps", "1", "--batch", "2", "--bind-weight", "1",
                           "--bind-layer", "2"])
    target = sparrow.load_target(export, device="cpu")
    assert target.tokenizer.chat_template and target.eos_token_ids
    assert (target.settings["min_pixels"], target.settings["max_pixels"]) == (112 * 112, 224 * 224)
    assert sparrow.generate(target, None, target.prepare(None, "Describe the video."), max_new_tokens=3,
                            method="ar").stats.new_tokens >= 1


def test_binding_loss_marks_colour_words_and_teaches_the_head_to_fetch_them():
    import torch

    from embedded.train_target import Batcher, BindingLoss, COLOURS

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

    from embedded.train_target import COLOURS, event_labels, named_objects

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


def test_time_binding_targets_the_object_as_first_and_last_seen():
    import torch

    from embedded.train_target import TimeBindingLoss

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

    from embedded.train_target import Batcher

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

    from embedded.train_target import Batcher, answer_loss, without_padding_mask

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

    from embedded.train_target import (Batcher, answer_loss, answer_weights, length_groups, row_group,
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
            labels, grounded = part.pop("labels"), part.pop("grounded")
            g, value = gradient(answer_loss(model(**part).logits, labels, grounded, 4.0, total))
            parts, parts_loss = parts + g, parts_loss + value
    finally:
        model.zero_grad(set_to_none=True)
        for p, was in zip(params, trainable):
            p.requires_grad_(was)
    assert abs(parts_loss - whole_loss) < 1e-5
    assert (parts - whole).norm() < 1e-4 * whole.norm()


def test_grounded_words_cover_every_alternative_of_a_decision():
    """--grounded-weight must not tilt a choice that the frames decide: the verb that says whether an object moves,
    and the sentence that follows the last object (another object, an event, or "no events"), are weighted
    whichever way the clip goes, and so is the token after an object's motion or event, which says whether (another)
    event of that object follows."""
    from sparrow.synthetic.text import MOTION_PHRASES, describe
    from embedded.train_target import grounded_ids
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

    from embedded.train_target import MIXES, SHAPES, Batcher

    for name, p in MIXES.items():
        assert len(p) == len(SHAPES) and min(p) >= 0 and abs(sum(p) - 1) < 1e-9, name
    long_mass = {name: sum(q for q, (frames, _, _) in zip(p, SHAPES) if frames >= 48) for name, p in MIXES.items()}
    assert long_mass["short"] == long_mass["long"] == 0 and long_mass["longer"] >= 0.05
    assert (96, 224, 224) in SHAPES  # the 3072 bucket's clips
    target = sparrow.load_target()
    b = Batcher(target, seed=4, pool=1, mix="longer")
    b.shape_p = np.eye(len(SHAPES))[SHAPES.index((48, 224, 224))]  # force the 1536 bucket's clip
    s = b.sample()
    assert s["grid"][0].tolist() == [24, 16, 16]  # 24 frame pairs of 16 x 16 patches: 24 x 64 visual tokens
    assert (s["ids"] == target.config.video_token_id).sum() == s["cells"].shape[0] == 24 * 64


def test_train_target_draws_in_worker_processes_and_resumes_exactly(tmp_path, monkeypatch):
    """--workers N: batches drawn by N processes (for a GPU's short steps); a run stopped and resumed ends with the
    weights of the run that was not stopped, and a checkpoint resumes only with the number of workers it drew with."""
    import torch

    from embedded import train_target

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


@pytest.mark.parametrize("seed", [0, 4, 9])
def test_cell_labels_match_rendered_pixels(seed):
    """A token labelled with an object shows that object's colour over at least a fifth of its 28 x 28 cell."""
    from embedded.train_target import cell_labels
    from sparrow.synthetic.world import COLOURS, MOTIONS, make_clip

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


def test_evaluate_main_with_a_draft_writes_the_same_texts_as_plain_decoding(tmp_path):
    import json

    from sparrow import defaults
    from embedded import evaluate as ev

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
    from embedded import evaluate as ev

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
    from embedded import evaluate as ev

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
    from embedded import evaluate as ev

    with pytest.raises(SystemExit) as e:
        ev.main(["--target", str(tmp_path / "no_target"), "--out", str(tmp_path / "eval"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert ev.clip_plan("512,1536", "200,100", "", 0) == [(512, 200), (1536, 100)]
