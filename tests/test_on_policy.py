"""On-policy distillation (lmbda): the student's own responses to the batch's prompts, scored by the teacher."""

import copy

import pytest
import torch
from datasets import Dataset

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.on_policy import is_on_policy_step, prompts_of, responses_batch

from conftest import (
    EOS,
    PAD,
    config,
    on_policy_trainer as make_trainer,
    prompt_only_dataset,
    prompt_response_dataset,
    ragged_prompts,
    record_batches,
    record_generate,
    response_of,
    tiny_t5,
    weights,
)

def test_lmbda_one_trains_on_generated_tokens(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    causal_dataset = ragged_prompts(tokenizer)
    config_before = student.generation_config.to_dict()
    calls = record_generate(student)
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, lmbda=1.0, generation_temperature=0.7)
    batches = record_batches(trainer)
    trainer.train()

    assert len(calls) == len(batches) == 2
    dataset_prompts = {tuple(p) for p in prompts_of(trainer.data_collator(list(causal_dataset)))}
    for call, (batch, counts) in zip(calls, batches):
        # Generated in eval mode without gradients, from left-padded prompts, by plain sampling.
        assert not call["training"] and not call["grad"]
        assert (call["attention_mask"].diff(dim=1) >= 0).all() and (call["attention_mask"][:, 0] == 0).any()
        settings = call["config"]
        assert settings.do_sample and settings.temperature == 0.7 and settings.max_new_tokens == 6
        assert settings.top_k == 0 and settings.pad_token_id == PAD and EOS in settings.eos_token_id
        prompt_length = call["input_ids"].shape[1]
        for row in range(batch["input_ids"].shape[0]):
            real = call["attention_mask"][row].bool()
            prompt = call["input_ids"][row][real].tolist()
            response = response_of(call["output"][row, prompt_length:].tolist())
            assert tuple(prompt) in dataset_prompts
            n = len(prompt) + len(response)
            # The batch compute_loss trains on: the prompt, masked, then exactly the generated tokens as labels.
            assert batch["input_ids"][row, :n].tolist() == prompt + response
            assert batch["labels"][row, : len(prompt)].eq(-100).all()
            assert batch["labels"][row, len(prompt) : n].tolist() == response
            assert batch["labels"][row, n:].eq(-100).all() and batch["attention_mask"][row, n:].eq(0).all()
            assert batch["attention_mask"][row, :n].eq(1).all()
        # The accumulation counts cover the generated targets.
        assert int(counts[0]) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    # The student trains again after generating, and its own generation config is untouched.
    assert student.training and student.generation_config.to_dict() == config_before
    logs = [log for log in trainer.state.log_history if "on_policy_fraction" in log]
    assert [log["on_policy_fraction"] for log in logs] == [1.0, 1.0] and all("kd_loss" in log for log in logs)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "**On policy:** lmbda=1.0" in card and "generation_temperature=0.7" in card


def test_lmbda_zero_is_todays_run(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    results = []
    for settings in ({}, {"lmbda": 0.0, "max_new_tokens": 3, "generation_temperature": 0.5}):
        model = copy.deepcopy(student)
        calls = record_generate(model)
        trainer = make_trainer(tmp_path, teacher, model, causal_dataset, tokenizer, max_steps=3, **settings)
        trainer.train()
        assert calls == []
        assert all("on_policy_fraction" not in log for log in trainer.state.log_history)
        results.append(weights(model))
    assert not torch.equal(results[0], weights(student))
    assert torch.equal(results[0], results[1])


def test_responses_stop_at_the_first_eos():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, PAD, PAD], [13, 14, 15, 16, PAD]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, 9], [-100, -100, -100, -100, -100], [13, 14, 15, 16, -100]]),
    }
    prompts = prompts_of(batch)
    # Before the first target; a prompt-only row whole; a row trained from its first token keeps that token.
    assert prompts == [[5, 6], [10, 11, 12], [13]]
    generated = torch.tensor([[20, EOS, PAD, PAD], [21, 22, 23, 24], [EOS, PAD, PAD, PAD]])
    out = responses_batch(prompts, generated, [EOS], PAD)
    assert out["input_ids"].tolist() == [[5, 6, 20, EOS, PAD, PAD, PAD], [10, 11, 12, 21, 22, 23, 24],
                                         [13, EOS, PAD, PAD, PAD, PAD, PAD]]
    assert out["labels"].tolist() == [[-100, -100, 20, EOS, -100, -100, -100], [-100, -100, -100, 21, 22, 23, 24],
                                      [-100, EOS, -100, -100, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7, [1, 1, 0, 0, 0, 0, 0]]


def test_early_eos_in_training(tmp_path, causal_pair, causal_dataset, tokenizer):
    """A row whose generation stops early (EOS, then generate's padding) has -100 and no attention after its EOS."""
    teacher, student = causal_pair

    def stop_row_zero_early(output, prompt_length):
        output = output.clone()
        output[0, prompt_length + 1] = EOS
        output[0, prompt_length + 2 :] = PAD
        return output

    calls = record_generate(student, stop_row_zero_early)
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, lmbda=1.0, max_steps=1)
    batches = record_batches(trainer)
    trainer.train()
    (batch, _), call = batches[0], calls[0]
    prompt_length = int(call["attention_mask"][0].sum())
    first = call["output"][0, call["input_ids"].shape[1]].item()
    end = prompt_length + 2  # the prompt, one token, EOS
    assert batch["labels"][0, prompt_length:end].tolist() == [first, EOS]
    assert batch["labels"][0, end:].eq(-100).all() and batch["attention_mask"][0, end:].eq(0).all()
    assert batch["input_ids"].shape[1] > end  # other rows went on to max_new_tokens


