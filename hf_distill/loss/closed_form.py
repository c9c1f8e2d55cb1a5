"""The blended loss's gradient w.r.t. the student's logits in closed form, for one chunk of positions.

Autograd through `log_softmax`, masks and mixtures makes some forty passes over a (chunk, V) tensor;
on a CPU those passes cost as much as the head's matrix products. The closed forms below make far
fewer. With z = s / T, q = softmax(z), p the teacher's, D the divergence (not T²-scaled; the caller's
row weights carry T²) and each row weighted by its weight w:

- forward KL, KL(p‖q):           d/ds = w/T · (q − p)
- reverse KL, KL(q‖p):           d/ds = w/T · q ⊙ (log q − log p − KL(q‖p))
- JSD, m = β·p + (1−β)·q:        d/ds = w/T · (1−β) · q ⊙ (log q − log m − KL(q‖m))
- a cached teacher (any KL-family loss): the divergence is a function of the student's bucket
  log-probabilities (top-k, tail); autograd on those (n, k + 1) values gives G, and the softmax's
  Jacobian carries it to the logits: (G_i − q_j·ΣG) / T on the i-th top-k id j, and
  q_j · (G_tail / q_tail − ΣG) / T on every other token, a per-row scale of q.
- CE: softmax(s) − onehot(target).

Values equal `hf_distill.loss.blended.blended_loss`. Gradients equal autograd's except where rounding made a
KL sum negative: the value is clamped at 0 there (p ≈ q, so the gradient is ≈ 0 either way). Other
loss types (skew KLs, tvd, mse, cosine online; tvd, mse, cosine cached) have no closed form here: the
caller uses autograd for them (`has_closed_form`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .buckets import CachedTeacher, student_buckets, student_tail_log_mass, teacher_buckets, uses_tail_bucket
from .divergences import DIVERGENCES, probability_divergence


def has_closed_form(teacher, settings) -> bool:
    """Whether `blended_loss_and_grad` handles this teacher (None, logits or `CachedTeacher`) and loss type."""
    if teacher is None:
        return True
    divergence = DIVERGENCES[settings.loss_type]
    return divergence.closed_form_cached if isinstance(teacher, CachedTeacher) else divergence.closed_form


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature  # no copy of a (chunk, V) tensor at T = 1


def _softmax_and_log_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(x), log Σ exp(x)) over the last dimension, from one fused softmax: the largest probability is at
    least 1/V, so max x − log max q is as exact as the softmax itself, and on a CPU this takes about half the time
    of `torch.logsumexp` followed by exp(x − lse)."""
    q = F.softmax(x, dim=-1)
    return q, x.amax(-1, keepdim=True) - q.amax(-1, keepdim=True).log()


