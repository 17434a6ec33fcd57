"""How much to speculate, decided while decoding: the draft tree's size from the verify cost measured on this
machine and the acceptance the draft shows, down to plain decode steps when speculation cannot pay.

Expected speed of a cycle with a tree of N draft tokens (EAGLE-2's "auto" configuration, made online):

    rate(N) = tau(N) / (verify(N) + draft(N))   tokens per second;  rate(0) = 1 / decode   (a plain step)

and each cycle takes a plain step unless the best N is expected 10% faster (`MARGIN`), else the N with the best
rate when tau(N) is raised by 1 / sqrt(cycles that measured it) (`BONUS`: sizes seen rarely get tried).

- verify(N): seconds of one target forward over N + 1 tokens at this context length, measured on the live cache
  right after the prefill (`measure_verify_costs`: sizes interleaved, medians of repeats, a monotone fit) and kept
  on disk per target, device, dtype, threads and context length (`cached_verify_costs`), so a later run pays
  nothing;
- tau(N): tokens a cycle would emit with the best N nodes of the tree. One verification of a tree of M nodes tells
  it for every N <= M at once: the dynamic tree of N nodes is the M-tree's nodes of score rank < N
  (`Tree.ranks`), so the accepted path of the N-tree is the M-path's prefix of ranks < N (exact for greedy
  decoding). Kept as moving averages, so the choice follows the acceptance as it changes;
- draft(N): the draft's seconds a cycle (tree expansion and catch-up) at size N, a moving average per size (a
  small tree stops expanding early; a size not yet drafted takes the average over all sizes).

When plain decoding wins, the policy takes plain steps (the draft catches up on them later) and tries one cycle
with the smallest tree after 4, 8, 16... of them, so that it speculates again when the drafts are accepted again.
Every token comes from the target either way: the output is the target's own decoding in every mode.
"""

from __future__ import annotations

import json
import math
import os

import torch

from .timing import Clock

SIZES = (4, 8, 16, 30)  # draft tokens a cycle that the policy chooses among (capped by the tree's `tokens`)
EXPLORE_EVERY = 8  # speculative cycles between two at the largest size (which refresh the larger sizes' tau)
ALPHA = 0.1  # weight of the newest cycle in the moving averages (a plain mean over the first 1 / ALPHA)
FIRST_BACKOFF, MAX_BACKOFF = 4, 64  # plain steps before trying speculation again (doubling while it loses)
MARGIN = 1.1  # speculate only where it is expected to be this much faster than plain steps
MIN_SEEN = 2  # cycles at the largest size before the choice is left to the estimates (while speculation pays)
BONUS = 1.0  # tokens of optimism for a size measured in one cycle (shrinking as 1 / sqrt(cycles))


