"""The blended objective, alpha·KD + (1−alpha)·CE on selected positions, whole or chunk by chunk.

The chunked form starts from the student's final hidden states and its linear head, and projects one
chunk of positions at a time: logits, divergence and their gradient exist for that chunk only, so no
(positions, vocabulary) tensor of either model is ever held for the whole batch. Gradients with
respect to the hidden states and the head are computed during the forward pass (as Liger-Kernel's
chunked losses do), so backward costs nothing extra and nothing is recomputed.

This module is where the divergence becomes a loss: the T² factor (`temperature_scale`) is applied
here, to the per-position values and to the closed-form gradients' row weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .buckets import CachedTeacher, cached_divergence
from .closed_form import chunk_loss_and_grad, compiled_chunk_loss_and_grad, has_closed_form
from .divergences import (
    LOGIT_LOSSES,
    check_loss_settings,
    cross_entropy_per_position,
    logit_divergence,
    probability_divergence,
    temperature_scale,
)
from .ensemble import TeacherEnsemble, mixture_logits


@dataclass(frozen=True)
class LossSettings:
    """How the divergence is computed (the blend's weights live in `PositionTargets`)."""

    loss_type: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    cache_tail: str = "bucket"  # how a cached teacher's mass outside its top-k is treated, see buckets.py
    closed_form: bool = True  # chunks use the closed-form gradients of closed_form.py where one exists
    compile: bool = False  # and fuse that math with torch.compile (live teacher)


@dataclass
class PositionTargets:
    """What each selected position is trained on.

    `targets` holds the next token (causal), the label token (seq2seq) or the class (classifier), -100
    where the position is distilled only. `kd_mask`/`ce_mask` pick the positions of each term;
    `kd_scale`/`ce_scale` (floats, or 0-d tensors when the counts stay on the device; exactly 0.0 when a term is
    off) are alpha / (distilled positions of the accumulated batch) and
    (1 − alpha) / (target tokens of the accumulated batch); `hidden_scale` and `attention_scale` are the layer
    terms' weights / (distilled positions of the accumulated batch).
    """

    targets: torch.Tensor
    kd_mask: torch.Tensor
    ce_mask: torch.Tensor
    kd_scale: float | torch.Tensor
    ce_scale: float | torch.Tensor
    hidden_scale: float | torch.Tensor = 0.0
    kd_everywhere: bool | None = None  # every position is distilled; None: look at kd_mask
    attention_scale: float | torch.Tensor = 0.0

    def chunk(self, part: slice) -> "PositionTargets":
        return replace(self, targets=self.targets[part], kd_mask=self.kd_mask[part], ce_mask=self.ce_mask[part])

    def reweighted(self, kd_weight: float, keep_ce: bool) -> "PositionTargets":
        """The KD term scaled by `kd_weight`, and CE kept or dropped: one teacher's share of a summed loss."""
        return replace(self, kd_scale=self.kd_scale * kd_weight, ce_scale=self.ce_scale if keep_ce else 0.0)


def is_on(scale) -> bool:
    """Whether a term with this scale is in the loss: a tensor scale is on (an off term gets the float 0.0)."""
    return torch.is_tensor(scale) or scale != 0


@dataclass
class TeacherLogits:
    """A teacher given as logits (n, V_t) at the selected positions."""

    logits: torch.Tensor

    def rows(self, part) -> torch.Tensor:
        return self.logits[part]


@dataclass
class TeacherHidden:
    """A teacher given as final hidden states (n, D_t) and the head that projects them, chunk by chunk, without gradient."""

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]

    def rows(self, part) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.hidden[part])


class Teacher(Protocol):
    """A teacher target at the selected positions, as the loss takes it: `TeacherLogits`, `TeacherHidden`,
    `CachedTeacher` or a `TeacherEnsemble` of the first two. The loss asks it for one thing, its rows at positions
    `part` (a slice of the selected positions): logits (n, V_t), cached entries, or each member's logits."""

    def rows(self, part: slice): ...


def token_divergence(
    student_logits: torch.Tensor,
    teacher: "torch.Tensor | CachedTeacher",
    *,
    loss_type: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    cache_tail: str = "bucket",
) -> torch.Tensor:
    """The loss-scaled divergence at each position: logits (..., V) -> float32 values (...).

    `teacher` is logits of the same shape (a larger vocabulary is compared on the shared leading rows) or
    a `CachedTeacher` for logits (n, V). See `distillation_loss` for each `loss_type`.
    """
    if isinstance(teacher, CachedTeacher):
        values = cached_divergence(
            student_logits, teacher, loss_type=loss_type, temperature=temperature, beta=beta, skew=skew, tail=cache_tail
        )
    else:
        vocab = min(student_logits.shape[-1], teacher.shape[-1])
        student, teacher = student_logits[..., :vocab].float(), teacher[..., :vocab].float()
        if loss_type in LOGIT_LOSSES:
            values = logit_divergence(student, teacher, loss_type)
        else:
            log_q = F.log_softmax(student / temperature, dim=-1)
            log_p = F.log_softmax(teacher / temperature, dim=-1)
            values = probability_divergence(log_q, log_p, loss_type, beta, skew)
    return values * temperature_scale(loss_type, temperature)


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


