"""EAGLE-2 dynamic draft tree, built with tensor ops (no per-node Python loops).

Source: EAGLE-2 (Li et al., 2024), "dynamic draft trees": expand the top-k children of each of the k frontier
nodes, score candidates by cumulative log-probability, keep the best k as the next frontier, and after `depth`
levels keep the best `total_tokens` candidates over all depths. Cumulative log-probabilities never increase
along a path, so the kept set is closed under ancestors (ties are broken towards earlier candidates, which
include every parent).

Node 0 is the root: the last accepted token (already decided, not a draft). Nodes are ordered parents first,
and siblings in descending draft probability.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import SparrowError


@dataclass
class TreeConfig:
    """top_k: children per expanded node and frontier width; depth: levels below the root (max accepted
    draft tokens per cycle); tokens: draft nodes kept (the target verifies tokens + 1 including the root).

    Raises: SparrowError (a ValueError) if any of the three is below 1."""

    top_k: int = 8
    depth: int = 5
    tokens: int = 30

    def __post_init__(self):
        if self.top_k < 1 or self.depth < 1 or self.tokens < 1:
            raise SparrowError(f"tree top-k {self.top_k}, depth {self.depth}, tokens {self.tokens}: each must be 1 or "
                               f"more (--tree-top-k, --tree-depth, --tree-tokens)")


@dataclass
class Tree:
    """A draft tree of n = 1 + N nodes (root first).

    tokens: (n,) int64 token ids; parents: (n,) int64 parent index (-1 for the root); depths: (n,) int64;
    mask: (n, n) bool, mask[i, j] = j is i or an ancestor of i. ranks (`build_tree` only, else None): (n,) int64,
    each draft node's place in the order of draft scores (0: the best; -1 for the root), so that the tree of the
    best N nodes is the nodes of rank < N. `paths` (computed on first use): (leaves, max_depth + 1) int64 node
    indices root-to-leaf, -1 after the leaf.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor
    ranks: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @functools.cached_property
    def paths(self) -> torch.Tensor:
        # data-dependent shapes (the number of leaves, the deepest leaf): each waits for the device, so generation,
        # whose acceptance works on the mask, never asks for them
        n, dev = self.tokens.shape[0], self.tokens.device
        is_parent = torch.zeros(n, dtype=torch.bool, device=dev)
        is_parent[self.parents[self.parents >= 0]] = True
        leaves = torch.arange(n, device=dev)[~is_parent]
        paths = torch.full((leaves.shape[0], int(self.depths.max()) + 1), -1, dtype=torch.long, device=dev)
        rows, cols = self.mask[leaves].nonzero(as_tuple=True)
        paths[rows, self.depths[cols]] = cols
        return paths


def tree_from_parents(tokens: torch.Tensor, parents: torch.Tensor, max_depth: int | None = None) -> Tree:
    """Build depths and the ancestor mask from tokens (n,) and parents (n,) (parents[0] = -1, parents[i] < i).
    Pointer jumping: one vectorised step per level. With `max_depth` (a bound on the deepest node's depth, which
    must hold: a deeper node would miss ancestors in its mask) it takes exactly that many steps and never waits for
    the device; without, it stops when every chain has reached the root (one device read per level)."""
    n, dev = tokens.shape[0], tokens.device
    ar = torch.arange(n, device=dev)
    mask = torch.eye(n, dtype=torch.bool, device=dev)
    depths = torch.zeros(n, dtype=torch.long, device=dev)
    anc = parents.clone()
    steps = 0
    while (steps < max_depth) if max_depth is not None else bool((anc >= 0).any()):
        live = anc >= 0
        at = anc.clamp(min=0)
        mask[ar, at] |= live  # mask[i, anc[i]] = True where live (row i's other columns untouched)
        depths += live.long()
        anc = torch.where(live, parents[at], anc)
        steps += 1
    return Tree(tokens=tokens, parents=parents, depths=depths, mask=mask)