def _kl_terms_(probs: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p · log(p / r), written into `log_ratio`; 0 where p = 0 (even where r = 0)."""
    return log_ratio.mul_(probs).masked_fill_(probs == 0, 0.0)


def _forward_kl(z, y, scale, ce_weights):
    """Forward KL(p‖q) per row and its gradient w.r.t. z, for z = s / T and y = teacher / T (shared vocabulary).

    Two fused softmaxes give q, p and their log-normalizers; KL = Σ p·(y − z) − (log Z_p − log Z_q) needs one
    difference and one row-dot, and the gradient `scale`·(q − p) (plus `ce_weights`·q, the CE's dense part at
    T = 1) is written into p's buffer: about half the passes over (chunk, V) of the log-softmax form.
    """
    q, log_norm_q = _softmax_and_log_norm(z)
    p, log_norm_p = _softmax_and_log_norm(y)
    # Where the teacher's logit is −inf, p = 0 and the term is 0; clamping the −inf difference keeps 0 · (−inf) from
    # making the dot NaN, with no host read of "any NaN?" (a sync on a GPU, a graph break under torch.compile).
    difference = torch.sub(y, z).clamp_min_(torch.finfo(y.dtype).min)
    value = torch.bmm(p.unsqueeze(1), difference.unsqueeze(2)).view(-1) - (log_norm_p - log_norm_q).view(-1)
    del difference
    grad = None
    if scale is not None:
        grad = p.mul_(-scale).addcmul_(q, scale if ce_weights is None else scale + ce_weights[:, None])
    return value.clamp_min(0.0), grad, log_norm_q, q


def _online(s, teacher_logits, settings, kd_weights, ce_weights=None):
    """(divergence per row, d Σ kd_weights·divergence / d s over the shared vocabulary or None, log q or None,
    q, log-normalizer of s / T or None, whether `ce_weights`·q is already in the gradient).

    q is softmax(s / T) over the shared vocabulary; the gradient, when asked, reuses one of the buffers.
    `ce_weights` (T = 1, whole vocabulary shared) lets forward KL fold the CE's dense part into its gradient.
    """
    temperature, beta, loss_type = settings.temperature, settings.beta, settings.loss_type
    if loss_type == "jsd" and beta in (0.0, 1.0):  # TRL's endpoints: forward and reverse KL
        loss_type = "forward_kl" if beta == 0.0 else "reverse_kl"
    vocab = min(s.shape[-1], teacher_logits.shape[-1])
    z = _scaled(s[:, :vocab], temperature)
    y = _scaled(teacher_logits[:, :vocab].float(), temperature)
    scale = None if kd_weights is None else (kd_weights / temperature)[:, None]
    if loss_type == "forward_kl":
        fold_ce = ce_weights is not None and scale is not None
        value, grad, log_norm, q = _forward_kl(z, y, scale, ce_weights if fold_ce else None)
        return value, grad, None, q, log_norm, fold_ce
    log_q = F.log_softmax(z, dim=-1)
    log_p = F.log_softmax(y, dim=-1)
    q = log_q.exp()
    grad = None
    if loss_type == "reverse_kl":
        log_ratio = log_q - log_p
        raw = _kl_terms_(q, log_ratio.clone()).sum(-1)
        value = raw.clamp_min(0.0)
        if scale is not None:
            grad = log_ratio.sub_(raw[:, None]).mul_(q).masked_fill_(q == 0, 0.0).mul_(scale)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        to_p = _kl_terms_(log_p.exp(), log_p.sub_(log_m)).sum(-1).clamp_min(0.0)
        q_log_ratio = log_q - log_m
        to_q = _kl_terms_(q, q_log_ratio.clone()).sum(-1)
        value = beta * to_p + (1 - beta) * to_q.clamp_min(0.0)
        if scale is not None:
            grad = q_log_ratio.sub_(to_q[:, None]).mul_(q).masked_fill_(q == 0, 0.0).mul_(scale * (1 - beta))
    return value, grad, log_q, q, None, False


# Below this student tail mass (float32 tail probabilities may be subnormal or 0) the tail's log-mass and its
# share of the gradient are computed in log space, for those rows only.
_SMALL_TAIL = 1e-30


def _cached(s, teacher: CachedTeacher, settings, kd_weights, ce_weights):
    """(divergence per row, gradient or None, log Σ exp(s / T)) against a cached teacher.

    The gradient is d Σ kd_weights·divergence / d s, plus ce_weights ⊙ softmax(s) when `ce_weights` is given
    (T = 1: the cross-entropy's dense part shares q). Every token outside the top-k gets the same share of
    the tail bucket's gradient in proportion to q, so the whole (n, V) gradient is q times a per-row scale,
    overwritten on the k ids: one pass, in q's own buffer.
    """
    temperature = settings.temperature
    ids = teacher.ids.long()
    scaled = _scaled(s, temperature)
    q, log_norm = _softmax_and_log_norm(scaled)
    top = scaled.gather(-1, ids).sub_(log_norm)  # log q on the top-k ids
    use_tail = uses_tail_bucket(settings.cache_tail, ids.shape[-1], s.shape[-1])
    tail, small = None, None
    if use_tail:
        q_rest = q.scatter_(-1, ids, 0.0).sum(-1, keepdim=True)  # q's top-k entries are rewritten below
        is_small = q_rest < _SMALL_TAIL
        small = is_small.squeeze(-1).nonzero().squeeze(-1)
        tail = q_rest.log()
        if small.numel():
            tail[small] = student_tail_log_mass(scaled[small] - log_norm[small], ids[small])
    want_grad = kd_weights is not None
    with torch.enable_grad():
        top.requires_grad_(want_grad)
        if use_tail:
            tail.requires_grad_(want_grad)
        values = probability_divergence(
            student_buckets(top, tail), teacher_buckets(teacher.logprobs, use_tail), settings.loss_type, settings.beta, settings.skew
        )
        if not want_grad:
            return values.detach(), None, log_norm
        weighted = torch.where(kd_weights != 0, values * kd_weights, torch.zeros_like(values)).sum()
        grads = torch.autograd.grad(weighted, [top, tail] if use_tail else [top])
    # Through the softmax: (G_i − q_j·ΣG) / T on the i-th top-k id j, (G_tail·q_j / q_tail − q_j·ΣG) / T elsewhere.
    grad_top = grads[0].div_(temperature)
    total = grad_top.sum(-1, keepdim=True)
    row_scale = -total
    if use_tail:
        grad_tail = grads[1].div_(temperature)
        total = total + grad_tail
        tail = tail.detach()
        row_scale = torch.where(is_small, 0.0, grad_tail * (-tail).exp()) - total
    q_top = top.detach().exp()
    values_top = grad_top - q_top * total
    if ce_weights is not None:
        row_scale = row_scale + ce_weights[:, None]
        values_top = values_top + q_top * ce_weights[:, None]
    grad = q.mul_(row_scale)
    if use_tail and small.numel():  # the tail's share for tiny tails, in log space
        share = (scaled[small] - log_norm[small] - tail[small]).exp_().mul_(grads[1][small])
        grad.index_add_(0, small, share)
    return values.detach(), grad.scatter_(-1, ids, values_top), log_norm


def chunk_loss_and_grad(
    student_logits, teacher, targets, kd_mask, ce_mask, kd_weights, ce_weights, settings, want_kd, want_ce, rows_left_out
):
    """(Σ divergence, Σ CE, d loss / d logits in float32); `*_weights` are the loss scales on each term's rows.

    The divergence sum is not T²-scaled; `kd_weights` carry that factor into the gradient."""
    s = student_logits.float()
    n, vocab = s.shape
    temperature = settings.temperature
    kd_sum, grad, log_q, probs, log_norm, ce_done = s.new_zeros(()), None, None, None, None, False
    if teacher is not None:
        if isinstance(teacher, CachedTeacher):
            ce_done = want_kd and want_ce and temperature == 1.0
            values, grad, log_norm = _cached(
                s, teacher, settings, kd_weights if want_kd else None, ce_weights if ce_done else None
            )
        else:
            shared = temperature == 1.0 and teacher.shape[-1] >= vocab and not rows_left_out
            values, grad, log_q, probs, log_norm, ce_done = _online(
                s, teacher, settings, kd_weights if want_kd else None, ce_weights if want_ce and shared else None
            )
            if grad is not None and rows_left_out:  # rows left out get 0, even where the teacher overflowed
                grad = grad.masked_fill_(~kd_mask[:, None], 0.0)
        kd_sum = torch.where(kd_mask, values, torch.zeros_like(values)).sum()
        if grad is not None and grad.shape[-1] < vocab:  # teacher with fewer rows: no KD gradient beyond them
            grad = torch.cat([grad, grad.new_zeros(n, vocab - grad.shape[-1])], -1)

    safe_targets = torch.where(targets != -100, targets, torch.zeros_like(targets))[:, None]
    if temperature == 1.0 and log_q is not None and log_q.shape[-1] == vocab:
        ce = -log_q.gather(-1, safe_targets).squeeze(-1)
    else:
        # q and its normalizer are reusable only at T = 1 and over the whole vocabulary (not a smaller teacher's)
        if temperature != 1.0 or log_norm is None or (probs is not None and probs.shape[-1] != vocab):
            probs, log_norm = _softmax_and_log_norm(s)
        ce = (log_norm - s.gather(-1, safe_targets)).squeeze(-1)
    ce_sum = torch.where(ce_mask & (targets != -100), ce, torch.zeros_like(ce)).sum()
    if want_ce:
        if not ce_done:
            if probs is None:  # a cached teacher at T = 1 without KD gradient: q was not kept
                probs = torch.sub(s, log_norm).exp_()
            grad = probs.mul_(ce_weights[:, None]) if grad is None else grad.addcmul_(probs, ce_weights[:, None])
        grad.scatter_add_(-1, safe_targets, -ce_weights[:, None])
    return kd_sum, ce_sum, torch.zeros_like(s) if grad is None else grad


@functools.cache
def compiled_chunk_loss_and_grad():
    # Fuses the elementwise passes into a few loops (inductor: C++/OpenMP on CPU, Triton on GPU).
    return torch.compile(chunk_loss_and_grad, dynamic=True)
