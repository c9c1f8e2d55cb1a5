"""Collators for the three task kinds, and checks of a tokenized dataset before training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding
from transformers.utils import logging

from .modeling import CAUSAL, CLASSIFICATION, SEQ2SEQ, position_limit, unwrap_model

logger = logging.get_logger(__name__)


@dataclass
class CausalLMCollator:
    """Pad `input_ids`/`attention_mask` with the pad token and `labels` with -100, on the right.

    Rows without `labels` are trained on every token (labels = input_ids). Rows that carry `labels`
    keep them, so prompt tokens masked with -100 stay out of the loss.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature in features:
            ids = list(feature["input_ids"])
            labels = list(feature["labels"]) if feature.get("labels") is not None else list(ids)
            mask = list(feature["attention_mask"]) if feature.get("attention_mask") is not None else [1] * len(ids)
            pad = length - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            batch["labels"].append(labels + [-100] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def default_collator(kind: str, tokenizer, pad_to_multiple_of: int | None = None):
    """The collator a kind needs when the user gives none."""
    if tokenizer is None:
        raise ValueError(
            "DistillationTrainer needs a processing_class (the student's tokenizer) to pad batches, or a data_collator."
        )
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if kind == CAUSAL:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(f"The tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token; set pad_token.")
        return CausalLMCollator(pad_id, pad_to_multiple_of)
    if kind == SEQ2SEQ:
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of)
    if kind == CLASSIFICATION:
        return ClassifierCollator(tokenizer, pad_to_multiple_of)
    raise ValueError(f"Unknown task kind {kind!r}.")


@dataclass
class ClassifierCollator:
    """Pad like `DataCollatorWithPadding`; a row without a label (no `label`/`labels`, None, or -100) gets -100,
    so it is distilled from the teacher alone (no CE)."""

    tokenizer: Any
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [next((f[key] for key in ("labels", "label") if f.get(key) is not None), -100) for f in features]
        features = [{key: value for key, value in f.items() if key not in ("labels", "label")} for f in features]
        batch = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)(features)
        batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.long)
        return batch


def labeled_rows(dataset, kind: str) -> int:
    """How many rows carry a target: a class label (classifiers), or a label that is not -100 (causal: after the shift)."""
    columns = getattr(dataset, "column_names", None) or []
    column = "labels" if "labels" in columns else "label" if kind == CLASSIFICATION and "label" in columns else None
    if column is None:
        return 0 if kind == CLASSIFICATION else len(dataset)  # causal rows without labels train on every token
    if kind == CLASSIFICATION:
        return sum(1 for label in dataset[column] if label is not None and label != -100)
    return len(dataset) - rows_without_targets(dataset[column], kind)


def rows_without_targets(labels_column, kind: str) -> int:
    """How many rows would add nothing to the loss: every label -100 (causal: after the shift)."""
    if kind == CLASSIFICATION:
        return sum(1 for label in labels_column if label is None or label == -100)
    skip = 1 if kind == CAUSAL else 0
    return sum(1 for labels in labels_column if all(label == -100 for label in list(labels)[skip:]))


def check_train_dataset(dataset, kind: str, name: str = "train_dataset", models=(), prompts_suffice: bool = False) -> None:
    """Raise before training on a dataset that cannot train; warn about rows that add nothing.

    With `models` (student, teacher), also check that token ids, class ids and row lengths fit every model.
    `prompts_suffice` (lmbda=1 or seq_kd, whose targets are generated) accepts prompt-only rows.
    """
    if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, dict):
        return
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: give it at least one tokenized row.")
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return
    if "input_ids" not in columns:
        raise ValueError(
            f"{name} has columns {columns} but no 'input_ids'. Tokenize it first (for instance with "
            "dataset.map(lambda rows: tokenizer(rows['text']), batched=True)), so each row has input_ids (and labels)."
        )
    if kind == CLASSIFICATION:
        unlabeled = len(dataset) - labeled_rows(dataset, kind)
        if unlabeled:  # the teacher's distribution is their only target
            logger.warning(
                f"{unlabeled} of {len(dataset)} rows of {name} have no label (no 'labels'/'label' column, None, or -100): "
                "they are distilled from the teacher alone (KD, no CE)."
            )
    if kind == SEQ2SEQ and "labels" not in columns and not prompts_suffice:  # seq_kd writes them
        raise ValueError(
            f"{name} has columns {columns} but no 'labels': a seq2seq model needs target token ids; add them with "
            "tokenizer(text_target=targets)."
        )
    if "labels" in columns and kind != CLASSIFICATION and not prompts_suffice:
        empty = rows_without_targets(dataset["labels"], kind)
        if empty == len(dataset):
            raise ValueError(
                f"None of the {len(dataset)} rows of {name} has a target token: every label is -100 (prompt-only rows, "
                "or responses truncated away). Check the response column and max_length, or set lmbda=1 to train on the "
                "student's own responses to these prompts (on-policy distillation), or seq_kd=True to train on the "
                "teacher's."
            )
        if empty:
            logger.warning(
                f"{empty} of {len(dataset)} rows of {name} have no target token (every label is -100) and add nothing "
                "to the loss; drop them to save compute."
            )
    if hasattr(dataset, "with_format"):
        check_rows_fit(dataset, kind, name, [unwrap_model(m) for m in models if m is not None])


