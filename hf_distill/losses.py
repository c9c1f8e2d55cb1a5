"""Token-level divergences between a student and a teacher, as pure tensor functions.

Every function takes logits whose last dimension is the vocabulary (or the classes), already aligned
position by position, and works in float32 whatever the input dtype. Distributions are compared at
temperature T: p = softmax(teacher / T), q = softmax(student / T).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse", "cosine")

# Losses on probabilities are scaled by T² so their gradients keep the same size as T changes
# (Hinton et al., 2015). Losses on raw logits or bounded ones are not.
_SCALED_BY_T2 = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"}


def check_loss_settings(loss_type: str, temperature: float, beta: float, skew: float) -> None:
    """Raise a `ValueError` naming the bad setting and its valid range."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of {', '.join(LOSS_TYPES)}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 (1.0 compares the plain softmax).")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must lie in [0, 1] (0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD).")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew={skew!r} must lie in [0, 1] (the share of the mixture taken from the other side).")


def _kl_from_log_probs(log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """KL(p‖r) over the last dimension; terms with p = 0 contribute 0 even where r = 0 (NaN stays NaN)."""
    p = log_p.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_r))
    # Rounding can leave a tiny negative sum where p ≈ r; a divergence is never negative.
    return terms.sum(-1).clamp_min(0.0)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) computed in log space, for 0 <= w <= 1."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss_type: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """The divergence at each position: logits (..., V) -> float32 values (...).

    See `distillation_loss` for the definition of each `loss_type`.
    """
    student = student_logits.float()
    teacher = teacher_logits.float()
    if loss_type == "mse":
        return (student - teacher).pow(2).mean(-1)
    if loss_type == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).clamp_min(0.0)

    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    if loss_type == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)

    if loss_type == "forward_kl":
        value = _kl_from_log_probs(log_p, log_q)
    elif loss_type == "reverse_kl":
        value = _kl_from_log_probs(log_q, log_p)
    elif loss_type == "jsd":
        # Generalized JSD with TRL's GKD convention: m = β·p + (1−β)·q; the endpoints are defined as
        # forward (β=0) and reverse (β=1) KL rather than the degenerate zero the formula gives there.
        if beta == 0.0:
            value = _kl_from_log_probs(log_p, log_q)
        elif beta == 1.0:
            value = _kl_from_log_probs(log_q, log_p)
        else:
            log_m = _log_mixture(log_p, log_q, beta)
            value = beta * _kl_from_log_probs(log_p, log_m) + (1 - beta) * _kl_from_log_probs(log_q, log_m)
    elif loss_type == "skew_kl":
        # skew=1 compares p with itself: exactly 0, kept in the graph so backward still runs.
        value = _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, skew)) if skew < 1.0 else 0.0 * log_q.sum(-1)
    elif loss_type == "skew_reverse_kl":
        value = _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, skew))
    else:
        raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of {', '.join(LOSS_TYPES)}.")
    return value * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    loss_type: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean divergence between student and teacher over the positions whose label is not `ignore_index`.

    Logits have shape (..., V) and must already be aligned (no shifting happens here). With
    p = softmax(teacher / T) and q = softmax(student / T):

    - `forward_kl`: T²·KL(p‖q) — mean-seeking, the classic Hinton loss.
    - `reverse_kl`: T²·KL(q‖p) — mode-seeking.
    - `jsd`: T²·[β·KL(p‖m) + (1−β)·KL(q‖m)], m = β·p + (1−β)·q; β=0 is forward KL, β=1 reverse KL.
    - `skew_kl`: T²·KL(p ‖ skew·p + (1−skew)·q) and `skew_reverse_kl`: T²·KL(q ‖ (1−skew)·p + skew·q) (DistiLLM).
    - `tvd`: ½·Σ|p−q|.
    - `mse`: mean over the vocabulary of (student−teacher)² on raw logits.
    - `cosine`: 1 − cos(student, teacher) on raw logits.

    Returns a float32 scalar. When `labels` is None every position counts. When no position counts,
    a warning is given and a zero that still carries gradient is returned.
    """
    check_loss_settings(loss_type, temperature, beta, skew)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has shape "
            f"{tuple(teacher_logits.shape)}; they must match. Align them first (causal LMs: drop the last position "
            "and shift labels left) and slice both to a shared vocabulary."
        )
    values = token_divergence(
        student_logits, teacher_logits, loss_type=loss_type, temperature=temperature, beta=beta, skew=skew
    )
    if labels is None:
        return values.mean()
    if labels.shape != values.shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but the logits have {tuple(student_logits.shape)}; labels must "
            "have the logits' shape without the last (vocabulary) dimension."
        )
    mask = labels != ignore_index
    count = mask.sum()
    if count == 0:
        warnings.warn("distillation_loss: every label equals ignore_index, so no position is distilled; returning 0.")
        return values.sum() * 0.0
    return values[mask].sum() / count


def cross_entropy_per_position(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """-log softmax(logits)[target] per position in float32; 0 where the target is `ignore_index`."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_z = torch.logsumexp(logits.float(), dim=-1)
    picked = logits.float().gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, log_z - picked, torch.zeros_like(log_z))
