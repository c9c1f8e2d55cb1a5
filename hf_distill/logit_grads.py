"""The blended loss and its gradient w.r.t. the student's logits in closed form, for one chunk of positions.

Autograd through `log_softmax`, masks and mixtures makes some forty passes over a (chunk, V) tensor;
on a CPU those passes cost as much as the head's matrix products. The closed forms below make far
fewer. With q = softmax(s / T), p the teacher's, and each row weighted by its loss scale:

- forward KL, T²·KL(p‖q):        d/ds = T · (q − p)
- reverse KL, T²·KL(q‖p):        d/ds = T · q ⊙ (log q − log p − KL(q‖p))
- JSD, m = β·p + (1−β)·q:        d/ds = T · (1−β) · q ⊙ (log q − log m − KL(q‖m))
- a cached teacher (any loss on probabilities): the divergence is a function of the student's bucket
  log-probabilities (top-k, tail); autograd on those (n, k + 1) values gives G, and the softmax's
  Jacobian carries it to the logits: (G_i − q_j·ΣG) / T on the i-th top-k id j,
  (G_tail · q_j / q_tail − q_j·ΣG) / T on every other token.
- CE: softmax(s) − onehot(target).

Values equal `hf_distill.chunked.blended_loss`. Gradients equal autograd's except where rounding made a
KL sum negative: the value is clamped at 0 there (p ≈ q, so the gradient is ≈ 0 either way). Other
loss types (skew KLs, tvd, mse, cosine online; mse, cosine cached) have no closed form here: the
caller uses autograd for them (`has_closed_form`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .cache import CachedTeacher, student_buckets, student_tail_log_mass, teacher_buckets, uses_tail_bucket
from .losses import _SCALED_BY_T2, token_divergence


def has_closed_form(teacher, settings) -> bool:
    """Whether `blended_loss_and_grad` handles this teacher (None, logits or `CachedTeacher`) and loss type."""
    if teacher is None:
        return True
    if isinstance(teacher, CachedTeacher):
        return settings.loss_type in _SCALED_BY_T2
    return settings.loss_type in ("forward_kl", "reverse_kl", "jsd")


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature  # no copy of a (chunk, V) tensor at T = 1


def _kl_terms_(probs: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p · log(p / r), written into `log_ratio`; 0 where p = 0 (even where r = 0)."""
    return log_ratio.mul_(probs).masked_fill_(probs == 0, 0.0)


def _online(s, teacher_logits, settings, want_grad):
    """(divergence per row, d divergence / d s over the shared vocabulary or None, log q, q)."""
    temperature, beta, loss_type = settings.temperature, settings.beta, settings.loss_type
    if loss_type == "jsd" and beta in (0.0, 1.0):  # TRL's endpoints: forward and reverse KL
        loss_type = "forward_kl" if beta == 0.0 else "reverse_kl"
    vocab = min(s.shape[-1], teacher_logits.shape[-1])
    log_q = F.log_softmax(_scaled(s[:, :vocab], temperature), dim=-1)
    log_p = F.log_softmax(_scaled(teacher_logits[:, :vocab].float(), temperature), dim=-1)
    q = log_q.exp()
    grad = None
    if loss_type == "forward_kl":
        p = log_p.exp()
        value = _kl_terms_(p, log_p.sub_(log_q)).sum(-1).clamp_min(0.0)
        if want_grad:
            grad = torch.sub(q, p).mul_(temperature)
    elif loss_type == "reverse_kl":
        log_ratio = log_q - log_p
        raw = _kl_terms_(q, log_ratio.clone()).sum(-1)
        value = raw.clamp_min(0.0)
        if want_grad:
            grad = log_ratio.sub_(raw[:, None]).mul_(q).masked_fill_(q == 0, 0.0).mul_(temperature)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        to_p = _kl_terms_(log_p.exp(), log_p.sub_(log_m)).sum(-1).clamp_min(0.0)
        q_log_ratio = log_q - log_m
        to_q = _kl_terms_(q, q_log_ratio.clone()).sum(-1)
        value = beta * to_p + (1 - beta) * to_q.clamp_min(0.0)
        if want_grad:
            grad = q_log_ratio.sub_(to_q[:, None]).mul_(q).masked_fill_(q == 0, 0.0)
            grad.mul_(temperature * (1 - beta))
    return value * temperature**2, grad, log_q, q


