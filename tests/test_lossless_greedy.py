"""Greedy speculative decoding must equal the target's own HF `generate(do_sample=False)` token for token."""

import pytest

import sparrow
from conftest import FAMILIES, clip, fit_draft, get_target, hf_greedy, prepare

TREES = {
    "chain": sparrow.TreeConfig(top_k=1, depth=6, tokens=6),
    "small": sparrow.TreeConfig(top_k=3, depth=3, tokens=8),
    "wide": sparrow.TreeConfig(top_k=8, depth=5, tokens=30),
    "deep-wide": sparrow.TreeConfig(top_k=10, depth=8, tokens=60),
}
MODES = [  # (method, draft config overrides)
    ("sparrow", {}),
    ("sparrow", {"position_mode": "absolute"}),
    ("sparrow", {"window": 4}),
    ("eagle", {}),
]
CASES = [(f, s, n) for f in FAMILIES for s, n in ((0, 2), (1, 16))] + [
    ("qwen2_5_vl", 2, 64), ("llava_onevision", 2, 64), ("qwen2_vl", 0, 0), ("qwen2_5_vl", 0, 0),
    ("llava_onevision", 0, 0)]


@pytest.mark.parametrize("family,seed,frames", CASES)
def test_greedy_equals_hf(ckpt_dir, family, seed, frames):
    target = get_target(ckpt_dir, family, seed)
    inputs = prepare(target, clip(frames, seed=seed) if frames else None)
    ref = hf_greedy(target, inputs, 48)
    fitted = fit_draft(target, inputs, ref, seed=seed)
    random_draft = sparrow.init_draft(target, seed=seed + 7)
    taus = []
    for name, tree in TREES.items():
        for method, over in MODES:
            # the random draft is rejected at almost every node, one token a cycle: 16 tokens run its rejection
            # paths through every tree and mode (and HF's greedy 16 are the first 16 of its 48)
            for draft, n in ((fitted, 48), (random_draft, 16)):
                for k, v in over.items():
                    setattr(draft.config, k, v)
                out = sparrow.generate(target, draft, inputs, max_new_tokens=n, method=method, tree=tree)
                for k in over:
                    setattr(draft.config, k, {"position_mode": "compact", "window": None}[k])
                assert out.token_ids == ref[:n], f"{name} {method} {over}: speculative output differs from HF greedy"
                assert sum(out.stats.accept_lengths) == len(ref[:n]) - 1
                if draft is fitted:
                    taus.append(out.stats.tau)
    ar = sparrow.generate(target, None, inputs, max_new_tokens=48, method="ar")
    assert ar.token_ids == ref and ar.stats.tau == 1.0
    assert max(taus) > 2.5, "the fitted draft never got accepted deeply: the test would not exercise accept paths"


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_inside_an_accepted_run(ckpt_dir, family):
    """EOS handling: generation stops at the first EOS (kept), even when it sits inside an accepted draft run."""
    target = get_target(ckpt_dir, family, 0)
    inputs = prepare(target, clip(4))
    ref = hf_greedy(target, inputs, 40)
    draft = fit_draft(target, inputs, ref)
    gc = target.model.generation_config
    old = gc.eos_token_id
    try:
        for pos in (0, 5, 17):
            gc.eos_token_id = ref[pos]
            expect = hf_greedy(target, inputs, 40)
            assert expect == ref[: ref.index(ref[pos]) + 1]
            for method in ("sparrow", "eagle", "ar"):
                out = sparrow.generate(target, draft, inputs, max_new_tokens=40, method=method)
                assert out.token_ids == expect and out.stats.stop_reason == "eos"
    finally:
        gc.eos_token_id = old


