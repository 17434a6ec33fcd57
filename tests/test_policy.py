"""The tree policy: verify costs, the counterfactual tau of smaller trees, plain steps when speculation cannot pay,
and token-exact output through every switch."""

import json

import pytest
import torch

import sparrow
from sparrow import policy
from sparrow.policy import TreePolicy, monotone
from sparrow.tree import TreeConfig, build_tree

from conftest import clip, fit_draft, get_target, hf_greedy, prepare


@pytest.fixture(autouse=True)
def cost_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARROW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_monotone_fit_pools_the_sizes_timed_faster_than_smaller_ones():
    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert monotone([5.0, 1.0, 1.0]) == pytest.approx([7 / 3] * 3)


def test_ranks_give_the_tree_of_each_smaller_size():
    """The dynamic tree of N nodes is the larger tree's nodes of rank < N: the counterfactual the policy reads."""
    torch.manual_seed(0)
    V = 50
    table = torch.log_softmax(torch.randn(V, V) * 3, -1)  # a draft that depends on the last token only

    def expand(tokens, parent_slot):
        return table[tokens]

    big = build_tree(3, table[3], expand, TreeConfig(top_k=4, depth=4, tokens=30))
    assert sorted(big.ranks[1:].tolist()) == list(range(30))
    for n in (1, 4, 8, 16):
        small = build_tree(3, table[3], expand, TreeConfig(top_k=4, depth=4, tokens=n))
        keep = [0] + [i for i in range(1, 31) if big.ranks[i] < n]
        pairs = lambda t, idx: sorted((int(t.tokens[i]), int(t.depths[i]), int(t.tokens[t.parents[i]]) if i else -1)
                                      for i in idx)  # noqa: E731
        assert pairs(small, range(len(small))) == pairs(big, keep)


def test_policy_prefers_plain_steps_when_drafts_fail_and_comes_back_when_they_pass():
    costs = {0: 0.010, 4: 0.012, 8: 0.014, 16: 0.018, 30: 0.026}
    p = TreePolicy(costs, (4, 8, 16, 30))
    assert p.choose() == 8  # the first cycle: a middle size
    p.observe(8, [0, 1, 2, 3, 5], draft_s=0.002, verify_s=0.014)  # 5 accepted: a 4-tree would have got 4 + bonus
    assert p.tau == {4: 5, 8: 6}
    n = p.choose()
    assert n == 30  # speculation pays (6 tokens in 16 ms against 1 in 10): the largest tree, to measure every size
    p.observe(30, [0, 1, 2, 3, 5, 9], draft_s=0.002, verify_s=0.026)
    p.observe(30, [0, 1, 2, 3, 5, 9], draft_s=0.002, verify_s=0.026)
    n = p.choose()
    assert n == 8  # every size measured: 6 tokens in 16 ms beats 7 in 20 ms (16) or in 28 ms (30)
    for _ in range(40):  # the drafts stop being accepted
        p.observe(n, [], draft_s=0.002, verify_s=costs[n])
        n = p.choose()
        if n == 0:
            break
    assert n == 0, p.summary()
    plain = [n] + [p.choose() for _ in range(3)]  # 4 plain steps, then one try at the largest size
    for _ in plain[1:]:
        p.plain(0.010)
    p.plain(0.010)
    assert plain == [0, 0, 0, 0] and p.choose() == 4  # the probe: the smallest tree, the cheapest test
    p.observe(4, [], draft_s=0.002, verify_s=0.012)  # still rejected: 8 plain steps this time
    assert [p.choose() for _ in range(8)] == [0] * 8
    for _ in range(8):
        p.plain(0.010)
    assert p.choose() == 4
    for _ in range(15):  # accepted again: speculation again
        p.observe(4, [0, 1, 2, 3], draft_s=0.002, verify_s=0.012)
    assert p.choose() > 0
    assert p.summary()["choices"]["0"] == 12


def test_verify_costs_are_measured_once_and_read_back(ckpt_dir, cost_dir, monkeypatch):
    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    inputs = prepare(target, clip(4))
    cache = target.new_cache(inputs["input_ids"].shape[1] + 40)
    target.prefill(inputs, cache)
    n = cache.length
    costs = policy.cached_verify_costs(target, cache, (4, 8))
    assert cache.length == n and set(costs) == {0, 4, 8} and costs[0] <= costs[4] <= costs[8]
    stored = json.loads((cost_dir / "verify_costs.json").read_text())
    assert list(stored) == [policy.cost_key(target, n)]
    monkeypatch.setattr(policy, "measure_verify_costs", lambda *a, **k: pytest.fail("measured again"))
    assert policy.cached_verify_costs(target, cache, (4, 8)) == costs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_switch_of_the_policy_is_lossless(ckpt_dir, monkeypatch, temperature):
    """A policy forced through every mode (plain steps, every tree size, back and forth) gives the target's own
    output: greedy token for token with HF generate, sampled the same tokens as a fixed-tree run of the same
    seed is not required, so sampling checks that every emitted token is counted once."""
    target = get_target(ckpt_dir, "qwen2_5_vl", 1)
    inputs = prepare(target, clip(8, seed=1))
    ref = hf_greedy(target, inputs, 40)
    draft = fit_draft(target, inputs, ref, seed=1, steps=60)
    script = iter([30, 0, 0, 4, 0, 8, 16, 0, 30, 0, 0, 0] * 10)

    class Forced(TreePolicy):
        def choose(self):
            n = next(script)
            self.counts[n] = self.counts.get(n, 0) + 1
            return n

    monkeypatch.setattr(sparrow.decode, "TreePolicy", Forced)
    out = sparrow.generate(target, draft, inputs, max_new_tokens=40, temperature=temperature, seed=3)
    choices = out.stats.policy["choices"]
    assert {"0", "4", "8", "16", "30"} <= set(choices) and out.stats.plain_steps == choices["0"]
    assert sum(out.stats.accept_lengths) == len(out.token_ids) - 1
    if temperature == 0:
        assert out.token_ids == ref
