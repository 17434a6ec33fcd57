"""Hidden-state capture and the draft's training objective: IVSB + MTP (docs/method.md sections 2b, 2c).

For one conversation (prompt with video + answer), `capture` runs the frozen target once and keeps what the
draft needs: token ids, the top states h (the LM-head input), the layer-m states, the input embeddings, the
target positions, the visual mask and the loss mask (positions whose NEXT token is an answer token).

`draft_loss` builds the draft's training sequence and sums the loss over K MTP stages:

    sparrow mode   [visual_proj(h^m_v) for v in visual (IVSB) ; FC(e_t ; h_{t-1}) for text t >= 1]
    eagle mode     [FC(e_t ; h_{t-1}) for every t >= 1]   (e_t = the video features at visual positions)
    stage k >= 2   the text inputs use the draft's own stage k-1 states, shifted by one text entry (in eagle mode
                   a text entry after a visual one keeps the target's state, as at inference)
    only text entries are queried: visual entries are keys and values, so the cost is text x (visual + text)
    loss_k         SmoothL1(s_t, h_t) + ce_weight * CE(softmax(lm_head(h_t)), lm_head(s_t)) on masked entries
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Captured:
    """Target states of one conversation of L tokens (H hidden). loss_mask[t]: token t + 1 is an answer token.
    hidden_mid is kept at the prompt positions only (zeros after: IVSB reads it at visual positions)."""

    ids: torch.Tensor  # (L,)
    hidden_top: torch.Tensor  # (L, H)
    hidden_mid: torch.Tensor | None  # (L, H)
    input_embeds: torch.Tensor  # (L, H)
    positions: torch.Tensor  # (3, L)
    visual_mask: torch.Tensor  # (L,) bool
    loss_mask: torch.Tensor  # (L,) bool


def answer_ids(target, answer: str) -> list[int]:
    """Token ids of an assistant answer as the target would produce it: the text, then its first EOS token."""
    return target.tokenizer(answer, add_special_tokens=False)["input_ids"] + [target.eos_token_ids[0]]


def extend_inputs(inputs: dict, ids: list[int]) -> dict:
    """Append text tokens `ids` to prepared inputs (input_ids, attention_mask, mm_token_type_ids)."""
    out = dict(inputs)
    new = torch.tensor([ids], dtype=torch.long, device=inputs["input_ids"].device)  # long even when empty
    out["input_ids"] = torch.cat((inputs["input_ids"], new), dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat((inputs["mm_token_type_ids"], torch.zeros_like(new)), dim=1)
    return out


def loss_mask_for(prompt_len: int, total_len: int, device=None) -> torch.Tensor:
    """(L,) bool: True at t = prompt_len - 1 .. total_len - 2 (the states that predict the answer tokens)."""
    m = torch.zeros(total_len, dtype=torch.bool, device=device)
    m[prompt_len - 1: total_len - 1] = True
    return m


@torch.no_grad()
def capture(target, inputs: dict, answer: str, mid_layer: int | None) -> Captured:
    """Run the frozen target over prompt + answer; see `Captured`. mid_layer: HF hidden_states index m."""
    return capture_ids(target, inputs, answer_ids(target, answer), mid_layer)


@torch.no_grad()
def capture_ids(target, inputs: dict, ids: list[int], mid_layer: int | None) -> Captured:
    """`capture` for answer token ids: the prompt is prefilled (with its video), then the answer runs as a chain
    after it, exactly as generated tokens do (positions continue from the prompt; any token id is text)."""
    L0 = inputs["input_ids"].shape[1]
    cache = target.new_cache(L0 + len(ids))
    pre = target.prefill(inputs, cache, mid_layer=mid_layer, capture_embeds=True)
    _, h_answer = target.forward(torch.tensor(ids, device=target.device), None, None, cache)
    return _assemble(target, inputs, pre, ids, h_answer)


def _assemble(target, inputs: dict, pre, ids: list[int], h_answer: torch.Tensor) -> Captured:
    """A `Captured` from the prompt's `Prefill` (with mid states and embeddings) and the answer's ids and top
    states (n, H)."""
    L0, n = inputs["input_ids"].shape[1], len(ids)
    answer = torch.tensor(ids, device=target.device, dtype=torch.long)
    own = lambda x: None if x is None else x.clone()  # noqa: E731  (inference tensors -> ordinary tensors)
    mid = None if pre.hidden_mid is None else torch.cat((pre.hidden_mid, pre.hidden_mid.new_zeros(n, pre.hidden_mid.shape[1])))
    positions = (torch.arange(L0, L0 + n, device=answer.device) + target.rope_delta).expand(3, -1)
    return Captured(ids=own(torch.cat((inputs["input_ids"][0], answer))),
                    hidden_top=own(torch.cat((pre.hidden_top, h_answer))), hidden_mid=own(mid),
                    input_embeds=own(torch.cat((pre.input_embeds, target.embed_tokens(answer)))),
                    positions=own(torch.cat((pre.positions, positions), dim=1)),
                    visual_mask=own(torch.cat((pre.visual_mask, torch.zeros(n, dtype=torch.bool, device=answer.device)))),
                    loss_mask=loss_mask_for(L0, L0 + n, answer.device))


@torch.no_grad()
def capture_greedy(target, inputs: dict, max_new_tokens: int, mid_layer: int | None) -> tuple[Captured, list[int]]:
    """Answer and capture in one pass: prefill the prompt once, decode greedily (the checkpoint's repetition penalty
    applied, as `generate` and `sparrow regenerate` do) until EOS or `max_new_tokens`, and keep the states of the
    decoded tokens. Returns (the `Captured` that `capture_ids(target, inputs, ids, mid_layer)` gives up to float
    rounding, the answer's token ids). On long videos the prefill is nearly all of the cost (about 1 minute at 25k
    visual tokens on 2 CPU cores), so this halves the target's time of `regenerate` followed by `capture`."""
    from ..verify import RepetitionPenalty

    L0 = inputs["input_ids"].shape[1]
    cache = target.new_cache(L0 + max_new_tokens + 1)
    pre = target.prefill(inputs, cache, mid_layer=mid_layer, capture_embeds=True)
    rp = target.repetition_penalty
    penalty = RepetitionPenalty(rp, inputs["input_ids"][0], pre.logits.shape[-1]) if rp != 1.0 else None
    eos, ids, states, logits = set(target.eos_token_ids), [], [], pre.logits
    while True:
        if penalty is not None:
            logits = penalty(logits.view(1, -1))[0]
        token = int(logits.view(-1).argmax())
        ids.append(token)
        if token in eos or len(ids) >= max_new_tokens:
            break
        if penalty is not None:
            penalty.add([token])
        logits, h = target.forward(torch.tensor([token], device=target.device), None, None, cache)
        states.append(h)
    # the last token's state (after EOS, or the cut-off) is never read by the loss (loss_mask ends before it)
    states.append(target.forward(torch.tensor([ids[-1]], device=target.device), None, None, cache)[1])
    return _assemble(target, inputs, pre, ids, torch.cat(states)), ids


