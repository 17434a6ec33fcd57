"""Sparrow inside vLLM: the draft as a vLLM draft model, and a proposer that keeps visual positions out of it.

Loaded by vLLM itself through the `vllm.general_plugins` entry point (pyproject.toml), in every vLLM process, and
only where vLLM is installed: nothing else in sparrow imports this module. `register()`:
- registers `SparrowDraftForCausalLM`, the architecture of a draft exported by `sparrow.serving.export_draft`;
- makes vLLM's EAGLE proposer a `SparrowProposer`, which behaves exactly as vLLM's own unless the draft's config
  says `"sparrow": {"mode": "sparrow"}`.

The draft in vLLM (docs/method.md section 2): z = FC([norm(e) ; h]) -> one Qwen2 decoder layer -> norm; logits
through the target's LM head; e from the target's embedding (both shared by vLLM, not copied). vLLM pairs draft
entry i with the token at i + 1 and the target's top state at i (EAGLE's shift), the pairing our DraftRunner
uses one index later. In sparrow mode (VATA) the first pass of each step drops every entry whose token is a visual
placeholder of the prompt and renumbers the rest compactly: entry i of request r goes to draft position
i - V_r(i) (V_r(i): the visual placeholders among the prompt's tokens 0..i), its KV to that position's slot of the
request's blocks, and the draft's sequence length is the target's minus the placeholders it has passed. RoPE is
relative, so positions that differ from `DraftRunner`'s by a constant give the same draft. The rest of vLLM's loop
(its chain of draft steps, +1 a step) runs unchanged on these compact positions.
Source: vLLM `SpecDecodeBaseProposer.set_inputs_first_pass` / `prepare_inputs` (v0.32); Sparrow VATA.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.v1.spec_decode.eagle import EagleProposer

ARCHITECTURE = "EagleSparrowDraftForCausalLM"  # vLLM prefixes "Eagle" to an EAGLE draft's architecture


class _EmbeddingSlot(nn.Module):
    """Where vLLM's proposer puts the target's embedding: a (1, H) buffer (not a weight to load) of the width it
    checks before sharing."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(1, hidden_size), persistent=False)


