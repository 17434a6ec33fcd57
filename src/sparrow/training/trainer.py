"""`sparrow train-draft`: train a Sparrow (or EAGLE-baseline) draft for a target, on one process or many.

    sparrow train-draft --target PATH --data regen.jsonl --out DRAFT_DIR [--config cfg.json|yaml] [--resume]
    torchrun --nproc-per-node 2 -m sparrow.training.trainer --target ... (N processes: gloo on CPU, nccl on GPU;
        several machines: torchrun --nnodes M --node-rank R --master-addr HOST --nproc-per-node N ...)

Hidden states are captured online (the frozen target runs in every process), or read from a capture directory
made by `sparrow capture` (--data CAPTURE_DIR; see `sparrow.training.offline`). Each optimiser step takes a global
batch of `batch` conversations, split across processes; gradients are summed across processes (all-reduce), so
N processes follow the single-process run. Data order is a seeded permutation per epoch; the step counter
fixes the position in it, so `--resume` continues exactly (draft, optimiser, step). Checkpoints every
`save_every` steps and on SIGINT/SIGTERM, written atomically. Metrics: JSONL (loss and top-1 agreement per MTP
stage), and a progress bar.

Evaluation: every `eval_every` steps (and after the last) rank 0 measures, on `eval_samples` held-out samples
(the last ones of --data, not trained on, or --eval-data), the per-stage top-1 agreement and the mean accepted
length tau of real greedy speculative decoding in the draft's mode; both go to metrics.jsonl and the draft's
config (`training.eval`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

from ..cli import Help
from ..errors import SparrowError
from .config import TrainConfig, load_config, online_capture
from .data import read_jsonl
from .losses import capture, draft_loss


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimiser step `step`: linear warm-up over cfg.warmup steps, then cosine to 0.1 x cfg.lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def batch_indices(step: int, cfg: TrainConfig, n: int, rank: int, world: int) -> list[int]:
    """The dataset indices this process handles at optimiser step `step` (seeded permutation per epoch)."""
    out = []
    for j in range(step * cfg.batch, (step + 1) * cfg.batch):
        epoch, pos = divmod(j, n)
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out[rank::world]


def save_checkpoint(out: str, draft, opt, step: int, cfg: TrainConfig, metrics: dict | None = None) -> None:
    """Atomic: ckpt.tmp/ is written completely, then renamed to ckpt/; the draft itself is saved to `out`."""
    tmp, final = os.path.join(out, "ckpt.tmp"), os.path.join(out, "ckpt")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"draft": draft.state_dict(), "opt": opt.state_dict(), "step": step, "config": asdict(cfg)},
               os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ev = {k: v for k, v in (metrics or {}).items() if k.startswith("eval_")}
    draft.config.training = {**asdict(cfg), "step": step, **({"eval": ev} if ev else {})}
    draft.save(out)


def evaluate(draft, target, eval_set, cfg: TrainConfig, mid: int) -> dict:
    """Held-out per-stage top-1 agreement (teacher-forced, the training objective's metric) and mean tau of
    greedy speculative decoding with the draft in its mode. eval_set: JSONL samples with videos."""
    from .. import generate
    from ..video import load_video

    was_training = draft.training
    draft.eval()
    taus, sums = [], [[0.0, 0] for _ in range(cfg.mtp_stages)]
    with torch.no_grad():
        for s in eval_set:
            try:
                video = load_video(s.video, max_frames=cfg.num_frames) if s.video else None
            except SparrowError:
                continue
            inputs = target.prepare(video, s.prompt, max_pixels=cfg.max_pixels)
            _, st = draft_loss(draft, target, capture(target, inputs, s.answer, mid), cfg.loss())
            for k, x in enumerate(st):
                sums[k][0] += x["acc"] * x["n"]
                sums[k][1] += x["n"]
            out = generate(target, draft, inputs, max_new_tokens=cfg.eval_max_new_tokens, method=cfg.mode)
            taus.append(out.stats.tau)
    draft.train(was_training)
    ev = {"eval_tau": sum(taus) / max(1, len(taus)), "eval_samples": len(taus)}
    for k, (a, n) in enumerate(sums):
        ev[f"eval_acc{k + 1}"] = a / max(1, n)
    return ev


def split_eval(samples, cfg: TrainConfig):
    """(train, eval_set): --eval-data when given, else the last `eval_samples` JSONL samples, held out.
    For a capture directory, the held-out samples come from its source JSONL (and are dropped from training)."""
    if cfg.eval_samples <= 0:
        return samples, []
    if cfg.eval_data:
        return samples, read_jsonl(cfg.eval_data)[: cfg.eval_samples]
    if hasattr(samples, "get"):  # offline capture: its answers (made while capturing) or its source JSONL
        src = samples.manifest.get("answers") or samples.manifest.get("data")
        if not src or not os.path.isfile(src):
            print(f"sparrow: no held-out evaluation ({src} is gone); pass --eval-data JSONL", file=sys.stderr)
            return samples, []
        rows = read_jsonl(src)
        if len(rows) < 2 * cfg.eval_samples:
            return samples, []
        held = rows[-cfg.eval_samples:]
        ids = {s.id for s in held}
        samples.entries = [e for e in samples.entries if e["id"] not in ids]
        return samples, held
    if len(samples) < 2 * cfg.eval_samples:
        return samples, []
    return samples[: -cfg.eval_samples], samples[-cfg.eval_samples:]


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True):
    """Within the block, SIGINT (Ctrl-C) and SIGTERM do not end the process: they set stop["now"] and
    stop["signal"] (its number) of the yielded dict, for a training loop to checkpoint and stop at the end of its
    step. The previous handlers come back when the block ends. With `enabled=False` (a process other than rank
    0), or outside the main thread (where Python cannot set handlers), it yields the dict and changes nothing."""
    stop = {"now": False, "signal": 0}
    kept = {}
    if enabled and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            kept[s] = signal.signal(s, lambda signum, _: stop.update(now=True, signal=signum))
    try:
        yield stop
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)


def train(target, samples, out: str, cfg: TrainConfig, resume: bool = False, log=None,
          progress: bool = True, eval_set=None) -> dict:
    """Train a draft for `target` on `samples`: a list of JSONL samples (online capture, see
    `sparrow.training.data`) or an `OfflineData` capture. Returns the last metrics (with the held-out
    evaluation on `eval_set` when given), with "interrupted": the signal's number when SIGINT or SIGTERM stopped
    it before cfg.steps (the checkpoint is saved; `resume=True` goes on). Works inside an initialised
    torch.distributed group (every process calls it with the same arguments)."""
    from tqdm import tqdm

    from .. import init_draft

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mid = cfg.mid_layer or target.default_mid_layer()
    draft = init_draft(target, seed=cfg.seed, mode=cfg.mode, position_mode=cfg.position_mode, mid_layer=mid)
    os.makedirs(out, exist_ok=True)  # after the draft: a mid_layer beyond the target fails before anything is written
    draft.float().train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    ckpt = os.path.join(out, "ckpt", "state.pt")
    if resume and os.path.isfile(ckpt):
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from step {step}", file=log or sys.stderr)
    metrics_path = os.path.join(out, "metrics.jsonl")
    lcfg = cfg.loss()
    n_data = len(samples)
    bar = tqdm(total=cfg.steps, initial=step, desc="train-draft", disable=not progress or rank != 0,
               dynamic_ncols=True)
    last = {}
    with stop_on_signals(rank == 0) as stop:
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            sums = [[0.0, 0.0, 0] for _ in range(cfg.mtp_stages)]
            for i in batch_indices(step, cfg, n_data, rank, world):
                c = samples.get(i) if hasattr(samples, "get") else online_capture(target, samples[i], cfg, mid, log)
                if c is None:
                    continue
                loss, st = draft_loss(draft, target, c, lcfg)
                (loss / cfg.batch).backward()
                for k, x in enumerate(st):
                    sums[k][0] += x["loss"] * x["n"]
                    sums[k][1] += x["acc"] * x["n"]
                    sums[k][2] += x["n"]
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                t = torch.tensor(sums, dtype=torch.float64)
                dist.all_reduce(t)
                sums = t.tolist()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            last = {"step": step, "lr": lr_at(step - 1, cfg)}
            for k, (l, a, n) in enumerate(sums):
                last[f"loss{k + 1}"] = l / max(n, 1)
                last[f"acc{k + 1}"] = a / max(n, 1)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items() if k.startswith(("loss", "acc"))})
            flag = torch.tensor([1.0 if stop["now"] else 0.0])
            if world > 1:
                dist.all_reduce(flag)
            if rank == 0 and eval_set and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                ev = evaluate(draft, target, eval_set, cfg, mid)
                last.update(ev)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, **ev}) + "\n")
                bar.write(f"step {step}: held-out tau {ev['eval_tau']:.2f}, top-1 " +
                          " ".join(f"{ev[f'eval_acc{k + 1}']:.3f}" for k in range(cfg.mtp_stages)))
            if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps or flag.item() > 0):
                save_checkpoint(out, draft, opt, step, cfg, last)
            if flag.item() > 0:
                print(f"interrupted: checkpoint saved at step {step}; continue with --resume", file=log or sys.stderr)
                last["interrupted"] = stop["signal"] or signal.SIGTERM  # another rank's signal: SIGTERM's exit code
                break
    bar.close()
    return last


def _flag_bool(text: str) -> bool:
    """A true/false flag value: 1/true/yes/on or 0/false/no/off (argparse reports anything else in one line)."""
    if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text.lower() in ("1", "true", "yes", "on")
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def main(argv=None) -> int:
    from .. import load_target

    ap = argparse.ArgumentParser(prog="sparrow train-draft", description="Train a Sparrow / EAGLE draft (IVSB + MTP).",
                                 formatter_class=Help)
    ap.add_argument("--target", help="target checkpoint (default: the embedded one)")
    ap.add_argument("--data", required=True, help="JSONL (LLaVA-Video style), answers from `sparrow regenerate`, "
                                                  "or a capture directory from `sparrow capture`")
    ap.add_argument("--out", required=True, help="draft directory (draft + ckpt/ + metrics.jsonl)")
    ap.add_argument("--config", help="JSON or YAML with TrainConfig fields")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt exactly (draft, optimiser, step)")
    for f in fields(TrainConfig):
        if f.name in ("extra", "stage_weights"):
            continue
        kind = {"bool": _flag_bool}.get(str(f.type).split(" ")[0], None)
        typ = kind or (int if "int" in str(f.type) else float if "float" in str(f.type) else str)
        ap.add_argument("--" + f.name.replace("_", "-"), type=typ, default=None, help=f.metadata.get("help"))
    a = ap.parse_args(argv)
    overrides = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if f.name not in ("extra", "stage_weights")}
    cfg = load_config(a.config, overrides)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        target = load_target(a.target)  # None: the embedded target
        if os.path.isdir(a.data):
            from .offline import OfflineData

            samples = OfflineData(a.data, target, cfg)
        else:
            samples = read_jsonl(a.data, strict=cfg.strict_data)
        samples, eval_set = split_eval(samples, cfg)
        last = train(target, samples, a.out, cfg, resume=a.resume, eval_set=eval_set)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # interrupted before cfg.steps: not 0, so that a script that chains stages (set -e) does not go on with a
    # half-trained draft
    return 128 + int(last["interrupted"]) if last.get("interrupted") else 0


if __name__ == "__main__":
    from ..cli import run_guarded

    sys.exit(run_guarded(main))
