"""The attention-relation term (MiniLM v2, Wang et al. 2021): the student's self-attention relations match the teacher's.

At a mapped layer, the queries, keys and values (the attention's input projections) are each split into R relation
heads; a relation is the softmax over a row's visible positions of their scaled dot products with each other
(query–query, key–key, value–value). Widths may differ between the models: each relation is (positions × positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def relation_log_probs(states: torch.Tensor, heads: int, key_mask: torch.Tensor | None, causal: bool = True):
    """(B, R, S, S) log-softmax over keys of the scaled dot products of `states` (B, S, D) split into `heads`.

    A position sees the real positions up to itself (causal) or all real positions; every position sees itself, so
    no row is empty (padding rows are left out by the query mask, not here).
    """
    batch, length, width = states.shape
    x = states.float().reshape(batch, length, heads, width // heads).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)
    visible = torch.ones(length, length, dtype=torch.bool, device=states.device)
    if causal:
        visible = visible.tril()
    visible = visible[None, None] if key_mask is None else visible & key_mask.bool()[:, None, None, :]
    visible = visible | torch.eye(length, dtype=torch.bool, device=states.device)
    # A finite fill keeps 0 · (fill − fill) = 0 in the KL where both sides mask a key.
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min).log_softmax(-1)


def attention_relation_sum(student: AttentionStates, teacher: AttentionStates, causal: bool = True):
    """Σ over the query positions of KL(teacher relation ‖ student relation), averaged over the mapped layers, the
    three relations and the relation heads (a scalar, float32)."""
    heads, per_position = student.heads, 0.0
    for s_layer, t_layer in zip(student.layers, teacher.layers):
        for name in RELATIONS:
            log_s = relation_log_probs(s_layer[name], heads, student.key_mask, causal)
            log_t = relation_log_probs(t_layer[name].detach(), heads, student.key_mask, causal)
            per_position = per_position + (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)  # (B, S)
    per_position = per_position / max(len(RELATIONS) * len(student.layers), 1)
    mask = student.query_mask
    if mask is None:
        return per_position.sum()
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
