"""Long contexts: the draft's training forward with text queries only equals the full forward; the draft's positions
have no limit (RoPE sees differences: the same states 30,000 positions later); a long prompt in a text window is read
by chunks with the same states; greedy speculative decoding past 30,000 positions, in every draft mode and position
numbering, equals HF `generate` token for token."""

import pytest
import torch

from conftest import get_target, hf_greedy

import sparrow


@pytest.fixture(scope="module")
def target(ckpt_dir):
    return get_target(ckpt_dir, "qwen2_5_vl", 0)


def test_text_queries_equal_the_full_forward(target):
    draft = sparrow.init_draft(target, seed=1)
    torch.manual_seed(0)
    x = torch.randn(1, 40, draft.config.hidden_size)
    pos = torch.arange(40).expand(3, 1, -1)
    full = draft(x, pos)
    queries = torch.tensor([0, 7, 8, 9, 25, 39])
    assert torch.allclose(draft(x, pos, queries=queries), full[:, queries], atol=1e-5)
    with pytest.raises(ValueError):
        draft(x, pos, attn_mask=torch.ones(1, 1, 40, 40, dtype=torch.bool), queries=queries)


def test_draft_states_are_the_same_30000_positions_later(target):
    draft = sparrow.init_draft(target, seed=2)
    torch.manual_seed(0)
    x = torch.randn(1, 24, draft.config.hidden_size)
    pos = torch.arange(24).expand(3, 1, -1)
    near, far = draft(x, pos), draft(x, pos + 30_000)
    assert torch.allclose(near, far, atol=2e-3), (near - far).abs().max()
    assert not torch.allclose(near, draft(x, pos.flip(-1)), atol=2e-3)  # positions do matter


def test_lossless_past_30000_positions(target):
    """A text prompt of 30,100 tokens (its positions run past 30k in every numbering), greedy = HF `generate`, for
    the text-only draft with absolute positions, with compact positions and a window, and the eagle draft."""
    ids = torch.randint(3, target.text_config.vocab_size, (1, 30_100), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in target.prepare(None, "x"):
        inputs["mm_token_type_ids"] = torch.zeros_like(ids)
    ref = hf_greedy(target, inputs, 6)
    prompt = sparrow.prefill_prompt(target, inputs, 6, 8)  # one prefill of the target for the three drafts
    for mode, position_mode, window in (("sparrow", "absolute", None), ("sparrow", "compact", 64),
                                        ("eagle", "compact", None)):
        draft = sparrow.init_draft(target, seed=3, mode=mode, position_mode=position_mode, window=window)
        out = sparrow.generate(target, draft, inputs, max_new_tokens=6, tree=sparrow.TreeConfig(4, 3, 8),
                               prompt=prompt)
        assert out.token_ids == ref, (mode, position_mode, window)
        assert out.stats.prompt_tokens == 30_100


def test_a_long_prompt_in_a_window_is_read_by_chunks_with_the_same_states(target, monkeypatch):
    import sparrow.draft as d

    draft = sparrow.init_draft(target, seed=4, window=48)
    torch.manual_seed(0)
    x = torch.randn(700, draft.config.hidden_size)
    pos = torch.arange(700).expand(3, -1)
    states = {}
    for chunk in (10**9, 256, 100):
        monkeypatch.setattr(d, "WINDOW_CHUNK", chunk)
        cache = d.DraftCache(draft.config, 800, "cpu", torch.float32)
        with torch.no_grad():
            states[chunk] = draft.step(x, pos, cache)
    assert torch.allclose(states[256], states[10**9], atol=1e-5)
    assert torch.allclose(states[100], states[10**9], atol=1e-5)
