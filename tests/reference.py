"""An independent NumPy float64 reference for the distillation losses, written from the mathematical definitions.

With p = softmax(teacher / T) and q = softmax(student / T):

- forward_kl: T²·KL(p‖q); reverse_kl: T²·KL(q‖p)
- jsd: T²·[β·KL(p‖m) + (1−β)·KL(q‖m)], m = β·p + (1−β)·q; β=0 → T²·KL(p‖q), β=1 → T²·KL(q‖p)
- skew_kl: T²·KL(p ‖ skew·p + (1−skew)·q); skew_reverse_kl: T²·KL(q ‖ (1−skew)·p + skew·q)
- tvd: ½·Σ|p−q|; mse: mean (student−teacher)² on raw logits; cosine: 1 − cos(student, teacher) on raw logits.

Only `LOSS_TYPES` (the list of names to cover) comes from the package.
"""

from __future__ import annotations

import math

import numpy as np

from hf_distill import LOSS_TYPES

MIXTURE_WEIGHTS = (0.0, 0.1, 0.5, 0.9, 1.0)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis; entries of -inf give -inf (probability 0)."""
    x = np.asarray(x, dtype=np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    shifted = x - top
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def np_kl(log_a: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    """KL(a‖b) = Σ_v a_v·(log a_v − log b_v) over the last axis, with 0·log(0/x) = 0."""
    a = np.exp(log_a)
    with np.errstate(invalid="ignore"):
        terms = a * (log_a - log_b)
    return np.sum(np.where(a > 0, terms, 0.0), axis=-1)


def np_log_mixture(log_a: np.ndarray, log_b: np.ndarray, w: float) -> np.ndarray:
    """log(w·a + (1−w)·b) in log space (stable for very small probabilities)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(w) + log_a, np.log1p(-w) + log_b)


def np_divergence(student, teacher, loss_type, temperature=1.0, beta=0.5, skew=0.1) -> np.ndarray:
    """Per-position divergence (shape = logits shape without the last axis), float64."""
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    T = float(temperature)
    if loss_type == "mse":
        return np.mean((s - t) ** 2, axis=-1)
    if loss_type == "cosine":
        dot = np.sum(s * t, axis=-1)
        norms = np.sqrt(np.sum(s * s, axis=-1)) * np.sqrt(np.sum(t * t, axis=-1))
        return 1.0 - dot / norms
    log_q = np_log_softmax(s / T)
    log_p = np_log_softmax(t / T)
    p, q = np.exp(log_p), np.exp(log_q)
    if loss_type == "tvd":
        return 0.5 * np.sum(np.abs(p - q), axis=-1)
    if loss_type == "forward_kl":
        value = np_kl(log_p, log_q)
    elif loss_type == "reverse_kl":
        value = np_kl(log_q, log_p)
    elif loss_type == "jsd":
        if beta == 0.0:
            value = np_kl(log_p, log_q)
        elif beta == 1.0:
            value = np_kl(log_q, log_p)
        else:
            log_m = np_log_mixture(log_p, log_q, beta)  # m = β·p + (1−β)·q
            value = beta * np_kl(log_p, log_m) + (1.0 - beta) * np_kl(log_q, log_m)
    elif loss_type == "skew_kl":
        value = np_kl(log_p, np_log_mixture(log_p, log_q, skew))  # skew·p + (1−skew)·q
    elif loss_type == "skew_reverse_kl":
        value = np_kl(log_q, np_log_mixture(log_p, log_q, 1.0 - skew))  # (1−skew)·p + skew·q
    else:
        raise AssertionError(loss_type)
    return T * T * value


def np_distillation_loss(student, teacher, labels=None, ignore_index=-100, **kwargs) -> float:
    values = np_divergence(student, teacher, **kwargs)
    if labels is None:
        return float(np.mean(values))
    keep = np.asarray(labels) != ignore_index
    return float(np.sum(values[keep]) / np.sum(keep))


def np_cross_entropy(logits, targets, ignore_index=-100) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    out = np.zeros(flat_targets.shape, dtype=np.float64)
    for i, target in enumerate(flat_targets):
        if target == ignore_index:
            continue
        row = flat_logits[i]
        top = row.max()
        out[i] = top + math.log(np.sum(np.exp(row - top))) - row[target]
    return out.reshape(targets.shape)


def np_numerical_grad(fn, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of a scalar function of x (float64)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + h
        up = fn(x)
        flat[i] = saved - h
        down = fn(x)
        flat[i] = saved
        gflat[i] = (up - down) / (2 * h)
    return grad


def settings_kwargs(loss_type: str, weight: float) -> dict:
    """Put the mixture weight where the loss type reads it (beta for jsd, skew for the skews)."""
    if loss_type == "jsd":
        return {"beta": weight}
    if loss_type in ("skew_kl", "skew_reverse_kl"):
        return {"skew": weight}
    return {}


def loss_cases():
    """(loss_type, kwargs) covering every loss type, with β / skew endpoints and interior values."""
    cases = []
    for loss_type in LOSS_TYPES:
        if loss_type in ("jsd", "skew_kl", "skew_reverse_kl"):
            cases += [(loss_type, settings_kwargs(loss_type, w)) for w in MIXTURE_WEIGHTS]
        else:
            cases.append((loss_type, {}))
    return cases


LOSS_CASES = loss_cases()
LOSS_CASE_IDS = [f"{lt}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'plain'}" for lt, kw in LOSS_CASES]
