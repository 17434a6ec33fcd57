"""Video loading (PyAV): containers and codecs, uniform sampling, order, sizes, frame directories, bad files."""

import os

import numpy as np
import pytest

from sparrow import SparrowError, load_video
from sparrow.video import sample_indices, write_video

FORMATS = [("mp4", "libx264"), ("mkv", "libx265"), ("webm", "libvpx-vp9"), ("avi", "mpeg4")]


def ramp(n=24, h=48, w=64):
    """Frame i is uniformly grey at level 8 * i (decodes back within a few levels)."""
    return np.stack([np.full((h, w, 3), 8 * i + 20, dtype=np.uint8) for i in range(n)])


def levels(frames):
    return np.round((frames.reshape(len(frames), -1).mean(1) - 20) / 8).astype(int)


@pytest.mark.parametrize("ext,codec", FORMATS)
def test_roundtrip_every_container(tmp_path, ext, codec):
    path = str(tmp_path / f"clip.{ext}")
    write_video(path, ramp(), fps=8, codec=codec)
    v = load_video(path)
    assert v.frames.shape == (24, 48, 64, 3) and v.frames.dtype == np.uint8
    assert levels(v.frames).tolist() == list(range(24))
    v = load_video(path, num_frames=6)
    assert v.frames.shape[0] == 6 and levels(v.frames).tolist() == v.indices.tolist()
    assert v.indices.tolist() == [2, 6, 10, 14, 18, 22]
    assert v.fps == pytest.approx(6 / 3.0)  # 6 frames over 3 s


def test_fps_sampling(tmp_path):
    path = str(tmp_path / "clip.mp4")
    write_video(path, ramp(), fps=8)  # 3 s
    v = load_video(path, fps=2)
    assert len(v.indices) == 6 and v.fps == pytest.approx(2.0)
    assert np.all(np.diff(levels(v.frames)) > 0)


def test_frame_directory(tmp_path):
    from PIL import Image

    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(ramp(5)):
        Image.fromarray(f).save(d / f"{i:03d}.png")
    v = load_video(str(d), num_frames=5)
    assert levels(v.frames).tolist() == [0, 1, 2, 3, 4]


