"""Students made from the teacher: block influence, layer choice, MLP channel pruning, save/reload/generate."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_distill.pruning import block_influence, layers_to_keep, mlp_channel_importance, prune_mlp, prune_student
from hf_distill.runner.scratch import small_llama


@pytest.fixture
def teacher():
    return small_llama(120, hidden_size=64, num_layers=6, seed=5).eval()


@pytest.fixture
def batches():
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # padding must not count
    return [{"input_ids": torch.randint(3, 120, (3, 12), generator=gen), "attention_mask": mask}]


def test_block_influence_matches_numpy(teacher, batches):
    batch = batches[0]
    with torch.no_grad():
        states = [s.double().numpy() for s in teacher(**batch, output_hidden_states=True).hidden_states]
    real = batch["attention_mask"].numpy().astype(bool)
    expected = []
    for a, b in zip(states[:-1], states[1:]):
        a, b = a[real], b[real]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        expected.append(1 - cos.mean())
    np.testing.assert_allclose(block_influence(teacher, batches), expected, rtol=1e-4, atol=1e-6)


def test_layers_to_keep():
    scores = [0.5, 0.1, 0.9, 0.2, 0.8, 0.3]
    assert layers_to_keep(scores, 3, keep_ends=False) == [0, 2, 4]
    assert layers_to_keep(scores, 3) == [0, 2, 5]  # ends forced, then the best of the rest
    with pytest.raises(ValueError, match="student_num_layers=7 must lie in 1..6"):
        layers_to_keep(scores, 7)


def test_mlp_pruning_equals_zeroing_the_dropped_channels(teacher, batches):
    scores = mlp_channel_importance(teacher, batches)
    reference = copy.deepcopy(teacher)
    with torch.no_grad():
        for block, score in zip(reference.model.layers, scores):
            drop = score.argsort()[: 256 - 100]  # the 156 least important channels of 256
            block.mlp.down_proj.weight[:, drop] = 0.0
    pruned = prune_mlp(copy.deepcopy(teacher), 100, batches)
    assert pruned.config.intermediate_size == 100
    assert all(block.mlp.up_proj.out_features == 100 for block in pruned.model.layers)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(pruned(ids).logits, teacher(ids).logits, atol=1e-3)


def test_pruned_student_saves_reloads_and_generates(tmp_path, teacher, batches, tokenizer):
    big = small_llama(len(tokenizer), hidden_size=64, num_layers=6, seed=6)
    student = prune_student(big, batches, num_layers=3, intermediate_size=128)
    assert student.config.num_hidden_layers == 3 and len(student.config.distill_source_layers) == 3
    assert student.config.distill_pruning["method"] == "block_influence"
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)
    generator = pipeline("text-generation", model=str(tmp_path / "student"), tokenizer=AutoTokenizer.from_pretrained(tmp_path / "student"))
    text = generator("In the beginning", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("In the beginning")
