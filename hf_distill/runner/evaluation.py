"""Scoring a model on a recipe's test split: held-out loss, task metrics, agreement with the teacher, latency."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import default_collator
from ..loss import cross_entropy_per_position
from ..forward import model_inputs, target_positions
from ..modeling import CAUSAL, CLASSIFICATION, model_kind, unwrap_model
from .metrics import compute_metric, metric_columns
from .recipe import model_columns
from .tasks import prompt_ids


def parameter_count(model) -> int:
    return sum(p.numel() for p in unwrap_model(model).parameters())


def layer_count(model) -> int | None:
    config = unwrap_model(model).config.get_text_config()
    return getattr(config, "num_hidden_layers", None)


def _device(model) -> torch.device:
    return next(unwrap_model(model).parameters()).device


def _loader(dataset, collator, batch_size: int) -> DataLoader:
    """Padded batches of the tokenized columns, in order."""
    return DataLoader(model_columns(dataset), batch_size=batch_size, collate_fn=collator)


def _to(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def loss_and_agreement(model, test, tokenizer, teacher=None, batch_size: int = 8) -> dict[str, float]:
    """Mean CE over target tokens, top-1 agreement with the teacher on those tokens, and forward latency."""
    kind = model_kind(model)
    loader = _loader(test, default_collator(kind, tokenizer), batch_size)
    model.eval()
    total_ce = total_tokens = agree = 0.0
    seconds = 0.0
    device = _device(model)
    if teacher is not None:
        teacher.to(device)
    model(**model_inputs(model, _to(next(iter(loader)), device), kind))  # warm-up: steady-state latency
    for batch in tqdm(loader, desc="Held-out loss", leave=False):
        batch = _to(batch, device)
        inputs = model_inputs(model, batch, kind)
        _synchronize(device)
        start = time.perf_counter()
        logits = model(**inputs).logits
        _synchronize(device)
        seconds += time.perf_counter() - start
        targets, mask, _ = target_positions(batch["labels"], batch.get("attention_mask"), kind)
        student, targets = logits[mask], targets[mask]
        total_ce += cross_entropy_per_position(student, targets).sum().item()
        total_tokens += targets.numel()
        if teacher is not None:
            # A teacher may start its decoder from another token than the student.
            teacher_logits = teacher(**model_inputs(teacher, batch, kind, own_decoder_inputs=True)).logits[mask]
            vocab = min(student.shape[-1], teacher_logits.shape[-1])
            agree += (student[:, :vocab].argmax(-1) == teacher_logits[:, :vocab].argmax(-1)).sum().item()
    loss = total_ce / max(total_tokens, 1)
    result = {"eval_loss": loss, "latency_ms": 1000 * seconds / max(len(test), 1)}
    if kind != CLASSIFICATION:
        result["perplexity"] = math.exp(min(loss, 50))
    if teacher is not None:
        result["agreement"] = agree / max(total_tokens, 1)
    return result


@torch.no_grad()
def classify(model, test, tokenizer, batch_size: int = 16) -> list[int]:
    device, predictions = _device(model), []
    loader = _loader(test, default_collator(CLASSIFICATION, tokenizer), batch_size)
    for batch in tqdm(loader, desc="Classifying", leave=False):
        inputs = model_inputs(model, _to(batch, device), CLASSIFICATION)
        predictions += model(**inputs).logits.argmax(-1).tolist()
    return predictions


@torch.no_grad()
def score_label_words(model, test, tokenizer, label_words: list[str], use_chat_template: bool) -> list[int]:
    """For a causal LM: the label whose word the model finds most likely after each prompt."""
    words = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in label_words]
    predictions = []
    for row in tqdm(test, desc="Scoring label words", leave=False):
        prompt = prompt_ids(tokenizer, row["prompt"], use_chat_template)
        sequences = [prompt + word for word in words]
        length = max(len(s) for s in sequences)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.tensor([s + [pad] * (length - len(s)) for s in sequences], device=_device(model))
        attention = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences], device=_device(model))
        log_probs = F.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
        scores = []
        for index, word in enumerate(words):
            positions = range(len(prompt) - 1, len(prompt) - 1 + len(word))
            scores.append(sum(log_probs[index, p, token].item() for p, token in zip(positions, word)))
        predictions.append(max(range(len(words)), key=scores.__getitem__))
    return predictions


@torch.no_grad()
def generate(model, test, tokenizer, max_new_tokens: int, use_chat_template: bool, batch_size: int = 16) -> list[str]:
    """Greedy outputs: the answer after each causal prompt, or the seq2seq target for each source."""
    kind = model_kind(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        if kind != CAUSAL:
            return tokenizer(texts, return_tensors="pt", padding=True)
        prompts = [prompt_ids(tokenizer, text, use_chat_template) for text in texts]
        length = max(len(p) for p in prompts)  # left padding, so every answer starts at the same column
        return {
            "input_ids": torch.tensor([[pad] * (length - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts]),
        }

    texts = list(test["prompt"] if kind == CAUSAL else test["source"])
    device, outputs = _device(model), []
    for batch in tqdm(DataLoader(texts, batch_size=batch_size, collate_fn=encode), desc="Generating", leave=False):
        input_ids = batch["input_ids"].to(device)
        generated = model.generate(
            input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        if kind == CAUSAL:
            generated = generated[:, input_ids.shape[1]:]
        outputs += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return outputs


def evaluate_model(name, model, test, tokenizer, recipe, teacher=None) -> tuple[dict, list[dict]]:
    """One row of the comparison table, and generated samples (translation)."""
    row = {"model": name, "parameters": parameter_count(model), "layers": layer_count(model)}
    row.update(loss_and_agreement(model, test, tokenizer, teacher))
    samples = []
    if recipe.packing:  # plain text: held-out perplexity is the metric
        return row, samples
    if recipe.task == CLASSIFICATION or recipe.label_words:
        if recipe.task == CLASSIFICATION:
            predictions = classify(model, test, tokenizer)
        else:
            predictions = score_label_words(model, test, tokenizer, recipe.label_words, recipe.use_chat_template)
        references = list(test["label"])
        row["accuracy"] = compute_metric("accuracy", predictions, references)["accuracy"]
        row["macro_f1"] = compute_metric("f1", predictions, references, average="macro")["f1"]
        for metric in recipe.metrics or []:
            row.update(metric_columns(metric, predictions, references))
    else:
        hypotheses = generate(model, test, tokenizer, recipe.eval_max_new_tokens, recipe.use_chat_template)
        references = list(test["response"] if recipe.task == CAUSAL else test["target"])
        references = [r.strip() for r in references]
        row["bleu"] = compute_metric("bleu", hypotheses, references)["bleu"]
        row["chrf"] = compute_metric("chrf", hypotheses, references)["chrf"]
        for metric in recipe.metrics or []:
            row.update(metric_columns(metric, hypotheses, references))
        sources = test["prompt"] if recipe.task == CAUSAL else test["source"]
        samples = [
            {"source": s, "reference": r, "output": h}
            for s, r, h in list(zip(sources, references, hypotheses))[: recipe.num_samples]
        ]
    return row, samples
