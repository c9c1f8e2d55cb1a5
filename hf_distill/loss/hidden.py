"""The intermediate-layer term: each mapped student layer's output regressed on a teacher layer's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_layer_map(student_layers: int, teacher_layers: int, source_layers: list[int] | None = None) -> list[int]:
    """For each student layer, the teacher layer it learns to match.

    A student cut or pruned from the teacher records the teacher layers it kept (`source_layers`), and each
    of its layers is mapped to the layer it came from; otherwise layers are spread uniformly, the last
    student layer on the last teacher layer.
    """
    if source_layers is not None and len(source_layers) == student_layers:
        return list(source_layers)
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)


def _cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


HIDDEN_DISTANCES = {"mse": _relative_mse, "cosine": _cosine_distance}
HIDDEN_LOSS_TYPES = tuple(HIDDEN_DISTANCES)


def hidden_state_distance(student: torch.Tensor, teacher: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-position distance (n,) between hidden states (n, D), in float32, scale-free so weight 1 suits any model.

    `mse`: ‖s − t‖² / ‖t‖², the squared error relative to the teacher's own size at that position (so tokens
    with huge activations, such as attention sinks, do not dominate). `cosine`: 1 − cos(s, t).
    """
    return HIDDEN_DISTANCES[loss_type](student.float(), teacher.float())


def hidden_state_sum(
    student_layers: list[torch.Tensor], teacher_layers: list[torch.Tensor], mask: torch.Tensor, loss_type: str
) -> torch.Tensor:
    """Σ over the masked positions of the distance averaged over mapped layer pairs (a scalar, float32)."""
    total = sum(hidden_state_distance(s, t.detach(), loss_type) for s, t in zip(student_layers, teacher_layers))
    per_position = total / max(len(student_layers), 1)
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
