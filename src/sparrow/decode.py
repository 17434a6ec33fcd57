"""The speculative decoding loop (prefill, draft, verify, accept, stop), the AR baseline, and the statistics.

One cycle, with n entries in the target cache and the pending root token r at target index n:

    draft catch-up   the draft reads the accepted pairs (token_t, h_{t-1}) -> its state at r -> root logits
    draft tree       EAGLE-2 expansion over depth - 1 more draft steps          tree: 1 + N nodes
    verify           one target forward over the tree (4D ancestor mask)       logits (1+N, V), h (1+N, H)
                     (+ the repetition penalty, each node's row along its own path, when one is set)
    accept           greedy / rejection sampling -> path r, a_1..a_k + bonus token b
    cache            target: keep [r, a_1..a_k]; draft: drop the tree entries; b is the next root

By default each cycle's tree size comes from `policy.TreePolicy` (the verify cost measured on this machine, the
acceptance seen so far), which also takes plain decode steps when speculation cannot pay; the draft reads those
steps' tokens before the next cycle. Every emitted token is the target's choice, so the output is the same.

Methods: "sparrow" (VATA: the draft holds text positions only), "eagle" (the draft holds every prompt
position, visual ones included, as MSD / ViSpec / vLLM EAGLE-3 do), "ar" (plain decoding through the same
cache and timing code: the fair baseline).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .draft import DraftRunner, SparrowDraft
from .errors import SparrowError
from .policy import SIZES, TreePolicy, cached_verify_costs
from .cache import KVCache
from .targets.base import Prefill, Target
from .timing import Clock, Stats
from .tree import Tree, TreeConfig, build_tree
from .verify import RepetitionPenalty, Sampling, accept_greedy, accept_sampling, sample, warp_probs

METHODS = ("sparrow", "eagle", "ar")


@dataclass
class GenerateOutput:
    """token_ids: the new tokens only; text: their decoding (special tokens skipped); stats: `Stats`."""

    token_ids: list[int]
    text: str
    stats: Stats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, **asdict(self.stats)}


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


@dataclass
class Prompt:
    """A prompt prefilled once and decoded several times (`sparrow bench` runs its methods on one prefill: at 25k
    visual tokens the prefill takes a minute on 2 CPU cores). Decoding only writes the cache after the prompt, and
    each `generate(..., prompt=)` cuts it back to the prompt first. Made by `prefill_prompt`.

    inputs: what was prefilled (`target.prepare`'s dict); cache: the target's `KVCache` holding the prompt (capacity
    for the longest decode); pre: its `Prefill` (with the input embeddings the eagle draft reads); rope_delta: the
    target's after this prefill (int, or a (1, 1) tensor for Qwen mRoPE); prefill_s: seconds; length: prompt tokens."""

    inputs: dict
    cache: KVCache
    pre: Prefill
    rope_delta: torch.Tensor | int
    prefill_s: float
    length: int

    def serves(self, inputs: dict) -> bool:
        """Whether `inputs` are the prefilled ones (the same tensors, or equal ones)."""
        def same(a, b) -> bool:
            if a is b:
                return True
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and bool(torch.equal(a, b))
            return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b

        return inputs.keys() == self.inputs.keys() and all(same(inputs[k], self.inputs[k]) for k in inputs)


def prefill_prompt(target: Target, inputs: dict, max_new_tokens: int, tree_tokens: int = 30) -> Prompt:
    """Prefill `inputs` (from `target.prepare`) once for decodes of up to `max_new_tokens` new tokens with trees of
    up to `tree_tokens` nodes. Raises SparrowError for a prompt that does not fit the context."""
    L = inputs["input_ids"].shape[1]
    target.check_length(L, max_new_tokens, int(target.visual_mask(inputs["input_ids"][0]).sum()))
    clock = Clock(target.device)
    t0 = clock.now()
    cache = target.new_cache(L + max_new_tokens + tree_tokens + 2)
    pre = target.prefill(inputs, cache, capture_embeds=True)
    return Prompt(inputs=dict(inputs), cache=cache, pre=pre, rope_delta=target.rope_delta,
                  prefill_s=clock.now() - t0, length=L)


def generate(target: Target, draft: SparrowDraft | None, inputs: dict, max_new_tokens: int = 128,
             method: str | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             tree: TreeConfig | None = None, stop: list[str] | None = None, seed: int | None = None,
             on_tokens: Callable[[list[int]], None] | None = None,
             repetition_penalty: float | None = None, prompt: Prompt | None = None) -> GenerateOutput:
    """Generate with lossless speculative decoding (or plain decoding with method="ar").

    Args:
        target: a loaded `Target`.
        draft: a `SparrowDraft` attached to `target`, or None for plain decoding.
        inputs: the dict from `target.prepare(...)` (batch 1): exactly what HF `model.generate(**inputs)` takes.
        max_new_tokens: upper bound on new tokens.
        method: None (the draft's own mode, `draft.config.mode`; "ar" without a draft), or "sparrow" (text-only
            draft cache, VATA) | "eagle" (draft cache with every visual position) | "ar" (plain decoding).
        temperature / top_p / top_k: sampling (temperature 0 = greedy), applied as HF does; top_p 1.0 and top_k 0
            are off (HF's `generate` uses top_k 50, or the checkpoint's generation_config, unless told top_k=0).
        tree: None (default): each cycle's tree size chosen by `policy.TreePolicy` from the verify cost measured on
            this machine and the acceptance seen so far, plain decode steps when speculation cannot pay; or a
            fixed `TreeConfig` (top-k, depth, tokens: an EAGLE-2 dynamic tree) for every cycle.
        stop: stop strings (generation ends at the token that completes one, which is kept).
        seed: seed of the sampling generator.
        on_tokens: called with each batch of newly emitted token ids (streaming).
        repetition_penalty: HF's repetition penalty (1.0 = off); None = the checkpoint's generation_config value,
            as `model.generate` takes it (Qwen2.5-VL Instruct: 1.05). Applied to every tree node along its own path.
        prompt: `prefill_prompt(target, inputs, ...)` of these same inputs: its prefill is used instead of a new
            one (stats.prefill_s reports the shared prefill's seconds).
    Returns: `GenerateOutput` (token_ids, text, stats).
    Raises: SparrowError for an unknown method, a missing draft, a tree that is not a TreeConfig, bad sampling
    settings or repetition penalty, a prompt that does not fit the context, or a `prompt` of other inputs or with too
    little room.
    Source: EAGLE-2 loop (dynamic tree, one verification per cycle); Sparrow VATA (docs/method.md section 2a).
    """
    if method is None:
        method = draft.config.mode if draft is not None else "ar"
    if method not in METHODS:
        raise SparrowError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "ar" and draft is None:
        raise SparrowError(f"method {method!r} needs a draft; pass --draft PATH or use --method ar")
    if max_new_tokens < 1:
        raise SparrowError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if tree is not None and not isinstance(tree, TreeConfig):
        raise SparrowError(f"tree must be a TreeConfig(top_k, depth, tokens) or None, got {tree!r}")
    shape = tree or TreeConfig()  # top-k and depth of every tree; a fixed tree's size
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

    visual = int(target.visual_mask(input_ids[0]).sum())
    target.check_length(L, max_new_tokens, visual)
    clock = Clock(target.device)
    stats = Stats(method=method, prompt_tokens=L, visual_tokens=visual, repetition_penalty=float(rp))
    emitter = _Emitter(target, max_new_tokens, stop, on_tokens, input_ids[0])

    t0 = clock.now()
    room = L + max_new_tokens + (shape.tokens if method != "ar" else 0) + 2  # cache positions the decode may use
    if prompt is None:
        cache = target.new_cache(room)
        pre = target.prefill(inputs, cache, capture_embeds=(method == "eagle"))
    else:
        if not prompt.serves(inputs):
            raise SparrowError("prompt: prefilled for other inputs; call prefill_prompt with these inputs")
        if prompt.cache.capacity < room:
            raise SparrowError(f"prompt: prefilled with room for {prompt.cache.capacity} positions; this decode needs "
                               f"{room}: call prefill_prompt with these max_new_tokens and tree size")
        cache, pre = prompt.cache, prompt.pre
        cache.truncate(L)
        target.rope_delta = prompt.rope_delta
    first = choose(pre.logits)
    t1 = clock.now()
    stats.prefill_s = t1 - t0 if prompt is None else prompt.prefill_s + (t1 - t0)
    emit([first])
    root = first  # the newest token: emitted, not yet in the target's cache

    def plain_step() -> tuple[torch.Tensor, float]:  # one target forward over the root: the next token
        nonlocal root
        tv = clock.now()
        logits, hidden = target.forward(torch.full((1,), root, device=target.device), None, None, cache)
        root = choose(logits[-1])
        dt = clock.now() - tv
        stats.verify_s += dt
        stats.accept_lengths.append(emit([root]))
        return hidden[-1], dt  # the root's top state, the seconds taken

    with torch.inference_mode():
        if method == "ar":
            while not emitter.reason:
                plain_step()
        else:
            policy = None
            if tree is None:  # a first run at this context length measures the verify cost (not decode time)
                tk = clock.now()
                sizes = [n for n in SIZES if n <= shape.tokens] or [shape.tokens]
                policy = TreePolicy(cached_verify_costs(target, cache, sizes), sizes)
                stats.calibration_s = clock.now() - tk
            tp = clock.now()
            runner = DraftRunner(draft, target, pre, method, max_new_tokens, shape)
            root_logp = runner.prefill(input_ids[0], pre, first)
            stats.draft_prefill_s = clock.now() - tp
            stats.draft_s += stats.draft_prefill_s
            behind_tokens, behind_states, behind_at = [], [], 0  # plain steps the draft has not read yet
            while not emitter.reason:
                size = policy.choose() if policy is not None else shape.tokens
                if size == 0:  # a plain step; the draft reads it before the next speculative cycle
                    behind_at = behind_at or cache.length + 1
                    state, dt = plain_step()
                    behind_states.append(state)
                    behind_tokens.append(root)
                    stats.plain_steps += 1
                    policy.plain(dt)
                    continue
                td = clock.now()
                if behind_tokens:
                    root_logp = runner.catch_up(torch.tensor(behind_tokens, device=target.device),
                                                torch.stack(behind_states), behind_at)
                    behind_tokens, behind_states, behind_at = [], [], 0
                tb = clock.now()  # the catch-up on plain steps is their cost, not this cycle's
                t: Tree = build_tree(root, root_logp, runner.expand, TreeConfig(shape.top_k, shape.depth, size))
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
                path = torch.stack((t.tokens[accepted[1:]], t.ranks[accepted[1:]])).tolist()  # one read
                stats.accept_lengths.append(emit(path[0] + [bonus]))
                stats.tree_tokens = len(t) - 1
                if not emitter.reason:
                    root = bonus
                    acc_tokens = torch.tensor(path[0] + [bonus], device=target.device)
                    root_logp = runner.catch_up(acc_tokens, hidden[accepted], n + 1)
                te = clock.now()
                stats.verify_s += tc - tv
                stats.draft_s += (tv - td) + (te - tc)
                if policy is not None:
                    policy.observe(size, path[1], (tv - tb) + (te - tc), tc - tv)
            if policy is not None:
                stats.policy = policy.summary()
    stats.decode_s = clock.now() - t1 - stats.calibration_s
    stats.new_tokens = len(emitter.ids)
    stats.stop_reason = emitter.reason
    if stats.accept_lengths:
        stats.tau = sum(stats.accept_lengths) / len(stats.accept_lengths)
    if stats.decode_s > 0:
        stats.tokens_per_s = (stats.new_tokens - 1) / stats.decode_s
    text = target.tokenizer.decode(emitter.ids, skip_special_tokens=True)
    return GenerateOutput(token_ids=list(emitter.ids), text=text, stats=stats)


def warm_up(target: Target, draft: SparrowDraft | None = None, method: str | None = None) -> float:
    """Pay a first call's one-off costs at load instead of in the first answer: one short generation (a 2-frame
    black video, 4 new tokens) plainly and, with a draft, speculatively with a fixed tree, through every kernel a
    generation uses (vision tower, prefill, decode step, draft prefill, tree steps, verification). On CUDA a first
    generation otherwise runs 3-10x slower than later ones (module loading, cuBLAS handles, the allocator's first
    blocks); on a CPU the first run is within 10% of later ones and this costs about 0.3 s. Nothing is kept but
    what the process caches. Returns the seconds taken. Raises SparrowError where `generate` would (a draft made
    for another target, an unknown method)."""
    import time

    import numpy as np

    from .video import Video

    t0 = time.perf_counter()
    side = 2 * 28  # two merged patches a side on Qwen-VL; the family resizes it to its own grid
    video = Video(frames=np.zeros((2, side, side, 3), dtype=np.uint8), fps=2.0, indices=np.arange(2),
                  total_frames=2)
    inputs = target.prepare(video, "Hi", max_pixels=side * side, min_pixels=side * side)
    generate(target, None, inputs, max_new_tokens=4, method="ar")
    if draft is not None:
        generate(target, draft, inputs, max_new_tokens=4, method=method, tree=TreeConfig(8, 5, 30))
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    return time.perf_counter() - t0
