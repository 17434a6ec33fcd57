"""The preallocated KV cache: appends without copies, and accept keeps exactly the accepted tree entries."""

import pytest
import torch

from sparrow.cache import KVCache, folded_sdpa


def test_accept_gathers_accepted_positions():
    torch.manual_seed(0)
    cache = KVCache(num_layers=2, capacity=32)
    prefix = [torch.randn(1, 2, 10, 4) for _ in range(2)]
    for i, layer in enumerate(cache.layers):
        layer.update(prefix[i], prefix[i] * 2)
    tree = [torch.randn(1, 2, 7, 4) for _ in range(2)]
    for i, layer in enumerate(cache.layers):
        k, v = layer.update(tree[i], tree[i] * 2)
        assert k.shape[2] == 17 and k.data_ptr() == layer.keys.data_ptr()  # a view of the buffer, no copy
    keep = torch.tensor([0, 2, 3, 6])
    cache.accept(10, keep)
    assert cache.length == 14 and cache.get_seq_length() == 14
    for i, layer in enumerate(cache.layers):
        expect = torch.cat((prefix[i], tree[i][:, :, keep]), dim=2)
        assert torch.equal(layer.keys[:, :, :14], expect)
        assert torch.equal(layer.values[:, :, :14], expect * 2)
    cache.truncate(12)
    assert cache.length == 12


def test_folded_attention_equals_repeated_kv():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 5, 16)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    mask = torch.rand(1, 1, 5, 40) > 0.3
    mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                           attn_mask=mask)
    assert torch.allclose(folded_sdpa(q, k, v, mask, None), ref, atol=1e-5)
    ref1 = torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], k.repeat_interleave(4, 1),
                                                            v.repeat_interleave(4, 1))
    assert torch.allclose(folded_sdpa(q[:, :, :1], k, v, None, None), ref1, atol=1e-5)


@pytest.mark.parametrize("prefix", [0, 1, 37, 3000, 30_000])
def test_split_tree_attention_equals_dense_masked_attention(prefix):
    """The cache attended without a mask and the tree block with its ancestor mask, merged by log-sum-exp, equal
    one dense masked attention (fp32, grouped-query heads, a random tree, cache lengths 0 to 30k)."""
    from sparrow.cache import split_tree_attention
    from sparrow.tree import tree_from_parents

    g = torch.Generator().manual_seed(prefix)
    q, hq, hkv, d = 13, 8, 2, 32
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, q)])
    tree = tree_from_parents(torch.zeros(q, dtype=torch.long), parents)
    query = torch.randn(1, hq, q, d, generator=g)
    key, value = torch.randn(2, 1, hkv, prefix + q, d, generator=g)
    mask = torch.ones(1, 1, q, prefix + q, dtype=torch.bool)
    mask[0, 0, :, prefix:] = tree.mask
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    split = split_tree_attention(query, key, value, prefix, tree.mask)
    assert torch.allclose(split, dense, atol=1e-5, rtol=1e-4), (split - dense).abs().max()
    causal = split_tree_attention(query, key, value, prefix, None)  # a chain: causal among the new entries
    mask[0, 0, :, prefix:] = torch.ones(q, q, dtype=torch.bool).tril()
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(causal, dense, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(split, causal, atol=1e-3)  # the tree's mask is not the chain's
