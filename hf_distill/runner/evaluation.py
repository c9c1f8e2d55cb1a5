"""Scoring a model on a recipe's test split: held-out loss, task metrics, agreement with the teacher, latency."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..data import default_collator
from ..losses import cross_entropy_per_position
from ..modeling import CAUSAL, CLASSIFICATION, SEQ2SEQ, _unwrap, model_kind


def parameter_count(model) -> int:
    return sum(p.numel() for p in _unwrap(model).parameters())


def _device(model) -> torch.device:
    return next(_unwrap(model).parameters()).device


def _batches(dataset, collator, batch_size, device):
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        yield {k: v.to(device) for k, v in collator([{c: row[c] for c in columns} for row in rows]).items()}


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_inputs(model, batch):
    """The batch less its labels; a seq2seq decoder gets its own right-shifted labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if model_kind(model) == SEQ2SEQ:
        inputs["decoder_input_ids"] = _unwrap(model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return inputs


def _aligned(kind, logits, labels):
    """(logits, targets) of the target positions, causal shifted by one."""
    if kind == CAUSAL:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    return logits[mask], labels[mask]


@torch.no_grad()
def loss_and_agreement(model, test, tokenizer, teacher=None, batch_size: int = 8) -> dict[str, float]:
    """Mean CE over target tokens, top-1 agreement with the teacher on those tokens, and forward latency."""
    kind = model_kind(model)
    collator = default_collator(kind, tokenizer)
    model.eval()
    total_ce = total_tokens = agree = 0.0
    seconds = 0.0
    device = _device(model)
    if teacher is not None:
        teacher.to(device)
    model(**_model_inputs(model, next(_batches(test, collator, batch_size, device))))  # warm-up: steady-state latency
    for batch in _batches(test, collator, batch_size, device):
        inputs = _model_inputs(model, batch)
        _synchronize(device)
        start = time.perf_counter()
        logits = model(**inputs).logits
        _synchronize(device)
        seconds += time.perf_counter() - start
        student, targets = _aligned(kind, logits, batch["labels"])
        total_ce += cross_entropy_per_position(student, targets).sum().item()
        total_tokens += targets.numel()
        if teacher is not None:
            teacher_logits, _ = _aligned(kind, teacher(**_model_inputs(teacher, batch)).logits, batch["labels"])
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
    collator = default_collator(CLASSIFICATION, tokenizer)
    predictions = []
    for batch in _batches(test, collator, batch_size, _device(model)):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        predictions += model(**inputs).logits.argmax(-1).tolist()
    return predictions


@torch.no_grad()
def score_label_words(model, test, tokenizer, label_words: list[str], use_chat_template: bool) -> list[int]:
    """For a causal LM: the label whose word the model finds most likely after each prompt."""
    from .tasks import prompt_ids

    words = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in label_words]
    predictions = []
    for row in test:
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
    from .tasks import prompt_ids

    kind = model_kind(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(test), batch_size):
        rows = test.select(range(start, min(start + batch_size, len(test))))
        if kind == CAUSAL:
            prompts = [prompt_ids(tokenizer, row["prompt"], use_chat_template) for row in rows]
            length = max(len(p) for p in prompts)  # left padding, so every answer starts at the same column
            input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])
            attention = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
        else:
            encoded = tokenizer([row["source"] for row in rows], return_tensors="pt", padding=True)
            input_ids, attention = encoded["input_ids"], encoded["attention_mask"]
        generated = model.generate(
            input_ids=input_ids.to(_device(model)), attention_mask=attention.to(_device(model)), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        if kind == CAUSAL:
            generated = generated[:, input_ids.shape[1]:]
        outputs += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return outputs


def evaluate_model(name, model, test, tokenizer, recipe, teacher=None) -> tuple[dict, list[dict]]:
    """One row of the comparison table, and generated samples (translation)."""
    from .metrics import load_metric

    row = {"model": name, "parameters": parameter_count(model)}
    row.update(loss_and_agreement(model, test, tokenizer, teacher))
    samples = []
    if recipe.task == CLASSIFICATION or recipe.label_words:
        if recipe.task == CLASSIFICATION:
            predictions = classify(model, test, tokenizer)
        else:
            predictions = score_label_words(model, test, tokenizer, recipe.label_words, recipe.use_chat_template)
        references = list(test["label"])
        row["accuracy"] = load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
        row["macro_f1"] = load_metric("f1").compute(predictions=predictions, references=references, average="macro")["f1"]
    else:
        hypotheses = generate(model, test, tokenizer, recipe.max_new_tokens, recipe.use_chat_template)
        references = list(test["response"] if recipe.task == CAUSAL else test["target"])
        references = [r.strip() for r in references]
        row["bleu"] = load_metric("bleu").compute(predictions=hypotheses, references=references)["bleu"]
        row["chrf"] = load_metric("chrf").compute(predictions=hypotheses, references=references)["chrf"]
        sources = test["prompt"] if recipe.task == CAUSAL else test["source"]
        samples = [
            {"source": s, "reference": r, "output": h}
            for s, r, h in list(zip(sources, references, hypotheses))[: recipe.num_samples]
        ]
    return row, samples
