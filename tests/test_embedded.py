"""The embedded default as a user meets it: the shipped target, its drafts, the example clips and `sparrow demo`."""

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


def test_demo_checks_lossless_output_and_scores_it_against_the_clips_truth(capsys):
    from sparrow.cli import main

    assert main(["demo", "--clip", "1", "--max-new-tokens", "80", "--long", "1024"]) == 0
    out = capsys.readouterr().out
    assert "long video: a synthetic clip of 32 frames at 224x224 (1024 visual tokens)" in out
    for method, reads in (("sparrow", "the text only"), ("eagle", "every position")):
        assert re.search(rf"{method}: the draft reads {reads}: its prefill \d+ ms, \d+\.\d ms a cycle; tau ", out), out
    assert "lossless: identical output for sparrow, eagle and ar (" in out
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
    # the README's first command: the default clip, which the shipped target describes right (the long clip, its
    # 8k-token prefill alone 10-20 s, is checked above at 1k)
    assert main(["demo", "--long", "0"]) == 0
    out = capsys.readouterr().out
    assert "clip2.mp4" in out and "attribute accuracy 1.00 " in out and "identical output" in out
