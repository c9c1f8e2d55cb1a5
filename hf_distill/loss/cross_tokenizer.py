"""A teacher with another tokenizer: Universal Logit Distillation (ULD, Boizard et al., 2024).

The two models' vocabularies need not share a single token. Positions are aligned on the response: the k-th
target token of the student's tokenization is paired with the k-th target token of the teacher's (each row
truncated to the shorter of the two), as in the paper. At each aligned pair the distance is

    ULD(p, q) = Σ_i | sort↓(p)_i − sort↓(q)_i |

over the two probability vectors at the temperature, each sorted in descending order and the shorter padded
with zeros to the larger vocabulary: it compares the shapes of the distributions, never token identities.
Like `tvd` it is bounded (≤ 2) and is not scaled by T².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import cross_entropy_per_position

CROSS_TOKENIZER = ("uld", "align")


@dataclass
class AlignedTeacher:
    """A teacher with its own vocabulary: logits (M, V_t), one row per distilled student position, in the
    row-major order of the student's distilled positions (so row j pairs with the j-th True of the KD mask)."""

    logits: torch.Tensor

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
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q, p = F.pad(q, (0, width - q.shape[-1])), F.pad(p, (0, width - p.shape[-1]))  # zeros: no mass there
    return (q - p).abs().sum(-1)


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


def uld_blended_loss(
    student_logits: torch.Tensor,
    teacher: AlignedTeacher | None,
    targets: torch.Tensor,
    kd_mask: torch.Tensor,
    ce_mask: torch.Tensor,
    kd_scale: float,
    ce_scale: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Σ ULD over distilled positions, Σ CE over targets) for the student's logits (N, V_s), by autograd.

    `teacher` holds one row per True of `kd_mask`; CE is the student's own loss on `targets` where `ce_mask`.
    A term whose scale is 0 is left out of the loss (alpha=0 is exactly the student's own loss).
    """
    loss = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum = loss.detach().clone()
    if teacher is not None:
        if len(teacher) != int(kd_mask.sum()):
            raise ValueError(
                f"The teacher gives {len(teacher)} aligned rows for {int(kd_mask.sum())} distilled student positions; "
                "both must come from `aligned_response_masks` on the same batch."
            )
        kd = uld_distance(student_logits[kd_mask], teacher.logits, temperature).sum()
        kd_sum = kd.detach()
        if kd_scale != 0:
            loss = loss + kd_scale * kd
    ce = cross_entropy_per_position(student_logits, targets)
    ce = torch.where(ce_mask, ce, torch.zeros_like(ce)).sum()
    if ce_scale != 0:
        loss = loss + ce_scale * ce
    return loss, kd_sum, ce.detach()