def test_sample_indices_uniform_and_distinct():
    idx = sample_indices(100, 25.0, 16, None)
    assert len(set(idx.tolist())) == 16 and idx[0] >= 0 and idx[-1] <= 99
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize("case", ["missing", "not_video", "truncated", "too_many", "empty_dir", "zero_frames"])
def test_bad_videos_raise_one_line_errors(tmp_path, case):
    path = str(tmp_path / "x.mp4")
    kwargs = {}
    if case == "not_video":
        open(path, "w").write("this is text, not a video\n" * 50)
    elif case == "truncated":
        write_video(path, ramp(), fps=8)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 4])
    elif case == "too_many":
        write_video(path, ramp(), fps=8)
        kwargs["num_frames"] = 100
    elif case == "empty_dir":
        path = str(tmp_path / "empty")
        os.mkdir(path)
    elif case == "zero_frames":
        kwargs["num_frames"] = 0
        write_video(path, ramp(4), fps=8)
    with pytest.raises(SparrowError) as e:
        load_video(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    assert {"missing": "no such file", "not_video": "not a video", "truncated": "corrupt",
            "too_many": "only 24", "empty_dir": "no image", "zero_frames": "positive"}[case] in msg


def test_max_frames_caps_without_failing(tmp_path):
    path = str(tmp_path / "clip.mp4")
    write_video(path, ramp(), fps=8)
    assert len(load_video(path, max_frames=6).indices) == 6
    assert len(load_video(path, max_frames=100).indices) == 24


def test_only_the_sampled_frames_are_kept_and_a_damaged_tail_resamples(tmp_path, monkeypatch):
    """A long video must not fill memory: decoding converts and keeps only the sampled frames. Where the packet
    count is wrong (a truncated file), the frames are those of sampling the frames that decoded."""
    import sparrow.video as vid

    path = str(tmp_path / "clip.mp4")
    write_video(path, ramp(), fps=8)
    seen = []
    real = vid._decode

    def counting(p, keep):
        kept, n, fps = real(p, keep)
        seen.append(len(kept))
        return kept, n, fps

    monkeypatch.setattr(vid, "_decode", counting)
    v = load_video(path, num_frames=6)
    assert seen == [6] and levels(v.frames).tolist() == v.indices.tolist() == [2, 6, 10, 14, 18, 22]
    avi = str(tmp_path / "clip.avi")
    write_video(avi, ramp(), fps=8, codec="mpeg4")
    data = open(avi, "rb").read()
    cut = str(tmp_path / "cut.avi")
    open(cut, "wb").write(data[: int(len(data) * 0.9)])  # its packets count one frame more than decodes
    everything, n, _ = real(cut, lambda i: True)
    assert vid._count_packets(cut)[0] > n > 6
    seen.clear()
    v = load_video(cut, num_frames=6)
    assert len(seen) == 2  # the indices from the packet count missed, so the frames that decoded are sampled again
    assert v.total_frames == n and v.indices.tolist() == sample_indices(n, 8.0, 6, None).tolist()
    assert np.array_equal(v.frames, np.stack([everything[i] for i in v.indices.tolist()]))


def test_check_sees_the_frames_to_sample_before_any_is_decoded(tmp_path, monkeypatch):
    """`check` gets (frames to sample, height, width) before decoding, so a video too long for a context is refused
    without decoding it (a file from its packets and header, a frame directory from its first image)."""
    from PIL import Image

    import sparrow.video as vid

    path = str(tmp_path / "clip.mp4")
    write_video(path, ramp(), fps=8)  # 24 frames of 48 x 64, 3 s
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(ramp(5)):
        Image.fromarray(f).save(d / f"{i:03d}.png")
    calls = []
    assert len(load_video(path, fps=4, check=lambda *a: calls.append(a)).indices) == 12
    assert len(load_video(str(d), num_frames=3, check=lambda *a: calls.append(a)).indices) == 3
    assert calls == [(12, 48, 64), (3, 48, 64)]

    def refuse(*a):
        raise SparrowError("too long")

    monkeypatch.setattr(vid, "_decode", lambda *a: pytest.fail("decoded a video that its check refused"))
    monkeypatch.setattr(vid, "_read_image", lambda p, real=vid._read_image: calls.append(p) or real(p))
    for p in (path, str(d)):
        with pytest.raises(SparrowError, match="too long"):
            load_video(p, num_frames=3, check=refuse)
    assert len(calls) == 3  # the directory's first image only


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_a_video_that_cannot_fit_the_context_is_refused_before_decoding(tmp_path, ckpt_dir, family, monkeypatch):
    """`Target.visual_tokens` counts what `prepare` puts in the prompt; `prepare` refuses, before decoding, a video
    whose visual tokens alone overflow the context."""
    from conftest import get_target

    import sparrow.video as vid

    target = get_target(ckpt_dir, family, max_positions=400)
    path = str(tmp_path / "clip.mp4")
    write_video(path, np.zeros((120, 96, 128, 3), np.uint8), fps=8)  # 15 s
    for frames, (h, w), px in ((4, (96, 128), None), (5, (96, 128), 56 * 56), (2, (48, 64), 28 * 28)):
        n = target.visual_tokens(frames, h, w, max_pixels=px)
        video = np.zeros((frames, h, w, 3), np.uint8)
        ids = target.prepare(video, "x", max_pixels=px)["input_ids"][0]
        assert int(target.visual_mask(ids).sum()) == n
    monkeypatch.setattr(vid, "_decode", lambda *a: pytest.fail("decoded a video that cannot fit"))
    with pytest.raises(SparrowError, match=r"the video would be \d+ visual tokens \(120 frames of 128x96\) but the "
                                           r"target's context is 400; sample fewer frames"):
        target.prepare(path, "x", fps=8.0)