VISUAL_STATES = ("mid", "top", "none")  # which target states IVSB feeds the draft in training


@dataclass
class LossConfig:
    """mode: "sparrow" | "eagle"; ivsb: add the visual states (sparrow mode); visual_states: "mid" | "top" |
    "none"; mtp_stages: K >= 1; stage_weights: K weights (default all 1); position_mode: "compact" |
    "absolute" (sparrow mode); l1_weight / ce_weight: EAGLE's 1.0 / 0.1."""

    mode: str = "sparrow"
    ivsb: bool = True
    visual_states: str = "mid"
    mtp_stages: int = 2
    stage_weights: tuple[float, ...] | None = None
    position_mode: str = "compact"
    l1_weight: float = 1.0
    ce_weight: float = 0.1


def draft_loss(draft, target, c: Captured, cfg: LossConfig) -> tuple[torch.Tensor, list[dict]]:
    """Summed MTP loss of one conversation and per-stage metrics (loss, top-1 agreement with the target, count).
    Returns (loss scalar, [{"loss", "acc", "n"} per stage])."""
    dtype = next(draft.parameters()).dtype
    L = c.ids.shape[0]
    t_idx = torch.arange(1, L, device=c.ids.device)
    if cfg.mode == "sparrow":
        t_idx = t_idx[~c.visual_mask[1:]]
        emb = target.embed_tokens(c.ids[t_idx])
    else:
        emb = c.input_embeds[t_idx]
    emb, h_prev, h_tgt = emb.to(dtype), c.hidden_top[t_idx - 1].to(dtype), c.hidden_top[t_idx].to(dtype)
    vis = None
    if cfg.mode == "sparrow" and cfg.ivsb and cfg.visual_states != "none" and bool(c.visual_mask.any()):
        src = c.hidden_mid if cfg.visual_states == "mid" else c.hidden_top
        v_idx = c.visual_mask.nonzero(as_tuple=True)[0]
        vis = draft.visual_proj(src[v_idx].to(dtype))
    # positions: RoPE sees only differences, so the visual block simply precedes the text entries
    n_vis = 0 if vis is None else vis.shape[0]
    if cfg.mode == "eagle" or cfg.position_mode == "absolute":
        tpos = c.positions[:, t_idx] if cfg.mode == "eagle" else c.positions[:1, t_idx].expand(3, -1)
        pos = tpos if vis is None else torch.cat((c.positions[:, v_idx], tpos), dim=1)
    else:
        pos = torch.arange(n_vis + t_idx.shape[0], device=c.ids.device).expand(3, -1)
    # only text entries' states are read (the loss, the next MTP stage): the others are keys and values alone
    text_q = (~c.visual_mask[t_idx]).nonzero(as_tuple=True)[0]  # (n,) entries of t_idx that are text
    queries = None if n_vis == 0 and text_q.shape[0] == t_idx.shape[0] else text_q + n_vis  # None: every entry
    mask = c.loss_mask[t_idx][text_q]
    h_tgt = h_tgt[text_q]
    with torch.no_grad():
        p_tgt = torch.softmax(target.lm_head(h_tgt[mask]).float(), dim=-1)
    # stage k+1 reads, at text entry i, the draft's own stage-k state at entry i - 1 when that entry is text too
    follows = torch.zeros_like(text_q, dtype=torch.bool)
    follows[1:] = text_q[1:] == text_q[:-1] + 1
    into, src = text_q[follows], follows.nonzero(as_tuple=True)[0] - 1
    weights = cfg.stage_weights or (1.0,) * cfg.mtp_stages
    total, stats, h_in = 0.0, [], h_prev
    for k in range(cfg.mtp_stages):
        x = draft.fuse(emb, h_in)
        if vis is not None:
            x = torch.cat((vis, x), dim=0)
        states = draft(x.unsqueeze(0), pos.unsqueeze(1), queries=queries)[0]  # (text entries, H)
        s = states[mask]
        logits = draft.logits(s).float()
        l1 = F.smooth_l1_loss(s.float(), h_tgt[mask].float())
        ce = -(p_tgt * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        loss_k = cfg.l1_weight * l1 + cfg.ce_weight * ce
        total = total + weights[k] * loss_k
        with torch.no_grad():
            acc = (logits.argmax(-1) == p_tgt.argmax(-1)).float().mean()
        stats.append({"loss": loss_k.item(), "acc": float(acc), "n": int(mask.sum())})
        h_in = h_prev.index_copy(0, into, states[src])
    return total, stats
