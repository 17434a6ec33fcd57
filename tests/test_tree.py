"""EAGLE-2 tree construction against a brute-force, per-node reference."""

import itertools

import pytest
import torch

from sparrow.tree import TreeConfig, build_tree, chain_tree, tree_from_parents
from sparrow.verify import accept_greedy

V = 12


def table_logp(seed: int):
    """Deterministic draft: log-probabilities of the children of a node depend on the node's token path."""
    def logp(path: tuple) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed,) + path) % 2**31)
        return torch.log_softmax(torch.randn(V, generator=g) * 2, dim=-1)
    return logp


def brute_force(logp, cfg: TreeConfig):
    """Per-node EAGLE-2: candidates as (score, path) with explicit loops; returns the kept set of token paths."""
    k = cfg.top_k
    root = logp(())
    cands = []  # (score, path, order)
    order = 0
    frontier = []
    for tok in torch.topk(root, k).indices.tolist():
        cands.append((float(root[tok]), (tok,), order)); order += 1
        frontier.append(cands[-1])
    for _ in range(cfg.depth - 1):
        children = []
        for score, path, _ in frontier:
            lp = logp(path)
            for tok in torch.topk(lp, k).indices.tolist():
                children.append((score + float(lp[tok]), path + (tok,), order)); order += 1
        cands += children
        frontier = sorted(children, key=lambda c: (-c[0], c[2]))[:k]
    kept = sorted(cands, key=lambda c: (-c[0], c[2]))[: cfg.tokens]
    return {c[1] for c in kept}


@pytest.mark.parametrize("cfg", [TreeConfig(1, 5, 5), TreeConfig(3, 3, 8), TreeConfig(4, 4, 20), TreeConfig(8, 3, 30),
                                 TreeConfig(5, 6, 200)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_matches_brute_force(cfg, seed):
    logp = table_logp(seed)
    paths_of_front = []

    def expand(tokens, parent_slot):
        nonlocal paths_of_front
        if parent_slot is None:
            paths = [(t,) for t in tokens.tolist()]
        else:
            paths = [paths_of_front[p] + (t,) for p, t in zip(parent_slot.tolist(), tokens.tolist())]
        paths_of_front = paths
        return torch.stack([logp(p) for p in paths])

    tree = build_tree(99, logp(()), expand, cfg)
    n = len(tree)
    # token path of every node from parents
    node_path = [()]
    for i in range(1, n):
        p = int(tree.parents[i])
        assert 0 <= p < i, "parents must precede children"
        node_path.append(node_path[p] + (int(tree.tokens[i]),))
    assert set(node_path[1:]) == brute_force(logp, cfg)
    assert len(set(node_path)) == n
    # depths, ancestor mask and paths against per-node definitions
    for i in range(n):
        anc = {i}
        j = i
        while tree.parents[j] >= 0:
            j = int(tree.parents[j]); anc.add(j)
        assert set(tree.mask[i].nonzero().flatten().tolist()) == anc
        assert int(tree.depths[i]) == len(node_path[i])
    leaves = [i for i in range(n) if i not in set(tree.parents.tolist())]
    assert sorted(int(p[(p >= 0).sum() - 1]) for p in tree.paths) == sorted(leaves)
    for row in tree.paths:
        nodes = row[row >= 0].tolist()
        assert nodes[0] == 0 and all(int(tree.parents[b]) == a for a, b in zip(nodes, nodes[1:]))


def test_siblings_in_descending_draft_probability():
    logp = table_logp(5)
    tree = build_tree(0, logp(()), lambda t, s: torch.stack([logp((x,)) for x in t.tolist()]), TreeConfig(4, 2, 12))
    root_kids = (tree.parents == 0).nonzero().flatten()
    scores = logp(())[tree.tokens[root_kids]]
    assert torch.all(scores[:-1] >= scores[1:])


def test_greedy_accept_longest_path_and_bonus():
    #        0
    #      /   \
    #     1(5)  2(6)
    #     |      |
    #     3(7)   4(8)
    tree = tree_from_parents(torch.tensor([1, 5, 6, 7, 8]), torch.tensor([-1, 0, 0, 1, 2]))
    logits = torch.zeros(5, 10)
    logits[0, 6] = 1  # target after root: 6 -> node 2
    logits[2, 8] = 1  # after node 2: 8 -> node 4
    logits[4, 3] = 1  # bonus 3
    accepted, bonus = accept_greedy(tree, logits)
    assert accepted.tolist() == [0, 2, 4] and bonus == 3
    logits[0] = 0; logits[0, 9] = 1  # nothing matches: root only, bonus 9
    accepted, bonus = accept_greedy(tree, logits)
    assert accepted.tolist() == [0] and bonus == 9


def test_chain_tree():
    t = chain_tree(torch.tensor([4, 5, 6]))
    assert t.depths.tolist() == [0, 1, 2] and t.mask.equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert t.paths.tolist() == [[0, 1, 2]]