def chain_tree(tokens: torch.Tensor) -> Tree:
    """A chain root -> t1 -> t2 ... (tokens (n,))."""
    n = tokens.shape[0]
    return tree_from_parents(tokens, torch.arange(-1, n - 1, device=tokens.device), max_depth=n - 1)


Expand = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def build_tree(root_token: int, root_logp: torch.Tensor, expand: Expand, cfg: TreeConfig) -> Tree:
    """EAGLE-2 dynamic tree.

    Args:
        root_token: the last accepted token (node 0).
        root_logp: (V,) draft log-probabilities of the root's children.
        expand: expand(frontier_tokens (k,), parent_slot (k,) | None) -> (k, V) draft log-probabilities of each
            frontier node's children. parent_slot[i] is the index, in the previous frontier, of node i's parent
            (None for the first frontier, whose parent is the root). Called at most depth - 1 times.
        cfg: top_k, depth, tokens.
    Returns: a `Tree` of 1 + min(tokens, candidates) nodes.

    Two shortcuts give the same tree (the same nodes and ranks, up to exactly equal scores) for less drafting: the
    frontier and each node's children are at most `tokens` wide (a kept level holds at most `tokens` nodes, each
    among the best `tokens` of its level and of its siblings), and on a CPU, where the check's host read is free,
    expansion stops once the best frontier node scores no more than the `tokens`-th best candidate so far (a deeper
    candidate never scores more than its frontier ancestor, and ties go to earlier candidates).
    """
    n_keep, dev = cfg.tokens, root_logp.device
    k = min(cfg.top_k, n_keep, root_logp.shape[-1])
    score, tok = root_logp.topk(k)
    scores, toks, parents = [score], [tok], [torch.full((k,), -1, device=dev)]
    front_id, front_score, front_tok, parent_slot = torch.arange(k, device=dev), score, tok, None
    offset = k
    for _ in range(cfg.depth - 1):
        if dev.type == "cpu" and offset >= n_keep:  # can a deeper node still be kept? (front_score descends)
            if bool(front_score[0] <= torch.cat(scores).topk(n_keep).values[-1]):
                break
        child_lp, child_tok = expand(front_tok, parent_slot).topk(k, dim=-1)  # (k, k)
        cum = (front_score.unsqueeze(1) + child_lp).flatten()
        scores.append(cum)
        toks.append(child_tok.flatten())
        parents.append(front_id.repeat_interleave(k))
        sel = cum.topk(k).indices
        front_id, front_score, front_tok, parent_slot = offset + sel, cum[sel], child_tok.flatten()[sel], sel // k
        offset += k * k
    scores, toks, parents = torch.cat(scores), torch.cat(toks), torch.cat(parents)
    n = min(cfg.tokens, scores.shape[0])
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = order[:n].sort().values  # parents before children
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=dev)
    lookup = torch.full((scores.shape[0] + 1,), -1, dtype=torch.long, device=dev)
    lookup[keep + 1] = torch.arange(1, n + 1, device=dev)
    lookup[:1] = 0  # candidate parent -1 (the root) -> node 0
    node_parent = lookup[parents[keep] + 1]
    # A lost ancestor (-1) means non-monotone scores (NaN in the draft's logits). On the CPU that is checked for
    # free; on a GPU the check would wait for the device every cycle, so the orphan hangs from the root instead:
    # the target verifies whatever tree it is given, so the output stays lossless either way.
    if dev.type == "cpu" and bool((node_parent < 0).any()):
        raise RuntimeError("draft tree lost an ancestor (non-monotone scores: NaN in the draft's logits?)")
    node_parent = node_parent.clamp(min=0)
    tokens = torch.cat((torch.full((1,), root_token, dtype=toks.dtype, device=dev), toks[keep]))
    parents = torch.cat((torch.full((1,), -1, dtype=torch.long, device=dev), node_parent))
    tree = tree_from_parents(tokens, parents, max_depth=cfg.depth)
    tree.ranks = torch.cat((torch.full((1,), -1, dtype=torch.long, device=dev), rank[keep]))
    return tree
