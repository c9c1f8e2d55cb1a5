"""DistillationTrainer end to end on tiny models: alignment, normalization, teacher handling, kinds, PEFT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_distill import DistillationTrainer, distillation_loss

from conftest import (
    config,
    english_lines,
    make_trainer,
    prompt_response_dataset,
    sharpen,
    spanish_lines,
    tiny_classifier,
    tiny_t5,
)


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


# ---- alignment and the blend --------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_causal_loss_matches_reference(tmp_path, causal_pair, causal_dataset, tokenizer, chunked):
    """alpha=1 is the divergence of shifted logits on response tokens; alpha=0 is the model's own LM loss."""
    teacher, student = causal_pair
    for alpha in (0.0, 0.3, 1.0):
        trainer = make_trainer(
            tmp_path, teacher, student, causal_dataset, tokenizer,
            alpha=alpha, temperature=2.0, loss_type="reverse_kl", chunked_loss=chunked,
        )
        batch = first_batch(trainer)
        student.eval()  # no dropout anyway; keep the comparison deterministic
        with torch.no_grad():
            loss = trainer.compute_loss(student, batch)
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            own = student(**batch).loss  # transformers' own shifted cross-entropy
        shifted = batch["labels"][:, 1:]
        kd = distillation_loss(
            s_logits[:, :-1], t_logits[:, :-1], shifted, loss_type="reverse_kl", temperature=2.0
        )
        expected = alpha * kd + (1 - alpha) * own
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (alpha, loss, expected)
        assert trainer._use_chunks.get("student", False) is chunked


def test_distill_all_tokens_includes_prompt(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, alpha=1.0, distill_all_tokens=True)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"][:, 1:].clone()
    kd_labels = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    expected = distillation_loss(s_logits[:, :-1], t_logits[:, :-1], kd_labels, loss_type="forward_kl")
    assert torch.allclose(loss, expected, rtol=1e-5)
    prompt_only = distillation_loss(s_logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:], loss_type="forward_kl")
    assert not torch.allclose(loss, prompt_only, rtol=1e-3)


@pytest.mark.parametrize("distill_all_tokens", [False, True])
@pytest.mark.parametrize("chunked", [True, False])
def test_gradient_accumulation_equals_big_batch(tmp_path, causal_pair, tokenizer, chunked, distill_all_tokens):
    """One step of batch 8 gives the same update as batch 4 x accumulation 2 on ragged, padded rows."""
    teacher, student = causal_pair
    dataset = prompt_response_dataset(tokenizer, n=8)
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = copy.deepcopy(student)
        trainer = make_trainer(
            tmp_path, teacher, model, dataset, tokenizer,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, optim="sgd", learning_rate=1.0, alpha=0.5, temperature=2.0,
            chunked_loss=chunked, distill_all_tokens=distill_all_tokens, max_grad_norm=0.0,
            lr_scheduler_type="constant",
        )
        trainer.train()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    before = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert not torch.allclose(results[0], before)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# ---- training runs -------------------------------------------------------------------------------


