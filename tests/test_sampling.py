"""Speculative sampling must reproduce the target's own distribution (statistically).

The exact distribution of the first two new tokens is computed from the target (p(x1) * p(x2 | x1), warped as
HF warps it); N speculative generations are compared with it by a chi-square test on bins with expected count
>= 5 (the rest pooled). False-alarm rate per check: ALPHA = 1e-3 (the runs are seeded, so the outcome is fixed).
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import sparrow
from conftest import clip, fit_draft, get_target, hf_greedy, prepare
from sparrow.verify import Sampling, warp_probs

ALPHA = 1e-3
N = 800


def exact_pair_distribution(target, inputs, s: Sampling) -> np.ndarray:
    """(V, V) joint probability of the first two new tokens."""
    return exact_joint(target, inputs, s)[0]


def penalised(logits: torch.Tensor, ids: list[int], penalty: float) -> torch.Tensor:
    """HF's repetition penalty, written out: the logits of the tokens in `ids` divided by it (multiplied if < 0)."""
    x = logits.float().clone()
    idx = torch.tensor(sorted(set(ids)))
    x[idx] = torch.where(x[idx] < 0, x[idx] * penalty, x[idx] / penalty)
    return x


def exact_joint(target, inputs, s: Sampling, top_pairs: int = 0, penalty: float = 1.0):
    """(V, V) joint probability of the first two new tokens and, for the `top_pairs` likeliest pairs, (P, V) joint
    probability of (pair, third token); with a repetition penalty on the prompt's and the new tokens."""
    cache = target.new_cache(inputs["input_ids"].shape[1] + 2)
    pre = target.prefill(inputs, cache)
    prompt = inputs["input_ids"][0].tolist()
    p1 = warp_probs(penalised(pre.logits, prompt, penalty), s)
    V = p1.shape[0]
    joint = torch.zeros(V, V)
    n = cache.length
    for x1 in p1.nonzero(as_tuple=True)[0].tolist():
        cache.truncate(n)
        logits, _ = target.forward(torch.tensor([x1]), None, None, cache)
        joint[x1] = p1[x1] * warp_probs(penalised(logits[-1], prompt + [x1], penalty), s)
    pairs = joint.flatten().topk(top_pairs).indices if top_pairs else torch.zeros(0, dtype=torch.long)
    triple = torch.zeros(len(pairs), V)
    for i, flat in enumerate(pairs.tolist()):
        cache.truncate(n)
        logits, _ = target.forward(torch.tensor([flat // V, flat % V]), None, None, cache)
        seen = prompt + [flat // V, flat % V]
        triple[i] = joint.flatten()[flat] * warp_probs(penalised(logits[-1], seen, penalty), s)
    return joint.double().numpy(), [(f // V, f % V) for f in pairs.tolist()], triple.double().numpy()


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    expected = probs.ravel() * n
    big = expected >= 5
    obs = np.append(counts.ravel()[big], counts.ravel()[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs, exp).pvalue)


@pytest.fixture(scope="module")
def setup(ckpt_dir):
    target = get_target(ckpt_dir, "qwen2_5_vl", 3, kind="word", vocab_size=64, init_std=0.25)
    target.model.generation_config.eos_token_id = -1  # no EOS: every run yields three tokens
    inputs = prepare(target, clip(4, seed=3))
    draft = fit_draft(target, inputs, hf_greedy(target, inputs, 24))
    return target, inputs, draft


@pytest.mark.parametrize("method,temperature,top_p,top_k,penalty", [
    ("sparrow", 1.0, 1.0, 0, 1.0), ("sparrow", 1.0, 0.8, 0, 1.0), ("eagle", 0.7, 0.9, 20, 1.0),
    ("sparrow", 1.0, 1.0, 0, 2.0)])
def test_speculative_sampling_matches_target(setup, method, temperature, top_p, top_k, penalty):
    target, inputs, draft = setup
    s = Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    pair_probs, pairs, triple_probs = exact_joint(target, inputs, s, top_pairs=8, penalty=penalty)
    V = pair_probs.shape[0]
    pair_counts, triple_counts = np.zeros((V, V)), np.zeros((len(pairs), V))
    deep = 0
    prompt = sparrow.prefill_prompt(target, inputs, max_new_tokens=3, tree_tokens=10)  # one prefill for N runs
    for i in range(N):
        out = sparrow.generate(target, draft, inputs, max_new_tokens=3, method=method, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=i, repetition_penalty=penalty,
                               tree=sparrow.TreeConfig(top_k=4, depth=3, tokens=10), prompt=prompt)
        a, b, c = out.token_ids
        pair_counts[a, b] += 1
        if (a, b) in pairs:
            triple_counts[pairs.index((a, b)), c] += 1
        deep += out.stats.accept_lengths[0] > 1  # the second token was an accepted draft token
    # about 10% of runs with the repetition penalty (the draft, fitted to the unpenalised target, proposes repeats);
    # more without it
    assert deep > N // 20, "drafts were almost never accepted: the test would not exercise acceptance"
    p = chi2_pvalue(pair_counts, pair_probs)
    assert p > ALPHA, f"first two tokens deviate from the target distribution (chi-square p = {p:.2e})"
    p = chi2_pvalue(triple_counts, triple_probs / triple_probs.sum())
    assert p > ALPHA, f"third token deviates from the target distribution (chi-square p = {p:.2e})"
    if penalty != 1.0:  # and the samples do tell the penalised distribution from the plain one
        assert chi2_pvalue(pair_counts, exact_joint(target, inputs, s)[0]) < ALPHA


def test_the_check_detects_a_biased_sampler(setup):
    """The same test rejects samples from a wrong distribution (temperature 0.7 against 1.0)."""
    target, inputs, _ = setup
    right = exact_pair_distribution(target, inputs, Sampling(temperature=1.0))
    wrong = exact_pair_distribution(target, inputs, Sampling(temperature=0.7))
    rng = np.random.default_rng(0)
    draws = rng.choice(wrong.size, size=N, p=wrong.ravel() / wrong.sum())
    counts = np.bincount(draws, minlength=wrong.size).reshape(wrong.shape)
    assert chi2_pvalue(counts, right) < ALPHA


def test_accept_sampling_on_a_hand_made_tree_emits_the_targets_distribution():
    """Model-free, over one fixed tree and fixed logits: the first emitted token follows the root's distribution, and
    after the child that has children of its own the second follows that child's (20,000 draws; chi-square at
    ALPHA). Against the other child's distribution the same counts fail, so the check can fail."""
    from sparrow.tree import tree_from_parents
    from sparrow.verify import accept_sampling

    torch.manual_seed(0)
    V, draws = 8, 20000
    # node i carries token i; the root (0) has children 1, 2, 3 and node 1 has children 4, 5
    tree = tree_from_parents(torch.arange(6), torch.tensor([-1, 0, 0, 0, 1, 1]))
    logits = torch.randn(6, V)
    logits[0, 1] += 2.0  # the first draft token is accepted often, so the second level is exercised
    s = Sampling(temperature=1.0)
    p = warp_probs(logits, s).double().numpy()
    gen = torch.Generator().manual_seed(0)
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(draws):
        accepted, bonus = accept_sampling(tree, logits, s, gen)
        emitted = tree.tokens[accepted[1:]].tolist() + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 1:
            second[emitted[1]] += 1
    assert second.sum() > draws / 4, "the second level was hardly reached"
    assert chi2_pvalue(first, p[0]) > ALPHA
    assert chi2_pvalue(second, p[1]) > ALPHA
    assert chi2_pvalue(second, p[2]) < ALPHA


def test_warp_matches_hf_processors():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for t, k, p in [(1.0, 0, 0.9), (0.6, 10, 1.0), (1.3, 5, 0.5)]:
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1:
            x = TopPLogitsWarper(p)(None, x)
        assert torch.allclose(warp_probs(logits, Sampling(t, p, k)), x.softmax(-1), atol=1e-6)


def test_repetition_penalty_over_a_tree_matches_hf_on_every_path():
    """Each tree node's row is penalised as HF's RepetitionPenaltyLogitsProcessor penalises it on the sequence
    prompt + committed tokens + the node's own root-to-node path (siblings' tokens do not count)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from sparrow.tree import tree_from_parents
    from sparrow.verify import RepetitionPenalty

    torch.manual_seed(0)
    V, prompt, committed = 40, torch.tensor([3, 7, 7, 11]), [20]
    tree = tree_from_parents(torch.tensor([20, 5, 6, 3, 5, 30, 6]), torch.tensor([-1, 0, 0, 1, 1, 2, 5]))
    logits = torch.randn(len(tree), V) * 3
    for r in (1.3, 0.6):
        pen = RepetitionPenalty(r, prompt, V)
        pen.add(committed)
        got = pen(logits, tree)
        for i in range(len(tree)):
            path = [int(tree.tokens[j]) for j in range(len(tree)) if tree.mask[i, j] and j > 0]
            ids = torch.tensor([prompt.tolist() + committed + path])
            want = RepetitionPenaltyLogitsProcessor(r)(ids, logits[i:i + 1].clone())[0]
            assert torch.equal(got[i], want), f"node {i}, penalty {r}"
        assert not torch.equal(got[4], pen(logits)[4])  # node 4 (token 5 under 5) differs from the committed-only row
    with pytest.raises(sparrow.SparrowError, match="must be > 0"):
        RepetitionPenalty(0.0, prompt, V)
