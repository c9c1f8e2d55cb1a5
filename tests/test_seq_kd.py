"""Sequence-level distillation (seq_kd): the teacher answers the batch's prompts and the student trains on that."""

import copy
import json

import pytest
import torch

from hf_distill import DistillationTrainer
from hf_distill.on_policy import is_on_policy_step

from conftest import (
    EOS,
    config,
    on_policy_trainer as make_trainer,
    prompt_only_dataset,
    ragged_prompts,
    record_batches,
    record_generate,
    response_of,
    tiny_classifier,
    tiny_t5,
    weights,
)


def test_seq_kd_trains_on_the_teachers_greedy_tokens(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    dataset = ragged_prompts(tokenizer)
    teacher_calls, student_calls = record_generate(teacher), record_generate(student)
    trainer = make_trainer(tmp_path, teacher, student, dataset, tokenizer, seq_kd=True, alpha=0.5, max_new_tokens=6)
    batches = record_batches(trainer)
    trainer.train()

    assert student_calls == [] and len(teacher_calls) == len(batches) == 2
    for call, (batch, counts) in zip(teacher_calls, batches):
        assert not call["training"] and not call["grad"]
        assert not call["config"].do_sample and call["config"].max_new_tokens == 6 and EOS in call["config"].eos_token_id
        width = call["input_ids"].shape[1]
        for row in range(batch["input_ids"].shape[0]):
            prompt = call["input_ids"][row][call["attention_mask"][row].bool()].tolist()
            response = response_of(call["output"][row, width:].tolist())
            n = len(prompt) + len(response)
            # Exactly the teacher's tokens are the labels; the prompt is masked.
            assert batch["input_ids"][row, :n].tolist() == prompt + response
            assert batch["labels"][row, : len(prompt)].eq(-100).all() and batch["labels"][row, n:].eq(-100).all()
            assert batch["labels"][row, len(prompt) : n].tolist() == response
            # Greedy: the first response token is the teacher's argmax after the prompt.
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([prompt])).logits[0, -1]
            assert response[0] == int(logits.argmax())
        # CE and KD counts cover the teacher's tokens.
        assert int(counts[0]) == int(counts[1]) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["ce_loss"] > 0 and log["kd_loss"] > 0 for log in logs)
    assert all("on_policy_fraction" not in log for log in logs) and teacher.training is False
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "seq_kd: trained on the teacher's greedy responses" in card


def test_prompt_only_dataset_trains_with_seq_kd(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    dataset = prompt_only_dataset(tokenizer)
    with pytest.raises(ValueError, match=r"None of the 8 rows .*or seq_kd=True"):
        make_trainer(tmp_path, teacher, copy.deepcopy(student), dataset, tokenizer)
    before = weights(student)
    trainer = make_trainer(tmp_path, teacher, student, dataset, tokenizer, seq_kd=True, alpha=0.5)
    trainer.train()
    assert not torch.equal(weights(student), before)
    assert all(log["ce_loss"] > 0 for log in trainer.state.log_history if "loss" in log)


def test_seq_kd_with_lmbda_and_sampling(tmp_path, causal_pair, causal_dataset, tokenizer):
    """On-policy steps answer with the student, the others with the teacher (sampled here at generation_temperature)."""
    teacher, student = causal_pair
    on_policy = [is_on_policy_step(0.5, 0, step) for step in range(4)]
    assert on_policy == [False, False, True, True]
    teacher_calls, student_calls = record_generate(teacher), record_generate(student)
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, seq_kd=True, lmbda=0.5, max_steps=4,
                           seq_kd_sampling=True, generation_temperature=0.7, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)
    batches = record_batches(trainer)
    trainer.train()
    assert len(teacher_calls) == len(student_calls) == 4  # two micro-batches per step
    assert all(call["config"].do_sample and call["config"].temperature == 0.7 for call in teacher_calls + student_calls)
    # Steps 0-1 train on the teacher's responses, steps 2-3 on the student's: every batch is a generated one.
    generated = [call["output"] for call in teacher_calls + student_calls]
    for (batch, _), output in zip(batches, generated):
        assert batch["input_ids"].shape[0] == output.shape[0]
    assert [log["on_policy_fraction"] for log in trainer.state.log_history if "loss" in log] == [0.0, 0.0, 1.0, 1.0]