def test_stop_strings_match_hf(ckpt_dir):
    """Stop strings end generation where HF's `generate(stop_strings=...)` does: at the token that completes one,
    also when the stop string begins in the prompt or ends inside the completing token, and not for one
    that lies in the prompt alone."""
    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    inputs = prepare(target, clip(4))
    tok, prompt = target.tokenizer, inputs["input_ids"][0].tolist()
    ref = hf_greedy(target, inputs, 40)
    draft = fit_draft(target, inputs, ref)
    k = next(i for i in range(4, 30) if len(tok.decode(ref[i:i + 1])) > 1)  # a token of two characters or more
    stops = {"inside the answer": tok.decode(ref[9:11]),
             "from the prompt into the answer": tok.decode(prompt[-1:] + ref[:1]),
             "ending inside the completing token": tok.decode(ref[k - 1:k + 1])[:-1],
             "in the prompt alone": "assistant"}
    for name, stop in stops.items():
        expect = target.model.generate(**inputs, max_new_tokens=40, do_sample=False, stop_strings=[stop],
                                       tokenizer=tok)[0, len(prompt):].tolist()
        assert (len(expect) < 40) == (name != "in the prompt alone"), name
        for method in ("sparrow", "ar"):
            out = sparrow.generate(target, draft, inputs, max_new_tokens=40, stop=[stop], method=method)
            assert out.token_ids == expect, f"{method}, stop string {name} ({stop!r})"
            assert out.stats.stop_reason == ("max_new_tokens" if len(expect) == 40 else "stop_string")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_repetition_penalty_matches_hf(ckpt_dir, family):
    """With a repetition penalty, greedy output equals HF `generate(repetition_penalty=...)`: each tree node is
    penalised along its own path (prompt, committed tokens, its ancestors). The checkpoint's generation_config value is
    the default, as in `generate`."""
    target = get_target(ckpt_dir, family, 1)
    inputs = prepare(target, clip(4, seed=1))
    L, gc = inputs["input_ids"].shape[1], target.model.generation_config
    plain = hf_greedy(target, inputs, 40)
    for rp in (1.3, 0.7):
        ref = target.model.generate(**inputs, max_new_tokens=40, do_sample=False, repetition_penalty=rp)[0, L:].tolist()
        assert ref != plain
        draft = fit_draft(target, inputs, ref)  # accepted deep, so the paths' own tokens matter
        taus = []
        for method, tree in (("sparrow", TREES["wide"]), ("sparrow", TREES["chain"]), ("eagle", TREES["small"]),
                             ("ar", None)):
            out = sparrow.generate(target, draft, inputs, max_new_tokens=40, method=method, tree=tree,
                                   repetition_penalty=rp)
            assert out.token_ids == ref, f"{method}, repetition penalty {rp}"
            taus.append(out.stats.tau)
        assert max(taus) > 2.5
        assert target.hf_greedy(inputs, 40, repetition_penalty=rp) == ref
    old = gc.repetition_penalty
    try:
        gc.repetition_penalty = 1.3
        expect = target.model.generate(**inputs, max_new_tokens=40, do_sample=False)[0, L:].tolist()
        assert expect != plain and target.hf_greedy(inputs, 40) == expect
        assert sparrow.generate(target, draft, inputs, max_new_tokens=40).token_ids == expect
        assert sparrow.generate(target, draft, inputs, max_new_tokens=40, repetition_penalty=1.0).token_ids == plain
    finally:
        gc.repetition_penalty = old
    with pytest.raises(sparrow.SparrowError, match="repetition penalty must be > 0"):
        sparrow.generate(target, draft, inputs, max_new_tokens=4, repetition_penalty=0.0)


def test_long_video_many_visual_tokens(ckpt_dir):
    """A longer clip (64 frames at 112x112: 512 visual tokens) through both draft modes."""
    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    inputs = target.prepare(clip(64, 112, 112), "Describe the video.", max_pixels=112 * 112, min_pixels=28 * 28)
    assert int(target.visual_mask(inputs["input_ids"][0]).sum()) == 512
    ref = hf_greedy(target, inputs, 32)
    draft = fit_draft(target, inputs, ref)
    for method in ("sparrow", "eagle"):
        out = sparrow.generate(target, draft, inputs, max_new_tokens=32, method=method)
        assert out.token_ids == ref
        assert out.stats.visual_tokens == 512


