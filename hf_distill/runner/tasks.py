"""From raw rows to tokenized training rows for each task format, with truncation that is counted, not silent.

- causal prompt → response: labels are -100 on the prompt, so loss and distillation fall on the response;
  instruct tokenizers get their chat template.
- seq2seq source → target: `labels` are the target's ids.
- classification text → label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.utils import logging

logger = logging.get_logger(__name__)


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


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of the answer, closed by the end-of-sequence token so the model learns to stop."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def fit_prompt_response(
    prompt: list[int], response: list[int], max_length: int, min_response_tokens: int, stats: TruncationStats
) -> dict[str, list[int]] | None:
    """Join prompt and response within `max_length` tokens, or None (counted) when no response would be left.

    The prompt is cut from the left first (its end, next to the answer, matters most) down to half the
    budget; then the response is cut from the right.
    """
    stats.rows += 1
    if len(response) == 0:
        stats.dropped += 1
        stats.reasons["empty response"] = stats.reasons.get("empty response", 0) + 1
        return None
    if len(prompt) + len(response) > max_length:
        keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
        if keep_prompt < len(prompt):
            prompt = prompt[len(prompt) - keep_prompt :]
            stats.prompts_truncated += 1
        if len(prompt) + len(response) > max_length:
            response = response[: max_length - len(prompt)]
            stats.responses_truncated += 1
    if len(response) < min_response_tokens:
        stats.dropped += 1
        stats.reasons["response truncated below min_response_tokens"] = (
            stats.reasons.get("response truncated below min_response_tokens", 0) + 1
        )
        return None
    stats.kept += 1
    ids = prompt + response
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + response}


def tokenize_causal(dataset, tokenizer, *, max_length: int, min_response_tokens: int = 1, use_chat_template: bool = True):
    """Rows with `prompt` and `response` strings → input_ids / attention_mask / labels (prompt masked)."""
    stats = TruncationStats()
    features = {"input_ids": [], "attention_mask": [], "labels": [], "row": []}
    for index, row in enumerate(dataset):
        fitted = fit_prompt_response(
            prompt_ids(tokenizer, row["prompt"], use_chat_template),
            response_ids(tokenizer, row["response"]),
            max_length,
            min_response_tokens,
            stats,
        )
        if fitted is not None:
            for key, value in fitted.items():
                features[key].append(value)
            features["row"].append(index)
    return _with_raw_columns(dataset, features), stats


def tokenize_seq2seq(dataset, tokenizer, *, max_length: int, max_target_length: int):
    """Rows with `source` and `target` strings → input_ids / attention_mask / labels."""
    stats = TruncationStats()
    features = {"input_ids": [], "attention_mask": [], "labels": [], "row": []}
    for index, row in enumerate(dataset):
        stats.rows += 1
        source = tokenizer(row["source"], truncation=False)["input_ids"]
        target = tokenizer(text_target=row["target"], truncation=False)["input_ids"]
        if len(source) > max_length:
            source = source[: max_length - 1] + source[-1:]  # keep the closing eos
            stats.prompts_truncated += 1
        if len(target) > max_target_length:
            target = target[: max_target_length - 1] + target[-1:]
            stats.responses_truncated += 1
        if not row["target"].strip():
            stats.dropped += 1
            stats.reasons["empty target"] = stats.reasons.get("empty target", 0) + 1
            continue
        stats.kept += 1
        features["input_ids"].append(source)
        features["attention_mask"].append([1] * len(source))
        features["labels"].append(target)
        features["row"].append(index)
    return _with_raw_columns(dataset, features), stats


def tokenize_classification(dataset, tokenizer, *, max_length: int):
    """Rows with `text` and integer `label` → input_ids / attention_mask / labels."""
    stats = TruncationStats(rows=len(dataset), kept=len(dataset))
    encoded = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)
    stats.prompts_truncated = sum(len(ids) >= max_length for ids in encoded["input_ids"])
    features = {**encoded, "labels": [int(label) for label in dataset["label"]], "row": list(range(len(dataset)))}
    return _with_raw_columns(dataset, features), stats


def _with_raw_columns(dataset, features):
    """The tokenized rows, keeping the raw text columns of the rows that survived (for evaluation)."""
    from datasets import Dataset

    rows = features.pop("row")
    tokenized = Dataset.from_dict(features)
    raw = dataset.select(rows)
    for column in raw.column_names:
        if column not in tokenized.column_names:
            tokenized = tokenized.add_column(column, raw[column])
    return tokenized
