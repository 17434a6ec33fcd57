"""`sparrow analyze` on a tiny random target: every analysis writes well-formed JSON and a PNG, removing nothing
reproduces the model, and an eagle draft with a reduced visual cache stays lossless."""

import json
import os

import torch

from sparrow.analyze import keep_mask
from sparrow.cli import main
from sparrow.tiny import make_tiny_target


def test_analyze_writes_all_three(tmp_path, capsys):
    target = make_tiny_target(str(tmp_path / "t"), "qwen2_5_vl", seed=0, init_std=0.1, layers=3)
    draft, out = str(tmp_path / "eagle"), str(tmp_path / "out")
    assert main(["init-draft", "--target", target, "--out", draft, "--mode", "eagle"]) == 0
    assert main(["analyze", "--target", target, "--draft", draft, "--visual-tokens", "64,128", "--clips", "1",
                 "--max-new-tokens", "8", "--out", out]) == 0
    for name in ("internalization", "visual_gain", "dilution"):
        assert open(os.path.join(out, name + ".png"), "rb").read(4) == b"\x89PNG"
    inter = json.load(open(os.path.join(out, "internalization.json")))
    for b in ("64", "128"):
        r = inter[b]
        assert r["layers"] == [0, 1, 2, 3] and r["agreement"][-1] == 1.0  # nothing removed: the model itself
        assert all(0 <= a <= 1 for a in r["agreement"])
        assert len(r["attention_to_visual"]) == 3 and all(0 <= m <= 1 for m in r["attention_to_visual"])
        assert len(r["cosine_visual"]) == len(r["cosine_text"]) == 3
    gain = json.load(open(os.path.join(out, "visual_gain.json")))
    assert gain["64"]["keep_fraction"] == [1.0, 0.25, 0.1, 0.05, 0.01, 0.0]
    assert all(t >= 1 for how in ("attention", "uniform") for t in gain["64"][how])
    dil = json.load(open(os.path.join(out, "dilution.json")))
    for b, vis in (("64", 64), ("128", 128)):
        assert abs(dil[b]["visual_mass"] + dil[b]["text_mass"] - 1) < 1e-4 and dil[b]["visual_entries"] == vis


def test_keep_mask_selects_visual_positions():
    vis = torch.tensor([False, True, True, True, True, False, True, True, True, True, True, False])
    w = torch.arange(12.0)
    top = keep_mask(vis, w, 0.25, "attention")
    assert top.tolist() == [False] * 9 + [True, True, False]  # the 2 highest-weight visual positions
    uni = keep_mask(vis, w, 0.25, "uniform")
    assert int(uni.sum()) == 2 and not (uni & ~vis).any() and uni[1] and uni[10]
    assert not keep_mask(vis, w, 0.0, "uniform").any() and (keep_mask(vis, w, 1.0, "attention") == vis).all()


def test_analyze_bad_input(tmp_path, capsys):
    assert main(["analyze", "--what", "everything", "--out", str(tmp_path)]) == 2
    assert "unknown analysis" in capsys.readouterr().err
    assert main(["analyze", "--visual-tokens", "0", "--out", str(tmp_path)]) == 2  # before any clip is built
    assert "--visual-tokens '0': give positive whole numbers" in capsys.readouterr().err
    assert main(["analyze", "--clips", "0", "--out", str(tmp_path)]) == 2
    assert "--clips 0: give 1 or more" in capsys.readouterr().err
