"""`DistillationLoss`: the whole objective, built once from the config and called by the trainer every step.

    loss = alpha · KD + (1 − alpha) · CE + hidden_loss_weight · H + attention_loss_weight · A

KD is the divergence from the teacher's output distribution, CE the student's own loss on the labels, H
the intermediate-layer term and A the attention-relation term; each is a sum over positions divided by the target count of the whole
accumulated batch, so gradient accumulation is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionStates, attention_relation_sum
from .blended import (
    LossSettings,
    PositionTargets,
    Teacher,
    block_loss,
    chunked_blended_loss,
    default_chunk_size,
    is_on,
)
from .cross_tokenizer import AlignedTeacher, aligned_blended_loss
from .ensemble import TeacherEnsemble, normalized_weights
from .hidden import hidden_state_sum


@dataclass
class StudentOutput:
    """The student at the selected positions: logits (N, V), or final hidden states (N, D) and the linear head
    that the chunked loss projects them with; `layers` are the mapped layers' outputs for the hidden term and
    `attention` their attention projections for the relation term."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: nn.Module | None = None
    layers: list[torch.Tensor] = field(default_factory=list)
    attention: AttentionStates | None = None

    @property
    def anchor(self) -> torch.Tensor:
        """A tensor of the student's graph (keeps every parameter in backward when nothing is selected)."""
        return self.logits if self.logits is not None else self.hidden


@dataclass
class TeacherOutput:
    """The teacher at the selected positions: its distribution (logits, hidden states + head, or cached
    entries) and the outputs (and attention projections) of the layers the student's layers are mapped to."""

    distribution: Teacher
    layers: list[torch.Tensor] = field(default_factory=list)
    attention: AttentionStates | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor
    kd_sum: torch.Tensor  # Σ divergence over distilled positions (detached, for logging)
    ce_sum: torch.Tensor  # Σ CE over target positions
    hidden_sum: torch.Tensor  # Σ hidden-state distance over distilled positions
    attention_sum: torch.Tensor  # Σ attention-relation divergence over distilled positions
    member_kd_sums: torch.Tensor | None = None  # several teachers: each one's Σ divergence (for its log line)


