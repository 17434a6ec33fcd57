"""Timing of a generation: `Stats` (what one run measured), `speedup` (a speculative run against plain
decoding: DSR, ESR) and `Clock` (wall time that waits for the device), shared by `generate`, `bench` and the
command line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Stats:
    """Timing and acceptance of one generation. Times in seconds.

    tau: mean accepted length per target forward after the prefill, bonus token included (Spec-Bench); 1.0 for ar.
    accept_lengths: tokens emitted by each target forward after the prefill.
    prefill_s: target prefill (vision encoder + LLM) up to the first token. decode_s: everything after
    (draft prompt pass, draft, verify, accept). draft_s / verify_s: the draft's and the target's share of decode_s.
    tokens_per_s: new tokens after the first / decode_s. repetition_penalty: the one applied (1.0 = none).
    tree_tokens: draft tokens of the last cycle's tree. plain_steps: target forwards of plain decoding taken by a
    speculative method when speculation did not pay (`policy`). policy: what the tree policy chose and saw
    (`TreePolicy.summary`), {} for a fixed tree or plain decoding. calibration_s: seconds spent measuring the
    verify cost at this context length (the first run at a length on a machine), not part of decode_s.
    """

    method: str
    new_tokens: int = 0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    tau: float = 0.0
    accept_lengths: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_prefill_s: float = 0.0
    tree_tokens: int = 0
    tokens_per_s: float = 0.0
    stop_reason: str = ""
    repetition_penalty: float = 1.0
    plain_steps: int = 0
    calibration_s: float = 0.0
    policy: dict = field(default_factory=dict)


def speedup(spec: Stats, base: Stats) -> dict:
    """How much faster `spec` (a speculative run) was than `base` (plain decoding, method "ar") on the same input.

    Per token, so that sampled runs of different lengths compare too (greedy runs emit the same tokens). Returns
    a dict: dsr, the decoding speedup, base's decode seconds per token after the first over spec's (Spec-Bench DSR;
    NaN when either emitted a single token); esr, the same end to end, prefill included (ESR; NaN for an untimed
    spec run); saved_s, the seconds spec saved against base's end-to-end rate over spec's tokens (negative when spec
    was slower); tau, spec's accepted length. `sparrow bench` sums times over many samples instead.
    """
    def per_token(s: Stats) -> float:
        return (s.prefill_s + s.decode_s) / max(1, s.new_tokens)

    dsr = spec.tokens_per_s / base.tokens_per_s if spec.tokens_per_s and base.tokens_per_s else float("nan")
    esr = per_token(base) / per_token(spec) if per_token(spec) else float("nan")
    return {"tau": spec.tau, "dsr": dsr, "esr": esr,
            "saved_s": per_token(base) * spec.new_tokens - (spec.prefill_s + spec.decode_s)}


class Clock:
    """Wall time in seconds (`now()`, perf_counter) after waiting for `device`'s queued work, so that a phase's
    time is the device's and not only the host's launch time."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
