"""Several teachers at the same positions, and the two ways their targets are reduced to one loss.

- `mean_probs`: distill toward the weighted mixture of the teachers' distributions at temperature T,
  m = Σ_i w_i · softmax(z_i / T), computed in log space. The mixture is handed on as logits whose softmax at T
  is m (T · log m), so every loss downstream (the closed-form gradients included) sees one teacher; for `mse`
  and `cosine` those logits are the mixture's log-probabilities times T.
- `mean_loss`: the weighted sum of per-teacher divergences, Σ_i w_i · D(teacher_i, student).

Teachers may differ in vocabulary size by padding rows: the mixture is taken over the rows they all have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MULTI_TEACHER = ("mean_probs", "mean_loss")


def normalized_weights(weights, n_teachers: int) -> tuple[float, ...]:
    """`weights` (None: equal) checked against the number of teachers and scaled to sum to 1."""
    if weights is None:
        return (1.0 / n_teachers,) * n_teachers
    weights = list(weights)
    if len(weights) != n_teachers:
        raise ValueError(
            f"teacher_weights={weights} has {len(weights)} value(s) for {n_teachers} teacher(s): give one weight per "
            "teacher, in the teachers' order, or leave teacher_weights unset for equal weights."
        )
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher_weights={weights} must be finite numbers >= 0 with a positive sum, like [0.7, 0.3].")
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def check_reduction(reduction: str) -> None:
    if reduction not in MULTI_TEACHER:
        raise ValueError(f"multi_teacher={reduction!r}; choose one of {', '.join(MULTI_TEACHER)}.")


@dataclass
class TeacherEnsemble:
    """Several teachers (each `TeacherLogits` or `TeacherHidden`) at the same positions, with normalized weights."""

    members: list
    weights: tuple[float, ...]
    reduction: str = "mean_probs"

    def __len__(self) -> int:
        return len(self.members)

    def rows(self, part) -> list[torch.Tensor]:
        """Each teacher's logits at positions `part` (projected now when given as hidden states)."""
        return [member.rows(part) for member in self.members]


@torch.no_grad()
def mixture_logits(teacher_logits: list[torch.Tensor], weights, temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is Σ_i w_i · softmax(teacher_logits_i / T), in float32.

    T · logsumexp_i(log w_i + log_softmax(z_i / T)) over the vocabulary rows every teacher has; a teacher of
    weight 0 is left out (its log-weight would be −inf).
    """
    vocab = min(logits.shape[-1] for logits in teacher_logits)
    terms = [
        math.log(w) + torch.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)
        for logits, w in zip(teacher_logits, weights)
        if w > 0
    ]
    return torch.logsumexp(torch.stack(terms), dim=0) * temperature
