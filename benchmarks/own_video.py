"""`sparrow generate` with default settings on ordinary videos, as a new user would run it: speculative decoding
(sparrow) against plain decoding, side by side on each video.

    python benchmarks/own_video.py [--out benchmarks/results/own_video] [--videos DIR] [--max-new-tokens 128]

The videos are made here from FFmpeg's test sources (read through PyAV's lavfi input; no ffmpeg binary needed) and
encoded with different codecs, containers, sizes, frame rates and lengths (5 s to 2 min): nothing from the
synthetic world the embedded target was trained on. Each video is sampled by the checkpoint's defaults (the same
`Target.sample_video` the CLI calls), then each method runs once untimed and `--repeats` times timed, interleaved,
in alternating order from video to video. Per video: what was sampled, tau, DSR (plain decoding's decode time
over sparrow's, summed over the repeats; the same tokens), ESR (of the last repeat), the trees the policy chose
(last repeat), and whether the outputs are identical (greedy: they must be).
Writes OUT.json, OUT.md (a table) and OUT.png (DSR per video).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

# (name, lavfi source, seconds, frame rate, width, height, codec, container)
VIDEOS = [
    ("testsrc_h264_12s", "testsrc", 12, 25, 320, 240, "libx264", "mp4"),
    ("mandelbrot_vp9_20s", "mandelbrot", 20, 30, 640, 360, "libvpx-vp9", "webm"),
    ("smptebars_mpeg4_5s", "smptebars", 5, 24, 1280, 720, "mpeg4", "avi"),
    ("life_h264_40s", "life=mold=10:ratio=0.4", 40, 15, 320, 320, "libx264", "mkv"),
    ("cellauto_h265_30s", "cellauto", 30, 50, 640, 480, "libx265", "mp4"),
    ("testsrc2_h264_90s", "testsrc2", 90, 30, 480, 270, "libx264", "mp4"),
    ("rgbtestsrc_h264_120s", "rgbtestsrc", 120, 30, 960, 540, "libx264", "mp4"),
    ("mandelbrot_mpeg4_60s", "mandelbrot", 60, 12, 400, 300, "mpeg4", "mkv"),
]


def make_video(path: str, source: str, seconds: int, rate: int, width: int, height: int, codec: str) -> None:
    """Render an FFmpeg test source through PyAV and encode it (written atomically)."""
    import av

    name, _, opts = source.partition("=")
    spec = f"{name}=size={width}x{height}:rate={rate}" + (f":{opts}" if opts else "")
    if name in ("testsrc", "testsrc2", "smptebars", "rgbtestsrc"):
        spec += f":duration={seconds}"
    tmp = path + ".part" + os.path.splitext(path)[1]
    with av.open(spec, format="lavfi") as src, av.open(tmp, "w") as dst:
        out = dst.add_stream(codec, rate=rate)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        if codec in ("libx264", "libx265"):
            out.options = {"preset": "veryfast", "crf": "23"}
        if codec == "libx265":
            out.options |= {"x265-params": "pools=none:log-level=error"}
        if codec == "libvpx-vp9":
            out.options = {"deadline": "realtime", "cpu-used": "8", "b": "1M"}
        for i, frame in enumerate(src.decode(video=0)):
            if i >= seconds * rate:
                break
            frame = frame.reformat(width=width, height=height, format="yuv420p")
            frame.pts = None
            for packet in out.encode(frame):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/own_video", help="OUT.json, OUT.md and OUT.png")
    ap.add_argument("--videos", default="runs/own_videos", help="where the test videos are made (kept for reruns)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--target", default=None, help="checkpoint (default: the embedded target)")
    ap.add_argument("--draft", default=None, help="draft (default: the embedded target's sparrow draft)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each method per video")
    ap.add_argument("--only", default="", help="comma-separated names: run only these videos")
    a = ap.parse_args(argv)

    import sparrow
    from sparrow.timing import speedup

    os.makedirs(a.videos, exist_ok=True)
    target = sparrow.load_target(a.target)
    draft = sparrow.load_draft(a.draft, target)
    rows = []
    for i, (name, source, seconds, rate, width, height, codec, container) in enumerate(VIDEOS):
        if a.only and name not in a.only.split(","):
            continue
        path = os.path.join(a.videos, f"{name}.{container}")
        if not os.path.exists(path):
            print(f"making {path}", file=sys.stderr, flush=True)
            make_video(path, source, seconds, rate, width, height, codec)
        video = target.sample_video(path)
        inputs = target.prepare(video, "Describe the video.")
        runs = {}
        order = [("sparrow", draft), ("ar", None)][:: 1 if i % 2 == 0 else -1]
        for method, d in order:
            sparrow.generate(target, d, inputs, max_new_tokens=a.max_new_tokens)  # untimed: first-run costs
        decode = {"sparrow": 0.0, "ar": 0.0}
        for _ in range(a.repeats):  # timed, interleaved; the decode seconds add up over the repeats
            for method, d in order:
                runs[method] = sparrow.generate(target, d, inputs, max_new_tokens=a.max_new_tokens)
                decode[method] += runs[method].stats.decode_s
        sp, ar = runs["sparrow"], runs["ar"]
        x = speedup(sp.stats, ar.stats)
        x["dsr"] = decode["ar"] / decode["sparrow"]  # the same tokens (greedy): the ratio of decode times
        rows.append({"video": name, "codec": codec, "container": container, "seconds": seconds, "fps": rate,
                     "size": f"{width}x{height}", "frames": int(video.frames.shape[0]),
                     "sampled_fps": round(video.fps, 3), "visual_tokens": sp.stats.visual_tokens,
                     "new_tokens": sp.stats.new_tokens, "tau": round(sp.stats.tau, 3), "dsr": round(x["dsr"], 3),
                     "esr": round(x["esr"], 3), "plain_steps": sp.stats.plain_steps,
                     "trees": sp.stats.policy.get("choices", {}), "identical": sp.token_ids == ar.token_ids,
                     "ar_tokens_per_s": round(ar.stats.tokens_per_s, 2),
                     "sparrow_tokens_per_s": round(sp.stats.tokens_per_s, 2), "text": sp.text})
        r = rows[-1]
        print(f"{name}: {r['frames']} frames, {r['visual_tokens']} visual tokens, tau {r['tau']:.2f}, "
              f"DSR {r['dsr']:.2f}x, identical {r['identical']}", file=sys.stderr, flush=True)
    dsr = [r["dsr"] for r in rows]
    summary = {"videos": len(rows), "min_dsr": min(dsr), "median_dsr": statistics.median(dsr),
               "all_identical": all(r["identical"] for r in rows), "target": target.path,
               "threads": __import__("torch").get_num_threads()}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    lines = ["| video | frames sampled | visual tokens | tau | DSR | ESR | plain steps | identical |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['video']} ({r['size']}, {r['fps']} fps) | {r['frames']} at {r['sampled_fps']:g} fps | "
              f"{r['visual_tokens']} | {r['tau']:.2f} | {r['dsr']:.2f}x | {r['esr']:.2f}x | {r['plain_steps']} | "
              f"{'yes' if r['identical'] else 'NO'} |" for r in rows]
    lines.append(f"\nmedian DSR {summary['median_dsr']:.2f}x, lowest {summary['min_dsr']:.2f}x")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(range(len(rows)), dsr, color=["tab:green" if v >= 1 else "tab:red" for v in dsr])
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xticks(range(len(rows)), [r["video"].rsplit("_", 1)[0] for r in rows], rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel("DSR (x plain decoding)")
        ax.set_title("sparrow generate, default settings, on ordinary videos")
        fig.tight_layout()
        fig.savefig(a.out + ".png", dpi=110)
    except ImportError:
        pass
    print("\n".join(lines))
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
