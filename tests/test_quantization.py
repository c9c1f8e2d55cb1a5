"""Quantization with distillation: post-training (torchao through transformers) and quantization-aware training."""

import copy
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

pytest.importorskip("torchao")

from hf_distill.quantization import (  # noqa: E402
    folder_bytes,
    has_qat,
    prepare_qat,
    remove_qat,
    save_quantized,
)
from hf_distill.runner.scratch import small_llama  # noqa: E402

from conftest import config, make_trainer  # noqa: E402


SCHEMES = ["int8", "int4"]


def ids(tokenizer):
    return torch.tensor([tokenizer("In the beginning God created the heaven and the earth.")["input_ids"]])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quantized_training_model_equals_the_exported_quantized_model(tmp_path, tokenizer, scheme):
    """What QAT trains against is what post-training quantization ships: same logits, to float rounding."""
    model = small_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0)
    model.save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    quantized = AutoModelForCausalLM.from_pretrained(save_quantized(str(tmp_path / "float"), str(tmp_path / scheme), scheme))
    fake = prepare_qat(copy.deepcopy(model), scheme)
    assert has_qat(fake) and type(fake.lm_head).__name__ == "Linear"  # the head stays in full precision
    with torch.no_grad():
        exact, expected, got = model(ids(tokenizer)).logits, quantized(ids(tokenizer)).logits, fake(ids(tokenizer)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (expected - exact).abs().max() > 1e-4  # quantization did change the model
    assert not has_qat(remove_qat(fake))
    torch.testing.assert_close(fake(ids(tokenizer)).logits, exact, rtol=0, atol=0)  # the float weights were kept


def test_post_training_int8_is_smaller_and_runs_in_a_pipeline(tmp_path, tokenizer):
    model = small_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0)
    model.save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    out = save_quantized(str(tmp_path / "float"), str(tmp_path / "int8"), "int8")
    assert folder_bytes(out) < 0.6 * folder_bytes(str(tmp_path / "float"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.config.quantization_config).__name__ == "TorchAoConfig"
    assert type(reloaded.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    generator = pipeline("text-generation", model=out, device="cpu")
    assert generator("In the beginning", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("In the beginning")
    with pytest.raises(ValueError, match="would overwrite the float model"):
        save_quantized(out, out, "int8")


def test_quantization_aware_distillation_exports_the_quantized_student(tmp_path, tokenizer, causal_pair, causal_dataset):
    teacher, student = causal_pair
    trainer = make_trainer(tmp_path, teacher, student, causal_dataset, tokenizer, student_quantization="int8",
                           max_steps=2, alpha=0.8, hidden_loss_weight=1.0, learning_rate=1e-2)
    assert has_qat(trainer.model)
    batch = {k: v for k, v in next(iter(trainer.get_train_dataloader())).items()}
    with torch.no_grad():  # fake quantization is on in training: the loss differs from the float student's
        qat_loss = trainer.compute_loss(trainer.model, batch).item()
        float_loss = trainer.compute_loss(remove_qat(copy.deepcopy(trainer.model)), batch).item()
    assert qat_loss != pytest.approx(float_loss, rel=1e-6)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    trainer.save_model(str(tmp_path / "student"))
    trainer.create_model_card()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert type(exported.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert not any("distill_projections" in name for name, _ in exported.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(exported(ids(tokenizer)).logits, trainer.model(ids(tokenizer)).logits, rtol=1e-4, atol=1e-4)
    assert "int8 weight-only" in open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert not [name for name in os.listdir(tmp_path) if name.endswith("-partial")]


def test_quantization_settings_are_checked(tmp_path, tokenizer, causal_pair, causal_dataset):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="student_quantization='int2'; choose one of none, int8, int4"):
        config(tmp_path, student_quantization="int2")
    teacher, student = causal_pair
    from hf_distill import DistillationTrainer

    with pytest.raises(ValueError, match="student_quantization='int8' fake-quantizes .* PEFT student"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, student_quantization="int8"),
                            train_dataset=causal_dataset, processing_class=tokenizer,
                            peft_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