def test_prompt_only_dataset(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    dataset = prompt_only_dataset(tokenizer)
    for lmbda in (0.0, 0.5):  # the dataset's own batches need targets
        with pytest.raises(ValueError, match=r"None of the 8 rows of train_dataset has a target token.*set lmbda=1"):
            make_trainer(tmp_path, teacher, copy.deepcopy(student), dataset, tokenizer, lmbda=lmbda)
    before = weights(student)
    trainer = make_trainer(tmp_path, teacher, student, dataset, tokenizer, lmbda=1.0)
    trainer.train()
    assert not torch.equal(weights(student), before)
    assert all(log["kd_loss"] > 0 for log in trainer.state.log_history if "loss" in log)


def test_accumulation_equals_big_batch(tmp_path, causal_pair, causal_dataset, tokenizer):
    """Batch 4 equals 2 x accumulation 2 on generated responses, with near-greedy (deterministic) sampling."""
    teacher, student = causal_pair
    results, responses = [], []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = copy.deepcopy(student)
        calls = record_generate(model)
        trainer = make_trainer(
            tmp_path, teacher, model, causal_dataset.select(range(4)), tokenizer, lmbda=1.0, max_steps=1,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, optim="sgd",
            learning_rate=1.0, alpha=0.5, max_grad_norm=0.0, lr_scheduler_type="constant",
            generation_temperature=1e-4, max_new_tokens=8,
        )
        trainer.train()
        assert len(calls) == accumulation
        length = calls[0]["input_ids"].shape[1]
        responses.append([response_of(row[length:].tolist()) for call in calls for row in call["output"]])
        results.append(weights(model))
    assert responses[0] == responses[1]
    assert not torch.allclose(results[0], weights(student))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_partial_lmbda_is_decided_per_step_and_reproducible(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    expected = [is_on_policy_step(0.5, 0, step) for step in range(6)]
    assert 0 < sum(expected) < 6
    results = []
    for _ in range(2):
        model = copy.deepcopy(student)
        calls = record_generate(model)
        trainer = make_trainer(
            tmp_path, teacher, model, causal_dataset, tokenizer, lmbda=0.5, max_steps=6,
            per_device_train_batch_size=2, gradient_accumulation_steps=2,
        )
        trainer.train()
        logged = [log["on_policy_fraction"] for log in trainer.state.log_history if "on_policy_fraction" in log]
        assert logged == [float(e) for e in expected]
        assert len(calls) == 2 * sum(expected)  # both micro-batches of each on-policy step
        results.append(weights(model))
    assert torch.equal(results[0], results[1])


def test_peft_student_generates_with_its_adapters(tmp_path, causal_pair, causal_dataset, tokenizer):
    from peft import LoraConfig

    teacher, student = causal_pair
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=causal_dataset, processing_class=tokenizer,
        args=config(tmp_path, lmbda=1.0, max_steps=2, max_new_tokens=4, per_device_train_batch_size=4),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    calls = record_generate(trainer.model)  # the PeftModel: generation runs through the adapters
    trainer.train()
    assert len(calls) == 2 and trainer.model.training


# ---- bad settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"lmbda": 1.5}, r"lmbda=1\.5 must lie in \[0, 1\]"),
    ({"lmbda": -0.1}, r"lmbda=-0\.1 must lie in \[0, 1\]"),
    ({"lmbda": "half"}, r"lmbda='half' must be a number"),
    ({"generation_temperature": 0.0}, r"generation_temperature=0\.0 must be a finite number > 0"),
    ({"generation_temperature": float("nan")}, r"generation_temperature=nan must be a finite number > 0"),
    ({"max_new_tokens": 0}, r"max_new_tokens=0 must be a whole number >= 1"),
])
def test_bad_settings(tmp_path, settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)


