"""The speculative decoding loop (prefill, draft, verify, accept, stop), the AR baseline, and the statistics.

One cycle, with n entries in the target cache and the pending root token r at target index n:

    draft catch-up   the draft reads the accepted pairs (token_t, h_{t-1}) -> its state at r -> root logits
    draft tree       EAGLE-2 expansion over depth - 1 more draft steps          tree: 1 + N nodes
    verify           one target forward over the tree (4D ancestor mask)       logits (1+N, V), h (1+N, H)
                     (+ the repetition penalty, each node's row along its own path, when one is set)
    accept           greedy / rejection sampling -> path r, a_1..a_k + bonus token b
    cache            target: keep [r, a_1..a_k]; draft: drop the tree entries; b is the next root

Methods: "sparrow" (VATA: the draft holds text positions only), "eagle" (the draft holds every prompt
position, visual ones included, as MSD / ViSpec / vLLM EAGLE-3 do), "ar" (plain decoding through the same
cache and timing code: the fair baseline).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .draft import DraftCache, SparrowDraft
from .errors import SparrowError
from .targets.base import Prefill, Target
from .tree import Tree, TreeConfig, build_tree
from .verify import RepetitionPenalty, Sampling, accept_greedy, accept_sampling, sample, warp_probs

METHODS = ("sparrow", "eagle", "ar")


@dataclass
class Stats:
    """Timing and acceptance of one generation. Times in seconds.

    tau: mean accepted length per target forward after the prefill, bonus token included (Spec-Bench); 1.0 for ar.
    accept_lengths: tokens emitted by each target forward after the prefill.
    prefill_s: target prefill (vision encoder + LLM) up to the first token. decode_s: everything after
    (draft prompt pass, draft, verify, accept). draft_s / verify_s: the draft's and the target's share of decode_s.
    tokens_per_s: new tokens after the first / decode_s. repetition_penalty: the one applied (1.0 = none).
    """

    method: str
    new_tokens: int = 0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    tau: float = 0.0
    accept_lengths: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_prefill_s: float = 0.0
    tree_tokens: int = 0
    tokens_per_s: float = 0.0
    stop_reason: str = ""
    repetition_penalty: float = 1.0


@dataclass
class GenerateOutput:
    """token_ids: the new tokens only; text: their decoding (special tokens skipped); stats: `Stats`."""

    token_ids: list[int]
    text: str
    stats: Stats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, **asdict(self.stats)}


def speedup(spec: Stats, base: Stats) -> dict:
    """How much faster `spec` (a speculative run) was than `base` (plain decoding, method "ar") on the same input.

    Per token, so that sampled runs of different lengths compare too (greedy runs emit the same tokens). Returns
    a dict: dsr, the decoding speedup, base's decode seconds per token after the first over spec's (Spec-Bench DSR;
    NaN when either emitted a single token); esr, the same end to end, prefill included (ESR; NaN for an untimed
    spec run); saved_s, the seconds spec saved against base's end-to-end rate over spec's tokens (negative when spec
    was slower); tau, spec's accepted length. `sparrow bench` sums times over many samples instead.
    """
    def per_token(s: Stats) -> float:
        return (s.prefill_s + s.decode_s) / max(1, s.new_tokens)

    dsr = spec.tokens_per_s / base.tokens_per_s if spec.tokens_per_s and base.tokens_per_s else float("nan")
    esr = per_token(base) / per_token(spec) if per_token(spec) else float("nan")
    return {"tau": spec.tau, "dsr": dsr, "esr": esr,
            "saved_s": per_token(base) * spec.new_tokens - (spec.prefill_s + spec.decode_s)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    def __init__(self, device):
        self.device = device

    def now(self) -> float:
        _sync(self.device)
        return time.perf_counter()


class DraftRunner:
    """The draft's side of the loop: its cache, its positions, catch-up on accepted tokens and tree expansion.

    mode "sparrow" feeds text positions only; "eagle" feeds every position (visual ones with the target's input
    embeddings, i.e. the video features). Draft positions: "compact" numbers the draft's entries 0, 1, ...;
    otherwise the target's own positions (3 mRoPE axes in "eagle"; the text axis in "sparrow" absolute).
    """

    def __init__(self, draft: SparrowDraft, target: Target, pre: Prefill, mode: str, capacity_new: int,
                 tree: TreeConfig, visual_keep: torch.Tensor | None = None):
        self.draft, self.target, self.mode = draft, target, mode
        self.compact = mode == "sparrow" and draft.config.position_mode == "compact"
        L = pre.positions.shape[1]
        keep = ~pre.visual_mask if mode == "sparrow" else torch.ones(L, dtype=torch.bool, device=pre.positions.device)
        if mode == "eagle" and visual_keep is not None:  # analysis: only some visual positions in the draft cache
            keep = ~pre.visual_mask | visual_keep.to(keep.device)
        keep[0] = False  # position 0 has no previous state (EAGLE drops it)
        self.keep = keep
        capacity = int(keep.sum()) + 1 + capacity_new + tree.top_k * tree.depth + 8
        self.cache = DraftCache(draft.config, capacity, target.device, target.dtype)

    def _positions(self, target_pos: torch.Tensor) -> torch.Tensor:
        """Draft positions (3, q) of new entries whose target positions are target_pos (3, q)."""
        if self.compact:
            c = self.cache.committed
            return torch.arange(c, c + target_pos.shape[1], device=target_pos.device).expand(3, -1)
        return target_pos if self.mode == "eagle" else target_pos[:1].expand(3, -1)

    def prefill(self, input_ids: torch.Tensor, pre: Prefill, first_token: int) -> torch.Tensor:
        """Feed the prompt pairs (token_t, h_{t-1}) for t in 1..L (t = L is the first new token), skipping visual
        positions in "sparrow" mode. input_ids (L,). Returns the root's child log-probabilities (V,)."""
        x, pos, _ = self.prompt_inputs(input_ids, pre, first_token)
        return self._commit(x, pos)

    def prompt_inputs(self, input_ids: torch.Tensor, pre: Prefill, first_token: int):
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
        self.cache.rollback()
        states = self.draft.step(x, pos, self.cache, None, commit=True)
        self.root_state, self.root_pos = states[-1:], pos[:, -1:]
        self.front_states, self.anc, self.depth = None, None, 0
        return torch.log_softmax(self.draft.logits(states[-1]).float(), dim=-1)

    def expand(self, tokens: torch.Tensor, parent_slot: torch.Tensor | None) -> torch.Tensor:
        """Tree expansion callback (see `build_tree`): run the frontier through the draft, each node seeing the
        committed entries and its own ancestors among the tree entries."""
        k = tokens.shape[0]
        n_old = 0 if self.anc is None else self.anc.shape[0]
        if parent_slot is None:
            parent_states = self.root_state.expand(k, -1)
            anc = torch.zeros(k, 0, dtype=torch.bool, device=tokens.device)
        else:
            slots = n_old - self.front_states.shape[0] + parent_slot  # absolute tree-entry slot of the parent
            parent_states = self.front_states[parent_slot]
            anc = self.anc[slots]
        self.depth += 1
        anc = torch.cat((anc, torch.eye(k, dtype=torch.bool, device=tokens.device)), dim=1)
        if self.anc is not None:
            self.anc = torch.cat((torch.cat((self.anc, self.anc.new_zeros(n_old, k)), dim=1), anc), dim=0)
        else:
            self.anc = anc
        pos = (self.root_pos + self.depth).expand(3, k)
        x = self.draft.fuse(self.draft.embed(tokens), parent_states)
        states = self.draft.step(x, pos, self.cache, anc, commit=False)
        self.front_states = states
        return torch.log_softmax(self.draft.logits(states).float(), dim=-1)


