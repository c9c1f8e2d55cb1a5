"""From raw rows to tokenized training rows for each task format, with truncation that is counted, not silent.

- causal prompt → response: labels are -100 on the prompt, so loss and distillation fall on the response;
  instruct tokenizers get their chat template.
- seq2seq source → target: `labels` are the target's ids.
- classification text → label.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..data import pack_dataset

# What the model and the collator take from a tokenized row.
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
# Per-row truncation flags written by tokenization, counted into `TruncationStats`, then removed.
PROMPT_TRUNCATED, RESPONSE_TRUNCATED, DROP_REASON = "_prompt_truncated", "_response_truncated", "_drop_reason"
_FLAG_COLUMNS = (PROMPT_TRUNCATED, RESPONSE_TRUNCATED, DROP_REASON)
# Why a row is dropped, as counted in `TruncationStats.reasons`.
EMPTY_RESPONSE = "empty response"
SHORT_RESPONSE = "response truncated below min_response_tokens"
EMPTY_TARGET = "empty target"
NO_LABEL = "no label"


@dataclass
class TruncationStats:
    """What truncation did to a split: rows kept, prompts/responses shortened, rows dropped."""

    rows: int = 0
    kept: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def summary(self, split: str) -> str:
        return (
            f"{split}: kept {self.kept} of {self.rows} rows; {self.prompts_truncated} prompts and "
            f"{self.responses_truncated} responses shortened to fit; {self.dropped} dropped "
            f"({', '.join(f'{k}: {v}' for k, v in self.reasons.items()) or 'none'})."
        )


def prompt_ids(tokenizer, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of the prompt as the model sees it before its answer (chat template with generation prompt)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def fit_prompt_response(
    prompt: list[int], response: list[int], max_length: int, min_response_tokens: int
) -> tuple[list[int], list[int], bool, bool, str]:
    """Fit prompt and response within `max_length` tokens.

    The prompt is cut from the left first (its end, next to the answer, matters most) down to half the
    budget; then the response is cut from the right. Returns (prompt, response, prompt cut, response cut,
    why the row is dropped or "").
    """
    if len(response) == 0:
        return prompt, response, False, False, EMPTY_RESPONSE
    prompt_cut = response_cut = False
    if len(prompt) + len(response) > max_length:
        keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
        if keep_prompt < len(prompt):
            prompt, prompt_cut = prompt[len(prompt) - keep_prompt :], True
        if len(prompt) + len(response) > max_length:
            response, response_cut = response[: max_length - len(prompt)], True
    return prompt, response, prompt_cut, response_cut, SHORT_RESPONSE if len(response) < min_response_tokens else ""


def _empty_columns() -> dict[str, list]:
    return {column: [] for column in (*MODEL_COLUMNS, *_FLAG_COLUMNS)}


def _add_row(out: dict, input_ids: list[int], labels, prompt_cut: bool, response_cut: bool, reason: str) -> None:
    out["input_ids"].append(input_ids)
    out["attention_mask"].append([1] * len(input_ids))
    out["labels"].append(labels)
    out[PROMPT_TRUNCATED].append(prompt_cut)
    out[RESPONSE_TRUNCATED].append(response_cut)
    out[DROP_REASON].append(reason)


def _count_and_drop(tokenized) -> tuple[Any, TruncationStats]:
    """Count the per-row truncation flags into `TruncationStats`, then drop the flagged rows and the flags.

    The counts are read from columns, not gathered as side effects of `map`, so a cached `map` counts the same.
    """
    if DROP_REASON not in tokenized.column_names:  # an empty split: map had no row to run on
        return tokenized, TruncationStats()
    reasons = Counter(reason for reason in tokenized[DROP_REASON] if reason)
    dropped = sum(reasons.values())
    stats = TruncationStats(
        rows=len(tokenized), kept=len(tokenized) - dropped, prompts_truncated=sum(tokenized[PROMPT_TRUNCATED]),
        responses_truncated=sum(tokenized[RESPONSE_TRUNCATED]), dropped=dropped, reasons=dict(reasons),
    )
    if dropped:
        tokenized = tokenized.filter(lambda reason: not reason, input_columns=DROP_REASON)
    return tokenized.remove_columns(list(_FLAG_COLUMNS)), stats


def tokenize_causal(
    dataset, tokenizer, *, max_length: int, min_response_tokens: int = 1, use_chat_template: bool = True
):
    """Rows with `prompt` and `response` strings → input_ids / attention_mask / labels (prompt masked).

    The raw columns of the rows kept stay beside the tokenized ones (evaluation scores against them).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        out = _empty_columns()
        # The answer is closed by the end-of-sequence token so the model learns to stop.
        responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        for text, response in zip(batch["prompt"], responses):
            prompt = prompt_ids(tokenizer, text, use_chat_template)
            prompt, response, prompt_cut, response_cut, reason = fit_prompt_response(
                prompt, response + eos, max_length, min_response_tokens
            )
            _add_row(out, prompt + response, [-100] * len(prompt) + response, prompt_cut, response_cut, reason)
        return out

    return _count_and_drop(dataset.map(tokenize, batched=True, desc="Tokenizing prompt → response"))


def tokenize_text(dataset, tokenizer, *, max_length: int):
    """Rows with a `text` string → packed `max_length` blocks of input_ids / attention_mask / labels (every token)."""
    ids = dataset.map(
        lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True, remove_columns=dataset.column_names, desc="Tokenizing text",
    )
    blocks = pack_dataset(ids, max_length, separator_id=tokenizer.eos_token_id)
    return blocks, TruncationStats(rows=len(dataset), kept=len(dataset))


def tokenize_seq2seq(dataset, tokenizer, *, max_length: int, max_target_length: int):
    """Rows with `source` and `target` strings → input_ids / attention_mask / labels."""

    def tokenize(batch):
        out = _empty_columns()
        sources = tokenizer(batch["source"], truncation=False)["input_ids"]
        targets = tokenizer(text_target=batch["target"], truncation=False)["input_ids"]
        for source, target, text in zip(sources, targets, batch["target"]):
            source_cut, target_cut = len(source) > max_length, len(target) > max_target_length
            if source_cut:
                source = source[: max_length - 1] + source[-1:]  # keep the closing eos
            if target_cut:
                target = target[: max_target_length - 1] + target[-1:]
            _add_row(out, source, target, source_cut, target_cut, "" if text.strip() else EMPTY_TARGET)
        return out

    return _count_and_drop(dataset.map(tokenize, batched=True, desc="Tokenizing source → target"))


def tokenize_classification(dataset, tokenizer, *, max_length: int, require_label: bool = False):
    """Rows with `text` and integer `label` → input_ids / attention_mask / labels.

    A row without a label (None or -100) keeps `labels` None: training distills it from the teacher alone. With
    `require_label` (held-out splits, which are scored against their labels) it is dropped and counted.
    """

    def tokenize(batch):
        out = _empty_columns()
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)["input_ids"]
        for ids, label in zip(encoded, batch["label"]):
            label = None if label is None or int(label) == -100 else int(label)
            reason = NO_LABEL if label is None and require_label else ""
            _add_row(out, ids, label, len(ids) >= max_length, False, reason)
        return out

    return _count_and_drop(dataset.map(tokenize, batched=True, desc="Tokenizing text → label"))
