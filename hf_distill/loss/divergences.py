"""The divergences themselves: pure functions on log-probabilities (or raw logits), no temperature scaling.

Every function works in float32 whatever the input dtype and reduces over the last dimension.
`temperature_scale` is the one definition of the T² factor; callers apply it where the divergence
becomes a loss (`hf_distill.loss.blended`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse", "cosine")
# Divergences between probability distributions; the others compare raw logits (mse, cosine) or are bounded (tvd).
KL_FAMILY = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
LOGIT_LOSSES = ("mse", "cosine")


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


def temperature_scale(loss_type: str, temperature: float) -> float:
    """T² for the KL family, so gradients keep their size as T changes (Hinton et al., 2015); 1 for the others."""
    return temperature**2 if loss_type in KL_FAMILY else 1.0


def kl_from_log_probs(log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """KL(p‖r) over the last dimension; terms with p = 0 contribute 0 even where r = 0 (NaN stays NaN)."""
    p = log_p.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_r))
    # Rounding can leave a tiny negative sum where p ≈ r; a divergence is never negative.
    return terms.sum(-1).clamp_min(0.0)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) computed in log space, for 0 <= w <= 1."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def probability_divergence(log_q: torch.Tensor, log_p: torch.Tensor, loss_type: str, beta: float, skew: float) -> torch.Tensor:
    """The divergence of the student's log-probabilities `log_q` from the teacher's `log_p` (see `distillation_loss`)."""
    if loss_type == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if loss_type == "jsd" and beta in (0.0, 1.0):
        # TRL GKD's convention: the endpoints are forward (β=0) and reverse (β=1) KL, not the degenerate zero.
        loss_type = "forward_kl" if beta == 0.0 else "reverse_kl"
    if loss_type == "forward_kl":
        return kl_from_log_probs(log_p, log_q)
    if loss_type == "reverse_kl":
        return kl_from_log_probs(log_q, log_p)
    if loss_type == "jsd":
        log_m = log_mixture(log_p, log_q, beta)
        return beta * kl_from_log_probs(log_p, log_m) + (1 - beta) * kl_from_log_probs(log_q, log_m)
    if loss_type == "skew_kl":
        # skew=1 compares p with itself: exactly 0, kept in the graph so backward still runs.
        return kl_from_log_probs(log_p, log_mixture(log_p, log_q, skew)) if skew < 1.0 else 0.0 * log_q.sum(-1)
    if loss_type == "skew_reverse_kl":
        return kl_from_log_probs(log_q, log_mixture(log_q, log_p, skew))
    raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of {', '.join(LOSS_TYPES)}.")


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, loss_type: str) -> torch.Tensor:
    """`mse` (mean squared difference) or `cosine` (1 − cosine similarity) of raw logits."""
    student, teacher = student.float(), teacher.float()
    if loss_type == "mse":
        return (student - teacher).pow(2).mean(-1)
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).clamp_min(0.0)


def cross_entropy_per_position(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """-log softmax(logits)[target] per position in float32; 0 where the target is `ignore_index`."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_z = torch.logsumexp(logits.float(), dim=-1)
    picked = logits.float().gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, log_z - picked, torch.zeros_like(log_z))
