"""Video decoding and frame sampling (PyAV), shared by every target family.

A video is a file in any container/codec that FFmpeg decodes (mp4, mkv, webm, avi; H.264, H.265, VP9, MPEG-4...)
or a directory of image files (sorted by name, one frame each). Frames are sampled uniformly, either a fixed
count (`num_frames`) or a rate (`fps`), as the Qwen-VL and LLaVA video processors do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import SparrowError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_DIR_FPS = 2.0  # frame rate assumed for a directory of frames (no timing metadata there)


@dataclass
class Video:
    """Sampled frames of one video.

    frames: uint8 array (T, H, W, 3), RGB, in time order.
    fps: the rate of the sampled frames in frames per second (T / duration); used for Qwen2.5-VL's
        `second_per_grid_ts` (temporal patch size / fps).
    indices: (T,) indices of the sampled frames among all decoded frames.
    total_frames: number of frames in the source.
    """

    frames: np.ndarray
    fps: float
    indices: np.ndarray
    total_frames: int


def sample_indices(total: int, source_fps: float, num_frames: int | None, fps: float | None,
                   max_frames: int | None = None, min_frames: int | None = None) -> np.ndarray:
    """Uniformly spaced frame indices.

    Args:
        total: frames in the source (> 0).
        source_fps: the source's frame rate (frames per second).
        num_frames: exact count to sample (takes precedence); must not exceed `total`.
        fps: sampling rate in frames per second (at least one frame); used when `num_frames` is None.
        max_frames: at most this many frames (with `fps`, or with neither: all frames of a shorter video).
        min_frames: with `fps`, at least this many (or every frame of a shorter video), as Qwen-VL's processors do.
    Returns: int64 array (T,), increasing.
    Raises: SparrowError when more frames are asked than the video has, or a count/rate is not positive.
    """
    if num_frames is not None:
        if num_frames <= 0:
            raise SparrowError(f"--num-frames must be positive, got {num_frames}")
        if num_frames > total:
            raise SparrowError(
                f"asked for {num_frames} frames but the video has only {total}; use --num-frames {total} or fewer"
            )
        count = num_frames
    elif fps is not None:
        if not 0 < fps < float("inf"):  # (NaN fails the comparison too)
            raise SparrowError(f"--fps must be a positive number of frames per second, got {fps}")
        count = max(1, min(total, int(round(total / source_fps * fps))))
        if max_frames is not None:
            count = max(1, min(count, max_frames))
        if min_frames is not None:
            count = max(count, min(total, min_frames))
    else:
        count = total if max_frames is None else max(1, min(total, max_frames))
    # centre of each of `count` equal segments, as uniform samplers in the field do (never the same frame twice)
    return np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64).clip(0, total - 1)


def _frame_names(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise SparrowError(f"{path}: directory holds no image files ({', '.join(IMAGE_SUFFIXES)}); give a video file")
    return names


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise SparrowError(f"{path}: not a readable image ({e})") from None


def _open(path: str):
    import av

    try:
        container = av.open(path)
    except av.error.InvalidDataError:
        raise SparrowError(f"{path}: not a video file FFmpeg can read (or corrupt); give an mp4/mkv/webm/avi") from None
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise SparrowError(f"{path}: cannot open video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise SparrowError(f"{path}: file has no video stream")
    return container


def _frame_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate and float(rate) > 0 else DEFAULT_DIR_FPS


def _count_packets(path: str) -> tuple[int, float, tuple[int, int]]:
    """(frames as the file's packets count them, frame rate, (height, width) as the header gives it): demuxed, not
    decoded, so fast; a guess that decoding checks."""
    import av

    n = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _frame_rate(stream)  # as the header gives it, before any packet is read
        size = (stream.codec_context.height, stream.codec_context.width)
        try:
            for packet in container.demux(stream):
                n += bool(packet.size)
        except av.error.FFmpegError:
            pass  # a damaged tail: the frames counted so far
    return n, fps, size


def _decode(path: str, keep) -> tuple[dict[int, np.ndarray], int, float]:
    """Decode every frame in order, converting to RGB (H, W, 3) uint8 only those whose index `keep(i)` accepts.
    Returns ({index: frame}, frames decoded, frame rate). A tail that fails to decode ends the video there, as
    players do. Raises SparrowError when no frame decodes."""
    import av

    kept, n = {}, 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _frame_rate(stream)  # as the header gives it, before decoding
        try:
            for frame in container.decode(stream):
                if keep(n):
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except av.error.FFmpegError as e:
            if not n:
                raise SparrowError(f"{path}: video is corrupt or truncated ({e})") from None
    if not n:
        raise SparrowError(f"{path}: video has zero decodable frames (corrupt, truncated or empty)")
    return kept, n, fps


def video_info(path: str) -> tuple[int, float, int, int]:
    """(frames, frame rate, height, width) of a video file or frame directory, from its header and packets (a file
    is demuxed, not decoded: fast). Raises SparrowError for a missing path or a file that is not a video."""
    if not os.path.exists(path):
        raise SparrowError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        names = _frame_names(path)
        h, w = _read_image(os.path.join(path, names[0])).shape[:2]
        return len(names), DEFAULT_DIR_FPS, h, w
    n, fps, (h, w) = _count_packets(path)
    return n, fps, h, w


def load_video(path: str, num_frames: int | None = None, fps: float | None = None,
               max_frames: int | None = None, check=None, min_frames: int | None = None) -> Video:
    """Decode a video (file or directory of frames) and sample frames uniformly. Only the sampled frames are kept
    (a file is decoded in order, each frame converted to RGB only if sampled), so memory does not grow with the
    video's length.

    Args:
        path: video file or directory of images.
        num_frames: sample exactly this many frames (uniform over the whole video).
        fps: or sample at this rate (frames per second); with neither, every frame is kept...
        max_frames: ...or at most this many, uniformly (with `fps` too: a cap on the rate's count).
        min_frames: with `fps`, at least this many frames (every frame of a shorter video).
        check: optional; called as check(frames, height, width) with the number of frames to sample and their size
            once those are known and before the frames are decoded (a target refuses there a video too long for
            its context, see `Target.video_check`): raise from it to stop.
    Returns: a `Video` with frames (T, H, W, 3) uint8.
    Raises: SparrowError for a missing path, a file that is not a video, a corrupt/truncated file with no
        decodable frame, zero frames, or more frames requested than the video has.
    """
    if not os.path.exists(path):
        raise SparrowError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        names = _frame_names(path)
        total, source_fps = len(names), DEFAULT_DIR_FPS
        idx = sample_indices(total, source_fps, num_frames, fps, max_frames, min_frames)
        frames = [_read_image(os.path.join(path, names[idx[0]]))]
        if check is not None:
            check(len(idx), *frames[0].shape[:2])
        frames += [_read_image(os.path.join(path, names[i])) for i in idx[1:].tolist()]
        if len({f.shape for f in frames}) != 1:
            raise SparrowError(f"{path}: frames have different sizes; resize them to one size first")
    else:
        # Only the sampled frames are kept, so a long video does not fill memory. The indices come from the packet
        # count; where decoding finds another number of frames (a damaged tail, a codec that packs frames), they are
        # taken again from the frames that decoded, as if every frame had been kept.
        guess, guess_fps, size = _count_packets(path)
        try:
            first = set(sample_indices(guess, guess_fps, num_frames, fps, max_frames, min_frames).tolist()) \
                if guess else None
        except SparrowError:
            first = None  # e.g. more frames asked than packets counted: keep every frame, decide after decoding
        if check is not None and first and min(size) > 0:
            check(len(first), *size)
        kept, total, source_fps = _decode(path, lambda i: first is None or i in first)
        idx = sample_indices(total, source_fps, num_frames, fps, max_frames, min_frames)
        wanted = set(idx.tolist())
        if not wanted <= kept.keys():
            kept, _, _ = _decode(path, wanted.__contains__)
        frames = [kept[i] for i in idx.tolist()]
    duration = total / source_fps
    return Video(frames=np.stack(frames), fps=len(idx) / duration, indices=idx, total_frames=total)


def write_video(path: str, frames: np.ndarray, fps: float = 8.0, codec: str = "libx264", crf: int = 23) -> None:
    """Write uint8 frames (T, H, W, 3) RGB to a video file with PyAV (H.264 mp4 by default).

    H and W are rounded down to even numbers (yuv420p needs them). Raises SparrowError for an empty clip.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise SparrowError(f"write_video needs frames of shape (T>0, H, W, 3), got {frames.shape}")
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    from fractions import Fraction

    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec in ("libx264", "libx265"):
            stream.options = {"crf": str(crf)}
        if codec == "libx265":  # x265's own thread pool: its lookahead once hung a test run (24 frames) for minutes
            stream.options |= {"x265-params": "pools=none:log-level=error"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
