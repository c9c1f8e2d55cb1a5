"""A teacher with another tokenizer: ULD (Boizard et al., 2024) and span alignment over a shared vocabulary.

Both pair the k-th distilled position of the student's tokenization with the k-th of the teacher's, each row
cut to the shorter (`aligned_response_masks`); they differ in which positions are distilled and how.

`uld`: every response position, as in the paper. The vocabularies need not share a single token; at each pair

    ULD(p, q) = Σ_i | sort↓(p)_i − sort↓(q)_i |

over the two probability vectors at the temperature, each sorted in descending order and the shorter padded
with zeros to the larger vocabulary: it compares the shapes of the distributions, never token identities.
Like `tvd` it is bounded (≤ 2) and is not scaled by T².

`align`: only response tokens that cover exactly the same characters of the text in both tokenizations
(`one_to_one_spans`), so both models predict the same piece of text there. Their distributions are compared
over the tokens both vocabularies spell alike (`shared_vocabulary`), plus one bucket holding each side's mass
outside them, with the configured divergence (`shared_vocabulary_divergence`).
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F

from .buckets import MIN_TAIL_MASS, student_tail_log_mass
from .divergences import cross_entropy_per_position, probability_divergence, temperature_scale

CROSS_TOKENIZER = ("uld", "align")


@dataclass
class AlignedTeacher:
    """A teacher with its own vocabulary: logits (M, V_t), one row per distilled student position, in the
    row-major order of the student's distilled positions (so row j pairs with the j-th True of the KD mask)."""

    logits: torch.Tensor
    shared: tuple[torch.Tensor, torch.Tensor] | None = None  # 'align': (student ids, teacher ids) spelled alike

    def __len__(self) -> int:
        return self.logits.shape[0]


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD at each aligned position: logits (n, V_s) and (n, V_t) -> values (n,), in float32 (float64 stays float64).

    The vocabularies may differ in size and content; only the sorted probabilities are compared.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"uld_distance needs one teacher row per student row: got student {tuple(student_logits.shape)} and "
            f"teacher {tuple(teacher_logits.shape)}; align the positions first (`aligned_response_masks`)."
        )
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1)
    p = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return sorted_l1(q, p)  # zeros pad the smaller vocabulary: no mass there


def aligned_response_masks(student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair the k-th distilled position of each student row with the k-th of the same teacher row.

    `student_mask` (B, L_s) and `teacher_mask` (B, L_t) mark each model's target positions (for a causal LM, the
    positions that predict a response token). Returns the two masks kept to the first min(n_s, n_t) positions
    of every row, so selecting with them in row-major order yields the pairs in the same order on both sides.
    """
    if student_mask.shape[0] != teacher_mask.shape[0]:
        raise ValueError(
            f"The student batch has {student_mask.shape[0]} rows but the teacher batch {teacher_mask.shape[0]}: "
            "each row needs both tokenizations (the cross-tokenizer collator builds them)."
        )
    kept = torch.minimum(student_mask.sum(-1), teacher_mask.sum(-1)).unsqueeze(-1)
    student_rank = student_mask.long().cumsum(-1)  # 1 at the first target position, 2 at the second, ...
    teacher_rank = teacher_mask.long().cumsum(-1)
    return student_mask & (student_rank <= kept), teacher_mask & (teacher_rank <= kept)


def one_to_one_spans(student_ends: list[int], teacher_ends: list[int]) -> list[tuple[int, int]]:
    """Pairs (i, j) of a student token and a teacher token that cover exactly the same characters of one text.

    Each list holds its tokens' end offsets in the text, in order (a token starts where the previous one ends).
    Walking both, the side whose token ends first advances; where both end at one offset a span closes, and it
    is kept when it holds one token of each side (as TRL's GOLD groups tokens by offsets; spans of several
    tokens are left out here). Zero-width tokens ending together, like both EOS tokens, pair too.
    """
    pairs, i, j, span_i, span_j = [], 0, 0, 0, 0
    while i < len(student_ends) and j < len(teacher_ends):
        if student_ends[i] < teacher_ends[j]:
            i += 1
        elif student_ends[i] > teacher_ends[j]:
            j += 1
        else:
            if i == span_i and j == span_j:
                pairs.append((i, j))
            i, j = i + 1, j + 1
            span_i, span_j = i, j
    return pairs


def shared_vocabulary(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the tokens both vocabularies spell alike (`get_vocab()` strings), by teacher id."""
    pairs = sorted((teacher_id, student_vocab[token]) for token, teacher_id in teacher_vocab.items() if token in student_vocab)
    return torch.tensor([s for _, s in pairs], dtype=torch.long), torch.tensor([t for t, _ in pairs], dtype=torch.long)


