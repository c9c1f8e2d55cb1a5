"""The blended objective (alpha·KD + (1−alpha)·CE) on selected positions, whole or chunk by chunk.

The chunked form starts from the student's final hidden states and its linear head, and projects one
chunk of positions at a time: logits, divergence and their gradient exist for that chunk only, so no
(positions, vocabulary) tensor of either model is ever held for the whole batch. Gradients with
respect to the hidden states and the head are computed during the forward pass (as Liger-Kernel's
chunked losses do), so backward costs nothing extra and nothing is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import CachedTeacher, cached_token_divergence
from .logit_grads import blended_loss_and_grad, has_closed_form
from .losses import cross_entropy_per_position, token_divergence


@dataclass(frozen=True)
class LossSettings:
    loss_type: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    cache_tail: str = "bucket"  # how a cached teacher's mass outside its top-k is treated, see cache.py
    closed_form: bool = True  # chunks use the closed-form gradients of logit_grads.py where one exists
    compile: bool = False  # and fuse that math with torch.compile (teacher given as logits or hidden states)


@dataclass
class PositionTargets:
    """What each selected position is trained on.

    `targets` holds the next token (causal), the label token (seq2seq) or the class (classifier), -100
    where the position is distilled only. `kd_mask`/`ce_mask` pick the positions of each term;
    `kd_scale`/`ce_scale` are alpha / (distilled positions of the accumulated batch) and
    (1 − alpha) / (target tokens of the accumulated batch).
    """

    targets: torch.Tensor
    kd_mask: torch.Tensor
    ce_mask: torch.Tensor
    kd_scale: float
    ce_scale: float

    def chunk(self, part: slice) -> "PositionTargets":
        return PositionTargets(self.targets[part], self.kd_mask[part], self.ce_mask[part], self.kd_scale, self.ce_scale)


def _divergence(student_logits, teacher, settings: LossSettings) -> torch.Tensor:
    """Per-position divergence against teacher logits (shared leading vocabulary rows) or a cached teacher."""
    options = dict(loss_type=settings.loss_type, temperature=settings.temperature, beta=settings.beta, skew=settings.skew)
    if isinstance(teacher, CachedTeacher):
        return cached_token_divergence(
            student_logits, teacher.ids, teacher.logprobs, teacher.lse, tail=settings.cache_tail, **options
        )
    vocab = min(student_logits.shape[-1], teacher.shape[-1])
    return token_divergence(student_logits[..., :vocab], teacher[..., :vocab], **options)


def blended_loss(
    student_logits: torch.Tensor,
    teacher_logits: "torch.Tensor | CachedTeacher | None",
    positions: PositionTargets,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Σ divergence over distilled positions, Σ CE over targets) for logits of shape (N, V).

    The teacher is given as logits (N, V_t), as cached top-k entries (`CachedTeacher`), or None (CE only).
    The two sums are detached (for logging). Teacher and student may differ in vocabulary size by
    padding rows: the divergence compares the shared leading rows. A term whose scale is 0 is left
    out of the loss, so alpha=0 is exactly the student's own loss even if the teacher overflowed.
    """
    loss = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum = loss.detach().clone()
    if teacher_logits is not None:
        divergence = _divergence(student_logits, teacher_logits, settings)
        kd = torch.where(positions.kd_mask, divergence, torch.zeros_like(divergence)).sum()
        kd_sum = kd.detach()
        if positions.kd_scale != 0:
            loss = loss + positions.kd_scale * kd
    ce = cross_entropy_per_position(student_logits, positions.targets)
    ce = torch.where(positions.ce_mask, ce, torch.zeros_like(ce)).sum()
    if positions.ce_scale != 0:
        loss = loss + positions.ce_scale * ce
    return loss, kd_sum, ce.detach()


class _ChunkedBlendedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_head, positions, settings, chunk_size):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        totals = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        closed_form = has_closed_form(teacher_hidden, settings) if settings.closed_form else False

        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden[part]
            teacher_logits = None
            if teacher_hidden is not None:
                with torch.no_grad():
                    teacher_logits = teacher_head(teacher_hidden[part])
            if closed_form:
                logits = F.linear(h, weight, bias)
                loss, kd_sum, ce_sum, grad_logits = blended_loss_and_grad(logits, teacher_logits, positions.chunk(part), settings)
            else:
                with torch.enable_grad():
                    logits = F.linear(h, weight, bias).detach().requires_grad_(True)
                    loss, kd_sum, ce_sum = blended_loss(logits, teacher_logits, positions.chunk(part), settings)
                    grad_logits = torch.autograd.grad(loss, logits)[0] if loss.requires_grad else torch.zeros_like(logits)
            del logits
            totals += torch.stack([loss.detach(), kd_sum, ce_sum])
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight.to(grad_logits.dtype)
            if grad_weight is not None:
                if grad_logits.dtype == torch.float32 and h.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), h)  # no (V, D) temporary
                else:
                    grad_weight += (grad_logits.t() @ h.to(grad_logits.dtype)).float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        kd_total, ce_total = totals[1].clone(), totals[2].clone()
        ctx.mark_non_differentiable(kd_total, ce_total)
        return totals[0].clone(), kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if grad is None else (grad * grad_loss).to(dtype))
        return (*grads, None, None, None, None, None)


def chunked_blended_loss(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
    positions: PositionTargets,
    settings: LossSettings,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`blended_loss` of `F.linear(student_hidden, head_weight, head_bias)`, computed `chunk_size` positions at a time.

    `student_hidden` (N, D) holds the student's final hidden states at the selected positions;
    `teacher_hidden` (N, D_t) the teacher's, projected by `teacher_head` chunk by chunk without
    gradient (None trains on the student's own loss alone). Anything sliceable by positions works as
    `teacher_hidden` when `teacher_head` turns a slice into what `blended_loss` takes: precomputed logits
    with `nn.Identity()`, or a `CachedTeacher` with `nn.Identity()`. Values and gradients equal the unchunked
    `blended_loss` up to float rounding.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    return _ChunkedBlendedLoss.apply(
        student_hidden, head_weight, head_bias, teacher_hidden, teacher_head, positions, settings, chunk_size
    )


# Logits values one chunk may hold. Measured (benchmarks/RESULTS.md): on an H100 at V=151,936 the time
# overhead of chunking falls from 1.65x (64 rows) to 1.08x (512 rows) while memory stays under 0.1x of
# naive; on the CPU small chunks cost little time and keep memory lowest.
CHUNK_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 27}


def default_chunk_size(vocab_size: int, budget_elements: int | None = None, device_type: str = "cpu") -> int:
    """Positions per chunk so one chunk's logits hold about `budget_elements` values (64 MiB float32 on CPU, 512 MiB on GPU)."""
    budget = budget_elements or CHUNK_BUDGET.get(device_type, CHUNK_BUDGET["cuda"])
    rows = max(1, budget // max(1, vocab_size))
    return max(8, 1 << (rows.bit_length() - 1))
