"""A teacher with another tokenizer (`cross_tokenizer`): each row tokenized again for the teacher, the response
positions of both tokenizations paired, and (`'align'`) the tokens both vocabularies spell alike.

The field's rules are checked in `DistillationConfig`, the models and tokenizers in `hf_distill.checks`; the loss
(ULD, or a divergence over the shared vocabulary) is `hf_distill.loss.cross_tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import TEACHER_PROMPT_COLUMN
from .forward import BatchTargets, target_positions
from .loss.cross_tokenizer import aligned_response_masks, one_to_one_spans, shared_vocabulary
from .modeling import CAUSAL, output_size


@dataclass
class CrossTokenizerCollator:
    """Wraps a causal collator: each row is also tokenized by a teacher with another tokenizer.

    The row's prompt (its tokens before the first label that is not -100) and response (the rest) are decoded
    with the student's tokenizer and tokenized again with the teacher's, giving `teacher_input_ids`,
    `teacher_attention_mask` and `teacher_labels` (-100 on the prompt), right-padded with the teacher's pad
    token. A response ending in the student's EOS ends in the teacher's. A row without a prompt keeps its first
    response token out of the teacher's targets too, as a causal student never predicts its first token.
    Teacher rows longer than `max_length` (the teacher's positions) are cut at the end. A row may carry its prompt
    in the teacher's tokens already (`teacher_prompt_ids`, which recipes write with the teacher's chat template);
    only the response must then be tokenized again.

    With `align`, only response tokens covering exactly the same characters in both tokenizations stay targets of
    the KD term: `teacher_labels` keep the teacher's, and `aligned_labels` (the student's labels, -100 elsewhere)
    the student's; the student's own `labels`, and so its CE term, are unchanged. Each batch carries its paired
    target masks (`paired_targets`), so the training step reads them instead of computing them.
    """

    collator: Any
    student_tokenizer: Any
    teacher_tokenizer: Any
    max_length: int | None = None
    align: bool = False

    def __post_init__(self):
        self.student_tokenizer = getattr(self.student_tokenizer, "tokenizer", self.student_tokenizer)
        self.teacher_tokenizer = getattr(self.teacher_tokenizer, "tokenizer", self.teacher_tokenizer)
        teacher = self.teacher_tokenizer
        self.teacher_pad_id = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id
        if self.teacher_pad_id is None:
            raise ValueError(
                f"The teacher tokenizer {teacher.name_or_path!r} has neither a pad nor an eos token to pad the teacher's "
                "rows with; set teacher_tokenizer.pad_token."
            )

    def teacher_row(self, feature: dict[str, Any]) -> tuple[list[int], list[int], list[int] | None]:
        """(teacher ids, teacher labels, the student's aligned labels with `align`) of one row: its prompt and
        response text in the teacher's tokens."""
        ids = list(feature["input_ids"])
        labels = list(feature["labels"]) if feature.get("labels") is not None else list(ids)
        mask = feature.get("attention_mask")
        if mask is not None:  # padding the row may already carry is not text
            ids, labels = [t for t, keep in zip(ids, mask) if keep], [t for t, keep in zip(labels, mask) if keep]
        start = next((i for i, label in enumerate(labels) if label != -100), len(ids))
        response = ids[start:]
        ends_with_eos = bool(response) and response[-1] == self.student_tokenizer.eos_token_id
        decode = lambda tokens: self.student_tokenizer.decode(  # noqa: E731
            tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        teacher = self.teacher_tokenizer
        prompt_ids = feature.get(TEACHER_PROMPT_COLUMN)
        if prompt_ids is None:
            prompt_ids = teacher(decode(ids[:start]), add_special_tokens=True)["input_ids"]
        prompt_ids = list(prompt_ids)
        text_tokens = response[:-1] if ends_with_eos else response
        encoded = teacher(decode(text_tokens), add_special_tokens=False, return_offsets_mapping=self.align)
        response_ids = encoded["input_ids"]
        if ends_with_eos and teacher.eos_token_id is not None:
            response_ids = response_ids + [teacher.eos_token_id]
        response_labels, aligned_labels = list(response_ids), None
        if self.align:
            # Character offsets in the response text: the teacher's from its tokenizer, the student's by decoding
            # ever longer prefixes of its own tokens (the row's tokens need not be what its tokenizer would give).
            student_ends = [len(decode(text_tokens[: k + 1])) for k in range(len(text_tokens))]
            pairs = one_to_one_spans(student_ends, [end for _, end in encoded["offset_mapping"]])
            if ends_with_eos and teacher.eos_token_id is not None:  # both EOS tokens end the text
                pairs.append((len(text_tokens), len(response_ids) - 1))
            kept_student, kept_teacher = {i for i, _ in pairs}, {j for _, j in pairs}
            response_labels = [t if j in kept_teacher else -100 for j, t in enumerate(response_ids)]
            aligned_labels = labels[:start] + [t if k in kept_student else -100 for k, t in enumerate(labels[start:])]
        labels = [-100] * len(prompt_ids) + response_labels
        if start == 0 and prompt_ids and response_ids:  # the student's first token is no target: nor is the teacher's
            labels[len(prompt_ids)] = -100
        ids = prompt_ids + response_ids
        if self.max_length and len(ids) > self.max_length:  # the pairing then stops where the teacher's row does
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels, aligned_labels

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [self.teacher_row(feature) for feature in features]
        batch = self.collator([{k: v for k, v in feature.items() if k != TEACHER_PROMPT_COLUMN} for feature in features])
        length = max(len(ids) for ids, _, _ in rows)
        batch["teacher_input_ids"] = torch.tensor(
            [ids + [self.teacher_pad_id] * (length - len(ids)) for ids, _, _ in rows], dtype=torch.long
        )
        batch["teacher_attention_mask"] = torch.tensor(
            [[1] * len(ids) + [0] * (length - len(ids)) for ids, _, _ in rows], dtype=torch.long
        )
        batch["teacher_labels"] = torch.tensor(
            [labels + [-100] * (length - len(labels)) for _, labels, _ in rows], dtype=torch.long
        )
        if self.align:
            width = batch["labels"].shape[1]
            batch["aligned_labels"] = torch.tensor(
                [aligned + [-100] * (width - len(aligned)) for _, _, aligned in rows], dtype=torch.long
            )
        paired_targets(batch).into(batch)  # here, once, while the step before trains
        return batch


def paired_targets(batch: dict[str, Any]) -> BatchTargets:
    """The student's targets, with the KD mask and the teacher's mask holding the response positions of both
    tokenizations paired k-th with k-th (with 'align', only the tokens whose span lines up with a teacher token)."""
    targets, ce_mask, response_mask = target_positions(batch["labels"], batch.get("attention_mask"), CAUSAL)
    student_mask = response_mask
    if "aligned_labels" in batch:
        student_mask = student_mask & target_positions(batch["aligned_labels"], batch.get("attention_mask"), CAUSAL)[2]
    teacher_mask = target_positions(batch["teacher_labels"], batch["teacher_attention_mask"], CAUSAL)[2]
    kd_mask, teacher_mask = aligned_response_masks(student_mask, teacher_mask)
    return BatchTargets(targets, ce_mask, kd_mask, teacher_mask, response_mask)


def shared_vocabulary_ids(student_tokenizer, teacher_tokenizer, student, teacher):
    """cross_tokenizer='align': (student ids, teacher ids) of the tokens both vocabularies spell alike, within both
    models' output rows; refused when there are none."""
    student_vocab = getattr(student_tokenizer, "tokenizer", student_tokenizer).get_vocab()
    teacher_vocab = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer).get_vocab()
    student_ids, teacher_ids = shared_vocabulary(student_vocab, teacher_vocab)
    fits = (student_ids < output_size(student)) & (teacher_ids < output_size(teacher))
    if not bool(fits.any()):
        raise ValueError(
            f"cross_tokenizer='align' compares the tokens both vocabularies spell alike, but the student's "
            f"{len(student_vocab)} tokens and the teacher's {len(teacher_vocab)} share none (a byte-level BPE and a "
            "SentencePiece vocabulary spell words differently): use cross_tokenizer='uld'."
        )
    return student_ids[fits], teacher_ids[fits]