def test_causal_training_moves_student_toward_teacher(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(
        tmp_path, teacher, student, causal_dataset, tokenizer, alpha=0.8, max_steps=30, learning_rate=3e-3
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_kd_loss"] < 0.8 * before["eval_kd_loss"]
    assert after["eval_loss"] < before["eval_loss"]
    train_logs = [log for log in trainer.state.log_history if "kd_loss" in log and "eval_kd_loss" not in log]
    assert len(train_logs) == 30 and all("ce_loss" in log for log in train_logs)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    # The teacher never trains and is never saved.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in student.parameters())
    assert reloaded.config.hidden_size == student.config.hidden_size


def test_alpha_zero_does_not_run_teacher(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, alpha=0.0, max_steps=2)
    trainer.train()
    assert calls == []
    assert all("kd_loss" not in log for log in trainer.state.log_history)
    metrics = trainer.evaluate()  # evaluation still compares with the teacher
    assert calls and "eval_kd_loss" in metrics


def test_alpha_schedule_moves_the_blend_step_by_step(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, alpha=1.0, alpha_end=0.0, max_steps=5)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert [log["alpha"] for log in logs] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    for log in logs:  # each step's loss is its own blend of the two logged terms
        blend = log["alpha"] * log["kd_loss"] + (1 - log["alpha"]) * log["ce_loss"]
        assert log["loss"] == pytest.approx(blend, rel=2e-3, abs=2e-3)
    trainer.create_model_card()
    assert "**Alpha:** 1.0 → 0.0, linearly over the steps" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_alpha_zero_warming_up_runs_the_teacher(tmp_path, causal_pair, causal_dataset, tokenizer):
    teacher, student = causal_pair
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, alpha=0.0, alpha_end=0.5, max_steps=2)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert calls and [log["alpha"] for log in logs] == pytest.approx([0.0, 0.5])
    assert logs[0]["loss"] == pytest.approx(logs[0]["ce_loss"], rel=2e-3)  # step 1 at alpha 0: the CE alone


def test_seq2seq_distillation(tmp_path, tokenizer):
    teacher = sharpen(tiny_t5(len(tokenizer), 64, 2, seed=0), 5.0)
    student = tiny_t5(len(tokenizer), 32, 1, seed=1)
    sources = tokenizer(english_lines(32), truncation=True, max_length=24)
    targets = tokenizer(spanish_lines(32), truncation=True, max_length=24)
    dataset = Dataset.from_dict({**sources, "labels": targets["input_ids"]})
    trainer = make_trainer(tmp_path, teacher, student, dataset, tokenizer, alpha=1.0, max_steps=25, learning_rate=3e-3)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
        s_logits = student(**batch).logits
        t_logits = teacher(**batch).logits
    expected = distillation_loss(s_logits, t_logits, batch["labels"], loss_type="forward_kl")
    assert torch.allclose(loss, expected, rtol=1e-5)
    before = trainer.evaluate()["eval_kd_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_kd_loss"] < 0.8 * before


def test_classifier_distillation(tmp_path, tokenizer):
    teacher = sharpen(tiny_classifier(len(tokenizer), 64, 2, seed=0), 30.0)
    student = tiny_classifier(len(tokenizer), 32, 1, seed=1)
    texts = english_lines(48)
    encoded = tokenizer(texts, truncation=True, max_length=32)
    dataset = Dataset.from_dict({**encoded, "labels": [len(t) % 3 for t in texts]})
    trainer = make_trainer(
        tmp_path, teacher, student, dataset, tokenizer, alpha=0.7, temperature=2.0, max_steps=30, learning_rate=3e-3
    )
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
        s_logits, t_logits = student(**batch).logits, teacher(**batch).logits
    expected = 0.7 * distillation_loss(s_logits, t_logits, batch["labels"], loss_type="forward_kl", temperature=2.0)
    expected += 0.3 * F.cross_entropy(s_logits, batch["labels"])
    assert torch.allclose(loss, expected, rtol=1e-5)
    before = trainer.evaluate()["eval_kd_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_kd_loss"] < 0.8 * before


# ---- PEFT ----------------------------------------------------------------------------------------


def test_peft_student_trains_only_adapters(tmp_path, causal_pair, causal_dataset, tokenizer):
    from peft import LoraConfig

    teacher, student = causal_pair
    base_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=5, learning_rate=1e-2),
        train_dataset=causal_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    lora_after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora_after[n], v) for n, v in lora_before.items())
    merged = trainer.model.get_base_model().state_dict()
    for key, value in base_before.items():
        peft_key = key.replace(".weight", ".base_layer.weight") if ("q_proj" in key or "v_proj" in key) else key
        assert torch.equal(merged[peft_key], value), key


def test_peft_teacher(tmp_path, causal_pair, causal_dataset, tokenizer):
    from peft import LoraConfig, get_peft_model

    teacher, student = causal_pair
    lora_teacher = get_peft_model(teacher, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    trainer = make_trainer(tmp_path, lora_teacher, student, causal_dataset, tokenizer, max_steps=2)
    trainer.train()
    assert not any(p.requires_grad for p in lora_teacher.parameters())
    assert "kd_loss" in trainer.state.log_history[0]
