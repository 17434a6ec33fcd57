"""Draft training (IVSB + MTP): loss masks, every mode learns, exact resume, 2 processes = 1 process, bad data."""

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparrow
from conftest import get_target
from sparrow.training.data import read_jsonl, write_sample
from sparrow.training.losses import LossConfig, capture, draft_loss, loss_mask_for
from sparrow.errors import SparrowError
from sparrow.training.config import TrainConfig
from sparrow.training.trainer import train
from sparrow.video import write_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ckpt_dir):
    d = tmp_path_factory.mktemp("data")
    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    rng = np.random.RandomState(0)
    path = str(d / "train.jsonl")
    with open(path, "w") as f:
        for i in range(4):
            write_video(str(d / f"c{i}.mp4"), (rng.rand(8, 56, 56, 3) * 255).astype(np.uint8), fps=4)
            write_sample(f, f"s{i}", f"c{i}.mp4", "Describe the video.", "A red circle moves to the left.")
    return target, path


def test_loss_mask_covers_exactly_the_answer(ckpt_dir):
    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    inputs = target.prepare(None, "Describe the video.")
    c = capture(target, inputs, "A red circle.", None)
    predicted = c.ids[1:][c.loss_mask[:-1]]  # the tokens that masked states predict
    tok = target.tokenizer
    assert tok.decode(predicted) == "A red circle.<|im_end|>"
    prompt = tok.decode(c.ids[: int(c.loss_mask.nonzero()[0]) + 1])
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "Describe the video.<|im_end|>\n<|im_start|>assistant\n")
    assert loss_mask_for(3, 6).tolist() == [False, False, True, True, True, False]


@pytest.mark.parametrize("cfg", [
    LossConfig(mode="sparrow", ivsb=True, visual_states="mid", mtp_stages=2),
    LossConfig(mode="sparrow", ivsb=True, visual_states="top", mtp_stages=3, position_mode="absolute"),
    LossConfig(mode="sparrow", ivsb=False, mtp_stages=1),
    LossConfig(mode="eagle", mtp_stages=1),
], ids=["ivsb-mid-mtp2", "ivsb-top-mtp3-absolute", "no-ivsb", "eagle"])
def test_each_mode_learns_a_repeated_batch(dataset, cfg):
    target, path = dataset
    s = read_jsonl(path)[0]
    inputs = target.prepare(sparrow.load_video(s.video, num_frames=8), s.prompt)
    c = capture(target, inputs, s.answer, target.default_mid_layer())
    assert c.visual_mask.any()
    draft = sparrow.init_draft(target, seed=0, mode=cfg.mode, position_mode=cfg.position_mode)
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    opt = torch.optim.Adam(draft.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, stats = draft_loss(draft, target, c, cfg)
        assert len(stats) == cfg.mtp_stages
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    changed = [k for k, v in draft.state_dict().items() if not torch.equal(v, before[k])]
    assert "fc.weight" in changed and "layer.q_proj.weight" in changed
    assert ("visual_proj.weight" in changed) == (cfg.mode == "sparrow" and cfg.ivsb)


def small_cfg(**kw):
    return TrainConfig(**{"steps": 4, "batch": 2, "lr": 3e-3, "warmup": 1, "save_every": 2, "num_frames": 8, **kw})


def test_resume_reaches_the_same_state(dataset, tmp_path):
    target, path = dataset
    samples = read_jsonl(path)
    train(target, samples, str(tmp_path / "a"), small_cfg(), progress=False)
    train(target, samples, str(tmp_path / "b"), small_cfg(steps=2), progress=False)  # "interrupted" after 2
    train(target, samples, str(tmp_path / "b"), small_cfg(), resume=True, progress=False)
    a = sparrow.load_draft(str(tmp_path / "a"), target).state_dict()
    b = sparrow.load_draft(str(tmp_path / "b"), target).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    la = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert np.allclose([r["loss1"] for r in la], [r["loss1"] for r in lb], rtol=1e-4)


def test_train_draft_stopped_by_a_signal_exits_nonzero(dataset, tmp_path, monkeypatch):
    import signal

    from sparrow.training import trainer

    target, path = dataset
    save = trainer.save_checkpoint

    def save_then_interrupt(out, draft, opt, step, *rest):
        save(out, draft, opt, step, *rest)
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as step 2 is saved: step 3 ends, is saved, and it stops

    monkeypatch.setattr(sparrow, "load_target", lambda _: target)
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_interrupt)
    handler = signal.getsignal(signal.SIGINT)
    out = str(tmp_path / "d")
    args = ["--data", path, "--out", out, "--steps", "4", "--batch", "2", "--save-every", "1", "--num-frames", "8",
            "--eval-samples", "0"]
    assert trainer.main(args) == 128 + signal.SIGINT  # a chain of stages (set -e) stops here
    assert torch.load(os.path.join(out, "ckpt", "state.pt"), weights_only=False)["step"] == 3
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    assert trainer.main(args + ["--resume"]) == 0
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is the caller's again


