"""EAGLE-2 tree construction against a brute-force, per-node reference."""

import pytest
import torch

from sparrow.tree import TreeConfig, build_tree, chain_tree, tree_from_parents
from sparrow.verify import accept_greedy

V = 12


def table_logp(seed: int, sharpness: float = 2.0):
    """Deterministic draft: log-probabilities of the children of a node depend on the node's token path (a larger
    `sharpness`: a more confident draft, whose trees are deep chains)."""
    def logp(path: tuple) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed,) + path) % 2**31)
        return torch.log_softmax(torch.randn(V, generator=g) * sharpness, dim=-1)
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
    ranked = sorted(cands, key=lambda c: (-c[0], c[2]))
    return {c[1]: rank for rank, c in enumerate(ranked[: cfg.tokens])}  # kept token paths -> their score rank


def tree_of(logp, cfg: TreeConfig, root: int = 99):
    """build_tree with the table draft `logp` (children's log-probabilities depend on the token path)."""
    paths_of_front = []

    def expand(tokens, parent_slot):
        nonlocal paths_of_front
        if parent_slot is None:
            paths = [(t,) for t in tokens.tolist()]
        else:
            paths = [paths_of_front[p] + (t,) for p, t in zip(parent_slot.tolist(), tokens.tolist())]
        paths_of_front = paths
        return torch.stack([logp(p) for p in paths])

    return build_tree(root, logp(()), expand, cfg)


@pytest.mark.parametrize("cfg", [TreeConfig(1, 5, 5), TreeConfig(3, 3, 8), TreeConfig(4, 4, 20), TreeConfig(8, 3, 30),
                                 TreeConfig(5, 6, 200), TreeConfig(8, 5, 4), TreeConfig(8, 6, 6)])
@pytest.mark.parametrize("seed,sharpness", [(0, 2.0), (1, 2.0), (2, 2.0), (3, 0.3), (4, 6.0)])
def test_tree_matches_brute_force(cfg, seed, sharpness):
    """The kept nodes and their score ranks are EAGLE-2's, computed per node with the full top-k everywhere (the
    tree's narrower frontier for few tokens and its early stop must not change them)."""
    logp = table_logp(seed, sharpness)
    tree = tree_of(logp, cfg)
    n = len(tree)
    # token path of every node from parents
    node_path = [()]
    for i in range(1, n):
        p = int(tree.parents[i])
        assert 0 <= p < i, "parents must precede children"
        node_path.append(node_path[p] + (int(tree.tokens[i]),))
    want = brute_force(logp, cfg)
    assert set(node_path[1:]) == set(want)
    assert [int(r) for r in tree.ranks[1:]] == [want[p] for p in node_path[1:]]
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


def test_expansion_stops_where_no_deeper_node_can_be_kept():
    """A flat draft (every child as likely) gives a 4-token tree of depth 5 in fewer expansions than depth - 1: the
    first level's 4 nodes score above every deeper candidate; a confident one is expanded to the full depth."""
    calls = []

    def expand(tokens, parent_slot):
        calls.append(len(tokens))
        return torch.log_softmax(torch.zeros(len(tokens), V), dim=-1)

    tree = build_tree(0, torch.log_softmax(torch.zeros(V), dim=-1), expand, TreeConfig(8, 5, 4))
    assert calls == [] and len(tree) == 5 and int(tree.depths.max()) == 1
    calls.clear()
    sharp = torch.full((V,), -20.0)
    sharp[3] = 0.0

    def confident(tokens, parent_slot):
        calls.append(len(tokens))
        return sharp.log_softmax(-1).expand(len(tokens), -1)

    tree = build_tree(0, sharp.log_softmax(-1), confident, TreeConfig(8, 5, 4))
    assert calls == [4, 4, 4] and int(tree.depths.max()) == 4


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


def test_greedy_accept_matches_a_walk_down_the_tree():
    """accept_greedy (one pass over the ancestor mask) against walking from the root: at each node, the child whose
    token the target picks, until there is none; then the target's pick there is the bonus token."""
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for trial in range(150):
        cfg = TreeConfig(top_k=3, depth=int(torch.randint(1, 6, (1,), generator=g)),
                         tokens=int(torch.randint(1, 40, (1,), generator=g)))
        tree = tree_of(table_logp(trial), cfg)
        n = len(tree)
        logits = torch.randn(n, V, generator=g)
        for i in range(1, n):  # the target agrees with the draft often, so that long chains are accepted
            if torch.rand(1, generator=g) < 0.6:
                logits[int(tree.parents[i]), int(tree.tokens[i])] += 5
        node, walk = 0, [0]
        while True:
            pick = int(logits[node].argmax())
            kids = [j for j in range(n) if int(tree.parents[j]) == node and int(tree.tokens[j]) == pick]
            if not kids:
                break
            node = kids[0]
            walk.append(node)
        accepted, bonus = accept_greedy(tree, logits)
        assert accepted.tolist() == walk and bonus == pick, trial
        lengths.add(len(walk))
    assert lengths >= {1, 2, 3, 4}  # the trials reach deep chains, not only the root


@pytest.mark.parametrize("seed", range(4))
def test_bounded_pointer_jumping_equals_the_open_loop(seed):
    """tree_from_parents with max_depth (no reads from the device) builds the same depths and mask as without."""
    g = torch.Generator().manual_seed(seed)
    n = 40
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])
    tokens = torch.randint(0, V, (n,), generator=g)
    open_loop = tree_from_parents(tokens, parents)
    deepest = int(open_loop.depths.max())
    for bound in (deepest, deepest + 3):
        bounded = tree_from_parents(tokens, parents, max_depth=bound)
        assert bounded.depths.equal(open_loop.depths) and bounded.mask.equal(open_loop.mask)
    short = tree_from_parents(tokens, parents, max_depth=deepest - 1)  # a bound too low misses ancestors
    assert not short.mask.equal(open_loop.mask)


def test_chain_tree():
    t = chain_tree(torch.tensor([4, 5, 6]))
    assert t.depths.tolist() == [0, 1, 2] and t.mask.equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert t.paths.tolist() == [[0, 1, 2]]