def test_sparrow_draft_cache_holds_text_only(ckpt_dir):
    """VATA: in sparrow mode the draft's KV cache never holds a visual position; in eagle mode it holds all."""
    from sparrow.draft import DraftRunner

    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    inputs = prepare(target, clip(16))
    L = inputs["input_ids"].shape[1]
    n_vis = int(target.visual_mask(inputs["input_ids"][0]).sum())
    cache = target.new_cache(L + 8)
    pre = target.prefill(inputs, cache, capture_embeds=True)
    draft = sparrow.init_draft(target)
    tree = sparrow.TreeConfig()
    for method, expected in (("sparrow", L - n_vis), ("eagle", L)):
        runner = DraftRunner(draft, target, pre, method, 8, tree)
        runner.prefill(inputs["input_ids"][0], pre, 5)
        assert runner.cache.committed == expected  # prompt entries 1..L-1 kept + the first new token
    assert n_vis > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_no_deprecation_warning_reaches_the_user(ckpt_dir, family):
    """Prefill, verify and decode call the HF forward with the argument names this transformers version takes
    (e.g. `cache`, which replaced `past_key_values` in 5.2x), so a user sees no FutureWarning from them."""
    import warnings

    target = get_target(ckpt_dir, family, 0)
    inputs = prepare(target, clip(4))
    draft = sparrow.init_draft(target, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ("sparrow", "ar"):
            sparrow.generate(target, draft if method != "ar" else None, inputs, max_new_tokens=8, method=method)
    bad = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, f"deprecation warnings: {bad}"


def test_fused_projections_give_the_layers_own_states(ckpt_dir):
    """At inference the draft layer runs q/k/v and gate/up as one matmul each: the same states as the separate
    projections (fp32 tolerance), rebuilt after the weights change."""
    import torch

    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    draft = sparrow.init_draft(target, seed=3)
    x, pos = torch.randn(1, 5, draft.config.hidden_size), torch.arange(5).expand(3, 1, 5)
    with torch.enable_grad():
        separate = draft(x, pos)
    with torch.no_grad():
        fused = draft(x, pos)
        assert torch.allclose(separate, fused, atol=1e-5)
        draft.layer.k_proj.weight.mul_(2.0)  # an optimiser step: the fused weights follow
        draft.layer.up_proj.weight.add_(0.1)
        after = draft(x, pos)
    with torch.enable_grad():
        assert torch.allclose(draft(x, pos), after, atol=1e-5) and not torch.allclose(after, fused, atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])  # both language models (Qwen2 is shared)
def test_split_tree_attention_path_is_lossless(ckpt_dir, family, monkeypatch):
    """The split path (the cache unmasked by the fused kernel, the tree block by its mask, merged by log-sum-exp),
    which GPUs take for the target's tree verification, run on the CPU: greedy = HF."""
    import sparrow.cache

    monkeypatch.setattr(sparrow.cache, "SPLIT_TREE", {"cpu"})
    target = get_target(ckpt_dir, family, 1)
    inputs = prepare(target, clip(16, seed=1))
    ref = hf_greedy(target, inputs, 40)
    fitted = fit_draft(target, inputs, ref, seed=1)
    for method, over in MODES:
        for k, v in over.items():
            setattr(fitted.config, k, v)
        out = sparrow.generate(target, fitted, inputs, max_new_tokens=40, method=method, tree=TREES["wide"])
        for k in over:
            setattr(fitted.config, k, {"position_mode": "compact", "window": None}[k])
        assert out.token_ids == ref, f"{method} {over}"
        assert out.stats.tau > 2.0, "the draft was hardly accepted: the split path's accept paths went untested"


