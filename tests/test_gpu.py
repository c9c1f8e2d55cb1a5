"""CUDA and bf16 paths; skipped on machines without a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_distill import DistillationTrainer
from hf_distill.loss import LossSettings, PositionTargets, TeacherHidden, blended_loss, chunked_blended_loss
from hf_distill.runner.scratch import small_llama

from conftest import config, sharpen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_in_bf16_on_cuda(loss_type):
    torch.manual_seed(0)
    n, d, vocab = 300, 64, 5000
    hidden = torch.randn(n, d, device="cuda", requires_grad=True)
    weight = (torch.randn(vocab, d, device="cuda") * 0.1).requires_grad_(True)
    teacher_hidden, teacher_head = torch.randn(n, d, device="cuda"), torch.nn.Linear(d, vocab, bias=False).cuda()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    mask = torch.ones(n, dtype=torch.bool, device="cuda")
    positions = PositionTargets(targets, mask, mask, 0.5 / n, 0.5 / n)
    settings = LossSettings(loss_type=loss_type, temperature=2.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked = chunked_blended_loss(hidden, weight, None, TeacherHidden(teacher_hidden, teacher_head), positions, settings, 64)[0]
        grads_chunked = torch.autograd.grad(chunked, (hidden, weight))
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        full = blended_loss(F.linear(hidden, weight), teacher_logits, positions, settings)[0]
        grads_full = torch.autograd.grad(full, (hidden, weight))
    assert torch.allclose(chunked, full, rtol=2e-2)
    for a, b in zip(grads_chunked, grads_full):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=5e-2, atol=1e-4)


def test_bf16_training_on_cuda_matches_fp32(tmp_path, tokenizer, causal_dataset):
    teacher = sharpen(small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=0), 5.0)
    student = small_llama(len(tokenizer), hidden_size=64, num_layers=1, seed=1)
    first_losses = {}
    for bf16 in (False, True):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
            args=config(tmp_path, bf16=bf16, use_cpu=False, max_steps=5, alpha=0.7, temperature=2.0),
            train_dataset=causal_dataset, processing_class=tokenizer,
        )
        assert next(trainer.teacher_model.parameters()).device.type == "cuda"
        trainer.train()
        logs = [log for log in trainer.state.log_history if "kd_loss" in log]
        assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
        first_losses[bf16] = logs[0]["loss"]
    assert first_losses[True] == pytest.approx(first_losses[False], rel=0.1)


def test_bf16_teacher_from_path_on_cuda(tmp_path, tokenizer, causal_dataset):
    teacher = sharpen(small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=0))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=small_llama(len(tokenizer), hidden_size=64, num_layers=1, seed=1),
        args=config(tmp_path, use_cpu=False, bf16=True, max_steps=3, teacher_model_name_or_path=str(tmp_path / "teacher"),
                    teacher_model_init_kwargs={"dtype": "bfloat16"}),
        train_dataset=causal_dataset, processing_class=tokenizer,
    )
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss"] > 0
