"""Tiny models, tokenizers and datasets built offline from configs, shared by the tests."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data" / "bible_en_es.jsonl"


def english_lines(n: int = 300) -> list[str]:
    with open(DATA, encoding="utf-8") as handle:
        return [json.loads(line)["translation"]["en"] for _, line in zip(range(n), handle)]


def spanish_lines(n: int = 300) -> list[str]:
    with open(DATA, encoding="utf-8") as handle:
        return [json.loads(line)["translation"]["es"] for _, line in zip(range(n), handle)]


@pytest.fixture(scope="session")
def tokenizer():
    from hf_distill.runner.scratch import train_bpe_tokenizer

    return train_bpe_tokenizer(english_lines(400) + spanish_lines(400), vocab_size=384)


def sharpen(model, factor: float = 20.0):
    """Scale the output head so a random model has peaked, clearly non-uniform distributions."""
    with torch.no_grad():
        head = model.get_output_embeddings() or model.score  # LM head, or a classifier's score layer
        head.weight.mul_(factor)
    return model


@pytest.fixture
def causal_pair(tokenizer):
    from hf_distill.runner.scratch import small_llama

    teacher = sharpen(small_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0))
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    return teacher, student


def prompt_response_dataset(tokenizer, n: int = 32, max_length: int = 40):
    """Ragged rows: an English prompt masked with -100, then its Spanish response as the target."""
    from datasets import Dataset

    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for en, es in zip(english_lines(n), spanish_lines(n)):
        prompt = tokenizer(en, add_special_tokens=False)["input_ids"][: max_length // 2]
        response = tokenizer(es, add_special_tokens=False)["input_ids"][: max_length // 2] + [tokenizer.eos_token_id]
        ids = prompt + response
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * len(prompt) + response)
    return Dataset.from_dict(rows)


@pytest.fixture
def causal_dataset(tokenizer):
    return prompt_response_dataset(tokenizer)
