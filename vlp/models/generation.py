"""Greedy and beam search over a model's KV cache.

The searches drive a *stepper* with three methods:

* ``start(ids, mask) → (log_probs (B, V), state)``: run the left-padded prompts once;
* ``step(tokens (B,), state) → (log_probs (B, V), state)``: feed one token per row;
* ``select(state, index (B',)) → state``: keep / repeat rows (beams) of every cached tensor.

Both return, per prompt, the new tokens without the stop token, and their summed log-prob
(beam search: the best hypothesis by ``score / length ** length_penalty``, its length
counting the stop token when it ended on one).
"""

from __future__ import annotations

import torch


def greedy_search(step, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, stop_ids: set[int]):
    """The most likely next token each step until a stop token or ``max_new_tokens``."""
    B = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    scores = torch.zeros(B)
    done = [False] * B
    if max_new_tokens <= 0:
        return out, scores.tolist()
    logp, state = step.start(ids, mask)  # (B, V)
    for t in range(max_new_tokens):
        token = logp.argmax(dim=-1)  # (B,)
        picked = logp.gather(-1, token[:, None]).squeeze(-1).cpu()
        for i, tok in enumerate(token.tolist()):
            if done[i]:
                continue
            scores[i] += picked[i]
            if tok in stop_ids:
                done[i] = True
            else:
                out[i].append(tok)
        if all(done) or t == max_new_tokens - 1:
            break
        logp, state = step.step(token, state)
    return out, scores.tolist()


def beam_search(
    step,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    stop_ids: set[int],
    length_penalty: float = 1.0,
):
    """``num_beams`` hypotheses per prompt; a prompt is done once it has ``num_beams``
    finished ones (HF's ``early_stopping=True``); the unfinished ones count at the end."""
    B, K = ids.shape[0], num_beams
    seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(B)]
    if max_new_tokens <= 0:
        return [[] for _ in range(B)], [0.0] * B
    logp, state = step.start(ids, mask)  # (B, V)
    V = logp.shape[-1]
    device = logp.device
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B * K,)
    state, logp = step.select(state, rows), logp[rows]
    beam = torch.full((B, K), float("-inf"), device=device)
    beam[:, 0] = 0.0  # the first step expands beam 0 only: K distinct first tokens
    done = [False] * B

    def normalised(score: float, length: int) -> float:
        return score / (max(length, 1) ** length_penalty)

    for t in range(max_new_tokens):
        cand = (beam.reshape(B * K, 1) + logp).reshape(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        new_beam = torch.full((B, K), float("-inf"), device=device)
        new_tok = torch.zeros(B, K, dtype=torch.long, device=device)
        new_src = torch.arange(K, device=device).repeat(B, 1)
        for b in range(B):
            if done[b]:
                continue
            kept, new_seqs = 0, []
            for s, i in zip(top_s[b], top_i[b]):
                if s == float("-inf"):
                    break
                src, tok = divmod(i, V)
                if tok in stop_ids:
                    finished[b].append((normalised(s, len(seqs[b][src]) + 1), seqs[b][src], s))
                    continue
                new_beam[b, kept], new_tok[b, kept], new_src[b, kept] = s, tok, src
                new_seqs.append(seqs[b][src] + [tok])
                kept += 1
                if kept == K:
                    break
            seqs[b] = new_seqs + [[] for _ in range(K - len(new_seqs))]
            if len(finished[b]) >= K or kept == 0:
                done[b] = True
        if all(done) or t == max_new_tokens - 1:
            beam = new_beam
            break
        beam = new_beam
        index = (torch.arange(B, device=device)[:, None] * K + new_src).reshape(-1)  # (B * K,)
        state = step.select(state, index)
        logp, state = step.step(new_tok.reshape(-1), state)
    out, scores = [], []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b] or not hyps:
            for k in range(K):
                s = float(beam[b, k])
                if s != float("-inf"):
                    hyps.append((normalised(s, len(seqs[b][k])), seqs[b][k], s))
        best = max(hyps, key=lambda h: h[0]) if hyps else (0.0, [], 0.0)
        out.append(best[1])
        scores.append(best[2])
    return out, scores
