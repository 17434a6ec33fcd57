"""Write a synthetic training set as a user would bring one: mp4 clips and a JSONL in LLaVA-Video style.

    python -m sparrow.synthetic.dataset --out data/synth --clips 400 [--first-seed 2000000000]

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--first-seed", type=int, default=2_000_000_000)
    ap.add_argument("--qa-share", type=float, default=0.2)
    a = ap.parse_args(argv)
    os.makedirs(os.path.join(a.out, "videos"), exist_ok=True)
    rng = np.random.default_rng(a.first_seed)
    with open(os.path.join(a.out, "train.jsonl"), "w") as f:
        for i in tqdm(range(a.clips), desc="clips"):
            seed = a.first_seed + i
            n, h, w = SHAPES[i % len(SHAPES)]
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
