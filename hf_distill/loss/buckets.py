"""Divergences against a cached teacher: its top-k log-probabilities plus one bucket for the rest of the vocabulary.

The teacher's mass outside its top-k is 1 − Σ p_topk. It is compared with the student's mass outside the
same ids as one extra bucket (never dropped, unless `tail="renormalize"` asks to renormalize both top-k),
which gives a lower bound of the full divergence that equals it when the top-k carry all of the teacher's mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import LOGIT_LOSSES, logit_divergence, probability_divergence

# Smallest tail mass kept for the teacher: float16 log-probs can round the top-k to a total of 1 or more,
# which would leave no mass outside them and make reverse-KL-type losses infinite.
MIN_TAIL_MASS = 1e-6


@dataclass
class CachedTeacher:
    """A batch's cached teacher entries, one row per selected position (row-major, like the trainer's selection).

    `ids` (n, k) top-k token ids, `logprobs` (n, k) their log-probabilities at the cache's temperature,
    `lse` (n,) logsumexp of the scaled logits over the whole vocabulary (gives back raw logits for mse/cosine).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor

    def rows(self, part) -> "CachedTeacher":
        return CachedTeacher(self.ids[part], self.logprobs[part], self.lse[part])

    def __len__(self) -> int:
        return self.ids.shape[0]


def top_k_entries(teacher_logits: torch.Tensor, k: int, temperature: float):
    """(ids, log-probs, lse) of the top-k at temperature T for logits (n, V)."""
    scaled = teacher_logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    values, ids = scaled.topk(k, dim=-1)
    return ids, values - lse[:, None], lse


def tail_log_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(topk_logprobs)), floored at log(MIN_TAIL_MASS)."""
    covered = torch.logsumexp(topk_logprobs.float(), dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(covered)).clamp(min=MIN_TAIL_MASS))


def uses_tail_bucket(tail: str, top_k: int, vocab: int) -> bool:
    """Whether the mass outside the top-k is its own bucket (not when renormalizing, or when no token is left)."""
    return tail != "renormalize" and top_k < vocab


def student_tail_log_mass(log_q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{j ∉ ids} q_j, exactly (not as 1 − Σ top-k, which cancels when the top-k hold nearly all the mass)."""
    return log_q.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)


def student_buckets(log_q_top: torch.Tensor, log_q_tail: torch.Tensor | None) -> torch.Tensor:
    """The student's bucket log-probabilities: top-k then tail, or the top-k renormalized when the tail is None."""
    return F.log_softmax(log_q_top, -1) if log_q_tail is None else torch.cat([log_q_top, log_q_tail], -1)


def teacher_buckets(teacher_logprobs: torch.Tensor, use_tail: bool) -> torch.Tensor:
    """The teacher's bucket log-probabilities from its stored top-k, like `student_buckets`."""
    log_p_top = teacher_logprobs.float()
    if not use_tail:
        return F.log_softmax(log_p_top, -1)
    return torch.cat([log_p_top, tail_log_mass(log_p_top)[:, None]], -1)


def cached_divergence(
    student_logits: torch.Tensor, teacher: CachedTeacher, *, loss_type: str, temperature: float, beta: float, skew: float, tail: str
) -> torch.Tensor:
    """Per-position divergence (not T²-scaled) of student logits (n, V) from a cached teacher.

    Probability losses compare the (k + 1)-bucket distributions; `mse`/`cosine` compare raw logits on the
    teacher's top-k ids.
    """
    ids = teacher.ids.long()
    if loss_type in LOGIT_LOSSES:
        teacher_raw = temperature * (teacher.logprobs.float() + teacher.lse.float()[:, None])
        return logit_divergence(student_logits.float().gather(-1, ids), teacher_raw, loss_type)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    use_tail = uses_tail_bucket(tail, ids.shape[-1], student_logits.shape[-1])
    log_q_tail = student_tail_log_mass(log_q, ids) if use_tail else None
    return probability_divergence(
        student_buckets(log_q.gather(-1, ids), log_q_tail), teacher_buckets(teacher.logprobs, use_tail), loss_type, beta, skew
    )
