"""Offline hidden-state capture: `sparrow capture` runs the frozen target once over a dataset and stores, per
sample, only what draft training needs; `sparrow train-draft --data CAPTURE_DIR` then trains without the target's
forward pass.

    sparrow capture --target PATH --data regen.jsonl --out CAPTURE_DIR [--config draft.json] [--shard-size 32]

Layout of CAPTURE_DIR:
    manifest.json            target, data, the capture settings (mode, ivsb, visual_states, mid_layer, frames),
                             and one entry per stored sample: id, line, shard, length
    shard-00000.safetensors  tensors "<k>.<field>" for the samples of that shard

Fields per sample (L tokens, H hidden, V visual positions): ids (L,), positions (3, L), visual_mask (L,),
loss_mask (L,), top_index (k,) with top (k, H): the top states at the positions the draft reads (sparrow mode:
text positions and the position before each, i.e. text-position states; eagle: every position); mid (V, H):
layer-m visual states (sparrow mode with IVSB on mid states); embeds (V, H): the video features (eagle mode).
Text input embeddings are recomputed from the target's frozen embedding.

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
SETTINGS = ("mode", "ivsb", "visual_states", "mid_layer", "num_frames", "max_pixels")


def capture_settings(cfg, target) -> dict:
    """The parts of a TrainConfig that decide what is captured."""
    return {"mode": cfg.mode, "ivsb": cfg.ivsb, "visual_states": cfg.visual_states,
            "mid_layer": cfg.mid_layer or target.default_mid_layer(), "num_frames": cfg.num_frames,
            "max_pixels": cfg.max_pixels}


def pack(c: Captured, settings: dict) -> dict[str, torch.Tensor]:
    """The stored tensors of one captured conversation (see the module docstring)."""
    vis = c.visual_mask
    if settings["mode"] == "eagle":
        need = torch.ones_like(vis)
    else:
        text = ~vis
        need = text | torch.cat((text[1:], text.new_zeros(1)))  # text states and the state before each text entry
        if settings["ivsb"] and settings["visual_states"] == "top":
            need |= vis
    idx = need.nonzero(as_tuple=True)[0]
    out = {"ids": c.ids, "positions": c.positions, "visual_mask": vis.to(torch.uint8),
           "loss_mask": c.loss_mask.to(torch.uint8), "top_index": idx, "top": c.hidden_top[idx]}
    if settings["mode"] == "sparrow" and settings["ivsb"] and settings["visual_states"] == "mid":
        out["mid"] = c.hidden_mid[vis]
    if settings["mode"] == "eagle":
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
                progress: bool = True) -> dict:
    """Capture every sample into shards under `out` (resuming after the last complete shard). Returns the
    manifest. Raises SparrowError when `out` holds a capture with other settings."""
    from safetensors.torch import save_file
    from tqdm import tqdm


    os.makedirs(out, exist_ok=True)
    settings = capture_settings(cfg, target)
    mpath = os.path.join(out, MANIFEST)
    manifest = {"target": target.path, "data": os.path.abspath(data_path), "settings": settings, "samples": [],
                "done_lines": [], "complete": False}
    if os.path.isfile(mpath):
        old = json.load(open(mpath))
        if old.get("settings") != settings:
            raise SparrowError(f"{out} holds a capture with other settings ({old.get('settings')}); use another "
                               f"--out or the same config")
        manifest = old
    done = set(manifest["done_lines"])
    todo = [s for s in samples if s.line not in done]
    shard_no = 1 + max([e["shard"] for e in manifest["samples"]], default=-1)
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="capture", disable=not progress,
               dynamic_ncols=True)
    pending, entries, lines = {}, [], []
    for n, s in enumerate(todo):
        c = online_capture(target, s, cfg, settings["mid_layer"], log)  # None: reported and skipped
        lines.append(s.line)
        if c is not None:
            k = len(entries)
            for name, tensor in pack(c, settings).items():
                pending[f"{k}.{name}"] = tensor
            entries.append({"id": s.id, "line": s.line, "shard": shard_no, "key": k, "length": int(c.ids.shape[0])})
        bar.update(1)
        if len(lines) >= shard_size or n == len(todo) - 1:
            if entries:
                name = os.path.join(out, f"shard-{shard_no:05d}.safetensors")
                save_file(pending, name + ".tmp")
                os.replace(name + ".tmp", name)
                shard_no += 1
            manifest["samples"] += entries
            manifest["done_lines"] += lines
            _write_json_atomic(mpath, manifest)
            pending, entries, lines = {}, [], []
    bar.close()
    manifest["complete"] = True
    _write_json_atomic(mpath, manifest)
    return manifest


class OfflineData:
    """A capture directory as a training dataset: len() samples; get(i) -> `Captured` (loaded lazily)."""

    def __init__(self, path: str, target, cfg):
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise SparrowError(f"{path}: not a capture directory (no {MANIFEST}); make one with sparrow capture")
        self.path, self.target = path, target
        self.manifest = json.load(open(mpath))
        want = capture_settings(cfg, target)
        got = self.manifest["settings"]
        diff = [k for k in ("mode", "ivsb", "visual_states", "mid_layer") if got.get(k) != want[k]]
        if diff:
            raise SparrowError(f"{path} was captured with {', '.join(f'{k}={got.get(k)}' for k in diff)} but the "
                               f"training config has {', '.join(f'{k}={want[k]}' for k in diff)}; capture again "
                               "with the same config")
        if not self.manifest["samples"]:
            raise SparrowError(f"{path}: the capture holds no sample")
        self.entries = self.manifest["samples"]

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, i: int) -> Captured:
        from safetensors import safe_open

        e = self.entries[i]
        with safe_open(os.path.join(self.path, f"shard-{e['shard']:05d}.safetensors"), "pt") as f:
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
    ap.add_argument("--config", help="the draft's training config (JSON/YAML): mode, ivsb, visual_states, ...")
    ap.add_argument("--mode", choices=MODES, help="the draft's mode (default: the config's)")
    ap.add_argument("--ivsb", choices=["true", "false"], help="capture layer-m visual states (sparrow mode)")
    ap.add_argument("--visual-states", choices=VISUAL_STATES, help="which visual states IVSB uses")
    ap.add_argument("--mid-layer", type=int, help="the target layer m of the visual states (default: half)")
    ap.add_argument("--num-frames", type=int, help="at most this many frames per video")
    ap.add_argument("--max-pixels", type=int, help="resize frames to at most this many pixels")
    ap.add_argument("--shard-size", type=int, default=32, help="samples per shard file")
    ap.add_argument("--strict-data", action="store_true", help="fail on a bad sample instead of skipping it")
    a = ap.parse_args(argv)
    at_least(1, ("--shard-size", a.shard_size))
    cfg: TrainConfig = load_config(a.config, {
        "mode": a.mode, "ivsb": None if a.ivsb is None else a.ivsb == "true", "visual_states": a.visual_states,
        "mid_layer": a.mid_layer, "num_frames": a.num_frames, "max_pixels": a.max_pixels,
        "strict_data": a.strict_data or None})
    target = load_target(a.target)
    samples = read_jsonl(a.data, strict=cfg.strict_data)
    m = run_capture(target, samples, a.out, cfg, a.data, a.shard_size)
    print(f"captured {len(m['samples'])} of {len(samples)} samples into {a.out}")
    return 0