class _Emitter:
    """Collects new tokens and applies the stopping rules exactly as the target's own `generate` does:
    EOS (kept), max_new_tokens, and stop strings (kept; like HF's StopStringCriteria, a stop string counts when the
    newest token completes it, and it may begin in the prompt: `prompt_ids` (L,) are the prompt's token ids)."""

    def __init__(self, target: Target, max_new_tokens: int, stop: list[str] | None,
                 on_tokens: Callable[[list[int]], None] | None, prompt_ids: torch.Tensor | None = None):
        self.eos = set(target.eos_token_ids)
        self.max_new = max_new_tokens
        self.stop = [s for s in (stop or []) if s]
        # a stop string spans at most len(s) tokens of one character or more; the margin covers tokens that decode
        # to nothing (a lone SentencePiece space at the start of a window)
        self.window = 2 * max(map(len, self.stop), default=0) + 8
        self.context = prompt_ids[-self.window:].tolist() if self.stop and prompt_ids is not None else []
        self.tok = target.tokenizer
        self.on_tokens = on_tokens
        self.ids: list[int] = []
        self.reason = ""

    def emit(self, tokens: list[int]) -> int:
        """Append tokens; returns how many were taken (fewer when a stopping rule fires)."""
        taken = []
        for t in tokens:
            taken.append(t)
            self.ids.append(t)
            if t in self.eos:
                self.reason = "eos"
            elif len(self.ids) >= self.max_new:
                self.reason = "max_new_tokens"
            elif self.stop and self._stopped():
                self.reason = "stop_string"
            if self.reason:
                break
        if self.on_tokens and taken:
            self.on_tokens(taken)
        return len(taken)

    def _stopped(self) -> bool:
        """True when a stop string ends inside the newest token's text (it may start in earlier tokens)."""
        ids = (self.context + self.ids)[-self.window:]
        head, text = self.tok.decode(ids[:-1]), self.tok.decode(ids)
        return any(text.find(s, max(0, len(head) - len(s) + 1)) >= 0 for s in self.stop)