def shared_log_buckets(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-probabilities (n, k + 1) of the k shared tokens `ids` and of the rest of the vocabulary as one bucket.

    The rest is floored at MIN_TAIL_MASS and the buckets renormalized, so a side whose whole vocabulary is shared
    still gives the other side's leftover mass a finite divergence.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
    index = ids.to(logits.device).expand(logits.shape[0], -1)
    rest = student_tail_log_mass(log_probs, index).clamp(min=math.log(MIN_TAIL_MASS))
    return F.log_softmax(torch.cat([log_probs.gather(-1, index), rest], -1), dim=-1)


def shared_vocabulary_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """The loss-scaled divergence at each aligned position over the shared tokens plus one bucket: values (n,).

    `loss_type` is a probability loss (`DistillationConfig` refuses mse and cosine with cross_tokenizer='align')."""
    log_q = shared_log_buckets(student_logits, student_ids, temperature)
    log_p = shared_log_buckets(teacher_logits, teacher_ids, temperature)
    return probability_divergence(log_q, log_p, loss_type, beta, skew) * temperature_scale(loss_type, temperature)


def sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_i |sort↓(q)_i − sort↓(p)_i| of two probability vectors (n, V_q), (n, V_p), the shorter padded with zeros."""
    q, p = q.sort(dim=-1, descending=True).values, p.sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    return (F.pad(q, (0, width - q.shape[-1])) - F.pad(p, (0, width - p.shape[-1]))).abs().sum(-1)


def aligned_blended_loss(
    student_logits: torch.Tensor,
    teacher: AlignedTeacher | None,
    targets: torch.Tensor,
    kd_mask: torch.Tensor,
    ce_mask: torch.Tensor,
    kd_scale: float,
    ce_scale: float,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Σ KD over distilled positions, Σ CE over targets) for the student's logits (N, V_s), by autograd.

    `teacher` holds one row per True of `kd_mask`: KD is ULD, or with `teacher.shared` ('align') the `loss_type`
    divergence over the shared vocabulary. CE is the student's own loss on `targets` where `ce_mask`. A term whose
    scale is 0 is left out of the loss (alpha=0 is exactly the student's own loss).
    """
    loss = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum = loss.detach().clone()
    if teacher is not None:
        if len(teacher) != int(kd_mask.sum()):
            raise ValueError(
                f"The teacher gives {len(teacher)} aligned rows for {int(kd_mask.sum())} distilled student positions; "
                "both must come from `aligned_response_masks` on the same batch."
            )
        if teacher.shared is None:
            kd = uld_distance(student_logits[kd_mask], teacher.logits, temperature).sum()
        else:
            kd = shared_vocabulary_divergence(
                student_logits[kd_mask], teacher.logits, *teacher.shared, loss_type=loss_type, temperature=temperature,
                beta=beta, skew=skew,
            ).sum()
        kd_sum = kd.detach()
        if torch.is_tensor(kd_scale) or kd_scale != 0:
            loss = loss + kd_scale * kd
    ce = cross_entropy_per_position(student_logits, targets)
    ce = torch.where(ce_mask, ce, torch.zeros_like(ce)).sum()
    if torch.is_tensor(ce_scale) or ce_scale != 0:
        loss = loss + ce_scale * ce
    return loss, kd_sum, ce.detach()