def test_seq2seq_trains_on_the_teachers_decoder_tokens(tmp_path, tokenizer):
    """A seq2seq teacher writes the target of each source: its generated decoder tokens become the labels."""
    from datasets import Dataset

    from conftest import english_lines, sharpen

    teacher, student = sharpen(tiny_t5(len(tokenizer), 64, 2, seed=0), 5.0), tiny_t5(len(tokenizer), 32, 1, seed=1)
    sources = tokenizer(english_lines(8), truncation=True, max_length=16)
    dataset = Dataset.from_dict(dict(sources))  # sources only: seq_kd writes the targets
    calls = record_generate(teacher)
    trainer = make_trainer(tmp_path, teacher, student, dataset, tokenizer, seq_kd=True, alpha=0.5, max_new_tokens=5)
    batches = record_batches(trainer)
    before = weights(student)
    trainer.train()
    assert len(calls) == len(batches) == 2
    for call, (batch, counts) in zip(calls, batches):
        assert not call["training"] and not call["grad"] and not call["config"].do_sample
        assert torch.equal(batch["input_ids"], call["input_ids"])  # the encoder reads the source as given
        for row, output in enumerate(call["output"].tolist()):
            expected = response_of(output[1:])  # after the decoder start token, up to the first EOS
            labels = batch["labels"][row].tolist()
            assert labels[: len(expected)] == expected and all(label == -100 for label in labels[len(expected) :])
        assert int(counts[0]) == int(counts[1]) == int((batch["labels"] != -100).sum()) > 0
    assert not torch.equal(weights(student), before)
    assert all(log["ce_loss"] > 0 and log["kd_loss"] > 0 for log in trainer.state.log_history if "loss" in log)


def test_seq_kd_refusals(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    with pytest.raises(ValueError, match=r"seq_kd=True trains on the teacher's generated responses, which works with "
                       r"causal LMs and seq2seq models; this student is a classification model\. Set seq_kd=False"):
        DistillationTrainer(model=tiny_classifier(len(tokenizer), 32, 1, seed=1),
                            teacher_model=tiny_classifier(len(tokenizer), 32, 1, seed=0),
                            args=config(tmp_path, seq_kd=True), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"lmbda=0\.5 with seq_kd=True trains on the student's and the teacher's generated "
                       r"responses, which works with causal LMs; this student is a seq2seq model"):
        DistillationTrainer(model=tiny_t5(len(tokenizer), 32, 1, seed=1), teacher_model=tiny_t5(len(tokenizer), 32, 1, seed=0),
                            args=config(tmp_path, seq_kd=True, lmbda=0.5), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"seq_kd=True needs the teacher live.*Drop teacher_cache, or set seq_kd=False"):
        DistillationTrainer(model=student, args=config(tmp_path, seq_kd=True, teacher_cache=str(tmp_path / "cache")),
                            train_dataset=causal_dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"seq_kd=True needs the student's tokenizer.*processing_class=tokenizer"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, seq_kd=True),
                            train_dataset=causal_dataset, data_collator=lambda rows: rows)
    with pytest.raises(ValueError, match=r"seq_kd=True trains on one teacher's responses, but 2 teachers"):
        DistillationTrainer(model=student, teacher_model=[teacher, copy.deepcopy(teacher)], args=config(tmp_path, seq_kd=True),
                            train_dataset=causal_dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"lmbda=0\.5 with seq_kd=True needs the teacher live.*set lmbda=0 and seq_kd=False"):
        DistillationTrainer(model=student, args=config(tmp_path, seq_kd=True, lmbda=0.5, teacher_cache=str(tmp_path / "c")),
                            train_dataset=causal_dataset, processing_class=tokenizer)


