"""Write the example clips shipped in `sparrow/assets/clips` (mp4 + ground truth JSON), from fixed seeds.

    python -m sparrow.synthetic.examples [--out src/sparrow/assets/clips] [--target DIR]

Each clip's reference description is written in the wording its target was trained on (`text.target_wording`;
default: the embedded target).
"""

from __future__ import annotations

import argparse
import json
import os

from ..video import write_video
from .text import describe, target_wording
from .world import make_clip

EXAMPLES = [  # (seed, frames, height, width, fps)
    (101, 16, 224, 224, 4.0),
    (102, 24, 224, 224, 4.0),
    (103, 32, 168, 224, 8.0),
    (104, 48, 224, 224, 4.0),
    (105, 96, 224, 224, 8.0),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "clips"))
    ap.add_argument("--target", default=None, help="the target whose description wording the references use "
                    "(default: the embedded target)")
    a = ap.parse_args(argv)
    if a.target is None:
        from ..defaults import target_path

        a.target = target_path()
    wording = target_wording(a.target)
    os.makedirs(a.out, exist_ok=True)
    for i, (seed, n, h, w, fps) in enumerate(EXAMPLES):
        clip = make_clip(seed, n, h, w, fps=fps)
        name = os.path.join(a.out, f"clip{i}")
        write_video(name + ".mp4", clip.frames, fps=fps, crf=20)
        truth = {k: v for k, v in clip.truth.items()}
        truth["objects"] = [{k: v for k, v in o.items() if k != "track"} for o in truth["objects"]]
        truth["reference_description"] = describe(clip.truth, seed, **wording)
        with open(name + ".json", "w") as f:
            json.dump(truth, f, indent=1)
        print(name + ".mp4", f"{n} frames {h}x{w} @ {fps} fps:", truth["reference_description"])


if __name__ == "__main__":
    main()