def _cached(s, teacher: CachedTeacher, settings, kd_weights):
    """(divergence per row, d Σ kd_weights·divergence / d s or None, log q, q) against a cached teacher."""
    temperature = settings.temperature
    ids = teacher.ids.long()
    log_q = F.log_softmax(_scaled(s, temperature), dim=-1)
    q = log_q.exp()
    use_tail = uses_tail_bucket(settings.cache_tail, ids.shape[-1], s.shape[-1])
    top = log_q.gather(-1, ids).requires_grad_(kd_weights is not None)
    tail = student_tail_log_mass(log_q, ids).requires_grad_(kd_weights is not None) if use_tail else None
    with torch.enable_grad():
        values = token_divergence(
            student_buckets(top, tail),
            teacher_buckets(teacher.logprobs, use_tail),
            loss_type=settings.loss_type,
            temperature=1.0,
            beta=settings.beta,
            skew=settings.skew,
        ) * temperature**2
        if kd_weights is None:
            return values.detach(), None, log_q, q
        weighted = torch.where(kd_weights != 0, values * kd_weights, torch.zeros_like(values)).sum()
        grads = torch.autograd.grad(weighted, [top, tail] if use_tail else [top])
    grad_top = grads[0]
    total = grad_top.sum(-1, keepdim=True)
    if use_tail:
        total = total + grads[1]
        grad = (log_q - tail.detach()).exp_().mul_(grads[1])  # G_tail · q_j / q_tail
    else:
        grad = torch.zeros_like(q)
    grad.addcmul_(q, total, value=-1.0)
    grad.scatter_(-1, ids, grad_top - top.detach().exp() * total)
    return values.detach(), grad.div_(temperature), log_q, q


def _chunk_loss_and_grad(student_logits, teacher, targets, kd_mask, ce_mask, kd_weights, ce_weights, settings, want_kd, want_ce):
    """(Σ divergence, Σ CE, d loss / d logits in float32); `*_weights` are the loss scales on each term's rows."""
    s = student_logits.float()
    n, vocab = s.shape
    kd_sum, grad, log_q, q = s.new_zeros(()), None, None, None
    if teacher is not None:
        if isinstance(teacher, CachedTeacher):
            values, grad, log_q, q = _cached(s, teacher, settings, kd_weights if want_kd else None)
        else:
            values, grad, log_q, q = _online(s, teacher, settings, want_kd)
            if grad is not None:  # rows left out get 0, even where the teacher overflowed
                grad = grad.mul_(kd_weights[:, None]).masked_fill_(~kd_mask[:, None], 0.0)
        kd_sum = torch.where(kd_mask, values, torch.zeros_like(values)).sum()
        if grad is not None and grad.shape[-1] < vocab:  # teacher with fewer rows: no KD gradient beyond them
            grad = torch.cat([grad, grad.new_zeros(n, vocab - grad.shape[-1])], -1)

    if settings.temperature != 1.0 or log_q is None or log_q.shape[-1] != vocab:
        log_q = F.log_softmax(s, dim=-1)
        q = log_q.exp() if want_ce else None
    safe_targets = torch.where(targets != -100, targets, torch.zeros_like(targets))[:, None]
    ce = -log_q.gather(-1, safe_targets).squeeze(-1)
    ce_sum = torch.where(ce_mask & (targets != -100), ce, torch.zeros_like(ce)).sum()
    if want_ce:
        grad = torch.zeros_like(s) if grad is None else grad
        grad.addcmul_(q, ce_weights[:, None]).scatter_add_(-1, safe_targets, -ce_weights[:, None])
    return kd_sum, ce_sum, torch.zeros_like(s) if grad is None else grad


@functools.cache
def _compiled_chunk_loss_and_grad():
    # Fuses the elementwise passes into a few loops (inductor: C++/OpenMP on CPU, Triton on GPU).
    return torch.compile(_chunk_loss_and_grad, dynamic=True)


@torch.no_grad()
def blended_loss_and_grad(student_logits, teacher, positions, settings):
    """(loss, Σ divergence, Σ CE, d loss / d student_logits) of `blended_loss`, without autograd on (n, V) values.

    Only for the cases `has_closed_form` accepts. The gradient has the logits' dtype. With
    `settings.compile`, the math for a teacher given as logits runs through `torch.compile`.
    """
    want_kd = teacher is not None and positions.kd_scale != 0
    want_ce = positions.ce_scale != 0
    device = student_logits.device
    kd_weights = torch.where(positions.kd_mask, positions.kd_scale, 0.0).to(device, torch.float32)
    ce_rows = positions.ce_mask & (positions.targets != -100)
    ce_weights = torch.where(ce_rows, positions.ce_scale, 0.0).to(device, torch.float32)
    compiled = settings.compile and teacher is not None and not isinstance(teacher, CachedTeacher)
    function = _compiled_chunk_loss_and_grad() if compiled else _chunk_loss_and_grad
    kd_sum, ce_sum, grad = function(
        student_logits, teacher, positions.targets, positions.kd_mask, positions.ce_mask, kd_weights, ce_weights,
        settings, want_kd, want_ce,
    )
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if want_kd:
        loss = loss + positions.kd_scale * kd_sum
    if want_ce:
        loss = loss + positions.ce_scale * ce_sum
    return loss, kd_sum, ce_sum, grad.to(student_logits.dtype)