def generate(target: Target, draft: SparrowDraft | None, inputs: dict, max_new_tokens: int = 128,
             method: str = "sparrow", temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             tree: TreeConfig | None = None, stop: list[str] | None = None, seed: int | None = None,
             on_tokens: Callable[[list[int]], None] | None = None,
             visual_keep: torch.Tensor | None = None, repetition_penalty: float | None = None) -> GenerateOutput:
    """Generate with lossless speculative decoding (or plain decoding with method="ar").

    Args:
        target: a loaded `Target`.
        draft: a `SparrowDraft` attached to `target` (ignored for "ar"). Its inference mode follows `method`.
        inputs: the dict from `target.prepare(...)` (batch 1): exactly what HF `model.generate(**inputs)` takes.
        max_new_tokens: upper bound on new tokens.
        method: "sparrow" (text-only draft cache, VATA) | "eagle" (draft cache with every visual position) | "ar".
        temperature / top_p / top_k: sampling (temperature 0 = greedy), applied as HF does; top_p 1.0 and top_k 0
            are off (HF's `generate` uses top_k 50, or the checkpoint's generation_config, unless told top_k=0).
        tree: draft tree shape (EAGLE-2 dynamic tree), default top-k 8, depth 5, 30 tokens.
        stop: stop strings (generation ends at the token that completes one, which is kept).
        seed: seed of the sampling generator.
        on_tokens: called with each batch of newly emitted token ids (streaming).
        visual_keep: (L,) bool over prompt positions, "eagle" only: the visual positions the draft's cache holds
            (default all). For the negative-visual-gain analysis; the output stays lossless.
        repetition_penalty: HF's repetition penalty (1.0 = off); None = the checkpoint's generation_config value,
            as `model.generate` takes it (Qwen2.5-VL Instruct: 1.05). Applied to every tree node along its own path.
    Returns: `GenerateOutput` (token_ids, text, stats).
    Raises: SparrowError for an unknown method, a missing draft, a tree that is not a TreeConfig, bad sampling
    settings or repetition penalty, or a prompt that does not fit the context.
    Source: EAGLE-2 loop (dynamic tree, one verification per cycle); Sparrow VATA (method.md section 2a).
    """
    if method not in METHODS:
        raise SparrowError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "ar" and draft is None:
        raise SparrowError(f"method {method!r} needs a draft; pass --draft PATH or use --method ar")
    if max_new_tokens < 1:
        raise SparrowError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if tree is not None and not isinstance(tree, TreeConfig):
        raise SparrowError(f"tree must be a TreeConfig(top_k, depth, tokens) or None, got {tree!r}")
    tree = tree or TreeConfig()
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    gen = None
    if not sampling.greedy:
        gen = torch.Generator(device=target.device)
        gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)
    input_ids = inputs["input_ids"]
    L = input_ids.shape[1]
    rp = target.repetition_penalty if repetition_penalty is None else repetition_penalty
    penalty = RepetitionPenalty(rp, input_ids[0], target.lm_head.weight.shape[0]) if rp != 1.0 else None

    def choose(logits: torch.Tensor) -> int:  # (V,) -> the target's next token after the committed sequence
        if penalty is not None:
            logits = penalty(logits[None])[0]
        return int(logits.argmax()) if sampling.greedy else sample(warp_probs(logits, sampling), gen)

    def emit(tokens: list[int]) -> int:
        n = emitter.emit(tokens)
        if penalty is not None:
            penalty.add(tokens[:n])
        return n

    target.check_length(L, max_new_tokens)
    clock = _Clock(target.device)
    stats = Stats(method=method, prompt_tokens=L, visual_tokens=int(target.visual_mask(input_ids[0]).sum()),
                  repetition_penalty=float(rp))
    emitter = _Emitter(target, max_new_tokens, stop, on_tokens, input_ids[0])

    t0 = clock.now()
    cache = target.new_cache(L + max_new_tokens + tree.tokens + 2)
    pre = target.prefill(inputs, cache, capture_embeds=(method == "eagle"))
    first = choose(pre.logits)
    t1 = clock.now()
    stats.prefill_s = t1 - t0
    emit([first])
    root = first

    with torch.inference_mode():
        if method == "ar":
            while not emitter.reason:
                tv = clock.now()
                logits, _ = target.forward(torch.full((1,), root, device=target.device), None, None, cache)
                root = choose(logits[-1])
                stats.verify_s += clock.now() - tv
                stats.accept_lengths.append(emit([root]))
        else:
            runner = DraftRunner(draft, target, pre, method, max_new_tokens, tree, visual_keep)
            root_logp = runner.prefill(input_ids[0], pre, first)
            stats.draft_prefill_s = clock.now() - t1
            stats.draft_s += stats.draft_prefill_s
            while not emitter.reason:
                td = clock.now()
                t: Tree = build_tree(root, root_logp, runner.expand, tree)
                tv = clock.now()
                n = cache.length
                logits, hidden = target.forward(t.tokens, t.depths, t.mask, cache)
                if penalty is not None:
                    logits = penalty(logits, t)
                if sampling.greedy:
                    accepted, bonus = accept_greedy(t, logits)
                else:
                    accepted, bonus = accept_sampling(t, logits, sampling, gen)
                cache.accept(n, accepted)
                tc = clock.now()
                drafted = t.tokens[accepted[1:]]  # (m - 1,) the accepted draft tokens, root excluded
                new = drafted.tolist() + [bonus]
                stats.accept_lengths.append(emit(new))
                stats.tree_tokens = len(t)
                if not emitter.reason:
                    root = bonus
                    acc_tokens = torch.cat((drafted, torch.full((1,), bonus, device=target.device)))
                    root_logp = runner.catch_up(acc_tokens, hidden[accepted], n + 1)
                te = clock.now()
                stats.verify_s += tc - tv
                stats.draft_s += (tv - td) + (te - tc)
    stats.decode_s = clock.now() - t1
    stats.new_tokens = len(emitter.ids)
    stats.stop_reason = emitter.reason
    if stats.accept_lengths:
        stats.tau = sum(stats.accept_lengths) / len(stats.accept_lengths)
    if stats.decode_s > 0:
        stats.tokens_per_s = (stats.new_tokens - 1) / stats.decode_s
    text = target.tokenizer.decode(emitter.ids, skip_special_tokens=True)
    return GenerateOutput(token_ids=list(emitter.ids), text=text, stats=stats)
