"""Offline hidden-state capture: `sparrow capture` runs the frozen target once over a dataset and stores, per
sample, only what draft training needs; `sparrow train-draft --data CAPTURE_DIR` then trains without the target's
forward pass.

    sparrow capture --target PATH --data regen.jsonl --out CAPTURE_DIR [--config draft.json ...] [--shard-size 32]
    sparrow capture --target PATH --data train.jsonl --out CAPTURE_DIR --answers regen.jsonl [--max-new-tokens N]

One capture serves every config given (`--config` repeated: the shipped four drafts train from one capture). With
`--answers`, the target answers each prompt greedily while it is captured (regenerate and capture in one pass: one
prefill a sample instead of two, which is nearly all of the cost on long videos) and the answers go to that JSONL.
`--part i/n` captures samples i, i + n, ... into the same directory (n processes side by side, each with its own
manifest and shard files; give each its own --answers file); training reads every part.

Layout of CAPTURE_DIR:
    manifest.json            target, data, the capture settings (what is stored, mid_layer, frames, answers),
                             and one entry per stored sample: id, line, shard, length (with --part i/n:
                             manifest-iofn.json and shard-iofn-00000.safetensors)
    shard-00000.safetensors  tensors "<k>.<field>" for the samples of that shard

Fields per sample (L tokens, H hidden, V visual positions): ids (L,), positions (3, L), visual_mask (L,),
loss_mask (L,), top_index (k,) with top (k, H): the top states at the positions the drafts read (settings "top":
"text" = text positions and the position before each, for sparrow-mode drafts; "all" = every position, for eagle
mode or IVSB on top states); mid (V, H): layer-m visual states (IVSB on mid states); embeds (V, H): the video
features (eagle mode). Text input embeddings are recomputed from the target's frozen embedding.

Shards are written to a temporary name and renamed, then the manifest is rewritten the same way, so an
interrupted capture loses at most the shard in progress and `sparrow capture` run again continues after the
last complete shard. Bad samples (missing or corrupt video) are reported with their line and skipped.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ..cli import Help
from ..draft import MODES
from ..errors import SparrowError, at_least
from .config import TrainConfig, load_config, online_capture
from .losses import VISUAL_STATES, Captured

MANIFEST = "manifest.json"


def _names(part: tuple[int, int]) -> tuple[str, str]:
    """(manifest file, shard file prefix) of capture part (i, n); (0, 1) is the whole capture."""
    tag = "" if part[1] == 1 else f"-{part[0]}of{part[1]}"
    return f"manifest{tag}.json", f"shard{tag}-"


def needs(cfg) -> dict:
    """What training with `cfg` reads from a capture: {"top": "text" | "all", "mid": bool, "embeds": bool}."""
    eagle = cfg.mode == "eagle"
    return {"top": "all" if eagle or (cfg.ivsb and cfg.visual_states == "top") else "text",
            "mid": not eagle and cfg.ivsb and cfg.visual_states == "mid", "embeds": eagle}


def capture_settings(cfgs, target, max_new_tokens: int | None = None) -> dict:
    """What a capture for every config of `cfgs` stores (the union of their `needs`), the middle layer, how videos
    are sampled (the first config's num_frames and max_pixels) and, with `max_new_tokens`, that the answers are
    the target's own greedy ones of at most that many tokens. Raises SparrowError for configs that disagree on the
    middle layer."""
    mids = {c.mid_layer or target.default_mid_layer() for c in cfgs if needs(c)["mid"]}
    if len(mids) > 1:
        raise SparrowError(f"the configs read the visual states of different layers {sorted(mids)}; capture each "
                           "middle layer separately")
    n = [needs(c) for c in cfgs]
    return {"top": "all" if any(x["top"] == "all" for x in n) else "text", "mid": any(x["mid"] for x in n),
            "embeds": any(x["embeds"] for x in n),
            "mid_layer": mids.pop() if mids else cfgs[0].mid_layer or target.default_mid_layer(),
            "num_frames": cfgs[0].num_frames, "max_pixels": cfgs[0].max_pixels, "answers": max_new_tokens}


def pack(c: Captured, settings: dict) -> dict[str, torch.Tensor]:
    """The stored tensors of one captured conversation (see the module docstring)."""
    vis = c.visual_mask
    if settings["top"] == "all":
        need = torch.ones_like(vis)
    else:
        text = ~vis
        need = text | torch.cat((text[1:], text.new_zeros(1)))  # text states and the state before each text entry
    idx = need.nonzero(as_tuple=True)[0]
    out = {"ids": c.ids, "positions": c.positions, "visual_mask": vis.to(torch.uint8),
           "loss_mask": c.loss_mask.to(torch.uint8), "top_index": idx, "top": c.hidden_top[idx]}
    if settings["mid"]:
        out["mid"] = c.hidden_mid[vis]
    if settings["embeds"]:
        out["embeds"] = c.input_embeds[vis]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def unpack(t: dict[str, torch.Tensor], target) -> Captured:
    """A `Captured` rebuilt from stored tensors; states that were not stored are zeros (never read in the
    capture's mode)."""
    ids, vis = t["ids"], t["visual_mask"].bool()
    L, H = ids.shape[0], t["top"].shape[1]
    top = t["top"].new_zeros(L, H)
    top[t["top_index"]] = t["top"]
    mid = None
    if "mid" in t:
        mid = t["mid"].new_zeros(L, H)
        mid[vis] = t["mid"]
    with torch.no_grad():
        embeds = target.embed_tokens(ids.to(target.device)).to(t["top"].dtype).cpu()
    if "embeds" in t:
        embeds[vis] = t["embeds"]
    dev = target.device
    return Captured(ids=ids.to(dev), hidden_top=top.to(dev), hidden_mid=None if mid is None else mid.to(dev),
                    input_embeds=embeds.to(dev), positions=t["positions"].to(dev), visual_mask=vis.to(dev),
                    loss_mask=t["loss_mask"].bool().to(dev))


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run_capture(target, samples, out: str, cfg, data_path: str, shard_size: int = 32, log=None,
                progress: bool = True, answers: str | None = None, max_new_tokens: int = 256,
                part: tuple[int, int] = (0, 1)) -> dict:
    """Capture every sample into shards under `out` (resuming after the last complete shard) for `cfg`, a
    `TrainConfig` or a list of them (one capture holds what each needs). With `answers` (a JSONL path) the target
    answers greedily, up to `max_new_tokens`, as it is captured (`capture_greedy`), and each answer is appended
    there as `sparrow regenerate` writes it (after its shard is stored: a resumed run writes every id once).
    part (i, n): only samples i, i + n, ... (n processes side by side, each its own manifest and shards).
    Returns the manifest. Raises SparrowError when `out` holds a capture with other settings."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .data import write_sample

    cfgs = cfg if isinstance(cfg, (list, tuple)) else [cfg]
    os.makedirs(out, exist_ok=True)
    settings = capture_settings(cfgs, target, max_new_tokens if answers else None)
    samples = samples[part[0]::part[1]]
    mname, prefix = _names(part)
    mpath = os.path.join(out, mname)
    manifest = {"target": target.path, "data": os.path.abspath(data_path), "settings": settings, "samples": [],
                "done_lines": [], "complete": False, **({"answers": os.path.abspath(answers)} if answers else {})}
    if os.path.isfile(mpath):
        old = json.load(open(mpath))
        if old.get("settings") != settings:
            raise SparrowError(f"{out} holds a capture with other settings ({old.get('settings')}); use another "
                               f"--out or the same configs and flags")
        manifest = old
    written = set()
    if answers:
        os.makedirs(os.path.dirname(os.path.abspath(answers)), exist_ok=True)
        if os.path.isfile(answers):
            written = {json.loads(line)["id"] for line in open(answers) if line.strip()}
    done = set(manifest["done_lines"])
    todo = [s for s in samples if s.line not in done]
    shard_no = 1 + max([e["shard"] for e in manifest["samples"]], default=-1)
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="capture", disable=not progress,
               dynamic_ncols=True)
    pending, entries, lines, texts = {}, [], [], []
    for n, s in enumerate(todo):
        # None: reported and skipped
        c = online_capture(target, s, cfgs[0], settings["mid_layer"], log, max_new_tokens if answers else None)
        lines.append(s.line)
        if c is not None:
            k = len(entries)
            for name, tensor in pack(c, settings).items():
                pending[f"{k}.{name}"] = tensor
            entries.append({"id": s.id, "line": s.line, "shard": shard_no, "key": k, "length": int(c.ids.shape[0]),
                            "file": f"{prefix}{shard_no:05d}.safetensors"})
            if answers:
                first = int(c.loss_mask.nonzero()[0]) + 1  # the answer's first token
                texts.append((s, target.tokenizer.decode(c.ids[first:].tolist(), skip_special_tokens=True)))
        bar.update(1)
        if len(lines) >= shard_size or n == len(todo) - 1:
            if entries:
                name = os.path.join(out, f"{prefix}{shard_no:05d}.safetensors")
                save_file(pending, name + ".tmp")
                os.replace(name + ".tmp", name)
                shard_no += 1
            if texts:
                base = os.path.dirname(os.path.abspath(answers))
                with open(answers, "a") as f:
                    for smp, text in texts:
                        if smp.id not in written:
                            rel = os.path.relpath(smp.video, base) if smp.video else None
                            write_sample(f, smp.id, rel, smp.prompt, text)
                            written.add(smp.id)
            manifest["samples"] += entries
            manifest["done_lines"] += lines
            _write_json_atomic(mpath, manifest)
            pending, entries, lines, texts = {}, [], [], []
    bar.close()
    manifest["complete"] = True
    _write_json_atomic(mpath, manifest)
    return manifest


class OfflineData:
    """A capture directory as a training dataset: len() samples; get(i) -> `Captured` (loaded lazily)."""

    def __init__(self, path: str, target, cfg):
        names = sorted(f for f in os.listdir(path) if f.startswith("manifest") and f.endswith(".json")) \
            if os.path.isdir(path) else []
        if not names:
            raise SparrowError(f"{path}: not a capture directory (no {MANIFEST}); make one with sparrow capture")
        self.path, self.target = path, target
        parts = [json.load(open(os.path.join(path, n))) for n in names]
        if any(p["settings"] != parts[0]["settings"] for p in parts):
            raise SparrowError(f"{path}: its parts were captured with different settings; capture them again alike")
        self.manifest = {**parts[0], "samples": [e for p in parts for e in p["samples"]]}
        got, want = self.manifest["settings"], needs(cfg)
        mid = cfg.mid_layer or target.default_mid_layer()
        missing = [what for what, lacking in (
            ("the top states at every position", want["top"] == "all" and got.get("top") != "all"),
            ("the layer-m visual states", want["mid"] and not got.get("mid")),
            (f"the visual states of layer {mid} (it holds layer {got.get('mid_layer')})",
             want["mid"] and got.get("mid") and got.get("mid_layer") != mid),
            ("the video features", want["embeds"] and not got.get("embeds"))) if lacking]
        if missing:
            raise SparrowError(f"{path} lacks {' and '.join(missing)}, which mode={cfg.mode} ivsb={cfg.ivsb} "
                               f"visual_states={cfg.visual_states} trains on; capture again with this config "
                               "(sparrow capture --config ..., repeated for several drafts)")
        if not self.manifest["samples"]:
            raise SparrowError(f"{path}: the capture holds no sample")
        self.entries = self.manifest["samples"]

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, i: int) -> Captured:
        from safetensors import safe_open

        e = self.entries[i]
        with safe_open(os.path.join(self.path, e["file"]), "pt") as f:
            prefix = f"{e['key']}."
            t = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        return unpack(t, self.target)


def main(argv=None) -> int:
    from .. import load_target
    from .data import read_jsonl

    ap = argparse.ArgumentParser(formatter_class=Help, prog="sparrow capture",
                                 description="Capture the target's hidden states for "
                                 "offline draft training (resumable safetensors shards with a manifest).")
    ap.add_argument("--target", help="target checkpoint (default: the embedded one)")
    ap.add_argument("--data", required=True, help="JSONL (LLaVA-Video style), answers from `sparrow regenerate`")
    ap.add_argument("--out", required=True, help="capture directory")
    ap.add_argument("--config", action="append", help="a draft's training config (JSON/YAML): mode, ivsb, "
                    "visual_states, ...; repeat it to capture for several drafts at once")
    ap.add_argument("--mode", choices=MODES, help="the draft's mode (default: the config's)")
    ap.add_argument("--ivsb", choices=["true", "false"], help="capture layer-m visual states (sparrow mode)")
    ap.add_argument("--visual-states", choices=VISUAL_STATES, help="which visual states IVSB uses")
    ap.add_argument("--mid-layer", type=int, help="the target layer m of the visual states (default: half)")
    ap.add_argument("--num-frames", type=int, help="at most this many frames per video")
    ap.add_argument("--max-pixels", type=int, help="resize frames to at most this many pixels")
    ap.add_argument("--shard-size", type=int, default=32, help="samples per shard file")
    ap.add_argument("--answers", help="JSONL to write the target's own greedy answers to, decoded while capturing "
                    "(regenerate and capture in one pass; --data's answers are ignored)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="longest answer with --answers, in tokens")
    ap.add_argument("--part", default="0/1", help="i/n: capture samples i, i+n, ... (n processes side by side into "
                    "one directory)")
    ap.add_argument("--strict-data", action="store_true", help="fail on a bad sample instead of skipping it")
    a = ap.parse_args(argv)
    try:
        part = tuple(int(x) for x in a.part.split("/"))
        assert len(part) == 2 and 0 <= part[0] < part[1]
    except (ValueError, AssertionError):
        raise SparrowError(f"--part must look like i/n with 0 <= i < n, got {a.part!r}") from None
    at_least(1, ("--shard-size", a.shard_size), ("--max-new-tokens", a.max_new_tokens))
    flags = {"mode": a.mode, "ivsb": None if a.ivsb is None else a.ivsb == "true", "visual_states": a.visual_states,
             "mid_layer": a.mid_layer, "num_frames": a.num_frames, "max_pixels": a.max_pixels,
             "strict_data": a.strict_data or None}
    cfgs: list[TrainConfig] = [load_config(path, flags) for path in (a.config or [None])]
    target = load_target(a.target)
    samples = read_jsonl(a.data, strict=cfgs[0].strict_data)
    m = run_capture(target, samples, a.out, cfgs, a.data, a.shard_size, answers=a.answers,
                    max_new_tokens=a.max_new_tokens, part=part)
    print(f"captured {len(m['samples'])} of {len(samples[part[0]::part[1]])} samples into {a.out}")
    return 0
