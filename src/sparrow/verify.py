"""Accepting a verified draft tree: greedy and lossless speculative sampling.

Greedy: a node is accepted when its token equals the target's argmax at its parent and its parent is accepted;
the longest accepted root-to-leaf path wins, plus the bonus token (the target's argmax after the last accepted
node). Output equals the target's own greedy decoding.

Sampling: recursive rejection sampling over siblings with a deterministic (top-k) draft (SpecInfer; EAGLE's
tree sampling). At node u with target distribution p (after temperature / top-k / top-p, as HF applies them)
and children x_1..x_m: accept x_i with probability p(x_i) / (1 - p(x_1) - ... - p(x_{i-1})), i.e. p with the
rejected siblings zeroed and renormalised; if every child is rejected, sample the bonus token from that
residual. The emitted token is distributed exactly as p, whatever the draft proposes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SparrowError
from .tree import Tree


@dataclass
class Sampling:
    """temperature 0 = greedy. top_k 0 / top_p 1.0 = off. Applied in HF's order: temperature, top-k, top-p.

    Raises: SparrowError (a ValueError) for a negative temperature or top_k, or top_p outside (0, 1]."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:  # also NaN
            raise SparrowError(f"temperature must be 0 (greedy) or more, got {self.temperature} (--temperature)")
        if not 0 < self.top_p <= 1:
            raise SparrowError(f"top-p must be in (0, 1], got {self.top_p} (--top-p; 1 = off)")
        if self.top_k < 0:
            raise SparrowError(f"top-k must be 0 (off) or more, got {self.top_k} (--top-k)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def check_repetition_penalty(penalty: float) -> None:
    """Raises SparrowError unless penalty > 0 (1.0 = off; NaN fails too)."""
    if not penalty > 0:
        raise SparrowError(f"repetition penalty must be > 0 (1.0 = off), got {penalty} (--repetition-penalty)")


class RepetitionPenalty:
    """transformers' repetition penalty (RepetitionPenaltyLogitsProcessor; CTRL, Keskar et al. 2019) for the target's
    logits over a draft tree: a token already in the sequence, prompt included, has its logit divided by `penalty`
    where >= 0 and multiplied where negative. In a tree, node i's sequence is the committed one plus the tokens of i
    and its ancestors (tree.mask), so each row is penalised as the target's own decoding would penalise it there.
    Applied to float32 logits before temperature / top-k / top-p, as `generate` does.

    penalty: > 0 (1.0 = off). prompt_ids: (L,) int64. vocab: V, the logits' width.
    Raises: SparrowError for a penalty that is not > 0.
    """

    def __init__(self, penalty: float, prompt_ids: torch.Tensor, vocab: int):
        check_repetition_penalty(penalty)
        self.penalty = float(penalty)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=prompt_ids.device)  # (V,) tokens in the sequence
        self.seen[prompt_ids] = True

    def add(self, tokens: list[int]) -> None:
        """The tokens just committed to the sequence."""
        self.seen[torch.tensor(tokens, device=self.seen.device)] = True

    def __call__(self, logits: torch.Tensor, tree: Tree | None = None) -> torch.Tensor:
        """logits (n, V) -> penalised float32 (n, V). Without a tree every row follows the committed sequence;
        with one (n nodes), row i also counts the tokens on its own root-to-i path."""
        x = logits.float()
        seen = self.seen.expand_as(x)
        if tree is not None:
            # row i also sees the tokens of i and its ancestors (tree.mask[i]); scatter, not indexing by the mask's
            # nonzero entries, which would wait for the device
            on_path = torch.zeros_like(x).scatter_reduce_(1, tree.tokens.expand(x.shape[0], -1),
                                                          tree.mask.to(x.dtype), "amax")
            seen = seen | (on_path > 0)
        return torch.where(seen, torch.where(x < 0, x * self.penalty, x / self.penalty), x)


def warp_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) float32 after temperature, top-k and top-p, with the same
    semantics as transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (ties at the
    top-k threshold kept; top-p keeps the smallest set whose mass exceeds top_p, at least one token)."""
    x = logits.float() / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=False, dim=-1)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - s.top_p
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return x.softmax(dim=-1)


def sample(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """One token id drawn from probs (V,) (non-negative weights; multinomial normalises them) with `gen` (None:
    torch's global generator)."""
    return int(torch.multinomial(probs, 1, generator=gen))


def accept_greedy(tree: Tree, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """tree with n nodes, target logits (n, V) -> (accepted node indices (a,) starting with the root, bonus token).

    A node is accepted when its token and each of its ancestors' is the target's greedy choice after its parent.
    Siblings carry different tokens, so the accepted nodes form one chain from the root, and the deepest of them
    ends it. Vectorised over all nodes, with one read from the device (the chain's length and the bonus token)."""
    n = tree.tokens.shape[0]
    pred = logits.argmax(dim=-1)  # (n,)
    ok = (tree.tokens == pred[tree.parents.clamp(min=0)]) | (tree.parents < 0)  # the root is always accepted
    good = ~(tree.mask & ~ok).any(dim=1)  # every node on the path root..i is accepted
    best = torch.where(good, tree.depths, -1).argmax()  # the deepest accepted node
    # its path in root-to-leaf order: best and its ancestors sorted by depth (0, 1, ...), every other node after them
    chain = torch.sort(torch.where(tree.mask[best], tree.depths, n), stable=True).indices
    depth, bonus = torch.stack((tree.depths[best], pred[best])).tolist()
    return chain[: depth + 1], bonus


def accept_sampling(tree: Tree, logits: torch.Tensor, s: Sampling,
                    gen: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """Lossless recursive rejection sampling down the tree (module docstring; SpecInfer, EAGLE's tree sampling).
    tree (n nodes), logits (n, V) -> (accepted node indices (a,) starting with the root, bonus token).

    Every node's test is computed on the device at once (its token's probability at its parent, and a uniform draw
    of its own), then read in one transfer and walked on the host, children in index order; the bonus token is the
    second and last read. Each node is tested at most once, so one uniform per node is what a walk level by level
    would draw."""
    probs = warp_probs(logits, s)  # (n, V)
    n = tree.tokens.shape[0]
    pk = probs[tree.parents.clamp(min=0), tree.tokens]  # (n,) p_parent(token): each node's acceptance mass
    u = torch.rand(n, generator=gen, device=probs.device)  # (n,)
    parents, pk, u = torch.stack((tree.parents.float(), pk, u)).tolist()  # float32: exact for indices < 2**24
    kids: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        kids[int(parents[i])].append(i)
    node, accepted = 0, [0]
    while kids[node]:
        remaining = 1.0  # 1 - p(x_1) - ... - p(x_{i-1}): the mass left after the rejected siblings
        for k in kids[node]:
            if u[k] < pk[k] / max(remaining, 1e-20):
                break
            remaining -= pk[k]
        else:  # every child rejected: the bonus token comes from p with them zeroed (multinomial renormalises)
            p = probs[node]
            residual = p.index_fill(0, tree.tokens[torch.tensor(kids[node], device=p.device)], 0.0)
            residual = torch.where(residual.sum() > 0, residual, p)  # rounding left no mass: p itself
            return torch.tensor(accepted, device=logits.device), sample(residual, gen)
        node = k
        accepted.append(node)
    return torch.tensor(accepted, device=logits.device), sample(probs[node], gen)
