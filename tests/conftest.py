"""Tiny models, tokenizers, datasets and trainers built offline from configs, shared by the tests."""

import json
import os
from pathlib import Path

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForSequenceClassification, T5Config, T5ForConditionalGeneration  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.runner.scratch import small_llama  # noqa: E402


EOS, PAD = 2, 0  # train_bpe_tokenizer's ids
REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "recipes" / "data" / "bible_en_es.jsonl")
# Overrides that make a recipe run in seconds on the CPU.
FAST = ["--max_steps", "2", "--held_out_size", "8", "--eval_max_new_tokens", "4", "--per_device_train_batch_size", "4",
        "--eval_strategy", "no", "--bf16", "false", "--use_cpu", "true", "--logging_steps", "1",
        "--gradient_accumulation_steps", "1", "--report_to", "none", "--dataloader_pin_memory", "false"]


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
    teacher = sharpen(small_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0))
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    return teacher, student


@pytest.fixture
def cut_pair(tokenizer):
    """A 4-layer teacher and a student cut from its layers 0 and 3, then moved away from them."""
    from hf_distill.modeling import student_from_teacher

    teacher = sharpen(small_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=3), 5.0)
    student = student_from_teacher(teacher, [0, 3])
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for parameter in student.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=gen))
    return teacher, student


def one_step_two_ways(tmp_path, teacher, student, tokenizer, **settings):
    """The student's weights after one SGD step on 8 rows: as one batch of 8, and as 2 accumulated batches of 4."""
    import copy

    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = copy.deepcopy(student)
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, train_dataset=prompt_response_dataset(tokenizer, n=8),
            processing_class=tokenizer,
            args=config(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                        max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                        **settings),
        )
        trainer.train()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert not torch.allclose(results[0], before)
    return results


def prompt_response_dataset(tokenizer, n: int = 32, max_length: int = 40):
    """Ragged rows: an English prompt masked with -100, then its Spanish response as the target."""
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


# ---- tiny models ------------------------------------------------------------------------------


def tiny_t5(vocab_size, d_model, layers, seed):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=16, num_heads=2, num_layers=layers,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, dropout_rate=0.0,
        )
    )


def tiny_classifier(vocab_size, hidden, layers, seed, num_labels=3):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels, pad_token_id=0,
        )
    )


@pytest.fixture(scope="module")
def causal_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    teacher = sharpen(small_llama(len(tokenizer), hidden_size=48, num_layers=2, seed=0), 5.0)
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def saved_classifiers(tmp_path, tokenizer):
    """(teacher folder, student folder) of two tiny binary classifiers; the teacher's holds the tokenizer."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    sharpen(tiny_classifier(len(tokenizer), 32, 1, seed=0, num_labels=2), 5.0).save_pretrained(teacher_dir)
    tiny_classifier(len(tokenizer), 16, 1, seed=1, num_labels=2).save_pretrained(student_dir)
    tokenizer.save_pretrained(teacher_dir)
    return teacher_dir, student_dir


# ---- trainers ---------------------------------------------------------------------------------


def config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_pin_memory=False,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
    )
    settings.update(overrides)
    return DistillationConfig(**settings)


def make_trainer(tmp_path, teacher, student, dataset, tokenizer, **overrides):
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **overrides),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )


def on_policy_trainer(tmp_path, teacher, student, dataset, tokenizer, **overrides):
    settings = dict(per_device_train_batch_size=4, max_steps=2, max_new_tokens=6, alpha=1.0)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **(settings | overrides)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def record_generate(model, rewrite=None):
    """Wrap `model.generate` to record each call (mode, grad, config, inputs) and what it returned."""
    calls = []
    original = model.generate

    def generate(*args, **kwargs):
        output = original(*args, **kwargs)
        if rewrite is not None:
            output = rewrite(output, kwargs["input_ids"].shape[1])
        calls.append({
            "training": model.training, "grad": torch.is_grad_enabled(), "config": kwargs["generation_config"],
            "input_ids": kwargs["input_ids"].clone(), "attention_mask": kwargs["attention_mask"].clone(),
            "output": output.clone(),
        })
        return output

    model.generate = generate
    return calls


def record_batches(trainer):
    """Wrap `trainer.compute_loss` to record the training batches it receives, with their target counts."""
    batches = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            batches.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = compute_loss
    return batches


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def response_of(tokens):
    """Generated tokens up to and including the first EOS."""
    tokens = list(tokens)
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def ragged_prompts(tokenizer, n=16):
    """Prompt-response rows whose prompts have 3 to 10 tokens."""
    rows = prompt_response_dataset(tokenizer, n=n)
    input_ids, labels = [], []
    for i, (ids, row_labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
        prompt, response = ids[: 3 + i % 8], ids[row_labels.count(-100) :]
        input_ids.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def prompt_only_dataset(tokenizer, n=8):
    rows = prompt_response_dataset(tokenizer, n=n)
    prompts = [ids[: labels.count(-100)] for ids, labels in zip(rows["input_ids"], rows["labels"])]
    return Dataset.from_dict({"input_ids": prompts, "labels": [[-100] * len(p) for p in prompts]})


# ---- resuming ---------------------------------------------------------------------------------


LOGGED = ("loss", "kd_loss", "ce_loss", "hidden_loss", "grad_norm", "learning_rate")


def with_dropout(model, p=0.2):
    """Attention dropout draws from the torch RNG at every step, so equal runs need its state restored too."""
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return model


def other_student(tokenizer):
    """Other weights than the original student's: resuming must load the checkpoint's."""
    return with_dropout(small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=7))


def logs_after(trainer, step):
    return [{key: log[key] for key in ("step", *LOGGED) if key in log}
            for log in trainer.state.log_history if log["step"] > step and "loss" in log]


def assert_same_logs(resumed, reference):
    assert len(resumed) == len(reference) > 0
    for got, expected in zip(resumed, reference):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (expected["step"], key)


def run_with_checkpoints(tmp_path, name, teacher, student, dataset, tokenizer, resume=None, **overrides):
    """7 steps over 12 rows in batches of 4 (3 steps an epoch): checkpoints at 2, 4, 6, logs at 3 and 6."""
    settings = dict(
        output_dir=str(tmp_path / name), max_steps=7, save_strategy="steps", save_steps=2, logging_steps=3,
        per_device_train_batch_size=4, learning_rate=1e-2, alpha=0.5, temperature=2.0, warmup_steps=2,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, **(settings | overrides)), train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# ---- a user's own metric -----------------------------------------------------------------------------------


ERROR_RATE_SCRIPT = """\
import datasets
import evaluate


class ErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions that differ from their reference.",
            citation="",
            inputs_description="predictions, references: lists of class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"error_rate": sum(p != r for p, r in zip(predictions, references)) / len(references), "note": "text"}
"""


def error_rate_script(folder) -> str:
    """An `evaluate` metric script in `folder` (one import a line: evaluate's dependency scan reads them so)."""
    path = Path(folder) / "error_rate.py"
    path.write_text(ERROR_RATE_SCRIPT, encoding="utf-8")
    return str(path)
