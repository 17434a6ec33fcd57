"""The Sparrow draft: an EAGLE-style single decoder layer over text positions (docs/method.md section 2).

    z_t = FC([norm(e_t) ; h_{t-1}])            e: frozen target embedding, h: target top state (or the draft's own)
    s_t = norm_out(DecoderLayer(z_t))          the draft's state, trained to match the target's top state
    logits_t = target LM head (s_t)            frozen, shared with the target

The decoder layer is of the target's family (RMSNorm, RoPE / mRoPE, GQA, SwiGLU, qkv bias). In training
(IVSB) the layer-m visual states, through `visual_proj`, precede the text positions; at inference:
- mode "sparrow" (VATA): the draft's sequence and KV cache hold TEXT positions only; positions are renumbered
  compactly (`position_mode="compact"`) or kept absolute (the target's, with a gap); an optional `window` keeps
  only the last `window` committed text entries visible.
- mode "eagle" (MSD/EAGLE baseline): every prompt position, visual ones included, with the target's positions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cache import folded_sdpa
from .errors import SparrowError

DRAFT_CONFIG = "config.json"
DRAFT_WEIGHTS = "model.safetensors"


WINDOW_CHUNK = 256  # queries per chunk of a long catch-up (the prompt pass) when the draft has a text window
MODES = ("sparrow", "eagle")  # text-only draft cache (VATA) | every position (the EAGLE baseline)
POSITION_MODES = ("compact", "absolute")


@dataclass
class DraftConfig:
    """Shape of the draft (copied from the target's text config) and how it runs.

    mode: "sparrow" (text positions only, VATA) | "eagle" (all positions).
    position_mode: "compact" (text entries renumbered 0, 1, ...) | "absolute" (the target's positions).
    window: None (all committed text entries visible) or the number of most recent committed entries visible.
    mid_layer: the target layer m whose visual states IVSB uses in training (HF `hidden_states[m]`).
    """

    family: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mrope_section: list[int] | None = None
    qkv_bias: bool = True
    target_num_layers: int = 0
    mid_layer: int = 0
    mode: str = "sparrow"
    position_mode: str = "compact"
    window: int | None = None
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise SparrowError(f"draft mode must be {' or '.join(map(repr, MODES))}, got {self.mode!r}")
        if self.position_mode not in POSITION_MODES:
            raise SparrowError(f"position_mode must be {' or '.join(map(repr, POSITION_MODES))}, got "
                               f"{self.position_mode!r}")
        if self.window is not None and self.window < 1:
            raise SparrowError(f"window must be a positive number of text tokens or None, got {self.window}")
        n = self.target_num_layers
        if n and not 1 <= self.mid_layer < n:
            raise SparrowError(f"mid_layer {self.mid_layer}: the target has {n} layers; give 1 to {n - 1} (or leave "
                               f"it unset for {n // 2})")

    @classmethod
    def from_target(cls, target, **overrides) -> "DraftConfig":
        """The draft shaped like one of `target`'s decoder layers (hidden size, heads, head_dim, rope and mRoPE
        sections, vocabulary), with m = `target.default_mid_layer()`; `overrides` set any other field."""
        tc = target.text_config
        heads = tc.num_attention_heads
        rope = getattr(tc, "rope_parameters", None) or {}
        kw = dict(family=target.family, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
                  num_attention_heads=heads, num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
                  head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads, vocab_size=tc.vocab_size,
                  rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
                  rope_theta=float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))),
                  mrope_section=list(rope["mrope_section"]) if rope.get("mrope_section") else None,
                  target_num_layers=tc.num_hidden_layers, mid_layer=target.default_mid_layer())
        kw.update(overrides)
        return cls(**kw)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (the same parameter, the same formula, computed in float32 as the Qwen and Llama families do)
    in four elementwise ops: torch's fused CPU kernel costs 20-50 us on a draft's few rows, 10x these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self)


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """`norm`'s RMSNorm of x (..., H) without a module call (the draft's inference step calls it four times)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype) * norm.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer of the Qwen2 family: RMSNorm -> GQA attention (qkv bias, RoPE) -> RMSNorm ->
    SwiGLU MLP, with residuals. Attention runs over a caller-supplied key/value history and mask."""

    def __init__(self, c: DraftConfig):
        super().__init__()
        h, d = c.hidden_size, c.head_dim
        self.c = c
        self.q_proj = nn.Linear(h, c.num_attention_heads * d, bias=c.qkv_bias)
        self.k_proj = nn.Linear(h, c.num_key_value_heads * d, bias=c.qkv_bias)
        self.v_proj = nn.Linear(h, c.num_key_value_heads * d, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * d, h, bias=False)
        self.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        self.input_layernorm = RMSNorm(h, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, eps=c.rms_norm_eps)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if c.mrope_section:  # which position axis (t, h, w) drives each frequency
            axis = torch.repeat_interleave(torch.arange(3), torch.tensor(c.mrope_section))
        else:
            axis = torch.zeros(d // 2, dtype=torch.long)
        self.register_buffer("freq_axis", axis, persistent=False)

    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (3, B, q) -> cos, sin (B, 1, q, D). mRoPE: frequency j rotates by the position on axis freq_axis[j]."""
        freqs = pos.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (3, B, q, D/2)
        freqs = freqs.gather(0, self.freq_axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Inference weights with one matmul where the layer has three or two: q/k/v (Hq*D + 2*Hkv*D, H) with its
        bias, and gate/up (2*I, H). Built from the separate projections (the trained and saved parameters) and
        rebuilt whenever one of them changes (an optimiser step, a dtype or device move; parameters made under
        `torch.inference_mode` have no version counter: only a new tensor is seen there)."""
        parts = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.gate_proj.weight,
                 self.up_proj.weight, *((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
                                        if self.q_proj.bias is not None else ()))
        key = tuple((p.data_ptr(), p._version if not p.is_inference() else -1) for p in parts)
        if getattr(self, "_fused_key", None) != key:
            with torch.no_grad():
                qkv_b = torch.cat(parts[5:]) if len(parts) > 5 else None
                self._fused = (torch.cat(parts[:3]), qkv_b, torch.cat(parts[3:5]))
            self._fused_key = key
        return self._fused

    def project_kv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, q, H), pos (3, B, q) -> q (B, Hq, q, D), k, v (B, Hkv, q, D), RoPE applied. Without autograd the
        three projections run as one matmul (`fused`), the same numbers up to float rounding."""
        b, q, _ = x.shape
        d, c = self.c.head_dim, self.c
        hn = self.input_layernorm(x)
        if torch.is_grad_enabled():
            qs, ks, vs = self.q_proj(hn), self.k_proj(hn), self.v_proj(hn)
        else:
            w, bias, _ = self.fused()
            qs, ks, vs = F.linear(hn, w, bias).split(
                (c.num_attention_heads * d, c.num_key_value_heads * d, c.num_key_value_heads * d), dim=-1)
        qs = qs.reshape(b, q, -1, d).transpose(1, 2)
        ks = ks.reshape(b, q, -1, d).transpose(1, 2)
        vs = vs.reshape(b, q, -1, d).transpose(1, 2)
        cos, sin = self.rope(pos, x.dtype)
        return qs * cos + rotate_half(qs) * sin, ks * cos + rotate_half(ks) * sin, vs

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x (B, q, H), attn (B, Hq, q, D) -> layer output (B, q, H). Without autograd gate and up run as one
        matmul (`fused`)."""
        b, _, q, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, q, -1))
        hn = self.post_attention_layernorm(x)
        if torch.is_grad_enabled():
            return x + self.down_proj(F.silu(self.gate_proj(hn)) * self.up_proj(hn))
        gate, up = F.linear(hn, self.fused()[2]).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class DraftCache:
    """The draft's own KV cache (batch 1): `committed` entries, then temporary tree entries up to `length`."""

    def __init__(self, c: DraftConfig, capacity: int, device, dtype):
        self.k = torch.zeros(1, c.num_key_value_heads, capacity, c.head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.capacity, self.committed, self.length = capacity, 0, 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (1, kv_heads, q, head_dim) at [length, length + q). RuntimeError past `capacity`."""
        q = k.shape[2]
        if self.length + q > self.capacity:
            raise RuntimeError(f"draft cache capacity {self.capacity} exceeded")
        self.k[:, :, self.length : self.length + q] = k
        self.v[:, :, self.length : self.length + q] = v
        self.length += q

    def rollback(self) -> None:
        """Drop the temporary (tree) entries."""
        self.length = self.committed


class SparrowDraft(nn.Module):
    """EAGLE-style draft of one decoder layer (docs/method.md section 2). See the module docstring.

    The target's token embedding and LM head are used frozen through `attach(target)`; they are not part of
    the draft's parameters or of its saved weights. `visual_keep` ((L,) bool over a prompt's positions, or None:
    all) is for analysis only: the visual positions that an "eagle"-mode cache holds (`sparrow analyze`'s
    negative visual gain); the output stays lossless whatever it holds.
    """

    def __init__(self, config: DraftConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.embed_norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.visual_proj = nn.Linear(h, h, bias=True)  # IVSB: layer-m visual states -> draft input (training)
        self.layer = DecoderLayer(config)
        self.norm = RMSNorm(h, eps=config.rms_norm_eps)
        self._frozen = None  # (embed_tokens, lm_head) of the target
        self.tree_fn = self.tree_step  # what DraftRunner calls for a tree level: tree_step, or its compiled form
        self.compiled = False  # compile_tree was called
        self.visual_keep: torch.Tensor | None = None
        with torch.no_grad():
            self.visual_proj.weight.copy_(torch.eye(h))
            self.visual_proj.bias.zero_()

    # ---- target coupling ----
    def attach(self, target) -> "SparrowDraft":
        """Use `target`'s frozen embedding and LM head; check that the draft was made for this target.
        Raises SparrowError naming the first mismatch (family, hidden size, vocabulary)."""
        c, tc = self.config, target.text_config
        for name, mine, theirs in (("family", c.family, target.family), ("hidden size", c.hidden_size,
                                   tc.hidden_size), ("vocabulary size", c.vocab_size, tc.vocab_size)):
            if mine != theirs:
                raise SparrowError(f"draft was made for another target: {name} {mine} != target's {theirs}; "
                                   f"train or init a draft for this target (sparrow init-draft --target ...)")
        self._frozen = (target.embed_tokens, target.lm_head)
        return self.to(device=target.device, dtype=target.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (...,) -> the target's input embeddings (..., hidden); needs `attach`."""
        return F.embedding(ids, self._frozen[0].weight)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Draft states (..., hidden) -> logits (..., V) through the target's LM head; needs `attach`."""
        head = self._frozen[1]
        return F.linear(states, head.weight, head.bias)

    # ---- inputs ----
    def fuse(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """z = FC([norm(e) ; h]): embeds (..., H), hidden (..., H) -> (..., H)."""
        return F.linear(torch.cat((rms_norm(embeds, self.embed_norm), hidden), dim=-1), self.fc.weight, self.fc.bias)

    # ---- training forward (full sequence, causal) ----
    def forward(self, x: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor | None = None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """Training / full-sequence forward. x (B, q, H) draft inputs (fused text z and projected visual states),
        pos (3, B, q) positions, attn_mask None (causal) or (B, 1, q, q) bool. Returns states (B, q, H).

        queries: None (every position) or (n,) int64 ascending indices: only those positions' states are computed
        (B, n, H), each attending causally to every position up to itself. One layer's keys and values depend on its
        inputs alone, so these states equal the full forward's rows; with n text queries over V visual entries the
        attention costs n x (V + n) instead of (V + n)^2 (IVSB at 25k visual tokens, docs/method.md section 2b).
        Not combinable with attn_mask (ValueError)."""
        if queries is not None and attn_mask is not None:
            raise ValueError("forward: give attn_mask or queries, not both")
        qs, ks, vs = self.layer.project_kv(x, pos)
        if queries is not None:  # those rows only, each causal up to its own position
            x, qs = x[:, queries], qs[:, :, queries]
            causal = torch.arange(ks.shape[2], device=x.device) <= queries.unsqueeze(1)  # (n, q)
            attn_mask = causal.view(1, 1, *causal.shape)
        if attn_mask is None:
            attn = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        else:
            attn = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask, enable_gqa=True)
        return self.norm(self.layer.finish(x, attn))

    # ---- inference steps over the cache (no autograd, no module calls, q/k/v and gate/up fused) ----
    def _attend_inputs(self, fused, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """fused: `layer.fused()`; x (q, H), cos/sin (q|1, 1, D) -> queries (1, Hq, q, D), keys and values
        (1, Hkv, q, D), RoPE applied to queries and keys together."""
        q, c, lay = x.shape[0], self.config, self.layer
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        w_qkv, b_qkv, _ = fused
        qkv = F.linear(rms_norm(x, lay.input_layernorm), w_qkv, b_qkv)  # (q, (Hq + 2 Hkv) D)
        qk = qkv[:, : (hq + hkv) * d].view(q, hq + hkv, d)
        qk = qk * cos + rotate_half(qk) * sin
        return (qk[:, :hq].transpose(0, 1).unsqueeze(0), qk[:, hq:].transpose(0, 1).unsqueeze(0),
                qkv[:, (hq + hkv) * d:].view(q, hkv, d).transpose(0, 1).unsqueeze(0))

    def _finish(self, fused, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """fused: `layer.fused()`; x (q, H), attn (1, Hq, q, D) -> the draft's states (q, H): output projection,
        MLP, final norm."""
        q, lay = x.shape[0], self.layer
        x = x + F.linear(attn[0].transpose(0, 1).reshape(q, -1), lay.o_proj.weight, lay.o_proj.bias)
        gate, up = F.linear(rms_norm(x, lay.post_attention_layernorm), fused[2]).chunk(2, dim=-1)
        return rms_norm(x + F.linear(F.silu(gate) * up, lay.down_proj.weight, lay.down_proj.bias), self.norm)

    def step(self, x: torch.Tensor, pos: torch.Tensor, cache: DraftCache,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Commit q new entries after the cache's committed ones (the prompt pass, a catch-up on accepted tokens),
        each attending causally: every committed entry (with a window, the `window` most recent entries up to
        itself) and the new ones up to itself.

        x: (q, H) fused inputs; pos: (3, q) positions; rope: `self.rope(pos)` when the caller has it. Returns states
        (q, H). RuntimeError past the cache's capacity.
        """
        q, dev, w = x.shape[0], x.device, self.config.window
        cache.rollback()
        fused = self.layer.fused()
        qs, ks, vs = self._attend_inputs(fused, x, *(rope if rope is not None else self.rope(pos)))
        c0 = cache.length  # cache index of the first new entry
        cache.append(ks, vs)
        if c0 == 0 and w is None and q > 1:  # the prompt pass: plain causal attention
            attn = F.scaled_dot_product_attention(qs, cache.k[:, :, :q], cache.v[:, :, :q], is_causal=True,
                                                  enable_gqa=True)
        elif w is not None and q > WINDOW_CHUNK:  # a long catch-up in a window: by chunks, each one's band
            attn = torch.cat([self._window_chunk(qs[:, :, i: i + WINDOW_CHUNK], cache, c0 + i, w)
                              for i in range(0, q, WINDOW_CHUNK)], dim=2)
        else:
            start, mask = (0 if w is None else max(0, c0 - w + 1)), None
            if q > 1 or w is not None:  # causal over the new entries (and a sliding band with a window)
                cols = torch.arange(start, cache.length, device=dev)
                rows = torch.arange(c0, c0 + q, device=dev).unsqueeze(1)
                allowed = cols <= rows
                if w is not None:
                    allowed &= cols > rows - w
                mask = allowed.view(1, 1, q, -1)
            attn = folded_sdpa(qs, cache.k[:, :, start: cache.length], cache.v[:, :, start: cache.length], mask, None)
        cache.committed = cache.length
        return self._finish(fused, x, attn)

    def tree_step(self, tokens: torch.Tensor, parent_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  slots: torch.Tensor, visible: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One level of the draft tree at static shapes, with no data-dependent shape and no host read, so that it
        compiles whole (`compile_tree`) and suits CUDA-graph capture.

        tokens (k,) the level's nodes, parent_states (k, H) their parents' draft states, cos/sin (1, 1, D) the
        level's rotation, slots (k,) int64 the cache slots their keys and values are written to, visible (k, C)
        bool over all C slots of the cache (the committed entries each node sees, its ancestors and itself),
        cache_k/cache_v (1, Hkv, C, D) the `DraftCache` buffers (written in place). Returns the nodes' states (k, H)
        and their children's log-probabilities (k, V) float32. Source: EAGLE-2's tree expansion, one level a call.
        """
        return self._tree_level(self.layer.fused(), tokens, parent_states, cos, sin, slots, visible, cache_k, cache_v)

    def _tree_level(self, fused, tokens, parent_states, cos, sin, slots, visible, cache_k, cache_v):
        x = self.fuse(self.embed(tokens), parent_states)
        qs, ks, vs = self._attend_inputs(fused, x, cos, sin)
        cache_k.index_copy_(2, slots, ks)
        cache_v.index_copy_(2, slots, vs)
        states = self._finish(fused, x, folded_sdpa(qs, cache_k, cache_v, visible[None, None], None))
        return states, torch.log_softmax(self.logits(states).float(), dim=-1)

    def compile_tree(self, mode: str = "default") -> "SparrowDraft":
        """Run the tree levels through `torch.compile(tree_step, fullgraph=True, dynamic=True)`: one graph for every
        cache size and tree width, compiled at the first tree (`sparrow.warm_up` pays it at load; later processes
        read torch's on-disk cache). mode: torch.compile's ("reduce-overhead" asks for CUDA graphs on a GPU, where a
        level's dozens of kernel launches are the cost). On 2 CPU cores (AVX2) a level alone runs 0.66 instead of
        1.0 ms, but whole trees came out between 8% faster and 25% slower than eager over runs, after 15 s of
        compilation: off by default. Returns self."""
        level = torch.compile(self._tree_level, fullgraph=True, dynamic=True, mode=mode)
        self.tree_fn = lambda *args: level(self.layer.fused(), *args)  # the fused weights made outside the graph
        self.compiled = True
        return self

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (3, q) draft positions -> cos, sin (q, 1, head_dim) for `step` (mRoPE sections as the layer's)."""
        cos, sin = self.layer.rope(pos.unsqueeze(1), self.fc.weight.dtype)  # (1, 1, q, D)
        return cos[0, 0].unsqueeze(1), sin[0, 0].unsqueeze(1)  # (q, 1, D), strides free of q

    @staticmethod
    def _window_chunk(qs: torch.Tensor, cache: DraftCache, r0: int, w: int) -> torch.Tensor:
        """Attention of the catch-up queries qs (1, Hq, c, D) at cache rows r0.. over the `w` entries up to each:
        only the band [r0 - w + 1, r0 + c) is read, so a long prompt in a window costs q x (chunk + w), not q^2."""
        c = qs.shape[2]
        lo = max(0, r0 - w + 1)
        cols = torch.arange(lo, r0 + c, device=qs.device)
        rows = torch.arange(r0, r0 + c, device=qs.device).unsqueeze(1)
        mask = ((cols <= rows) & (cols > rows - w)).view(1, 1, c, -1)
        return folded_sdpa(qs, cache.k[:, :, lo: r0 + c], cache.v[:, :, lo: r0 + c], mask, None)

    # ---- persistence ----
    def save(self, path: str) -> None:
        """Write config.json + model.safetensors (atomically: a temporary name, then rename)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = os.path.join(path, DRAFT_WEIGHTS + ".tmp")
        save_file(state, tmp, metadata={"format": "pt", "kind": "sparrow-draft"})
        os.replace(tmp, os.path.join(path, DRAFT_WEIGHTS))
        cfg = {"kind": "sparrow-draft", **asdict(self.config)}
        tmp = os.path.join(path, DRAFT_CONFIG + ".tmp")
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, os.path.join(path, DRAFT_CONFIG))


def init_draft(target, seed: int = 0, **overrides) -> SparrowDraft:
    """An untrained draft for `target` (random layer and FC, identity visual projection), attached to it.
    `overrides` set `DraftConfig` fields (mode, position_mode, window, mid_layer...)."""
    cfg = DraftConfig.from_target(target, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = SparrowDraft(cfg)
        std = getattr(target.text_config, "initializer_range", 0.02)
        for mod in draft.modules():
            if isinstance(mod, nn.Linear) and mod is not draft.visual_proj:
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
    return draft.attach(target)


def load_draft(path: str | None, target, **overrides) -> SparrowDraft:
    """Load a saved draft and attach it to `target`. path None: the embedded target's shipped draft (of
    `overrides["mode"]`, default sparrow), as `load_target(None)` is the embedded target. `overrides` change
    run-time fields (mode, position_mode, window). Raises SparrowError when the path is not a draft, the draft was
    made for another target, or path is None and this install ships no such draft."""
    from safetensors.torch import load_file

    if path is None:
        from .defaults import draft_path

        path = draft_path(overrides.get("mode", "sparrow"))
        if path is None:
            raise SparrowError(f"no shipped {overrides.get('mode', 'sparrow')} draft in this install; give a draft "
                               f"directory (sparrow init-draft / train-draft)")
    cfg_file = os.path.join(path, DRAFT_CONFIG)
    if not os.path.isfile(cfg_file) or not os.path.isfile(os.path.join(path, DRAFT_WEIGHTS)):
        raise SparrowError(f"{path}: not a Sparrow draft (needs {DRAFT_CONFIG} and {DRAFT_WEIGHTS}); "
                           "make one with sparrow init-draft or sparrow train-draft")
    raw = json.load(open(cfg_file))
    if raw.pop("kind", None) != "sparrow-draft":
        raise SparrowError(f"{path}: {DRAFT_CONFIG} is not a Sparrow draft config")
    raw.update(overrides)
    try:
        cfg = DraftConfig(**raw)
    except TypeError as e:
        raise SparrowError(f"{path}: draft config does not fit this version of sparrow ({e})") from None
    draft = SparrowDraft(cfg)
    draft.attach(target)  # checks family/sizes before touching weights
    state = load_file(os.path.join(path, DRAFT_WEIGHTS))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SparrowError(f"{path}: draft weights do not match its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return draft.to(device=target.device, dtype=target.dtype)


class DraftRunner:
    """The draft's side of the decoding loop: its cache, its positions, catch-up on accepted tokens and tree
    expansion (`expand`, the callback of `tree.build_tree`). One runner per generation: `target` a `Target`, `pre`
    its `Prefill`, `capacity_new` the most tokens the generation adds, `tree` its `TreeConfig`.

    mode "sparrow" feeds text positions only; "eagle" feeds every position (visual ones with the target's input
    embeddings, i.e. the video features). Draft positions: "compact" numbers the draft's entries 0, 1, ...;
    otherwise the target's own positions (3 mRoPE axes in "eagle"; the text axis in "sparrow" absolute).
    """

    def __init__(self, draft: "SparrowDraft", target, pre, mode: str, capacity_new: int, tree):
        self.draft, self.target, self.mode = draft, target, mode
        self.compact = mode == "sparrow" and draft.config.position_mode == "compact"
        L = pre.positions.shape[1]
        keep = ~pre.visual_mask if mode == "sparrow" else torch.ones(L, dtype=torch.bool, device=pre.positions.device)
        if mode == "eagle" and draft.visual_keep is not None:  # analysis: only some visual positions in the cache
            keep = ~pre.visual_mask | draft.visual_keep.to(keep.device)
        keep[0] = False  # position 0 has no previous state (EAGLE drops it)
        self.keep = keep
        capacity = int(keep.sum()) + 1 + capacity_new + tree.top_k * tree.depth + 8
        self.cache = DraftCache(draft.config, capacity, target.device, target.dtype)
        if draft.compiled:  # CUDA graphs keep the cache's in-place writes (a new cache: one re-recording)
            for buf in (self.cache.k, self.cache.v):
                torch._dynamo.mark_static_address(buf, guard=False)
        self.slot_ids = torch.arange(capacity, device=target.device)  # (C,)
        self.tree_depth, self.visible, self.eye = tree.depth, None, None  # what each tree entry sees (tree_step)
        self.tree_rope = None  # cos, sin of the tree levels' positions (levels, 1, head_dim), made at each tree's root

    def _positions(self, target_pos: torch.Tensor) -> torch.Tensor:
        """Draft positions (3, q) of new entries whose target positions are target_pos (3, q)."""
        if self.compact:
            c = self.cache.committed
            return torch.arange(c, c + target_pos.shape[1], device=target_pos.device).expand(3, -1)
        return target_pos if self.mode == "eagle" else target_pos[:1].expand(3, -1)

    def prefill(self, input_ids: torch.Tensor, pre, first_token: int) -> torch.Tensor:
        """Feed the prompt pairs (token_t, h_{t-1}) for t in 1..L (t = L is the first new token), skipping visual
        positions in "sparrow" mode. input_ids (L,). Returns the root's child log-probabilities (V,)."""
        x, pos, _ = self.prompt_inputs(input_ids, pre, first_token)
        return self._commit(x, pos)

    def prompt_inputs(self, input_ids: torch.Tensor, pre, first_token: int):
        """The draft's prompt-pass inputs: x (q, H) fused inputs, pos (3, q) draft positions, and idx (q,) the
        target index of each entry (L for the first new token)."""
        L, dev = input_ids.shape[0], input_ids.device
        idx = torch.cat((self.keep.nonzero(as_tuple=True)[0], torch.tensor([L], device=dev)))
        tokens = torch.cat((input_ids, torch.tensor([first_token], device=dev)))[idx]
        emb = self.draft.embed(tokens)
        if self.mode == "eagle" and pre.input_embeds is not None:
            emb[:-1] = pre.input_embeds[idx[:-1]]  # visual positions carry the video features
        tpos = torch.cat((pre.positions, pre.positions.new_full((3, 1), L + self.target.rope_delta)), dim=1)
        x = self.draft.fuse(emb, pre.hidden_top[idx - 1])
        return x, self._positions(tpos[:, idx]), idx

    def catch_up(self, tokens: torch.Tensor, hidden: torch.Tensor, first_index: int) -> torch.Tensor:
        """Feed accepted pairs: tokens (q,) at target indices first_index.., hidden (q, H) the target's top states
        at the previous indices. Returns the new root's child log-probabilities (V,)."""
        idx = torch.arange(first_index, first_index + tokens.shape[0], device=tokens.device)
        x = self.draft.fuse(self.draft.embed(tokens), hidden)
        return self._commit(x, self._positions((idx + self.target.rope_delta).expand(3, -1)))

    def _commit(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        states = self.draft.step(x, pos, self.cache)
        self.root_state, self.root_pos = states[-1:], pos[:, -1:]
        self.front_states, self.depth = None, 0
        return torch.log_softmax(self.draft.logits(states[-1]).float(), dim=-1)

    def expand(self, tokens: torch.Tensor, parent_slot: torch.Tensor | None) -> torch.Tensor:
        """Tree expansion callback (see `build_tree`): run the frontier through the draft, each node seeing the
        committed entries and its own ancestors among the tree entries. tokens (k,) the frontier, parent_slot (k,)
        each one's parent in the previous frontier (None: the root). Returns (k, V) log-probabilities.

        Level d's entries take cache slots committed + k*d .. + k; what each node sees is one row over all C slots of
        the cache, in a buffer (k * levels, C) made at the tree's root: the committed entries (with a window, its
        last `window`), then its parent's row over the tree slots plus itself, written in place. The draft's
        `tree_step` (or its compiled form, `SparrowDraft.compile_tree`) runs at the same shapes every cycle.
        RuntimeError when the tree outgrows the cache (a deeper tree than this runner was made for)."""
        k, d, cache = tokens.shape[0], self.depth, self.cache
        c = cache.committed
        col = c + k * d  # this level's first slot
        if col + k > cache.capacity:
            raise RuntimeError(f"draft cache capacity {cache.capacity} exceeded by the tree's level {d + 1}")
        if d == 0 or self.visible.shape[0] < k * (d + 1):  # a new tree (or one deeper than planned)
            levels = max(self.tree_depth - 1, d + 1)
            seen = self.slot_ids < c
            if self.draft.config.window is not None:
                seen &= self.slot_ids >= c - self.draft.config.window
            grown = seen.expand(k * levels, -1).clone()  # (k * levels, C)
            if d:
                grown[: k * d] = self.visible[: k * d]
            self.visible = grown
            steps = torch.arange(1, levels + 1, device=tokens.device)  # a level's nodes share one position
            self.tree_rope = self.draft.rope(self.root_pos + steps)  # cos, sin (levels, 1, D)
            if self.eye is None or self.eye.shape[0] != k:
                self.eye = torch.eye(k, dtype=torch.bool, device=tokens.device)
        rows = self.visible[k * d: k * (d + 1)]  # (k, C)
        if parent_slot is None:
            parent_states = self.root_state.expand(k, -1).contiguous()  # the layout of the other levels' (one graph)
        else:
            parent_states = self.front_states[parent_slot]
            rows[:, c: col] = self.visible[k * (d - 1) + parent_slot, c: col]
        rows[:, col: col + k] = self.eye
        cache.length, self.depth = col + k, d + 1
        cos, sin = self.tree_rope
        states, logp = self.draft.tree_fn(tokens, parent_states, cos[d: d + 1], sin[d: d + 1],
                                          self.slot_ids[col: col + k], rows, cache.k, cache.v)
        self.front_states = states
        return logp
