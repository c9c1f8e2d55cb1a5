"""The intermediate-layer term: against a float64 reference, under accumulation, its layer map and its errors."""

import copy

import numpy as np
import pytest
import torch

from hf_distill import DistillationTrainer
from hf_distill.loss import default_layer_map
from hf_distill.modeling import student_from_teacher
from hf_distill.runner.scratch import small_llama

from conftest import config, one_step_two_ways, prompt_response_dataset


def log_softmax64(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_loss(student, teacher, batch, *, alpha, gamma, hidden_type, layer_map, temperature):
    """alpha·T²·KL(p‖q) + (1−alpha)·CE + gamma·H in float64 NumPy, over response positions (shifted)."""
    s64, t64 = copy.deepcopy(student).double().eval(), copy.deepcopy(teacher).double().eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_out = s64(**inputs, output_hidden_states=True)
        t_out = t64(**inputs, output_hidden_states=True)
    targets = batch["labels"][:, 1:].numpy()
    mask = targets != -100
    s_logits, t_logits = s_out.logits[:, :-1].numpy()[mask], t_out.logits[:, :-1].numpy()[mask]
    log_q, log_p = log_softmax64(s_logits / temperature), log_softmax64(t_logits / temperature)
    kd = temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    ce = -log_softmax64(s_logits)[np.arange(mask.sum()), targets[mask]].mean()
    distances = []
    for i, j in enumerate(layer_map):
        s_h, t_h = s_out.hidden_states[i + 1][:, :-1].numpy()[mask], t_out.hidden_states[j + 1][:, :-1].numpy()[mask]
        if hidden_type == "mse":
            distances.append(((s_h - t_h) ** 2).sum(-1) / (t_h**2).sum(-1))
        else:
            cos = (s_h * t_h).sum(-1) / np.linalg.norm(s_h, axis=-1) / np.linalg.norm(t_h, axis=-1)
            distances.append(1 - cos)
    hidden = np.mean(distances, axis=0).mean()
    return alpha * kd + (1 - alpha) * ce + gamma * hidden, hidden


@pytest.mark.parametrize("hidden_type", ["mse", "cosine"])
@pytest.mark.parametrize("chunked", [True, False])
def test_hidden_term_matches_float64_reference(tmp_path, cut_pair, tokenizer, hidden_type, chunked):
    teacher, student = cut_pair
    dataset = prompt_response_dataset(tokenizer, n=8)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
        args=config(tmp_path, alpha=0.3, temperature=2.0, hidden_loss_weight=2.5, hidden_loss_type=hidden_type,
                    chunked_loss=chunked),
    )
    assert trainer.layer_map == [0, 3]  # from the layers the student was cut from
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
    expected, hidden = reference_loss(
        student, teacher, batch, alpha=0.3, gamma=2.5, hidden_type=hidden_type, layer_map=[0, 3], temperature=2.0
    )
    assert hidden > 1e-4  # the term is really there
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert trainer._use_chunks.get("student", False) is chunked


