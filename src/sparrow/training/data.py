"""Training data: JSONL in the style of LLaVA-Video-178K, one sample per line.

    {"id": "clip0", "video": "videos/clip0.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nDescribe the video."}, {"from": "gpt", "value": "..."}]}

Video paths are relative to the JSONL file. A bad line (not JSON, missing fields, missing or unreadable video)
is reported with its line number and skipped, or fails the run (`strict=True`); never dropped silently.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from ..errors import SparrowError


@dataclass
class Sample:
    """One training conversation: its id, absolute video path (or None), the user prompt and the answer."""

    id: str
    video: str | None
    prompt: str
    answer: str
    line: int


def parse_line(text: str, lineno: int, base: str) -> Sample:
    """Parse one JSONL line. Raises SparrowError naming the line and the problem."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SparrowError(f"line {lineno}: not valid JSON ({e.msg})") from None
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list) or len(conv) < 2:
        raise SparrowError(f"line {lineno}: needs 'conversations' with a human turn and a gpt turn")
    human = next((c for c in conv if c.get("from") == "human"), None)
    gpt = next((c for c in conv if c.get("from") == "gpt"), None)
    if human is None or gpt is None or not isinstance(human.get("value"), str) or not isinstance(gpt.get("value"), str):
        raise SparrowError(f"line {lineno}: needs a 'human' and a 'gpt' turn with string values")
    video = obj.get("video")
    if video is not None:
        video = video if os.path.isabs(video) else os.path.join(base, video)
        if not os.path.exists(video):
            raise SparrowError(f"line {lineno}: video {video} does not exist")
    prompt = human["value"].replace("<video>\n", "").replace("<video>", "").strip()
    return Sample(id=str(obj.get("id", lineno)), video=video, prompt=prompt, answer=gpt["value"], line=lineno)


def read_jsonl(path: str, strict: bool = False, log=None) -> list[Sample]:
    """Read every valid sample of a JSONL file; bad lines are reported (or raise with strict=True).
    Raises SparrowError for a missing file or a file with no valid sample."""
    if not os.path.isfile(path):
        raise SparrowError(f"{path}: no such data file")
    base = os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                samples.append(parse_line(text, lineno, base))
            except SparrowError as e:
                if strict:
                    raise SparrowError(f"{path}: {e}") from None
                print(f"sparrow: skipping {path} {e}", file=log or sys.stderr)
    if not samples:
        raise SparrowError(f"{path}: no valid sample")
    return samples


def write_sample(f, sample_id: str, video: str | None, prompt: str, answer: str) -> None:
    """Append one conversation to the open JSONL file `f` in the LLaVA-Video layout that `read_jsonl` reads."""
    obj = {"id": sample_id, **({"video": video} if video else {}),
           "conversations": [{"from": "human", "value": ("<video>\n" if video else "") + prompt},
                             {"from": "gpt", "value": answer}]}
    f.write(json.dumps(obj) + "\n")