# ---- offline: hf-distill generate-targets, then train on the teacher's responses --------------------------------


def test_generate_targets_then_train(tmp_path, causal_dirs, capsys):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from conftest import REPO
    from hf_distill.runner.cli import main
    from hf_distill.runner.recipe import prepare_splits
    from conftest import DATA, FAST

    recipe = str(REPO / "recipes" / "translation_causal_seq_kd.yaml")
    common = ["--teacher_model_name_or_path", str(causal_dirs / "teacher"), "--teacher_model_init_kwargs", "{}",
              "--student_model_name_or_path", str(causal_dirs / "student"), "--max_length", "48"]
    targets = tmp_path / "targets"
    assert main(["generate-targets", recipe, *common, "--dataset_name", DATA, "--max_train_samples", "12",
                 "--held_out_size", "8", "--max_new_tokens", "5", "--output_dir", str(targets)]) == 0
    assert f"--dataset_name {targets}" in capsys.readouterr().out
    data = load_from_disk(str(targets))
    assert {name: len(split) for name, split in data.items()} == {"train": 12, "eval": 8, "test": 8}
    assert data["train"].column_names == ["prompt", "response"]

    # Each response is the teacher's greedy answer to the row's prompt, as training would tokenize it.
    from hf_distill.runner.cli import parse_recipe

    args, _ = parse_recipe(recipe, [*common, "--dataset_name", DATA, "--max_train_samples", "12", "--held_out_size", "8",
                                    "--use_cpu", "true"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(causal_dirs / "teacher")
    train = prepare_splits(args, tokenizer, seed=42)[0]["train"]
    teacher = AutoModelForCausalLM.from_pretrained(causal_dirs / "teacher").eval()
    for row in (0, 7):
        prompt = train[row]["input_ids"][: train[row]["labels"].count(-100)]
        with torch.no_grad():
            output = teacher.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)
        assert data["train"][row] == {"prompt": train[row]["prompt"], "response": expected}
    assert data["test"]["response"] == prepare_splits(args, tokenizer, seed=42)[0]["test"]["response"]  # references

    # Train on them: the recipe reads the folder's prompt/response columns and its held-out splits.
    out = tmp_path / "run"
    assert main(["train", recipe, *common, "--dataset_name", str(targets), "--eval_split", "eval", "--test_split", "test",
                 "--seq_kd", "false", "--output_dir", str(out), *FAST]) == 0
    samples = json.loads((out / "samples.json").read_text())
    assert samples["labeled_rows"]["of"] == 12 and 0 < samples["labeled_rows"]["train"] <= 12
    assert [row["model"] for row in json.loads((out / "report.json").read_text())["rows"]][:2] == ["teacher", "distilled"]

    # The recipe as written: the teacher answers during training; the baseline (no teacher) trains on the data.
    out = tmp_path / "online"
    assert main(["train", recipe, *common, "--dataset_name", DATA, "--max_train_samples", "12", "--max_new_tokens", "4",
                 "--output_dir", str(out), *FAST]) == 0
    assert "seq_kd: trained on the teacher's greedy responses" in (out / "README.md").read_text()


def test_generate_targets_errors_are_one_line(tmp_path, capsys):
    from conftest import REPO
    from hf_distill.runner.cli import main

    recipe = str(REPO / "recipes" / "translation_causal_seq_kd.yaml")
    assert main(["generate-targets", recipe]) == 2
    assert "needs --output_dir" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["generate-targets", recipe, "--output_dir", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not empty" in err
    assert main(["generate-targets", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--output_dir" in text and "--max_new_tokens" in text and "--seq_kd_sampling" in text
    assert "--learning_rate" not in text