def monotone(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in least squares (pool-adjacent-violators): verify cost
    cannot fall as the tree grows, so a size timed faster than a smaller one is noise."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (a, wa), (b, wb) = blocks[-2], blocks.pop()
            blocks[-1] = [(a * wa + b * wb) / (wa + wb), wa + wb]
    return [m for m, w in blocks for _ in range(int(w))]


@torch.inference_mode()
def measure_verify_costs(target, cache, sizes, repeats: int = 3) -> dict[int, float]:
    """Seconds of one target forward over N + 1 tokens (N in sizes; 0 = a decode step) on `cache` as it stands
    (the prompt prefilled), sizes interleaved within each of `repeats` rounds after one untimed round; medians,
    then `monotone`. The tokens are a star of N children under one root (the cost does not depend on the shape);
    `cache` is left as it was. Returns {N: seconds}."""
    from .tree import tree_from_parents

    clock, n, dev = Clock(target.device), cache.length, target.device
    sizes = sorted({0, *sizes})
    trees = {N: tree_from_parents(torch.zeros(N + 1, dtype=torch.long, device=dev),
                                  torch.tensor([-1] + [0] * N, device=dev), max_depth=1) for N in sizes}
    times: dict[int, list[float]] = {N: [] for N in sizes}
    for r in range(repeats + 1):  # round 0 warms up each shape
        for N in sizes:
            t = trees[N]
            t0 = clock.now()
            target.forward(t.tokens, t.depths, t.mask if N else None, cache)
            dt = clock.now() - t0
            cache.truncate(n)
            if r:
                times[N].append(dt)
    med = [sorted(v)[len(v) // 2] for v in (times[N] for N in sizes)]
    return dict(zip(sizes, monotone(med)))


def cache_file() -> str:
    """Where measured verify costs are kept: $SPARROW_CACHE_DIR/verify_costs.json, else
    ~/.cache/sparrow/verify_costs.json."""
    root = os.environ.get("SPARROW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparrow")
    return os.path.join(root, "verify_costs.json")


def cost_key(target, context: int) -> str:
    """What a measurement depends on: the checkpoint, the device (the GPU's name, or the CPU's vector instruction
    set, so a home directory shared by several machines keeps one measurement each), dtype, CPU threads and the
    context length, in half-octave buckets (costs at 3,000 and 3,400 positions are one measurement)."""
    bucket = round(2 ** (round(2 * math.log2(max(context, 1))) / 2))
    where = os.path.realpath(target.path) if getattr(target, "path", None) else f"model-{id(target.model)}"
    dev = target.device
    kind = torch.cuda.get_device_name(dev) if dev.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    return (f"{where}|{dev} {kind}|{str(target.dtype)[6:]}|threads={torch.get_num_threads()}|"
            f"context~{bucket}")


def cached_verify_costs(target, cache, sizes) -> dict[int, float]:
    """`measure_verify_costs` for this target at this context length, read from `cache_file()` when measured
    before (with every size asked), else measured now and stored there (an unwritable file is left alone)."""
    path, key = cache_file(), cost_key(target, cache.length)
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        stored = {}
    got = {int(k): float(v) for k, v in stored.get(key, {}).items()}
    if all(N in got for N in (0, *sizes)):
        return got
    got = measure_verify_costs(target, cache, sizes)
    stored[key] = {str(k): v for k, v in got.items()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(stored, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError:
        pass
    return got


class TreePolicy:
    """The choice of each cycle: `choose()` -> N draft tokens for the next cycle's tree (0: a plain decode step);
    `observe(N, ranks, draft_s, verify_s)` after a speculative cycle, with the score ranks of the accepted draft
    nodes (`Tree.ranks` along the accepted path, root excluded) and the draft's and the verification's seconds in
    that cycle; `plain(seconds)` after a plain step. Measured times rescale the calibrated costs (moving averages
    of measured / calibrated, one for plain steps, one for verifications). `costs`: {N: seconds} with 0 (a decode
    step) and every size; `sizes`: the tree sizes to choose among (a middle one first, the largest every
    `EXPLORE_EVERY` cycles while speculation pays, the smallest after a run of plain steps). `counts` records the
    choices made."""

    def __init__(self, costs: dict[int, float], sizes):
        self.costs, self.sizes = costs, sorted(sizes)
        self.tau: dict[int, float] = {}
        self.seen: dict[int, int] = {}  # cycles that measured tau[n]
        self.draft_s: float | None = None  # seconds of drafting a cycle, moving average over every size
        self.draft_at: dict[int, float] = {}  # the same per size
        self.since_largest = 0  # speculative cycles since the last at the largest size
        self.plain_left = 0
        self.probe = False  # after a run of plain steps: one cycle with the smallest tree
        self.backoff = FIRST_BACKOFF
        self.counts: dict[int, int] = {}
        # measured / calibrated time of plain steps and of verifications, moving averages: the calibration may be
        # old or taken while the machine was busy, and the machine's speed drifts
        self.scale = [1.0, 1.0]

    def rate(self, n: int, optimistic: bool = False) -> float:
        """Expected tokens per second of a cycle with a tree of n draft tokens (n = 0: a plain step); optimistic:
        with tau raised by `BONUS` / sqrt(cycles that measured it)."""
        if n == 0:
            return 1.0 / (self.costs[0] * self.scale[0])
        tau = self.tau[n] + (BONUS / math.sqrt(self.seen[n]) if optimistic else 0.0)
        return tau / (self.costs[n] * self.scale[1] + self.draft_at.get(n, self.draft_s or 0.0))

    def choose(self) -> int:
        largest = self.sizes[-1]
        if self.plain_left > 0:
            n = 0
        elif self.probe:  # after plain steps: is the draft accepted again? The smallest tree tells, cheaply
            n, self.probe = self.sizes[0], False
        elif not self.tau:  # the first cycle: a middle size, which a draft that is not accepted makes cheap to learn
            n = self.sizes[len(self.sizes) // 2 - 1] if len(self.sizes) > 2 else self.sizes[0]
        else:
            known = [m for m in self.sizes if m in self.tau]
            best = max(self.rate(m) for m in known)
            # the size to try: the best rate with a bonus for sizes seen in few cycles (an upper confidence
            # bound), since a cycle measures tau only for its own size and the smaller ones
            n = max(known, key=lambda m: self.rate(m, optimistic=True))
            if best < MARGIN * self.rate(0):  # speculation does not pay (near break-even, noise would
                n, self.plain_left = 0, self.backoff  # cost): plain steps, then one try with the smallest tree
                self.backoff = min(2 * self.backoff, MAX_BACKOFF)
            elif self.since_largest >= EXPLORE_EVERY or self.seen.get(largest, 0) < MIN_SEEN:
                n = largest  # while speculation pays: the largest tree early and now and then (tau of every size)
        self.counts[n] = self.counts.get(n, 0) + 1
        return n

    def _rescale(self, which: int, measured: float, calibrated: float) -> None:
        self.scale[which] = (1 - ALPHA) * self.scale[which] + ALPHA * measured / max(calibrated, 1e-9)

    def observe(self, n: int, ranks: list[int], draft_s: float, verify_s: float) -> None:
        for m in self.sizes:
            if m > n:
                break
            got = 1 + sum(r < m for r in ranks)  # the accepted draft tokens of the best-m tree, + the bonus token
            self.seen[m] = self.seen.get(m, 0) + 1
            w = max(1.0 / self.seen[m], ALPHA)
            self.tau[m] = (1 - w) * self.tau.get(m, 0.0) + w * got
        self.draft_s = draft_s if self.draft_s is None else (1 - ALPHA) * self.draft_s + ALPHA * draft_s
        self.draft_at[n] = (1 - ALPHA) * self.draft_at[n] + ALPHA * draft_s if n in self.draft_at else draft_s
        self._rescale(1, verify_s, self.costs[n])
        self.since_largest = 0 if n == self.sizes[-1] else self.since_largest + 1
        if max(self.rate(m) for m in self.sizes if m in self.tau) > MARGIN * self.rate(0):
            self.backoff = FIRST_BACKOFF  # speculation pays again

    def plain(self, seconds: float) -> None:
        self._rescale(0, seconds, self.costs[0])
        self.plain_left -= 1
        self.probe = self.plain_left == 0

    def summary(self) -> dict:
        """What the policy did and saw: cycles per tree size (0: plain steps), the verify costs (ms) and the
        latest tau estimates."""
        return {"choices": {str(k): v for k, v in sorted(self.counts.items())},
                "verify_ms": {str(k): round(1e3 * v * self.scale[k > 0], 2) for k, v in sorted(self.costs.items())},
                "tau": {str(k): round(v, 2) for k, v in sorted(self.tau.items())}}