def _divergence_options(settings: LossSettings) -> dict:
    return dict(
        loss_type=settings.loss_type, temperature=settings.temperature, beta=settings.beta, skew=settings.skew,
        cache_tail=settings.cache_tail,
    )


def blended_loss(
    student_logits: torch.Tensor,
    teacher: "torch.Tensor | CachedTeacher | None",
    positions: PositionTargets,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Σ divergence over distilled positions, Σ CE over targets) for logits of shape (N, V), by autograd.

    The teacher is given as logits (N, V_t), as cached top-k entries (`CachedTeacher`), or None (CE only).
    The two sums are detached (for logging). Teacher and student may differ in vocabulary size by
    padding rows: the divergence compares the shared leading rows. A term whose scale is 0 is left
    out of the loss, so alpha=0 is exactly the student's own loss even if the teacher overflowed.
    """
    loss = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum = loss.detach().clone()
    if teacher is not None:
        divergence = token_divergence(student_logits, teacher, **_divergence_options(settings))
        kd = torch.where(positions.kd_mask, divergence, torch.zeros_like(divergence)).sum()
        kd_sum = kd.detach()
        if is_on(positions.kd_scale):
            loss = loss + positions.kd_scale * kd
    ce = cross_entropy_per_position(student_logits, positions.targets)
    ce = torch.where(positions.ce_mask, ce, torch.zeros_like(ce)).sum()
    if is_on(positions.ce_scale):
        loss = loss + positions.ce_scale * ce
    return loss, kd_sum, ce.detach()


@torch.no_grad()
def blended_loss_and_grad(student_logits, teacher, positions: PositionTargets, settings: LossSettings):
    """(loss, Σ divergence, Σ CE, d loss / d student_logits) of `blended_loss`, without autograd on (n, V) values.

    Only for the cases `has_closed_form` accepts. The gradient has the logits' dtype. With
    `settings.compile`, the math for a teacher given as logits runs through `torch.compile`.
    """
    scale = temperature_scale(settings.loss_type, settings.temperature)
    want_kd = teacher is not None and is_on(positions.kd_scale)
    want_ce = is_on(positions.ce_scale)
    device = student_logits.device
    kd_weights = torch.where(positions.kd_mask, _on(positions.kd_scale * scale, device), 0.0).to(device, torch.float32)
    ce_rows = positions.ce_mask & (positions.targets != -100)
    ce_weights = torch.where(ce_rows, _on(positions.ce_scale, device), 0.0).to(device, torch.float32)
    # Not read from kd_mask (a host sync): where some rows may be left out, the chunk math masks them.
    rows_left_out = want_kd and not positions.kd_everywhere
    compiled = settings.compile and teacher is not None and not isinstance(teacher, CachedTeacher)
    function = compiled_chunk_loss_and_grad() if compiled else chunk_loss_and_grad
    raw_kd_sum, ce_sum, grad = function(
        student_logits, teacher, positions.targets, positions.kd_mask, positions.ce_mask, kd_weights, ce_weights,
        settings, want_kd, want_ce, rows_left_out,
    )
    kd_sum = raw_kd_sum * scale
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if want_kd:
        loss = loss + positions.kd_scale * kd_sum
    if want_ce:
        loss = loss + positions.ce_scale * ce_sum
    return loss, kd_sum, ce_sum, grad.to(student_logits.dtype)


def _on(scale, device):
    """A scale as `torch.where` takes it: a float, or a 0-d tensor on `device`."""
    return scale.to(device, torch.float32) if torch.is_tensor(scale) else scale


def _terms(teacher, teacher_rows, positions: PositionTargets, settings: LossSettings) -> list:
    """The (teacher rows, positions) pairs whose blended losses add up to the objective on these rows."""
    if not isinstance(teacher, TeacherEnsemble):
        return [(teacher_rows, positions)]
    if teacher.reduction == "mean_probs":
        return [(mixture_logits(teacher_rows, teacher.weights, settings.temperature), positions)]
    return [(rows, positions.reweighted(w, keep_ce=i == 0)) for i, (rows, w) in enumerate(zip(teacher_rows, teacher.weights))]


def block_loss(student_logits, teacher, teacher_rows, positions: PositionTargets, settings: LossSettings, closed_form: bool):
    """(loss, Σ KD, Σ CE, d loss / d logits or None, Σ KD of each teacher or None) on one block of positions.

    `teacher_rows` are `teacher.rows(...)` for the block. With `closed_form` the gradient comes from
    `blended_loss_and_grad`; otherwise the loss is in the autograd graph of `student_logits`. For a
    `TeacherEnsemble` the KD sum is that of the mixture (`mean_probs`) or the weighted sum of the teachers'
    (`mean_loss`), and each teacher's own divergence is summed for its log line.
    """
    loss, grad, ce_sum, kd_sums = None, None, None, []
    for rows, part_positions in _terms(teacher, teacher_rows, positions, settings):
        if closed_form:
            term, kd, ce, term_grad = blended_loss_and_grad(student_logits, rows, part_positions, settings)
            grad = term_grad if grad is None else grad.add_(term_grad)
        else:
            term, kd, ce = blended_loss(student_logits, rows, part_positions, settings)
        loss = term if loss is None else loss + term
        ce_sum = ce if ce_sum is None else ce_sum
        kd_sums.append(kd)
    if not isinstance(teacher, TeacherEnsemble):
        return loss, kd_sums[0], ce_sum, grad, None
    if teacher.reduction == "mean_loss":
        members = torch.stack(kd_sums)
        return loss, (members * members.new_tensor(teacher.weights)).sum(), ce_sum, grad, members
    with torch.no_grad():
        members = torch.stack([
            torch.where(positions.kd_mask, token_divergence(student_logits, rows, **_divergence_options(settings)), 0.0).sum()
            for rows in teacher_rows
        ])
    return loss, kd_sums[0], ce_sum, grad, members


class _ChunkedBlendedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, positions, settings, chunk_size):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        n_members = len(teacher) if isinstance(teacher, TeacherEnsemble) else 0
        totals = torch.zeros(3 + n_members, dtype=torch.float32, device=hidden.device)
        closed_form = settings.closed_form and has_closed_form(teacher, settings)

        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden[part]
            teacher_rows = None if teacher is None else teacher.rows(part)
            if closed_form:
                logits = F.linear(h, weight, bias)
                loss, kd_sum, ce_sum, grad_logits, members = block_loss(
                    logits, teacher, teacher_rows, positions.chunk(part), settings, closed_form=True
                )
            else:
                with torch.enable_grad():
                    logits = F.linear(h, weight, bias).detach().requires_grad_(True)
                    loss, kd_sum, ce_sum, _, members = block_loss(
                        logits, teacher, teacher_rows, positions.chunk(part), settings, closed_form=False
                    )
                    grad_logits = torch.autograd.grad(loss, logits)[0] if loss.requires_grad else torch.zeros_like(logits)
            del logits, teacher_rows
            sums = [loss.detach(), kd_sum, ce_sum] + ([] if members is None else list(members))
            totals += torch.stack(sums)
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
        kd_total, ce_total, member_totals = totals[1].clone(), totals[2].clone(), totals[3:].clone()
        ctx.mark_non_differentiable(kd_total, ce_total, member_totals)
        return totals[0].clone(), kd_total, ce_total, member_totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce, _grad_members):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if grad is None else (grad * grad_loss).to(dtype))
        return (*grads, None, None, None, None)


def chunked_blended_loss(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    teacher: Teacher | None,
    positions: PositionTargets,
    settings: LossSettings,
    chunk_size: int,
    return_member_sums: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`blended_loss` of `F.linear(student_hidden, head_weight, head_bias)`, computed `chunk_size` positions at a time.

    `student_hidden` (N, D) holds the student's final hidden states at the selected positions; `teacher`
    is a `TeacherHidden` (projected chunk by chunk without gradient), `TeacherLogits`, a `CachedTeacher`,
    a `TeacherEnsemble` of the first two, or None (the student's own loss alone). Values and gradients equal
    the unchunked `blended_loss` up to float rounding. Returns (loss, Σ KD, Σ CE), and with
    `return_member_sums` also each ensemble teacher's Σ KD (empty for a single teacher).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    result = _ChunkedBlendedLoss.apply(student_hidden, head_weight, head_bias, teacher, positions, settings, chunk_size)
    return result if return_member_sums else result[:3]


# Logits values one chunk may hold. Measured (benchmarks/RESULTS.md): on an H100 at V=151,936 the time
# overhead of chunking falls from 1.65x (64 rows) to 1.08x (512 rows) while memory stays under 0.1x of
# naive; on the CPU small chunks cost little time and keep memory lowest.
CHUNK_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 27}


def default_chunk_size(vocab_size: int, budget_elements: int | None = None, device_type: str = "cpu") -> int:
    """Positions per chunk so one chunk's logits hold about `budget_elements` values (64 MiB float32 on CPU, 512 MiB on GPU)."""
    budget = budget_elements or CHUNK_BUDGET.get(device_type, CHUNK_BUDGET["cuda"])
    rows = max(1, budget // max(1, vocab_size))
    return max(8, 1 << (rows.bit_length() - 1))