def check_rows_fit(dataset, kind: str, name: str, models: list) -> None:
    """Token ids inside each model's vocabulary, class ids below num_labels, rows within max_position_embeddings.

    Each of these would otherwise fail inside the first forward pass with an index error that names no row or setting.
    """
    if not models:
        return
    columns = dataset.with_format("arrow")
    try:
        lengths, flat = pc.list_value_length(columns["input_ids"]), pc.list_flatten(columns["input_ids"])
    except (pa.ArrowException, TypeError):  # not a column of id lists (a custom format): left to the collator
        return
    smallest, largest = (pc.min(flat).as_py(), pc.max(flat).as_py()) if len(flat) else (0, 0)
    if smallest < 0:
        raise ValueError(
            f"{name} has input id {smallest} in input_ids: pad input_ids with the pad token id (only labels use -100 "
            "to mask)."
        )
    if kind != CLASSIFICATION and "labels" in dataset.column_names and len(flat):
        largest = max(largest, pc.max(pc.list_flatten(columns["labels"])).as_py())
    longest = pc.max(lengths).as_py() if len(lengths) else 0
    for model in models:
        model_name = type(model).__name__
        vocab = _embedding_rows(model)
        if vocab is not None and largest >= vocab:
            raise ValueError(
                f"{name} has token id {largest} but {model_name} embeds only {vocab} tokens (ids 0..{vocab - 1}): "
                "tokenize the data with the student's tokenizer, or resize the model's embeddings to it."
            )
        limit = position_limit(model)
        if limit is not None and longest > limit:
            raise ValueError(
                f"{name} has rows of up to {longest} tokens but {model_name} takes at most {limit} positions "
                f"(max_position_embeddings): truncate them, e.g. tokenizer(..., truncation=True, max_length={limit}), "
                "or lower max_length in the recipe."
            )
    label_column = "labels" if "labels" in dataset.column_names else "label"
    if kind == CLASSIFICATION and label_column in dataset.column_names:
        num_labels = min(model.config.num_labels for model in models)
        labels = pc.filter(columns[label_column], pc.not_equal(columns[label_column], -100))
        bad = pc.filter(labels, pc.or_(pc.less(labels, 0), pc.greater_equal(labels, num_labels)))
        if len(bad):
            raise ValueError(
                f"{name} has class label {bad[0].as_py()} but the models predict {num_labels} classes (0..{num_labels - 1}): "
                f"map the labels to 0..{num_labels - 1}, or give the models num_labels to match."
            )


def _embedding_rows(model) -> int | None:
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None
    return weight.shape[0] if weight is not None and weight.dim() == 2 else None


# A row's prompt in a teacher's own tokens (cross_tokenizer), when the data carries it.
TEACHER_PROMPT_COLUMN = "teacher_prompt_ids"


def pack_dataset(dataset, max_length: int, separator_id: int | None = None, drop_last: bool = True):
    """Concatenate tokenized rows (a separator token between them) and cut the stream into `max_length` blocks.

    Every token of a block is trained (labels = input_ids), which is what plain-text language modeling wants;
    no padding is spent. The last, shorter block is dropped unless `drop_last=False`.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too short to pack: a block needs at least 2 tokens.")

    def pack(rows):
        stream: list[int] = []
        for ids in rows["input_ids"]:
            stream.extend(ids)
            if separator_id is not None:
                stream.append(separator_id)
        stop = len(stream) - len(stream) % max_length if drop_last else len(stream)
        blocks = [stream[i : i + max_length] for i in range(0, stop, max_length)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": [list(b) for b in blocks]}

    # One batch holds the whole split, so no tokens are lost at batch boundaries.
    return dataset.map(pack, batched=True, batch_size=None, remove_columns=dataset.column_names, desc="packing")