def _worker(rank, world, init_file, ckpt, path, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    target = sparrow.load_target(ckpt, device="cpu")
    train(target, read_jsonl(path), out, small_cfg(), progress=False)
    dist.destroy_process_group()


def test_two_processes_match_one(dataset, tmp_path):
    target, path = dataset
    train(target, read_jsonl(path), str(tmp_path / "one"), small_cfg(), progress=False)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), target.path, path, str(tmp_path / "two")), nprocs=2)
    one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert np.allclose([r["loss1"] for r in one], [r["loss1"] for r in two], rtol=1e-3)
    a = sparrow.load_draft(str(tmp_path / "one"), target).state_dict()
    b = sparrow.load_draft(str(tmp_path / "two"), target).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_bad_data_is_reported_not_fatal(dataset, tmp_path, capsys):
    target, path = dataset
    bad = str(tmp_path / "bad.jsonl")
    lines = open(path).read().splitlines()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    with open(bad, "w") as f:
        f.write(lines[0].replace('"c0.mp4"', f'"{os.path.dirname(path)}/c0.mp4"') + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"id": "x", "video": "missing.mp4", "conversations": []}) + "\n")
        write_sample(f, "corrupt", str(broken), "Describe the video.", "Something.")
    samples = read_jsonl(bad)
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3" in err and len(samples) == 2
    train(target, samples, str(tmp_path / "d"), small_cfg(steps=2), progress=False)
    assert "skipping sample corrupt" in capsys.readouterr().err
    with pytest.raises(sparrow.SparrowError, match="line 2"):
        read_jsonl(bad, strict=True)


def test_regenerate_appends_and_resumes(dataset, tmp_path):
    from sparrow.training.regenerate import regenerate

    target, path = dataset
    out = str(tmp_path / "regen.jsonl")
    assert regenerate(target, path, out, max_new_tokens=6, num_frames=8) == 4
    full = open(out).read().splitlines()
    with open(out, "w") as f:  # an interrupted run: two answers and a torn line
        f.write("\n".join(full[:2]) + "\n" + full[2][:20])
    assert regenerate(target, path, out, max_new_tokens=6, num_frames=8) == 2
    rows = [json.loads(x) for x in open(out).read().splitlines()]
    assert sorted(r["id"] for r in rows) == ["s0", "s1", "s2", "s3"]
    s = read_jsonl(out)[0]
    assert os.path.exists(s.video)  # video paths were rewritten relative to the output file
    expect = sparrow.generate(target, None, target.prepare(sparrow.load_video(s.video, max_frames=8), s.prompt),
                              max_new_tokens=6, method="ar").text
    assert s.answer == expect


def test_regenerate_sampling_is_the_same_resumed_or_sharded(dataset, tmp_path):
    """Each sample's seed is its line's, not its place in what is left to do: a resumed run and two shards write
    the answers of one uninterrupted run."""
    from sparrow.training.regenerate import regenerate

    target, path = dataset
    kw = dict(max_new_tokens=8, num_frames=8, temperature=1.5, seed=3)
    whole = str(tmp_path / "whole.jsonl")
    regenerate(target, path, whole, **kw)
    answers = {r["id"]: r for r in map(json.loads, open(whole))}
    assert len({r["conversations"][1]["value"] for r in answers.values()}) > 1  # sampled, not one fixed answer
    resumed = str(tmp_path / "resumed.jsonl")
    with open(resumed, "w") as f:
        f.write(open(whole).read().splitlines()[1] + "\n")  # only s1 was done
    regenerate(target, path, resumed, **kw)
    for shard in (0, 1):
        regenerate(target, path, str(tmp_path / "sharded.jsonl"), shard=(shard, 2), **kw)
    for name in ("resumed", "sharded"):
        rows = {r["id"]: r for r in map(json.loads, open(tmp_path / f"{name}.jsonl"))}
        assert rows == answers, name