class _SparrowDraftModel(nn.Module):
    """The draft's layers in vLLM's modules; `embed_tokens` is the target's (set by vLLM's proposer)."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
        ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0):
        super().__init__()
        config = vllm_config.speculative_config.draft_model_config.hf_config
        h = config.hidden_size
        self.config = config
        self.embed_tokens = _EmbeddingSlot(h)  # vLLM puts the target's embedding here
        self.embed_norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.fc = ReplicatedLinear(2 * h, h, bias=True, params_dtype=vllm_config.model_config.dtype,
                                   prefix=maybe_prefix(prefix, "fc"), return_bias=False)
        # the layer's attention is named after the target's last layer, so that its KV cache is the draft's own
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, vllm_config.cache_config, None,
                                                       prefix=maybe_prefix(prefix, f"layers.{start_layer_id}"))])
        self.norm = RMSNorm(h, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (T, H)
        x = self.fc(torch.cat((self.embed_norm(e), hidden_states), dim=-1))          # (T, H)
        x, residual = self.layers[0](positions, x, None)
        return self.norm(x, residual)[0]                                             # (T, H): the draft's states


class SparrowDraftForCausalLM(nn.Module):
    """A Sparrow draft (`sparrow.serving.export_draft`'s layout) as a vLLM EAGLE draft model. forward(input_ids (T,),
    positions (T,) or (3, T) with mRoPE, hidden_states (T, H)) -> (states, states): the draft's state is both what
    the LM head reads and the next step's input, as in `SparrowDraft`."""

    has_own_embed_tokens = False  # vLLM gives it the target's embedding and LM head
    has_own_lm_head = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        self.model = _SparrowDraftModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                        start_layer_id=vllm_config.model_config.get_num_layers(
                                            vllm_config.parallel_config))
        self.logits_processor = LogitsProcessor(self.config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.model(input_ids, positions, hidden_states, inputs_embeds)
        return s, s

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head.", "model.embed_tokens."])
        return loader.load_weights(weights, mapper=_SparrowDraftModel.hf_to_vllm_mapper)


class SparrowProposer(EagleProposer):
    """vLLM's EAGLE proposer; with a sparrow-mode draft, its first pass of each step holds text entries only (see
    the module docstring). Needs the whole prompt in one scheduler step (`max_num_batched_tokens` >= the longest
    prompt, as `sparrow.serving` sets it), the non-padded drafter batch (`disable_padded_drafter_batch`) and
    prefix caching off (a cached prefix would skip the draft's pass): ValueError at start-up otherwise.

    `SparrowProposer.passes` (class-wide, the last 4096, for tests and `sparrow.serving.proposer_passes`) records
    each call of `propose` in this process: {"mode", "entries" (the target's tokens handed to the draft's first
    pass), "kept" (the draft's first-pass entries), "visual_kept" (kept entries whose token is a visual
    placeholder, besides the last entry of a prefill chunk that ends inside a video), "seconds" (the whole proposal:
    first pass and draft steps)}."""

    passes: deque = deque(maxlen=4096)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None):
        super().__init__(vllm_config, device, runner)
        self._runner = runner
        sparrow = getattr(self.draft_model_config.hf_config, "sparrow", None) or {}
        self.text_only = sparrow.get("mode") == "sparrow"
        self._visual: dict[str, np.ndarray] = {}  # request id -> cumulative visual-placeholder counts of its prompt
        tc = vllm_config.model_config.hf_config
        self.visual_ids = np.array([getattr(tc, n) for n in ("video_token_id", "image_token_id", "video_token_index",
                                                             "image_token_index") if getattr(tc, n, None) is not None])
        if not self.text_only:
            return
        sc = vllm_config.speculative_config
        if not sc.disable_padded_drafter_batch:
            raise ValueError("a sparrow-mode draft needs speculative_config disable_padded_drafter_batch=True")
        if vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("a sparrow-mode draft needs enable_prefix_caching=False (a cached prefix would skip "
                             "the draft's prompt pass)")

    def propose(self, num_speculative_tokens, target_token_ids, *args, **kwargs):
        self._pass = {"mode": "sparrow" if self.text_only else "eagle", "entries": int(target_token_ids.shape[0]),
                      "kept": int(target_token_ids.shape[0]), "visual_kept": 0}
        t0 = time.perf_counter()
        out = super().propose(num_speculative_tokens, target_token_ids, *args, **kwargs)
        self._pass["seconds"] = time.perf_counter() - t0
        SparrowProposer.passes.append(self._pass)
        return out

    def _visual_counts(self, row: int) -> np.ndarray:
        """(prompt length + 1,) int64: c[k] = visual placeholders among the prompt's first k tokens, for the request
        in batch row `row` (cached by request id)."""
        req_id = self._runner.input_batch.req_ids[row]
        counts = self._visual.get(req_id)
        if counts is None:
            prompt = np.asarray(self._runner.requests[req_id].prompt_token_ids)
            counts = np.concatenate(([0], np.cumsum(np.isin(prompt, self.visual_ids))))
            if len(self._visual) > 4 * max(1, self._runner.input_batch.num_reqs) + 64:  # finished requests
                live = set(self._runner.input_batch.req_ids)
                self._visual = {k: v for k, v in self._visual.items() if k in live}
            self._visual[req_id] = counts
        return counts

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions, target_hidden_states,
                              token_indices_to_sample, cad, num_rejected_tokens_gpu):
        if not self.text_only:
            out = super().set_inputs_first_pass(target_token_ids, next_token_ids, target_positions,
                                                target_hidden_states, token_indices_to_sample, cad,
                                                num_rejected_tokens_gpu)
            self._pass["visual_kept"] = int(np.isin(self.input_ids[:out[0]].cpu().numpy(), self.visual_ids).sum())
            return out
        dev = target_token_ids.device
        qsl = cad.query_start_loc_cpu.numpy().astype(np.int64)                    # (B + 1,)
        seq_lens = cad.seq_lens.cpu().numpy().astype(np.int64)                  # (B,) the target's, after this step
        B = len(seq_lens)
        keep_parts, pos_parts, new_lens, forced = [], [], np.zeros(B, dtype=np.int64), 0
        for r in range(B):
            q, S = qsl[r + 1] - qsl[r], seq_lens[r]
            c = self._visual_counts(r)
            Lp = len(c) - 1
            i = np.arange(S - q, S)                                             # each entry's sequence index
            visual = np.zeros(q, dtype=bool)                                    # entry i's token (i + 1): a
            inside = i + 1 < Lp                                                 # visual placeholder of the prompt
            visual[inside] = c[i[inside] + 2] > c[i[inside] + 1]
            keep = ~visual
            forced += int(visual[-1])  # a prefill chunk that ends inside the video: its last entry stays (its slot
            keep[-1] = True            # is the next kept entry's, which overwrites it); otherwise the sampled token
            keep_parts.append(keep)
            pos_parts.append((i - c[np.minimum(i + 1, Lp)])[keep])              # compact draft positions
            new_lens[r] = S - c[min(S + 1, Lp)]
        keep = torch.from_numpy(np.concatenate(keep_parts)).to(dev)
        kept_per_req = np.array([k.sum() for k in keep_parts], dtype=np.int64)
        idx = keep.nonzero(as_tuple=True)[0]                                    # (N,) kept entries
        n = idx.shape[0]
        # EAGLE's shift (entry i: token i + 1, state i), then the kept entries only
        shifted = torch.empty_like(target_token_ids)
        shifted[:-1] = target_token_ids[1:]
        shifted[torch.from_numpy(qsl[1:] - 1).to(dev)] = next_token_ids
        self.input_ids[:n] = shifted[idx]
        self.hidden_states[:n] = target_hidden_states[idx]
        pos = torch.from_numpy(np.concatenate(pos_parts)).to(dev)
        self._set_positions(n, pos.expand(3, -1) if self.uses_mrope else pos)
        new_qsl_cpu = torch.from_numpy(np.concatenate(([0], np.cumsum(kept_per_req)))).to(torch.int32)
        req = torch.repeat_interleave(torch.arange(B, device=dev), torch.from_numpy(kept_per_req).to(dev))
        bs = self.block_size
        blocks = cad.block_table_tensor[req, pos // bs]
        slots = (blocks.to(torch.int64) * bs + pos % bs).to(cad.slot_mapping.dtype)
        lens_cpu = torch.from_numpy(new_lens).to(torch.int32)
        new_cad = replace(cad, query_start_loc=new_qsl_cpu.to(dev), query_start_loc_cpu=new_qsl_cpu,
                          seq_lens=lens_cpu.to(dev), seq_lens_cpu_upper_bound=lens_cpu, num_actual_tokens=n,
                          max_query_len=int(kept_per_req.max()), max_seq_len=int(new_lens.max()),
                          slot_mapping=slots, positions=None if cad.positions is None else pos)
        kept_ids = self.input_ids[:n].cpu().numpy()
        self._pass.update(kept=n, visual_kept=int(np.isin(kept_ids, self.visual_ids).sum()) - forced,
                          chunk_ends=forced)
        return n, new_qsl_cpu[1:].to(dev).long() - 1, new_cad


def register() -> None:
    """vLLM's plugin hook (entry point `vllm.general_plugins`): the draft architecture and the proposer."""
    from vllm import ModelRegistry
    import vllm.v1.worker.gpu_model_runner as runner

    for name in (ARCHITECTURE, ARCHITECTURE[len("Eagle"):]):  # the exported config's name and vLLM's EAGLE name
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, SparrowDraftForCausalLM)
    runner.EagleProposer = SparrowProposer  # the runner makes its drafter from this name
