"""Write the example clips shipped in `sparrow/assets/clips` (mp4 + ground truth JSON), from fixed seeds.

    python -m embedded examples [--out src/sparrow/assets/clips]

Each clip's truth holds its reference description (`describe`), which `sparrow demo` prints beside the answer.
"""

from __future__ import annotations

import argparse
import json
import os

from sparrow.synthetic.text import describe
from sparrow.synthetic.world import make_clip
from sparrow.video import write_video

EXAMPLES = [  # (seed, frames, height, width, fps)
    (101, 16, 224, 224, 4.0),
    (102, 24, 224, 224, 4.0),
    (103, 32, 168, 224, 8.0),
    (104, 48, 224, 224, 4.0),
    (105, 96, 224, 224, 8.0),
]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m embedded examples", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("src", "sparrow", "assets", "clips"),
                    help="where to write clipN.mp4 and clipN.json (default %(default)s)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    for i, (seed, n, h, w, fps) in enumerate(EXAMPLES):
        clip = make_clip(seed, n, h, w, fps=fps)
        name = os.path.join(a.out, f"clip{i}")
        write_video(name + ".mp4", clip.frames, fps=fps, crf=20)
        truth = {k: v for k, v in clip.truth.items()}
        truth["objects"] = [{k: v for k, v in o.items() if k != "track"} for o in truth["objects"]]
        truth["reference_description"] = describe(clip.truth, seed)
        with open(name + ".json", "w") as f:
            json.dump(truth, f, indent=1)
        print(name + ".mp4", f"{n} frames {h}x{w} @ {fps} fps:", truth["reference_description"])
    return 0