def test_explicit_layer_map_is_used(tmp_path, cut_pair, tokenizer):
    teacher, student = cut_pair
    dataset = prompt_response_dataset(tokenizer, n=8)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
        args=config(tmp_path, alpha=0.0, hidden_loss_weight=1.0, layer_map=[1, 2]),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
    expected, _ = reference_loss(
        student, teacher, batch, alpha=0.0, gamma=1.0, hidden_type="mse", layer_map=[1, 2], temperature=1.0
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_default_layer_map():
    assert default_layer_map(2, 4) == [1, 3]  # uniform, the last on the last
    assert default_layer_map(3, 12) == [3, 7, 11]
    assert default_layer_map(2, 4, source_layers=[0, 2]) == [0, 2]


def test_student_records_its_source_layers(cut_pair):
    teacher, student = cut_pair
    assert student.config.distill_source_layers == [0, 3]
    grandchild = student_from_teacher(student, [1])
    assert grandchild.config.distill_source_layers == [3]


@pytest.mark.parametrize("chunked", [True, False])
def test_gradient_accumulation_equals_big_batch_with_hidden_term(tmp_path, cut_pair, tokenizer, chunked):
    teacher, student = cut_pair
    big, accumulated = one_step_two_ways(tmp_path, teacher, student, tokenizer, alpha=0.5, hidden_loss_weight=3.0,
                                         chunked_loss=chunked)
    torch.testing.assert_close(big, accumulated, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_logged_hidden_loss(tmp_path, cut_pair, tokenizer):
    teacher, student = cut_pair
    dataset = prompt_response_dataset(tokenizer, n=16)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
        args=config(tmp_path, alpha=0.5, hidden_loss_weight=1.0, max_steps=15, learning_rate=3e-3),
    )
    trainer.train()
    logs = [log["hidden_loss"] for log in trainer.state.log_history if "hidden_loss" in log]
    assert len(logs) == 15 and logs[-1] < 0.7 * logs[0]


def test_projections_bridge_other_hidden_sizes(tmp_path, causal_pair, tokenizer):
    """Student 32 wide, teacher 64: a learned projection per mapped layer, in the loss as in the reference."""
    teacher, student = causal_pair
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=prompt_response_dataset(tokenizer, n=8),
        processing_class=tokenizer, args=config(tmp_path, alpha=0.0, hidden_loss_weight=2.0),
    )
    assert trainer.layer_map == [1]  # uniform: the student's only layer on the teacher's last
    projection = student.distill_projections[0]
    assert projection.weight.shape == (64, 32) and projection.weight.requires_grad
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
        s_out = copy.deepcopy(student).double()(**batch, output_hidden_states=True)
        t_out = copy.deepcopy(teacher).double().eval()(**batch, output_hidden_states=True)
    mask = (batch["labels"][:, 1:] != -100).numpy()
    s_h = s_out.hidden_states[1][:, :-1].numpy()[mask] @ projection.weight.detach().double().numpy().T
    t_h = t_out.hidden_states[2][:, :-1].numpy()[mask]
    hidden = (((s_h - t_h) ** 2).sum(-1) / (t_h**2).sum(-1)).mean()
    assert loss.item() == pytest.approx(s_out.loss.item() + 2.0 * hidden, rel=1e-5)


def test_projections_train_are_checkpointed_and_left_out_of_the_export(tmp_path, causal_pair, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    teacher, student = causal_pair
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=prompt_response_dataset(tokenizer, n=16),
        processing_class=tokenizer,
        args=config(tmp_path, alpha=0.5, hidden_loss_weight=1.0, max_steps=4, learning_rate=1e-2, save_strategy="steps",
                    save_steps=2),
    )
    before = student.distill_projections[0].weight.detach().clone()
    trainer.train()
    after = student.distill_projections[0].weight.detach()
    assert not torch.allclose(before, after)
    checkpoint = load_file(tmp_path / "out" / "checkpoint-4" / "model.safetensors")
    torch.testing.assert_close(checkpoint["distill_projections.0.weight"], after)
    trainer.save_model(str(tmp_path / "export"))
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert not any(key.startswith("distill_projections") for key in exported)
    assert hasattr(student, "distill_projections")  # still there for more training
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not hasattr(reloaded, "distill_projections")


def test_resume_restores_projections_and_matches_an_uninterrupted_run(tmp_path, causal_pair, tokenizer):
    """Resuming from step 2 of 4, starting from other weights, ends where the uninterrupted run ends."""
    teacher, student = causal_pair
    dataset = prompt_response_dataset(tokenizer, n=16)

    def run(model, output_dir, resume=None):
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
            args=config(tmp_path, output_dir=str(output_dir), alpha=0.5, hidden_loss_weight=1.0, max_steps=4,
                        learning_rate=1e-2, save_strategy="steps", save_steps=2, per_device_train_batch_size=4),
        )
        trainer.train(resume_from_checkpoint=resume)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    uninterrupted = run(copy.deepcopy(student), tmp_path / "a")
    other = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=7)  # other weights than the original
    resumed = run(other, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    torch.testing.assert_close(resumed, uninterrupted, rtol=1e-5, atol=1e-6)


def test_layer_map_of_wrong_length_is_refused(tmp_path, cut_pair, tokenizer):
    teacher, student = cut_pair
    with pytest.raises(ValueError, match=r"layer_map=\[0, 1, 2\] must give one teacher layer \(0\.\.3\) for each"):
        DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=prompt_response_dataset(tokenizer, n=4),
            processing_class=tokenizer, args=config(tmp_path, hidden_loss_weight=1.0, layer_map=[0, 1, 2]),
        )