class DistillationLoss:
    """alpha · KD + (1 − alpha) · CE + hidden_loss_weight · H + attention_loss_weight · A over selected positions.

    Args:
        loss_type, temperature, beta, skew: the divergence (see `hf_distill.distillation_loss`).
        alpha: weight of KD in [0, 1]; CE gets 1 − alpha.
        cache_tail: how a cached teacher's mass outside its top-k is compared ("bucket" or "renormalize").
        chunk_size: positions per chunk of the chunked loss (None: from the vocabulary and device).
        compile: fuse the chunk math with `torch.compile`.
        hidden_loss_weight, hidden_loss_type: weight and distance ("mse", "cosine") of the hidden-state term.
        attention_loss_weight: weight of the attention-relation term.
        multi_teacher, teacher_weights: with several teachers, how their targets are reduced ("mean_probs": the
            weighted mixture of their distributions; "mean_loss": the weighted sum of their divergences) and
            their weights (None: equal; normalized to sum to 1).
    """

    def __init__(
        self,
        loss_type: str = "forward_kl",
        temperature: float = 1.0,
        alpha: float = 0.5,
        beta: float = 0.5,
        skew: float = 0.1,
        cache_tail: str = "bucket",
        chunk_size: int | None = None,
        compile: bool = False,
        hidden_loss_weight: float = 0.0,
        hidden_loss_type: str = "mse",
        attention_loss_weight: float = 0.0,
        multi_teacher: str = "mean_probs",
        teacher_weights: list[float] | None = None,
    ):
        # The settings are checked where they are set (`DistillationConfig`); the loss trusts them.
        self.settings = LossSettings(loss_type, temperature, beta, skew, cache_tail, compile=compile)
        self.alpha = alpha
        self.chunk_size = chunk_size
        self.hidden_loss_weight = hidden_loss_weight
        self.hidden_loss_type = hidden_loss_type
        self.attention_loss_weight = attention_loss_weight
        self.multi_teacher = multi_teacher
        self.teacher_weights = teacher_weights

    @classmethod
    def from_config(cls, args) -> "DistillationLoss":
        return cls(
            loss_type=args.loss_type,
            temperature=args.temperature,
            alpha=args.alpha,
            beta=args.beta,
            skew=args.skew,
            cache_tail=args.teacher_cache_tail,
            chunk_size=args.chunk_size,
            compile=args.compile_loss,
            hidden_loss_weight=args.hidden_loss_weight,
            hidden_loss_type=args.hidden_loss_type,
            attention_loss_weight=args.attention_loss_weight,
            multi_teacher=args.multi_teacher,
            teacher_weights=args.teacher_weights,
        )

    def teacher_distribution(self, members: list[Teacher]) -> Teacher:
        """One teacher's distribution as is; several as a `TeacherEnsemble` with this loss's weights and reduction."""
        if len(members) == 1:
            return members[0]
        return TeacherEnsemble(members, normalized_weights(self.teacher_weights, len(members)), self.multi_teacher)

    def positions(self, targets, kd_mask, ce_mask, n_kd, n_ce, kd_everywhere: bool | None = None) -> PositionTargets:
        """Targets and term scales for positions whose counts over the accumulated batch are `n_kd`, `n_ce`.

        The counts may be tensors on the device (no host sync); a term of weight 0 gets the scale 0.0, so it is left
        out of the loss. `kd_everywhere`: every position is distilled (known without looking at `kd_mask`).
        """
        def scale(weight, count):
            if weight == 0:
                return 0.0
            return weight / (count.clamp_min(1) if torch.is_tensor(count) else max(count, 1))

        return PositionTargets(
            targets, kd_mask, ce_mask, scale(self.alpha, n_kd), scale(1 - self.alpha, n_ce),
            scale(self.hidden_loss_weight, n_kd), kd_everywhere, scale(self.attention_loss_weight, n_kd),
        )

    def __call__(self, student: StudentOutput, teacher: TeacherOutput | None, positions: PositionTargets) -> LossOutput:
        distribution = None if teacher is None else teacher.distribution
        if isinstance(distribution, list):  # several teachers at the same positions
            distribution = self.teacher_distribution(distribution)
        # The one dispatch on the teacher target: another tokenizer's aligned rows, or (chunked or whole) rows at the
        # selected positions of any `TeacherTarget` (logits, hidden states + head, cached entries, an ensemble).
        if isinstance(distribution, AlignedTeacher):  # another tokenizer: aligned positions, whole logits
            head = student.head
            logits = student.logits if head is None else F.linear(student.hidden, head.weight, head.bias)
            settings = self.settings
            loss, kd_sum, ce_sum = aligned_blended_loss(
                logits, distribution, positions.targets, positions.kd_mask, positions.ce_mask, positions.kd_scale,
                positions.ce_scale, loss_type=settings.loss_type, temperature=settings.temperature, beta=settings.beta,
                skew=settings.skew,
            )
            members = None
        elif student.head is not None:
            head = student.head
            chunk_size = self.chunk_size or default_chunk_size(head.weight.shape[0], device_type=head.weight.device.type)
            loss, kd_sum, ce_sum, members = chunked_blended_loss(
                student.hidden, head.weight, head.bias, distribution, positions, self.settings, chunk_size,
                return_member_sums=True,
            )
        else:  # whole logits at the selected positions: any teacher target gives its rows for them
            rows = None if distribution is None else distribution.rows(slice(None))
            loss, kd_sum, ce_sum, _, members = block_loss(
                student.logits, distribution, rows, positions, self.settings, closed_form=False
            )

        hidden_sum = loss.new_zeros(())
        if is_on(positions.hidden_scale) and teacher is not None and teacher.layers:
            hidden = hidden_state_sum(student.layers, teacher.layers, positions.kd_mask, self.hidden_loss_type)
            loss = loss + positions.hidden_scale * hidden
            hidden_sum = hidden.detach()
        attention_sum = loss.new_zeros(())
        if is_on(positions.attention_scale) and teacher is not None and teacher.attention is not None:
            relations = attention_relation_sum(student.attention, teacher.attention)
            loss = loss + positions.attention_scale * relations
            attention_sum = relations.detach()
        # Keep the student in the graph when no position is selected, so distributed backward stays in step.
        loss = loss + 0.0 * student.anchor.sum()
        members = None if members is None or not len(members) else members  # each of several teachers' Σ KD
        return LossOutput(loss, kd_sum, ce_sum, hidden_sum, attention_sum, members)

