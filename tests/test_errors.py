"""Bad input is refused before the first step, with a message that says what was given and how to fix it."""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from hf_distill import DistillationTrainer
from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer

from conftest import config, english_lines, make_trainer, spanish_lines, tiny_classifier, tiny_t5


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("loss_type", "kl_div", "loss_type='kl_div'"),
        ("alpha", 1.5, "alpha=1.5"),
        ("alpha", -0.1, "alpha=-0.1"),
        ("beta", 1.2, "beta=1.2"),
        ("skew", -0.5, "skew=-0.5"),
        ("temperature", 0.0, "temperature=0.0"),
        ("temperature", -1.0, "temperature=-1.0"),
        ("chunk_size", 0, "chunk_size=0"),
        ("teacher_model_init_kwargs", "{dtype: bf16", "not valid JSON"),
    ],
)
def test_bad_settings(tmp_path, field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        config(tmp_path, **{field: value})


def test_init_kwargs_json_string(tmp_path):
    args = config(tmp_path, teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}


def test_plain_training_arguments_refused(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=TrainingArguments(output_dir=str(tmp_path)),
            train_dataset=causal_dataset, processing_class=tokenizer,
        )


def test_missing_teacher(tmp_path, causal_pair, causal_dataset, tokenizer):
    _, student = causal_pair
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=student, args=config(tmp_path), train_dataset=causal_dataset, processing_class=tokenizer)


def test_causal_teacher_with_seq2seq_student(tmp_path, causal_pair, tokenizer):
    teacher, _ = causal_pair
    student = tiny_t5(len(tokenizer), 32, 1, seed=0)
    with pytest.raises(ValueError, match=r"teacher is a causal model \(LlamaForCausalLM\).*student is a seq2seq model"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path), processing_class=tokenizer)


def test_classifier_teacher_with_causal_student(tmp_path, causal_pair, tokenizer):
    _, student = causal_pair
    teacher = tiny_classifier(len(tokenizer), 32, 1, seed=0)
    with pytest.raises(ValueError, match="classification model"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path), processing_class=tokenizer)


def test_classifier_label_count_mismatch(tmp_path, tokenizer):
    teacher = tiny_classifier(len(tokenizer), 32, 1, seed=0, num_labels=3)
    student = tiny_classifier(len(tokenizer), 32, 1, seed=1, num_labels=2)
    with pytest.raises(ValueError, match="predicts 3 classes.*predicts 2"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path), processing_class=tokenizer)


def test_mismatched_tokenizers(tmp_path, causal_dataset, tokenizer):
    other = train_bpe_tokenizer(spanish_lines(300), vocab_size=len(tokenizer))
    other.name_or_path = "spanish-bpe"
    tokenizer.name_or_path = "english-bpe"
    teacher, student = small_llama(len(other), seed=0), small_llama(len(tokenizer), seed=1)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    other.save_pretrained(teacher_dir)
    with pytest.raises(ValueError, match=r"teacher tokenizer .* and the student tokenizer \('english-bpe'.*differ: id \d+ is"):
        DistillationTrainer(
            model=student, teacher_model=str(teacher_dir), args=config(tmp_path),
            train_dataset=causal_dataset, processing_class=tokenizer,
        )


def test_padded_teacher_vocabulary_compares_shared_rows(tmp_path, causal_dataset, tokenizer):
    """A teacher with extra padding rows (Qwen's 151,936 vs 152,064) distills over the shared rows."""
    teacher = small_llama(len(tokenizer) + 64, seed=0)
    student = small_llama(len(tokenizer), seed=1)
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, max_steps=2, alpha=1.0)
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss"] > 0


def test_empty_dataset(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    empty = Dataset.from_dict({"input_ids": [], "labels": []})
    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(tmp_path, teacher, student, empty, tokenizer)


def test_untokenized_dataset(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    raw = Dataset.from_dict({"text": english_lines(4)})
    with pytest.raises(ValueError, match=r"columns \['text'\] but no 'input_ids'"):
        make_trainer(tmp_path, teacher, student, raw, tokenizer)


def test_prompt_only_dataset(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100] * 3, [-100, -100]]})
    with pytest.raises(ValueError, match="None of the 2 rows of train_dataset has a target token"):
        make_trainer(tmp_path, teacher, student, rows, tokenizer)


def test_some_prompt_only_rows_warn(tmp_path, causal_pair, tokenizer, caplog):
    teacher, student = causal_pair
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9, 10]], "labels": [[-100] * 3, [-100, 9, 10]]})
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path, teacher, student, rows, tokenizer)
    assert "1 of 2 rows of train_dataset have no target token" in caplog.text


def test_prompt_only_batch_is_skipped(tmp_path, causal_pair, tokenizer, caplog):
    """A step whose rows have no target leaves the student unchanged (warned), instead of a silent 0 or NaN."""
    teacher, student = causal_pair
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7]] * 4 + [[8, 9, 10]] * 4, "labels": [[-100] * 3] * 4 + [[-100, 9, 10]] * 4})
    trainer = make_trainer(
        tmp_path, teacher, student, rows, tokenizer, per_device_train_batch_size=4, max_steps=1, optim="sgd",
        learning_rate=1.0, max_grad_norm=0.0, train_sampling_strategy="sequential",  # prompt-only rows first
    )
    before = [p.detach().clone() for p in student.parameters()]
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "has no target token" in caplog.text and "skipped" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert trainer.state.log_history[0]["loss"] == 0.0


def test_nan_teacher_stops_training(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    with torch.no_grad():
        teacher.get_output_embeddings().weight[3, 0] = float("nan")
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, max_steps=2)
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(FloatingPointError, match="distillation term"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_seq2seq_without_labels(tmp_path, tokenizer):
    teacher, student = tiny_t5(len(tokenizer), 32, 1, seed=0), tiny_t5(len(tokenizer), 32, 1, seed=1)
    dataset = Dataset.from_dict(tokenizer(english_lines(4)))
    with pytest.raises(ValueError, match="no 'labels'"):
        make_trainer(tmp_path, teacher, student, dataset, tokenizer)
