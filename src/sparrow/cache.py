"""The target's KV cache: preallocated, with in-place accept, and GQA-folded attention for tree verification.

HF's `DynamicCache` concatenates (copies the whole cache) on every update, and HF's sdpa path repeats the KV
heads of a grouped-query model whenever a mask is given. At 25k tokens of context both make verifying a draft
tree several times slower than one decode step. Here:

- `KVCache` is a `transformers.Cache` whose layers write into buffers of a fixed capacity and hand the model a
  view of the filled part (no copy);
- `KVCache.accept(start, keep)` keeps the accepted tree positions by one gather per layer (no re-forward);
- `sparrow_attention` (the attention implementation "sparrow", registered with transformers by
  `register_attention`, which `load_target` calls) folds the query heads of each KV
  group into the query-length axis, so the masked verification forward reads every key once; given the tree's own
  q x q mask (`sparrow_tree`), it attends the cache by the fused kernel without a mask and the tree block by its
  mask, merged by their log-sum-exp (`split_tree_attention`; `SPLIT_TREE` says where that path is taken).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "sparrow"
FOLD_MAX_QUERY = 256  # above this query length (prefill) the plain sdpa kernel with is_causal is faster
# Devices whose tree verification uses `split_tree_attention` instead of one masked kernel call: on GPUs a mask
# drives attention off the fused kernels (at 25k, 31 tree tokens cost 2.2x a decode step on an H200). The draft's
# tree levels keep one masked call over their whole (text-only in sparrow mode, so short) cache: static shapes.
SPLIT_TREE = {"cuda"}


class PreallocLayer(CacheLayerMixin):
    """One layer's keys and values in buffers (B, H_kv, capacity, D); `length` slots are filled."""

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, self.capacity, d)
        self.values = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        end = self.length + q
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} entries); allocate a larger cache")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        self.length = tokens_to_remove if tokens_to_remove >= 0 else self.length + tokens_to_remove

    def reset(self) -> None:
        self.length = 0


class KVCache(Cache):
    """Preallocated KV cache for one sequence (batch 1), `num_layers` layers of `capacity` positions.

    Passed to the HF forward as `past_key_values`. After a tree verification that appended q entries at
    [start, start + q), `accept(start, keep)` moves the kept ones to [start, start + len(keep)) and drops the rest.
    """

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    def __len__(self) -> int:  # number of layers, as transformers expects
        return len(self.layers)

    @property
    def length(self) -> int:
        """Filled positions (the same in every layer)."""
        return self.layers[0].length

    def accept(self, start: int, keep: torch.Tensor) -> None:
        """Keep tree entries `start + keep` (keep: (m,) int64, ascending, relative to `start`) as [start, start+m).

        Source: EAGLE's KV update after acceptance (copy the accepted tree positions into contiguous slots).
        """
        m = keep.numel()
        src = keep + start
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[:, :, start : start + m] = layer.keys.index_select(2, src)
                layer.values[:, :, start : start + m] = layer.values.index_select(2, src)
            layer.length = start + m

    def truncate(self, length: int) -> None:
        """Drop every entry from position `length` on."""
        for layer in self.layers:
            layer.length = length


def folded_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scale: float | None) -> torch.Tensor:
    """Grouped-query attention without repeating KV heads.

    query (B, Hq, q, D), key/value (B, Hkv, k, D), mask None or bool (B|1, 1, q, k) (True = attend) or additive.
    The g = Hq / Hkv query heads of one KV group are folded into the query axis: (B, Hkv, g*q, D).
    Returns (B, Hq, q, D).
    """
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    if g == 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    qf = query.reshape(b, hkv, g * q, d)
    if mask is not None and q > 1:
        mask = mask.unsqueeze(2).expand(mask.shape[0], 1, g, q, mask.shape[-1]).reshape(mask.shape[0], 1, g * q, -1)
    out = F.scaled_dot_product_attention(qf, key, value, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, q, value.shape[-1])


def attend_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention with its log-sum-exp, on the fused kernel where torch exposes one: query (B, H, q, D),
    key/value (B, H, k, D) (the same head count) -> out (B, H, q, D) in the input dtype, lse (B, H, q) float32 (natural
    log of the softmax's denominator over the scaled scores)."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                               scale=scale)
        return out, lse.float()
    if query.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True,
                                                                           scale=scale)[:2]
        return out, lse[..., : query.shape[2]].float()  # the kernel may pad the query axis of lse
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    lse = scores.logsumexp(-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ value.float()).to(query.dtype), lse


def split_tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: int,
                         tree_mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """Tree attention split in two and merged by log-sum-exp: the `prefix` cache entries, which every query sees, by
    the fused kernel without a mask; the t entries after them (the tree) by the tree mask, a q x t block.

    query (B, Hq, q, D); key/value (B, Hkv, prefix + t, D) (grouped-query: Hq a multiple of Hkv; the g query heads of
    a KV group are folded into the query axis, so every key is read once); tree_mask (q, t) bool (True = attend;
    every row attends somewhere) or None (t = q, causal among the q). Returns (B, Hq, q, D), equal to dense masked
    attention up to float rounding. Used by the target's verification (`sparrow_attention` with `sparrow_tree`).
    Source: FlashInfer's cascade attention (`merge_state`), LongSpec's hybrid tree
    attention.
    """
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qf = query.reshape(b, hkv, g * q, d)
    kt, vt = key[:, :, prefix:], value[:, :, prefix:]
    if tree_mask is None:
        tree_mask = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
    scores = (qf.float() @ kt.float().transpose(-1, -2)) * scale  # (B, Hkv, g*q, q)
    scores = scores.masked_fill(~tree_mask.repeat(g, 1), float("-inf"))  # (g*q, t): row i*q + j is query j
    lse_t = scores.logsumexp(-1)
    out = torch.exp(scores - lse_t.unsqueeze(-1)) @ vt.float()
    if prefix > 0:
        out_p, lse_p = attend_with_lse(qf, key[:, :, :prefix], value[:, :, :prefix], scale)
        m = torch.maximum(lse_p, lse_t)
        wp, wt = torch.exp(lse_p - m).unsqueeze(-1), torch.exp(lse_t - m).unsqueeze(-1)
        out = (out_p.float() * wp + out * wt) / (wp + wt)
    return out.to(query.dtype).reshape(b, hq, q, value.shape[-1])


def sparrow_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """Attention function for transformers' `AttentionInterface` ("sparrow").

    Decode and tree verification (short queries, any mask) run `folded_sdpa`; prefill, vision towers and anything
    else fall back to transformers' own sdpa function. Returns (B, q, Hq, D), None, as HF attention functions do.
    """
    q = query.shape[2]
    tree = kwargs.pop("sparrow_tree", None)  # (q, q) from Target.forward: the tree block's mask, the cache unmasked
    if tree is not None and tree.shape[0] == q and dropout == 0.0:
        out = split_tree_attention(query, key, value, key.shape[2] - q, tree, scaling)
        return out.transpose(1, 2).contiguous(), None
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and q <= FOLD_MAX_QUERY and (q == 1 or attention_mask is not None) and dropout == 0.0 \
            and kwargs.get("position_bias") is None:
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[..., : key.shape[-2]]
        out = folded_sdpa(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register_attention() -> str:
    """Register `sparrow_attention` (and sdpa's mask builder) with transformers under `ATTN_IMPLEMENTATION`, so
    that a model can be loaded or switched with `attn_implementation="sparrow"`; idempotent. Returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sparrow_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
