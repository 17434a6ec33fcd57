"""Write a synthetic training set as a user would bring one: mp4 clips and a JSONL in LLaVA-Video style.

    python -m sparrow.synthetic.dataset --out data/synth --clips 400 [--first-seed 2000000000]
        [--long 1536:80,3072:60,8192:40,25088:20]

`--clips` short clips cycle through `SHAPES` (at most 512 visual tokens on Qwen-VL); `--long TOKENS:COUNT,...` adds
COUNT clips of about TOKENS visual tokens each (224 px frames, 32 tokens a frame on Qwen-VL), after them.

Answers are the reference descriptions (or QA answers); `sparrow regenerate` then replaces them with the target's
own output for draft training.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from tqdm import tqdm

from ..training.data import write_sample
from ..video import write_video
from .text import DESCRIBE_PROMPTS, describe, questions
from .world import make_clip

SHAPES = [(16, 224, 224), (8, 224, 224), (24, 168, 168), (32, 112, 112)]
LONG_SIDE = 224  # long clips' frame side: 32 visual tokens a frame (Qwen-VL merges 2 frames x 2 x 2 patches of 14 px)


def parse_long(spec: str) -> list[tuple[int, int]]:
    """"1536:80,25088:20" -> [(frames, count), ...]: an even frame count of about TOKENS visual tokens at 224 px.
    Raises ValueError naming the bad item."""
    out = []
    for item in filter(None, spec.split(",")):
        try:
            tokens, count = (int(x) for x in item.split(":"))
            assert tokens >= 64 and count >= 0
        except (ValueError, AssertionError):
            raise ValueError(f"--long: {item!r}: give TOKENS:COUNT with TOKENS >= 64, e.g. 25088:20") from None
        out.append((2 * max(1, round(tokens / 64)), count))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--first-seed", type=int, default=2_000_000_000)
    ap.add_argument("--qa-share", type=float, default=0.2)
    ap.add_argument("--long", default="", help="TOKENS:COUNT,... long clips added after the short ones")
    a = ap.parse_args(argv)
    try:
        long = parse_long(a.long)
    except ValueError as e:
        ap.error(str(e))
    shapes = [SHAPES[i % len(SHAPES)] for i in range(a.clips)]
    shapes += [(n, LONG_SIDE, LONG_SIDE) for n, count in long for _ in range(count)]
    os.makedirs(os.path.join(a.out, "videos"), exist_ok=True)
    rng = np.random.default_rng(a.first_seed)
    with open(os.path.join(a.out, "train.jsonl"), "w") as f:
        for i, (n, h, w) in enumerate(tqdm(shapes, desc="clips")):
            seed = a.first_seed + i
            clip = make_clip(seed, n, h, w, fps=4.0)
            rel = f"videos/{i:05d}.mp4"
            write_video(os.path.join(a.out, rel), clip.frames, fps=4.0, crf=18)
            if rng.random() < a.qa_share:
                qa = questions(clip.truth, seed)
                prompt, answer = qa[int(rng.integers(len(qa)))]
            else:
                prompt, answer = str(rng.choice(DESCRIBE_PROMPTS)), describe(clip.truth, seed)
            write_sample(f, f"synth{i:05d}", rel, prompt, answer)


if __name__ == "__main__":
    main()
