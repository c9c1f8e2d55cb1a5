"""The divergences themselves: pure functions on log-probabilities (or raw logits), no temperature scaling, and
their registry (`DIVERGENCES`: name → function, closed-form gradients, description) that the config's choices,
the model card and the README's loss table read.

Every function works in float32 whatever the input dtype and reduces over the last dimension.
`temperature_scale` is the one definition of the T² factor; callers apply it where the divergence
becomes a loss (`hf_distill.loss.blended`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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
    return temperature**2 if DIVERGENCES[loss_type].scaled_by_t2 else 1.0


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
    return DIVERGENCES[loss_type].function(log_q, log_p, beta, skew)


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, loss_type: str) -> torch.Tensor:
    """`mse` (mean squared difference) or `cosine` (1 − cosine similarity) of raw logits."""
    return DIVERGENCES[loss_type].function(student.float(), teacher.float())


# ---- the divergences, one function each ------------------------------------------------------------


def _forward_kl(log_q, log_p, beta, skew):
    return kl_from_log_probs(log_p, log_q)


def _reverse_kl(log_q, log_p, beta, skew):
    return kl_from_log_probs(log_q, log_p)


def _jsd(log_q, log_p, beta, skew):
    if beta in (0.0, 1.0):  # TRL GKD's convention: the endpoints are forward and reverse KL, not the degenerate zero
        return _forward_kl(log_q, log_p, beta, skew) if beta == 0.0 else _reverse_kl(log_q, log_p, beta, skew)
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_from_log_probs(log_p, log_m) + (1 - beta) * kl_from_log_probs(log_q, log_m)


def _skew_kl(log_q, log_p, beta, skew):
    # skew=1 compares p with itself: exactly 0, kept in the graph so backward still runs.
    return kl_from_log_probs(log_p, log_mixture(log_p, log_q, skew)) if skew < 1.0 else 0.0 * log_q.sum(-1)


def _skew_reverse_kl(log_q, log_p, beta, skew):
    return kl_from_log_probs(log_q, log_mixture(log_q, log_p, skew))


def _tvd(log_q, log_p, beta, skew):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _mse(student, teacher):
    return (student - teacher).pow(2).mean(-1)


def _cosine(student, teacher):
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).clamp_min(0.0)


@dataclass(frozen=True)
class Divergence:
    """One `loss_type`: its function, what is known of its gradient, and how it is described.

    `function` gives the value at each position from the student's and the teacher's log-probabilities
    (`log_q, log_p, beta, skew`), or with `on_logits` from their raw logits (`student, teacher`).
    """

    name: str
    function: Callable[..., torch.Tensor]
    description: str  # one line, for the model card
    formula: str  # the value, for the README's loss table (p = softmax(teacher/T), q = softmax(student/T))
    on_logits: bool = False
    scaled_by_t2: bool = True  # the KL family: T² keeps gradients' size as T changes (Hinton et al., 2015)
    closed_form: bool = False  # `closed_form.py` has its chunk gradient against a live teacher's logits
    closed_form_cached: bool = False  # ... and against a cached teacher's top-k buckets


DIVERGENCES = {divergence.name: divergence for divergence in (
    Divergence("forward_kl", _forward_kl, "forward KL, KL(teacher ‖ student)", "T²·KL(p‖q)",
               closed_form=True, closed_form_cached=True),
    Divergence("reverse_kl", _reverse_kl, "reverse KL, KL(student ‖ teacher)", "T²·KL(q‖p)",
               closed_form=True, closed_form_cached=True),
    Divergence("jsd", _jsd, "generalized Jensen-Shannon divergence",
               "T²·[β·KL(p‖m) + (1−β)·KL(q‖m)], m = β·p + (1−β)·q; β=0 is forward KL, β=1 reverse KL (TRL GKD's "
               "convention)", closed_form=True, closed_form_cached=True),
    Divergence("skew_kl", _skew_kl, "skew KL (DistiLLM)", "T²·KL(p ‖ skew·p + (1−skew)·q) (DistiLLM)",
               closed_form_cached=True),
    Divergence("skew_reverse_kl", _skew_reverse_kl, "skew reverse KL (DistiLLM)",
               "T²·KL(q ‖ (1−skew)·p + skew·q) (DistiLLM)", closed_form_cached=True),
    Divergence("tvd", _tvd, "total variation distance", "½·Σ\\|p−q\\|", scaled_by_t2=False),
    Divergence("mse", _mse, "mean squared error on logits", "mean over the vocabulary of (student−teacher)², raw logits",
               on_logits=True, scaled_by_t2=False),
    Divergence("cosine", _cosine, "cosine distance on logits", "1 − cos(student, teacher), raw logits",
               on_logits=True, scaled_by_t2=False),
)}
LOSS_TYPES = tuple(DIVERGENCES)
LOGIT_LOSSES = tuple(name for name, divergence in DIVERGENCES.items() if divergence.on_logits)


def loss_table() -> str:
    """The README's table of loss types, rendered from the registry."""
    rows = [f"| `{name}` | {divergence.formula} |" for name, divergence in DIVERGENCES.items()]
    return "\n".join(["| `loss_type` | value |", "| --- | --- |", *rows])


def cross_entropy_per_position(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """-log softmax(logits)[target] per position in float32; 0 where the target is `ignore_index`."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_z = torch.logsumexp(logits.float(), dim=-1)
    picked = logits.float().gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, log_z - picked, torch.zeros_like(log_z))
