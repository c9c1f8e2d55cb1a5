"""A batch's model inputs and target positions (the one definition, used by the trainer, the cache, the served
teacher and evaluation), and the student's and teachers' forward passes over them in the shapes the loss takes
(`StudentOutput`, `TeacherOutput`)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import logging

from .loss import (
    AlignedTeacher,
    AttentionStates,
    CachedTeacher,
    StudentOutput,
    TeacherHidden,
    TeacherLogits,
    TeacherOutput,
)
from .modeling import (
    CACHE_COLUMNS,
    CAUSAL,
    CLASSIFICATION,
    SEQ2SEQ,
    TEACHER_TOKEN_KEYS,
    TaskKind,
    attention_projections,
    unwrap_model,
)
from .sharding import head_is_shardable, whole_heads

logger = logging.get_logger(__name__)

# A micro-batch's targets and masks, computed once when the step's batches are fetched (`BatchTargets`).
BATCH_TARGET_KEYS = ("distill_targets", "distill_ce_mask", "distill_kd_mask", "distill_teacher_mask", "distill_response_mask")
# Batch keys that describe targets (labels, a cached teacher's entries, the teacher's tokens) rather than model inputs.
TARGET_KEYS = ("labels", "num_items_in_batch", *CACHE_COLUMNS, *BATCH_TARGET_KEYS, *TEACHER_TOKEN_KEYS)


# ---- a batch's inputs and targets -----------------------------------------------------------------


def model_inputs(model, batch: dict[str, Any], kind: TaskKind, own_decoder_inputs: bool = False) -> dict[str, Any]:
    """The forward arguments of `model`: the batch less its targets.

    A seq2seq decoder starts from its own right-shifted labels when the batch has no `decoder_input_ids`,
    or always with `own_decoder_inputs` (a teacher may use another decoder start token than the student).
    """
    inputs = {key: value for key, value in batch.items() if key not in TARGET_KEYS}
    if kind == SEQ2SEQ and (own_decoder_inputs or "decoder_input_ids" not in inputs):
        inputs["decoder_input_ids"] = unwrap_model(model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return inputs


def target_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None, kind: TaskKind, distill_all_tokens: bool = False):
    """(targets, CE mask, KD mask), each shaped like the model's output positions.

    Causal: position t is trained on token t + 1, so labels are shifted left; the CE mask holds positions
    whose next label is not -100, and the KD mask the same, or with `distill_all_tokens` every position
    whose next token is real (non-padding) text, prompt included. Seq2seq: decoder positions align with
    the labels. Classifiers: one position a row, distilled on every row; a row without a label (-100) is
    distilled from the teacher alone, with no CE.
    """
    if kind == CLASSIFICATION:
        return labels, labels != -100, torch.ones_like(labels, dtype=torch.bool)
    if kind != CAUSAL:
        ce_mask = labels != -100
        return labels, ce_mask, ce_mask
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    ce_mask = targets != -100
    if not distill_all_tokens:
        return targets, ce_mask, ce_mask
    if attention_mask is None:
        attention_mask = torch.ones_like(labels)
    next_is_text = F.pad(attention_mask[:, 1:], (0, 1), value=0).bool()
    return targets, ce_mask, (attention_mask.bool() & next_is_text) | ce_mask


@dataclass
class BatchTargets:
    """What each of the student's output positions is trained on, as masks shaped like its output positions.

    `select` = CE mask | KD mask picks the positions the loss sees. With `cross_tokenizer`, `teacher_mask` marks the
    teacher's positions paired k-th with k-th with the KD mask's, and `response_mask` the student's response positions
    (the share paired is logged as `aligned_fraction`).
    """

    targets: torch.Tensor
    ce_mask: torch.Tensor
    kd_mask: torch.Tensor
    teacher_mask: torch.Tensor | None = None
    response_mask: torch.Tensor | None = None

    def __post_init__(self):
        self.select = self.ce_mask | self.kd_mask
        # Without another tokenizer the KD mask holds the CE mask, so every selected position is distilled.
        self.kd_everywhere = self.teacher_mask is None

    def into(self, batch: dict[str, Any]) -> None:
        """Carry these targets in `batch` (as tensors, like the rest of a batch), so they are computed once."""
        values = (self.targets, self.ce_mask, self.kd_mask, self.teacher_mask, self.response_mask)
        batch.update({key: value for key, value in zip(BATCH_TARGET_KEYS, values) if value is not None})

    def counts(self) -> torch.Tensor:
        """(CE, KD) target counts, on the device."""
        return torch.stack([self.ce_mask.sum(), self.kd_mask.sum()])


def batch_targets(inputs: dict[str, Any], kind, distill_all_tokens: bool = False, cross_tokenizer: str | None = None):
    """The `BatchTargets` of a batch: the one the batch carries (`cross_tokenizer`: always, from its collator), or
    computed from its labels."""
    if BATCH_TARGET_KEYS[0] in inputs:
        return BatchTargets(*(inputs.get(key) for key in BATCH_TARGET_KEYS))
    if cross_tokenizer:
        raise ValueError(
            f"cross_tokenizer={cross_tokenizer!r} needs each batch in the teacher's tokens too, with the positions of "
            f"both paired; this batch has only {sorted(inputs)}. A custom data_collator must keep the keys that "
            "hf_distill.cross_tokenizer.CrossTokenizerCollator adds."
        )
    return BatchTargets(*target_positions(inputs["labels"], inputs.get("attention_mask"), kind, distill_all_tokens))


class ForwardPasses:
    """Runs the student and the teachers on a micro-batch and keeps their outputs at the selected positions only.

    Where a model's logits are its linear head applied to its last hidden states (checked once per model, on the
    first batch), it returns the hidden states and the head, and the loss projects them chunk by chunk.

    Args:
        teachers: the live teachers ([] with a cached teacher).
        kind: the task kind.
        layer_map: the teacher layer of each student layer for the layer terms, or None.
        chunked_loss: whether to try the chunked loss.
        unwrap: drops DDP (and a DeepSpeed engine) around a model, for the trial forward.
        shared_vocabulary: `cross_tokenizer='align'`: (student ids, teacher ids) spelled alike.
        projections: the student's hidden-state projections (to the teacher's hidden size), or None.
        hidden_states: whether the mapped layers' outputs are kept (the hidden-state term).
        relation_heads: the attention-relation term's heads, or None (the term is off).
    """

    def __init__(self, teachers, kind, layer_map=None, chunked_loss=True, unwrap=None, shared_vocabulary=None,
                 projections=None, hidden_states=True, relation_heads=None):
        self.teachers = teachers
        self.kind = kind
        self.layer_map = layer_map
        self.hidden_layers = layer_map if layer_map and hidden_states else None
        self.relation_heads = relation_heads if layer_map else None
        self.chunked_loss = chunked_loss
        self.unwrap = unwrap or (lambda model: model)
        self.shared_vocabulary = shared_vocabulary
        self.projections = projections
        self.use_chunks: dict[str, bool] = {}  # decided per model on the first batch

    def student(self, model, inputs, targets: BatchTargets) -> tuple[Any, StudentOutput]:
        select = targets.select
        chunked = self.chunking_works("student", model, inputs)
        own_layers = range(len(self.layer_map or []))
        with self._relations(model, own_layers, inputs, targets) as attention:
            outputs = self._forward(model, inputs, chunked)
        layers = self._layer_outputs(outputs, own_layers if self.hidden_layers else [], select, inputs.get("attention_mask"))
        if self.projections is not None:
            layers = [project(layer) for project, layer in zip(self.projections, layers)]
        if chunked:
            head = unwrap_model(model).get_output_embeddings()
            return outputs, StudentOutput(hidden=outputs.hidden_states[-1][select], head=head, layers=layers,
                                          attention=attention)
        return outputs, StudentOutput(logits=outputs.logits[select], layers=layers, attention=attention)

    @torch.no_grad()
    def teacher(self, inputs, targets: BatchTargets) -> TeacherOutput:
        """The teacher at the selected positions: a cached one's entries, one with another tokenizer at the paired
        positions, or each live teacher's logits (or hidden states and head) and mapped layers' outputs."""
        if not self.teachers:
            return TeacherOutput(CachedTeacher(inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["teacher_lse"]))
        if targets.teacher_mask is not None:
            return self._other_tokenizer_teacher(inputs, targets.teacher_mask)
        select = targets.select
        members, layers, attention = [], [], None
        for i, teacher in enumerate(self.teachers):
            chunked = self.chunking_works("teacher" if i == 0 else f"teacher_{i}", teacher, inputs)
            mapped = self.layer_map if i == 0 else None  # the layer terms take one teacher (checked at setup)
            with self._relations(teacher, mapped, inputs, targets) as relations:
                outputs = self._forward(teacher, inputs, chunked, own_decoder_inputs=True)
            if i == 0:
                layers = self._layer_outputs(outputs, self.hidden_layers or [], select, inputs.get("attention_mask"))
                attention = relations
            if chunked:
                head = unwrap_model(teacher).get_output_embeddings()
                members.append(TeacherHidden(outputs.hidden_states[-1][select], head))
            else:
                members.append(TeacherLogits(outputs.logits[select]))
            del outputs
        return TeacherOutput(members[0] if len(members) == 1 else members, layers, attention)  # the loss weighs several

    def _other_tokenizer_teacher(self, inputs, teacher_keep) -> TeacherOutput:
        """`cross_tokenizer`: the teacher on its own tokens, at the response positions paired with the student's."""
        teacher = self.teachers[0]
        teacher_inputs = {"input_ids": inputs["teacher_input_ids"], "attention_mask": inputs["teacher_attention_mask"]}
        chunked = self.chunking_works("teacher", teacher, teacher_inputs)
        outputs = self._forward(teacher, teacher_inputs, chunked)
        if chunked:
            head = unwrap_model(teacher).get_output_embeddings()
            with whole_heads([(teacher, head, False)]):  # only the paired positions are projected
                logits = head(outputs.hidden_states[-1][teacher_keep])
        else:
            logits = outputs.logits[teacher_keep]
        shared = self.shared_vocabulary
        shared = None if shared is None else tuple(ids.to(logits.device) for ids in shared)
        return TeacherOutput(AlignedTeacher(logits, shared))

    def whole_heads(self, model, student: StudentOutput, teacher: TeacherOutput | None):
        """Gather the heads the chunked loss projects with (sharded under FSDP2); the student's stays for backward."""
        heads = []
        if student.head is not None:
            heads.append((model, student.head, model.training and torch.is_grad_enabled()))
        if teacher is not None:
            members = teacher.distribution if isinstance(teacher.distribution, list) else [teacher.distribution]
            heads += [(owner, member.head, False) for owner, member in zip(self.teachers, members)
                      if isinstance(member, TeacherHidden)]
        return whole_heads(heads)

    def _forward(self, model, inputs, chunked: bool, own_decoder_inputs: bool = False):
        """Run a model; when chunking, it returns the last position's logits only (the loss projects the rest)."""
        kwargs = model_inputs(model, inputs, self.kind, own_decoder_inputs)
        if chunked:
            kwargs["logits_to_keep"] = 1
        if chunked or self.hidden_layers:
            kwargs["output_hidden_states"] = True
        return model(**kwargs)

    @contextmanager
    def _relations(self, model, layers, inputs, targets: BatchTargets):
        """Keeps the query/key/value projections of `layers` while the forward inside runs (None: the term is off)."""
        if self.relation_heads is None or not layers:
            yield None
            return
        blocks = attention_projections(model)
        states = AttentionStates([{} for _ in layers], self.relation_heads, inputs.get("attention_mask"), targets.kd_mask)
        handles = [
            blocks[layer][name].register_forward_hook(lambda module, args, output, slot=slot, name=name: slot.update({name: output}))
            for slot, layer in zip(states.layers, layers) for name in ("q", "k", "v")
        ]
        try:
            yield states
        finally:
            for handle in handles:
                handle.remove()

    def _layer_outputs(self, outputs, layers, select, attention_mask=None) -> list[torch.Tensor]:
        """The outputs of `layers` (0-based block indices) at the selected positions (seq2seq: the decoder's)."""
        if not layers:
            return []
        states = outputs.decoder_hidden_states if self.kind == SEQ2SEQ else outputs.hidden_states
        if self.kind == CLASSIFICATION:  # one position a row: the mean over its real tokens
            weights = torch.ones(states[0].shape[:2], device=states[0].device) if attention_mask is None else attention_mask
            weights = (weights / weights.sum(-1, keepdim=True).clamp_min(1)).unsqueeze(-1).to(states[0].dtype)
            return [(states[i + 1] * weights).sum(1)[select] for i in layers]
        return [states[i + 1][select] for i in layers]

    def chunking_works(self, name: str, model, inputs: dict[str, Any]) -> bool:
        """Whether `model`'s logits equal its linear head applied to its last hidden states (checked once)."""
        if name in self.use_chunks:
            return self.use_chunks[name]
        inner = unwrap_model(model)
        head = inner.get_output_embeddings()
        if self.chunked_loss and self.kind == CAUSAL and not head_is_shardable(model, head):
            logger.warning(
                f"The {name}'s output head is sharded by FSDP1 or DeepSpeed ZeRO-3, whose shards the chunked loss can't "
                "gather with their gradient; it uses full logits at the target positions. FSDP2 (fsdp_config="
                "{'fsdp_version': 2}) keeps the chunked loss."
            )
        works = (
            self.chunked_loss
            and self.kind == CAUSAL
            and head_is_shardable(model, head)  # whole, or FSDP2 (gathered for the loss)
            and "logits_to_keep" in inspect.signature(inner.forward).parameters
            and (isinstance(head, nn.Linear) or name == "teacher")
        )
        if works:
            # A trial forward: its dropout must not use up the random numbers of step 1 (a resumed run skips it).
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                kwargs = model_inputs(model, inputs, self.kind)
                out = self.unwrap(model)(**kwargs, logits_to_keep=1, output_hidden_states=True)
                with whole_heads([(model, head, False)]):
                    projected = head(out.hidden_states[-1][:, -1])
                works = torch.allclose(out.logits[:, -1].float(), projected.float(), rtol=1e-3, atol=1e-3, equal_nan=True)
            if not works:
                logger.warning(
                    f"The {name}'s logits are not a plain linear projection of its last hidden states (a logit "
                    "soft-cap, scale, or adapter on the head); it uses full logits at the target positions instead."
                )
        self.use_chunks[name] = works
        return works