def test_negative_hidden_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_loss_weight=-1"):
        config(tmp_path, hidden_loss_weight=-1.0)


def test_peft_student_with_hidden_term(tmp_path, cut_pair, tokenizer):
    """Adapters on a cut student learn from the hidden-state term too (only they change)."""
    from peft import LoraConfig

    teacher, student = cut_pair
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=prompt_response_dataset(tokenizer, n=8),
        processing_class=tokenizer,
        args=config(tmp_path, alpha=0.0, hidden_loss_weight=1.0, max_steps=4, learning_rate=1e-2),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.layer_map == [0, 3]
    trainer.train()
    logs = [log["hidden_loss"] for log in trainer.state.log_history if "hidden_loss" in log]
    assert len(logs) == 4 and logs[-1] < logs[0]


def test_seq2seq_hidden_term_matches_decoder_reference(tmp_path, tokenizer):
    """Seq2seq models match decoder layers at the label positions (uniform map: student 0 → teacher 1)."""
    from datasets import Dataset
    from conftest import tiny_t5

    from conftest import english_lines, spanish_lines

    teacher, student = tiny_t5(len(tokenizer), 32, 2, seed=0), tiny_t5(len(tokenizer), 32, 1, seed=1)
    sources = tokenizer(english_lines(8), truncation=True, max_length=16)
    targets = tokenizer(spanish_lines(8), truncation=True, max_length=16)
    dataset = Dataset.from_dict({**sources, "labels": targets["input_ids"]})
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
        args=config(tmp_path, alpha=0.0, hidden_loss_weight=2.0),
    )
    assert trainer.layer_map == [1]
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
        s_out = copy.deepcopy(student).double()(**batch, output_hidden_states=True)
        t_out = copy.deepcopy(teacher).double().eval()(**batch, output_hidden_states=True)
    mask = (batch["labels"] != -100).numpy()
    s_h, t_h = s_out.decoder_hidden_states[1].numpy()[mask], t_out.decoder_hidden_states[2].numpy()[mask]
    hidden = (((s_h - t_h) ** 2).sum(-1) / (t_h**2).sum(-1)).mean()
    assert loss.item() == pytest.approx(s_out.loss.item() + 2.0 * hidden, rel=1e-5)


def test_classifier_hidden_term_matches_mean_pooled_reference(tmp_path, tokenizer):
    """Classifiers match each row's mean hidden state over its real tokens."""
    from datasets import Dataset
    from conftest import tiny_classifier

    from conftest import english_lines

    teacher, student = tiny_classifier(len(tokenizer), 32, 2, seed=0), tiny_classifier(len(tokenizer), 32, 1, seed=1)
    texts = english_lines(8)
    dataset = Dataset.from_dict({**tokenizer(texts, truncation=True, max_length=400), "labels": [len(t) % 3 for t in texts]})
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
        args=config(tmp_path, alpha=0.0, hidden_loss_weight=1.5, hidden_loss_type="cosine"),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["attention_mask"].min() == 0  # ragged rows: padding must not count
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch)
        s_out = copy.deepcopy(student).double()(**batch, output_hidden_states=True)
        t_out = copy.deepcopy(teacher).double().eval()(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].numpy()[..., None].astype(float)
    s_mean = (s_out.hidden_states[1].numpy() * mask).sum(1) / mask.sum(1)
    t_mean = (t_out.hidden_states[2].numpy() * mask).sum(1) / mask.sum(1)
    cosine = (s_mean * t_mean).sum(-1) / np.linalg.norm(s_mean, axis=-1) / np.linalg.norm(t_mean, axis=-1)
    ce = torch.nn.functional.cross_entropy(s_out.logits, batch["labels"]).item()
    assert loss.item() == pytest.approx(ce + 1.5 * (1 - cosine).mean(), rel=1e-5)
