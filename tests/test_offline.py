"""Offline capture: the stored states give exactly the online loss in every mode; a capture resumes where it
stopped; mismatched settings fail with one line; train-draft on a capture evaluates tau on held-out samples."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import get_target
from sparrow.cli import main
from sparrow.training.data import read_jsonl, write_sample
from sparrow.training.losses import capture, draft_loss
from sparrow.training.offline import OfflineData, run_capture
from sparrow.training.config import TrainConfig
from sparrow.video import load_video, write_video

import sparrow


@pytest.fixture(scope="module")
def data(tmp_path_factory, ckpt_dir):
    d = tmp_path_factory.mktemp("offline")
    rng = np.random.RandomState(1)
    path = str(d / "train.jsonl")
    with open(path, "w") as f:
        for i in range(10):
            write_video(str(d / f"c{i}.mp4"), (rng.rand(8, 56, 56, 3) * 255).astype(np.uint8), fps=4)
            write_sample(f, f"s{i}", f"c{i}.mp4", "Describe the video.", f"A red circle moves {i} times.")
    make = get_target(ckpt_dir, "qwen2_5_vl", 0)
    return make, path, d


@pytest.mark.parametrize("cfg", [
    TrainConfig(mode="sparrow", ivsb=True, visual_states="mid", mtp_stages=2, num_frames=8),
    TrainConfig(mode="sparrow", ivsb=True, visual_states="top", mtp_stages=2, position_mode="absolute", num_frames=8),
    TrainConfig(mode="sparrow", ivsb=False, mtp_stages=1, num_frames=8),
    TrainConfig(mode="eagle", ivsb=False, mtp_stages=1, num_frames=8),
], ids=["ivsb-mid", "ivsb-top-absolute", "no-ivsb", "eagle"])
def test_offline_loss_equals_online(data, tmp_path, cfg):
    target, path, _ = data
    samples = read_jsonl(path)[:3]
    run_capture(target, samples, str(tmp_path / "cap"), cfg, path, shard_size=2, progress=False)
    off = OfflineData(str(tmp_path / "cap"), target, cfg)
    assert len(off) == 3 and sorted(os.listdir(tmp_path / "cap")) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    draft = sparrow.init_draft(target, seed=0, mode=cfg.mode, position_mode=cfg.position_mode)
    mid = target.default_mid_layer()
    for i, s in enumerate(samples):
        inputs = target.prepare(load_video(s.video, max_frames=8), s.prompt)
        online, _ = draft_loss(draft, target, capture(target, inputs, s.answer, mid), cfg.loss())
        offline, _ = draft_loss(draft, target, off.get(i), cfg.loss())
        assert torch.allclose(online, offline, rtol=1e-5, atol=1e-6), (i, online, offline)


def test_capture_resumes_after_the_last_complete_shard(data, tmp_path):
    target, path, d = data
    rows = open(path).read().splitlines()
    part = str(d / "part.jsonl")
    open(part, "w").write("\n".join(rows[:4]) + "\n")
    out = str(tmp_path / "cap")
    cfg = TrainConfig(num_frames=8)
    run_capture(target, read_jsonl(part), out, cfg, part, shard_size=2, progress=False)
    first = os.path.getmtime(os.path.join(out, "shard-00000.safetensors"))
    with open(part, "a") as f:  # the rest of the data arrives (or the first run was interrupted here)
        f.write("\n".join(rows[4:6]) + "\n")
    m = run_capture(target, read_jsonl(part), out, cfg, part, shard_size=2, progress=False)
    assert [e["line"] for e in m["samples"]] == [1, 2, 3, 4, 5, 6] and m["complete"]
    assert os.path.getmtime(os.path.join(out, "shard-00000.safetensors")) == first
    assert sorted(f for f in os.listdir(out) if f.endswith(".tmp")) == []


def test_train_draft_on_a_capture_with_held_out_tau(data, tmp_path, capsys):
    target, path, _ = data
    cap, out = str(tmp_path / "cap"), str(tmp_path / "draft")
    args = ["--target", target.path, "--data", path, "--num-frames", "8"]
    assert main(["capture", *args, "--out", cap]) == 0
    assert main(["train-draft", "--target", target.path, "--data", cap, "--out", out, "--num-frames", "8",
                 "--steps", "2", "--batch", "2", "--eval-samples", "2", "--eval-max-new-tokens", "8"]) == 0
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    ev = [x for x in lines if "eval_tau" in x]
    assert len(ev) == 1 and ev[0]["step"] == 2 and ev[0]["eval_samples"] == 2 and ev[0]["eval_tau"] >= 1
    assert 0 <= ev[0]["eval_acc1"] <= 1 and 0 <= ev[0]["eval_acc2"] <= 1
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["training"]["eval"]["eval_tau"] == ev[0]["eval_tau"]
    # the capture was made for sparrow mode: an eagle run on it is refused in one line
    capsys.readouterr()
    assert main(["train-draft", "--target", target.path, "--data", cap, "--out", str(tmp_path / "e"),
                 "--mode", "eagle", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks the top states at every position and the video features" in err[0], err


def test_capture_with_answers_equals_regenerate_then_capture(data, tmp_path):
    """`--answers` in two parts: the answers are `sparrow regenerate`'s, word for word, and the stored states give
    the loss of capturing those tokens afterwards, for both configs the one capture was made for."""
    from sparrow.training.losses import capture_ids
    from sparrow.training.regenerate import regenerate

    target, path, d = data
    rows = open(path).read().splitlines()[:3]
    part = str(d / "three.jsonl")
    open(part, "w").write("\n".join(rows) + "\n")
    cfgs = [TrainConfig(num_frames=8), TrainConfig(mode="eagle", ivsb=False, mtp_stages=1, num_frames=8)]
    out = str(tmp_path / "cap")
    for i in (0, 1):
        run_capture(target, read_jsonl(part), out, cfgs, part, progress=False, answers=str(tmp_path / f"a{i}.jsonl"),
                    max_new_tokens=12, part=(i, 2))
    regenerate(target, part, str(tmp_path / "ref.jsonl"), max_new_tokens=12, num_frames=8)
    ref = {s.id: s for s in read_jsonl(str(tmp_path / "ref.jsonl"))}
    got = {s.id: s.answer for i in (0, 1) for s in read_jsonl(str(tmp_path / f"a{i}.jsonl"))}
    assert got == {k: s.answer for k, s in ref.items()} and len(got) == 3
    mid = target.default_mid_layer()
    for cfg in cfgs:
        off = OfflineData(out, target, cfg)
        assert sorted(e["id"] for e in off.entries) == sorted(ref)
        draft = sparrow.init_draft(target, seed=0, mode=cfg.mode)
        for i, e in enumerate(off.entries):
            c = off.get(i)
            first = int(c.loss_mask.nonzero()[0]) + 1
            inputs = target.prepare(load_video(ref[e["id"]].video, max_frames=8), ref[e["id"]].prompt)
            online, _ = draft_loss(draft, target, capture_ids(target, inputs, c.ids[first:].tolist(), mid), cfg.loss())
            offline, _ = draft_loss(draft, target, c, cfg.loss())
            assert torch.allclose(online, offline, rtol=1e-4, atol=1e-5), (e["id"], online, offline)