def test_regenerate_with_a_draft_writes_the_plain_answers(dataset, tmp_path, capsys, monkeypatch):
    """`--method sparrow --draft D` regenerates by lossless speculative decoding: greedy, the answers of plain
    decoding, and a closing line with tau and the decoding speed."""
    from sparrow.cli import main
    from sparrow.training.regenerate import regenerate

    target, path = dataset
    plain = str(tmp_path / "plain.jsonl")
    totals = {}
    regenerate(target, path, plain, max_new_tokens=6, num_frames=8, totals=totals)
    assert totals["accepted"] == totals["forwards"] == totals["new_tokens"] - 4 > 0  # ar: a token a forward
    draft = str(tmp_path / "draft")
    sparrow.init_draft(target, seed=1).save(draft)
    spec = str(tmp_path / "spec.jsonl")
    used, real = [], sparrow.generate
    monkeypatch.setattr(sparrow, "generate", lambda t, d, *a, **k: used.append((d, k["method"])) or real(t, d, *a, **k))
    assert main(["regenerate", "--target", target.path, "--data", path, "--out", spec, "--method", "sparrow",
                 "--draft", draft, "--max-new-tokens", "6", "--num-frames", "8"]) == 0
    assert len(used) == 4 and all(d is not None and m == "sparrow" for d, m in used)
    assert open(spec).read() == open(plain).read()
    assert re.search(r"wrote 4 answers to .*spec.jsonl \(\d+ tokens, tau \d\.\d\d, [\d.]+ tokens/s decoding\)",
                     capsys.readouterr().out)


@pytest.mark.parametrize("flags, message", [
    (["--mode", "nope"], "mode 'nope': choose sparrow or eagle"),
    (["--visual-states", "bogus"], "visual_states 'bogus': choose mid or top or none"),  # was read as "top"
    (["--ivsb", "maybe"], "argument --ivsb: 'maybe' is not true or false"),  # was read as false
    (["--save-every", "0"], "save_every 0: give 1 or more"),  # was a ZeroDivisionError at step 1
    (["--grad-clip", "0"], "grad_clip 0.0: give a positive number"),  # clipped every update to nothing
    (["--lr", "nan"], "lr nan: give a positive number"),
    (["--mtp-stages", "0"], "mtp_stages 0: give 1 or more"),
    (["--l1-weight", "0", "--ce-weight", "0"], "both 0: nothing to train"),
])
def test_train_draft_bad_settings_are_one_line_before_loading(tmp_path, capsys, flags, message):
    """A bad setting exits 2 with one line before the target loads or anything is written."""
    from sparrow.cli import main

    out = tmp_path / "draft"
    try:
        rc = main(["train-draft", "--target", str(tmp_path / "no_target"), "--data", "x.jsonl", "--out", str(out),
                   *flags])
    except SystemExit as e:  # argparse's own checks (a flag's type) exit from inside
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not out.exists(), err
    with pytest.raises(SparrowError, match="stage_weights .*one weight per MTP stage"):
        TrainConfig(mtp_stages=2, stage_weights=[1.0])


def test_mid_layer_beyond_the_target_is_one_line(dataset, tmp_path):
    target, path = dataset
    with pytest.raises(SparrowError, match=f"mid_layer 99: the target has {target.num_layers} layers"):
        train(target, read_jsonl(path), str(tmp_path / "d"), small_cfg(mid_layer=99), progress=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give 1 or more"),
    (["--num-frames", "0"], "--num-frames 0: give 1 or more"),
    (["--temperature", "-1"], "temperature must be 0 (greedy) or more"),
    (["--shard", "2/2"], "--shard must look like i/n"),
    (["--draft", "d"], "--draft is for speculative decoding; add --method sparrow"),
    (["--method", "sparrow"], "--method sparrow with --target needs --draft PATH"),
])
def test_regenerate_bad_settings_are_one_line_before_loading(tmp_path, capsys, flags, message):
    from sparrow.cli import main

    out = tmp_path / "regen.jsonl"
    assert main(["regenerate", "--target", str(tmp_path / "no_target"), "--data", "x.jsonl", "--out", str(out),
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists(), err


def test_bad_config_files_are_one_line(tmp_path):
    from sparrow.training.config import load_config

    for text, message in (('{"steps": 3,', "not valid JSON"), ("[1, 2]", "give a mapping of TrainConfig fields"),
                          ('{"stepz": 3}', "unknown training config keys"), ('{"batch": 0}', "batch 0: give 1")):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(SparrowError, match=message):
            load_config(str(tmp_path / "c.json"), {})
    assert load_config(str(tmp_path / "c.json"), {"batch": 4}).batch == 4  # a flag overrides the file