def test_draft_rms_norm_is_torchs():
    """The draft's RMSNorm (four elementwise ops, float32 inside) gives nn.RMSNorm's output for the same weight."""
    import torch

    from sparrow.draft import RMSNorm

    ours, theirs = RMSNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 64) * 5
    assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    half = ours.to(torch.bfloat16)(x.bfloat16())  # a draft in bf16: float32 inside, bf16 out
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), theirs(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_warm_up_leaves_generation_lossless(ckpt_dir, family):
    """`sparrow.warm_up` (one short plain and speculative generation at load) runs on each family and what
    follows is still HF's greedy output, for both draft modes."""
    target = get_target(ckpt_dir, family, 0)
    inputs = prepare(target, clip(2))
    ref = hf_greedy(target, inputs, 12)
    for mode in ("sparrow", "eagle"):
        draft = sparrow.init_draft(target, seed=1, mode=mode)
        assert sparrow.warm_up(target, draft) > 0
        assert sparrow.generate(target, draft, inputs, max_new_tokens=12).token_ids == ref


@pytest.mark.parametrize("mode,over", [("sparrow", {}), ("sparrow", {"window": 5}),
                                       ("sparrow", {"position_mode": "absolute"}), ("eagle", {})])
def test_tree_levels_equal_the_drafts_own_forward(ckpt_dir, mode, over):
    """Each tree node's draft state, as `DraftRunner.expand` computes it (slots after the committed entries, one
    visibility row over the whole cache, one rotation a level), equals the draft's full forward over the committed
    entries and the node's own path (with a window: the last `window` committed entries and the path)."""
    import torch

    from sparrow.draft import DraftRunner

    target = get_target(ckpt_dir, "qwen2_5_vl", 0)
    inputs = prepare(target, clip(4))
    ids = inputs["input_ids"][0]
    pre = target.prefill(inputs, target.new_cache(ids.shape[0] + 8), capture_embeds=True)
    draft = sparrow.init_draft(target, seed=2, mode=mode, **over)
    k, w = 3, over.get("window")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        runner = DraftRunner(draft, target, pre, mode, 8, sparrow.TreeConfig(top_k=k, depth=4, tokens=12))
        x, pos, _ = runner.prompt_inputs(ids, pre, 5)
        runner.prefill(ids, pre, 5)
        c = x.shape[0]
        paths = [[] for _ in range(k)]  # each frontier node's path: its entries' inputs (H,) and positions (3,)
        parent_states, parent_slot = runner.root_state.expand(k, -1), None
        for level in range(3):
            tokens = torch.randint(0, target.vocab_size, (k,), generator=gen)
            runner.expand(tokens, parent_slot)
            node_pos = (runner.root_pos + level + 1)[:, 0]
            if parent_slot is not None:
                paths = [paths[int(p)] for p in parent_slot]
            paths = [path + [(draft.fuse(draft.embed(t), s), node_pos)] for path, t, s in
                     zip(paths, tokens, parent_states)]
            want = []
            for path in paths:
                seq = torch.cat((x, torch.stack([e for e, _ in path])))
                seq_pos = torch.cat((pos, torch.stack([q for _, q in path], dim=1)), dim=1)
                n = seq.shape[0]
                mask = torch.ones(n, n, dtype=torch.bool).tril()
                if w is not None:
                    mask[-1, : c - w] = False
                want.append(draft(seq[None], seq_pos[:, None], attn_mask=mask[None, None])[0, -1])
            want = torch.stack(want)
            assert torch.allclose(runner.front_states, want, atol=1e-4), (level, mode, over)
            parent_slot = torch.tensor([2, 0, 0])  # the next level's nodes hang from these nodes of this one
            parent_states = want[parent_slot]


def test_compiled_tree_step_drafts_the_same_trees(ckpt_dir):
    """`SparrowDraft.compile_tree` (torch.compile of the tree level, whole graph): the same answers as HF and the
    same accepted lengths as the eager draft, cycle by cycle."""
    target = get_target(ckpt_dir, "qwen2_5_vl", 1)
    inputs = prepare(target, clip(16, seed=1))
    ref = hf_greedy(target, inputs, 24)
    fitted = fit_draft(target, inputs, ref, seed=1)
    eager = sparrow.generate(target, fitted, inputs, max_new_tokens=24, tree=TREES["wide"])
    compiled = sparrow.generate(target, fitted.compile_tree(), inputs, max_new_tokens=24, tree=TREES["wide"])
    assert compiled.token_ids == eager.token_ids == ref
    assert compiled.stats.accept_lengths == eager.stats.accept_lengths and eager.stats.tau > 2.0
