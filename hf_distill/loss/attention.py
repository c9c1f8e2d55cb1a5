"""The attention-relation term (MiniLM v2, Wang et al. 2021): the student's self-attention relations match the teacher's.

At a mapped layer, the queries, keys and values (the attention's input projections) are each split into R relation
heads; a relation is the softmax over a row's visible positions of their scaled dot products with each other
(query–query, key–key, value–value). Widths may differ between the models: each relation is (positions × positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

RELATIONS = ("q", "k", "v")


@dataclass
class AttentionStates:
    """The query/key/value projections (B, S, D) of each mapped layer, over whole rows, and the relation heads they
    split into. `key_mask` (B, S) marks real tokens; `query_mask` (B, S) the positions the term is summed over.
    """

    layers: list[dict[str, torch.Tensor]]
    heads: int
    key_mask: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None


def relation_log_probs(states: torch.Tensor, heads: int, key_mask: torch.Tensor | None, causal: bool = True,
                       queries: slice = slice(None)):
    """(B, R, Q, K) log-softmax over keys of the scaled dot products of `states` (B, S, D) split into `heads`, for the
    query positions `queries` (all by default) against the keys they may see.

    A position sees the real positions up to itself (causal) or all real positions; every position sees itself, so
    no row is empty (padding rows are left out by the query mask, not here). Causally, keys after the last query are
    left out of the result (K = the last query + 1): they are never seen.
    """
    batch, length, width = states.shape
    start, stop, _ = queries.indices(length)
    keys = stop if causal else length
    x = states.float().reshape(batch, length, heads, width // heads).transpose(1, 2)
    scores = x[:, :, start:stop] @ x[:, :, :keys].transpose(-1, -2) / math.sqrt(width // heads)
    query_at = torch.arange(start, stop, device=states.device)[:, None]
    key_at = torch.arange(keys, device=states.device)[None, :]
    visible = key_at <= query_at if causal else torch.ones_like(key_at == query_at)
    visible = visible[None, None] if key_mask is None else visible & key_mask.bool()[:, None, None, :keys]
    visible = visible | (key_at == query_at)
    # A finite fill keeps 0 · (fill − fill) = 0 in the KL where both sides mask a key.
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min).log_softmax(-1)


def relation_divergence(student: torch.Tensor, teacher: torch.Tensor, heads: int, key_mask: torch.Tensor | None,
                        causal: bool, queries: slice = slice(None)) -> torch.Tensor:
    """(B, Q) KL(teacher relation ‖ student relation) of each query position in `queries`, averaged over heads."""
    log_s = relation_log_probs(student, heads, key_mask, causal, queries)
    log_t = relation_log_probs(teacher.detach(), heads, key_mask, causal, queries)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)


def relation_query_chunk(batch: int, heads: int, length: int, budget_elements: int = 1 << 24) -> int:
    """Query positions per chunk so that one chunk's (B, R, Q, S) relations stay near `budget_elements`."""
    return max(1, min(length, budget_elements // max(batch * heads * length, 1)))


def attention_relation_sum(student: AttentionStates, teacher: AttentionStates, causal: bool = True,
                           query_chunk: int | None = None):
    """Σ over the query positions of KL(teacher relation ‖ student relation), averaged over the mapped layers, the
    three relations and the relation heads (a scalar, float32).

    The (positions × positions) relations are built `query_chunk` queries at a time (None: from a memory budget) and,
    when the rows are longer than a chunk, recomputed in backward rather than kept (activation checkpointing), so the
    memory held for backward grows with the projections, not with the square of the row length.
    """
    heads, per_position = student.heads, 0.0
    batch, length = student.layers[0]["q"].shape[:2] if student.layers else (0, 0)
    chunk = query_chunk or relation_query_chunk(batch, heads, length)
    for s_layer, t_layer in zip(student.layers, teacher.layers):
        for name in RELATIONS:
            parts = []
            for start in range(0, length, chunk):
                args = (s_layer[name], t_layer[name], heads, student.key_mask, causal, slice(start, start + chunk))
                if chunk < length and torch.is_grad_enabled():
                    parts.append(checkpoint(relation_divergence, *args, use_reentrant=False))
                else:
                    parts.append(relation_divergence(*args))
            per_position = per_position + torch.cat(parts, dim=1)  # (B, S)
    per_position = per_position / max(len(RELATIONS) * len(student.layers), 1)
    mask = student.query_mask
    if mask is None:
        return per_position.sum()
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