def test_refused_combinations(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    with pytest.raises(ValueError, match=r"lmbda=0\.5 .*causal LMs; this student is a seq2seq model\. Set lmbda=0"):
        DistillationTrainer(model=tiny_t5(len(tokenizer), 32, 1, seed=1), teacher_model=tiny_t5(len(tokenizer), 32, 1, seed=0),
                            args=config(tmp_path, lmbda=0.5), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"lmbda=1\.0 needs the teacher live.*Drop teacher_cache"):
        DistillationTrainer(model=student, args=config(tmp_path, lmbda=1.0, teacher_cache=str(tmp_path / "cache")),
                            train_dataset=causal_dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"lmbda=0\.5 needs the student's tokenizer.*processing_class=tokenizer"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, lmbda=0.5),
                            train_dataset=causal_dataset, data_collator=lambda rows: rows)


def test_resume_equals_the_uninterrupted_run(tmp_path, causal_pair, tokenizer):
    """Decisions and samples depend on (seed, step) only: a resumed run repeats the uninterrupted one's."""
    from conftest import assert_same_logs, logs_after, other_student, run_with_checkpoints, with_dropout

    teacher, student = causal_pair
    dataset = prompt_response_dataset(tokenizer, n=12)
    settings = dict(lmbda=0.5, max_new_tokens=6, alpha=1.0)
    assert [is_on_policy_step(0.5, 0, step) for step in range(7)] == [False, False, True, True, True, True, True]
    reference = run_with_checkpoints(tmp_path, "uninterrupted", teacher, with_dropout(student), dataset, tokenizer, **settings)
    checkpoint = str(tmp_path / "uninterrupted" / "checkpoint-4")
    resumed = run_with_checkpoints(tmp_path, "resumed", teacher, other_student(tokenizer), dataset, tokenizer, resume=checkpoint, **settings)
    assert_same_logs(logs_after(resumed, 4), logs_after(reference, 4))
    fractions = [[log["on_policy_fraction"] for log in trainer.state.log_history if log["step"] > 4 and "loss" in log]
                 for trainer in (reference, resumed)]
    assert fractions[0] == fractions[1] == [1.0]
    torch.testing.assert_close(weights(resumed.model), weights(reference.model), rtol=1e-5, atol=1e-6)


def test_responses_fit_the_models_positions(tmp_path, tokenizer):
    """Generation stops where prompt + response would outgrow max_position_embeddings."""
    from hf_distill.runner.scratch import small_llama

    teacher = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=0, max_position_embeddings=16)
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1, max_position_embeddings=64)
    prompts = [list(range(5, 15)), [5, 6, 7, 8]]
    dataset = Dataset.from_dict({"input_ids": prompts, "labels": [[-100] * len(p) for p in prompts]})
    trainer = make_trainer(tmp_path, teacher, student, dataset, tokenizer, lmbda=1.0, max_new_tokens=20, max_steps=1)
    batches = record_batches(trainer)
    trainer.train()
    assert batches[0][0]["input_ids"].shape[1] <= 16


def test_command_line_names():
    """On a command line, max_new_tokens is the on-policy length; the metrics' length is eval_max_new_tokens."""
    from conftest import REPO
    from hf_distill.runner.cli import UsageError, parse_recipe

    recipe = str(REPO / "recipes" / "translation_causal.yaml")
    args, config = parse_recipe(recipe, ["--use_cpu", "true", "--lmbda", "0.5", "--max_new_tokens", "32",
                                         "--generation_temperature", "0.8"])
    assert (config.lmbda, config.max_new_tokens, config.generation_temperature) == (0.5, 32, 0.8)
    assert args.eval_max_new_tokens == 128  # from the recipe
    with pytest.raises(UsageError, match=r"does not use --max_new_tokens \(.*--eval_max_new_tokens\)"):
        parse_recipe(recipe, ["--max_new_tokens", "4"], command="eval")
