"""Several teachers: both reductions against a float64 NumPy reference, chunked and whole, and in the trainer."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.loss import (
    DistillationLoss,
    StudentOutput,
    TeacherEnsemble,
    TeacherHidden,
    TeacherLogits,
    TeacherOutput,
)
from hf_distill.runner.scratch import small_llama

from conftest import config, make_trainer, sharpen
from reference import LOSS_CASE_IDS, LOSS_CASES, np_cross_entropy, np_divergence, np_log_softmax, np_numerical_grad

N, V, D = 7, 13, 5
WEIGHTS = [0.7, 0.3]


def np_log_mixture_of(teachers, weights, temperature):
    """log Σ_i w_i softmax(t_i / T), float64."""
    terms = [np.log(w) + np_log_softmax(np.asarray(t, dtype=np.float64) / temperature) for t, w in zip(teachers, weights)]
    top = np.max(terms, axis=0)
    return top + np.log(np.sum(np.exp(np.array(terms) - top), axis=0))


def np_objective(student, teachers, weights, reduction, targets, kd_mask, ce_mask, alpha, **divergence):
    """(loss, Σ KD, each teacher's Σ KD) of alpha·KD/n_kd + (1 − alpha)·CE/n_ce, in float64."""
    T = divergence.get("temperature", 1.0)
    teachers = [t[..., : student.shape[-1]] for t in teachers]  # padding rows beyond the student's are not compared
    members = [np_divergence(student, t, **divergence) for t in teachers]
    if reduction == "mean_probs":
        # The mixture as logits: softmax(T · log m / T) = m; mse and cosine compare T · log m directly.
        kd = np_divergence(student, T * np_log_mixture_of(teachers, weights, T), **divergence)
    else:
        kd = sum(w * m for w, m in zip(weights, members))
    ce = np_cross_entropy(student, np.where(ce_mask, targets, -100))
    kd_sum, ce_sum = kd[kd_mask].sum(), ce[ce_mask].sum()
    loss = alpha * kd_sum / max(kd_mask.sum(), 1) + (1 - alpha) * ce_sum / max(ce_mask.sum(), 1)
    return loss, kd_sum, [m[kd_mask].sum() for m in members]


def case(seed=0, extra_vocab=(0, 2)):
    """Student hidden states and head, and two teachers' logits (the second padded by `extra_vocab` rows)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    head = nn.Linear(D, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=gen, dtype=torch.float64))
    teachers = [torch.randn(N, V + extra, generator=gen, dtype=torch.float64) * 3 for extra in extra_vocab]
    targets = torch.randint(0, V, (N,), generator=gen)
    kd_mask = torch.tensor([True, True, False, True, True, True, False])
    ce_mask = torch.tensor([True, False, True, True, True, False, True])
    return hidden, head, teachers, targets, kd_mask, ce_mask


def loss_fn(loss_type, kwargs, reduction, temperature, alpha=0.6):
    return DistillationLoss(
        loss_type=loss_type, temperature=temperature, alpha=alpha, multi_teacher=reduction, teacher_weights=WEIGHTS,
        chunk_size=3, **kwargs,
    )


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("reduction", ["mean_probs", "mean_loss"])
@pytest.mark.parametrize("loss_type, kwargs", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_both_reductions_match_float64_reference(loss_type, kwargs, reduction, chunked, temperature=2.0):
    hidden, head, teachers, targets, kd_mask, ce_mask = case()
    objective = loss_fn(loss_type, kwargs, reduction, temperature)
    positions = objective.positions(targets, kd_mask, ce_mask, int(kd_mask.sum()), int(ce_mask.sum()))
    hidden = hidden.clone().requires_grad_(True)
    if chunked:
        student = StudentOutput(hidden=hidden, head=head)
        # Teachers as "hidden states" with an identity head: the chunk loop projects each chunk through rows().
        members = [TeacherHidden(t, lambda x: x) for t in teachers]
    else:
        student = StudentOutput(logits=head(hidden))
        members = [TeacherLogits(t) for t in teachers]
    result = objective(student, TeacherOutput(objective.teacher_distribution(members)), positions)
    result.loss.backward()

    def reference(h):
        return np_objective(h @ head.weight.detach().numpy().T, [t.numpy() for t in teachers], WEIGHTS, reduction,
                            targets.numpy(), kd_mask.numpy(), ce_mask.numpy(), 0.6, loss_type=loss_type,
                            temperature=temperature, **kwargs)

    loss, kd_sum, member_sums = reference(hidden.detach().numpy())
    assert result.loss.item() == pytest.approx(loss, rel=2e-5, abs=1e-7)
    assert result.kd_sum.item() == pytest.approx(kd_sum, rel=2e-5, abs=1e-7)
    np.testing.assert_allclose(result.member_kd_sums.numpy(), member_sums, rtol=2e-5, atol=1e-7)
    expected_grad = np_numerical_grad(lambda h: reference(h)[0], hidden.detach().numpy())
    np.testing.assert_allclose(hidden.grad.numpy(), expected_grad, rtol=1e-4, atol=1e-6)


def test_mixture_divergence_is_at_most_the_mean_of_divergences():
    """Forward KL is convex in the teacher: KL(Σ w_i p_i ‖ q) ≤ Σ w_i KL(p_i ‖ q), strictly for distinct teachers."""
    hidden, head, teachers, targets, kd_mask, ce_mask = case(seed=3, extra_vocab=(0, 0))
    sums = {}
    for reduction in ("mean_probs", "mean_loss"):
        objective = loss_fn("forward_kl", {}, reduction, 1.0)
        positions = objective.positions(targets, kd_mask, ce_mask, int(kd_mask.sum()), int(ce_mask.sum()))
        teacher = objective.teacher_distribution([TeacherLogits(t) for t in teachers])
        sums[reduction] = objective(StudentOutput(logits=head(hidden)), TeacherOutput(teacher), positions).kd_sum.item()
    assert sums["mean_probs"] < sums["mean_loss"]


def test_one_teacher_is_not_an_ensemble():
    only = TeacherLogits(torch.zeros(2, 3))
    assert DistillationLoss(multi_teacher="mean_loss", teacher_weights=[2.0]).teacher_distribution([only]) is only
    ensemble = DistillationLoss(teacher_weights=[3, 1]).teacher_distribution([only, only])
    assert isinstance(ensemble, TeacherEnsemble) and ensemble.weights == (0.75, 0.25)


# ---- in the trainer ---------------------------------------------------------------------------------


class Losses(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def teachers_for(tokenizer):
    big = sharpen(small_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0))
    other = sharpen(small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=5), factor=10.0)
    return big, other


def train(tmp_path, name, teacher, tokenizer, dataset, **overrides):
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    settings = dict(max_steps=2, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
                    train_sampling_strategy="sequential", alpha=0.7, temperature=2.0, per_device_train_batch_size=4)
    settings.update(overrides)
    trainer = make_trainer(tmp_path / name, teacher, student, dataset, tokenizer, **settings)
    logs = Losses()
    trainer.add_callback(logs)
    trainer.train()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), logs.logs, trainer


def test_one_teacher_in_a_list_equals_the_single_teacher_run(tmp_path, tokenizer, causal_dataset):
    big, _ = teachers_for(tokenizer)
    alone, alone_logs, _ = train(tmp_path, "alone", big, tokenizer, causal_dataset)
    listed, listed_logs, _ = train(tmp_path, "listed", [big], tokenizer, causal_dataset, multi_teacher="mean_loss")
    torch.testing.assert_close(listed, alone, rtol=0, atol=0)
    assert listed_logs[0]["kd_loss"] == alone_logs[0]["kd_loss"]
    assert not any(key.startswith("kd_loss/") for key in listed_logs[0])


@pytest.mark.parametrize("reduction", ["mean_probs", "mean_loss"])
def test_two_teachers_accumulation_equals_one_batch(tmp_path, tokenizer, causal_dataset, reduction):
    """Batch 4 equals 2 × accumulation 2 on ragged rows, and each teacher gets its log line."""
    teachers = list(teachers_for(tokenizer))
    one, one_logs, trainer = train(tmp_path, "one", teachers, tokenizer, causal_dataset, multi_teacher=reduction,
                                   teacher_weights=[3, 1])
    two, two_logs, _ = train(tmp_path, "two", teachers, tokenizer, causal_dataset, multi_teacher=reduction,
                             teacher_weights=[3, 1], per_device_train_batch_size=2, gradient_accumulation_steps=2)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
    names = trainer.teacher_names
    assert len(names) == 2 and names[0] != names[1]
    for key in ("kd_loss", *(f"kd_loss/{name}" for name in names)):
        assert two_logs[0][key] == pytest.approx(one_logs[0][key], rel=1e-5)
    members = [one_logs[0][f"kd_loss/{name}"] for name in names]
    if reduction == "mean_loss":  # the blend is the weighted mean of the teachers' divergences
        assert one_logs[0]["kd_loss"] == pytest.approx(0.75 * members[0] + 0.25 * members[1], rel=1e-4)
    else:  # the mixture's divergence is below that (convexity of forward KL)
        assert one_logs[0]["kd_loss"] < 0.75 * members[0] + 0.25 * members[1]
    assert trainer._use_chunks == {"student": True, "teacher": True, "teacher_1": True}


def test_chunked_equals_full_logits_with_two_teachers(tmp_path, tokenizer, causal_dataset):
    teachers = list(teachers_for(tokenizer))
    chunked, _, _ = train(tmp_path, "chunked", teachers, tokenizer, causal_dataset)
    full, _, trainer = train(tmp_path, "full", teachers, tokenizer, causal_dataset, chunked_loss=False)
    assert not any(trainer._use_chunks.values())
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides, words", [
    ({"teacher_weights": [1.0]}, r"teacher_weights=\[1.0\] has 1 value\(s\) for 2 teacher\(s\)"),
    ({"teacher_weights": [1.0, -1.0]}, r"teacher_weights=\[1.0, -1.0\] must be finite numbers >= 0"),
    ({"hidden_loss_weight": 1.0}, r"hidden_loss_weight=1.0 matches one teacher's layers, but 2 teachers"),
])
def test_bad_multi_teacher_settings(tmp_path, tokenizer, causal_dataset, overrides, words):
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    with pytest.raises(ValueError, match=words):
        make_trainer(tmp_path, list(teachers_for(tokenizer)), student, causal_dataset, tokenizer, **overrides)


def test_teachers_of_mixed_kinds_or_tokenizers_are_refused(tmp_path, tokenizer, causal_dataset):
    """Each teacher is checked against the student as a single teacher is: kind, classes, tokenizer."""
    from hf_distill.runner.scratch import train_bpe_tokenizer

    from conftest import spanish_lines
    from conftest import tiny_t5

    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    big, other = teachers_for(tokenizer)
    with pytest.raises(ValueError, match="The teacher is a seq2seq model .* but the student is a causal model"):
        make_trainer(tmp_path, [big, tiny_t5(len(tokenizer), 32, 1, seed=0)], student, causal_dataset, tokenizer)
    stranger = train_bpe_tokenizer(spanish_lines(200), vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="tokenizer"):
        DistillationTrainer(model=student, teacher_model=[big, other], args=config(tmp_path),
                            train_dataset=causal_dataset, processing_class=tokenizer,
                            teacher_processing_class=[tokenizer, stranger])


def test_unknown_reduction_is_refused(tmp_path):
    with pytest.raises(ValueError, match="multi_teacher='mean'; choose one of mean_probs, mean_loss"):
        config(tmp_path, multi_teacher="mean")


def test_teacher_paths_as_a_list_and_comma_separated(tmp_path):
    assert config(tmp_path, teacher_model_name_or_path="a/b, c/d").teacher_model_name_or_path == ["a/b", "c/d"]
    assert config(tmp_path, teacher_model_name_or_path=["a/b"]).teacher_model_name_or_path == "a/b"
    with pytest.raises(ValueError, match="teacher_weights"):
        config(tmp_path, teacher_model_name_or_path=["a/b", "c/d"], teacher_weights=[1, 2, 3])

