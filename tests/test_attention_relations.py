"""The attention-relation term (MiniLM v2): against a float64 loop reference, in the trainer, under accumulation."""

import copy
import math

import pytest
import torch

from hf_distill import DistillationTrainer
from hf_distill.loss import AttentionStates, attention_relation_sum, relation_log_probs

from conftest import config, one_step_two_ways, prompt_response_dataset


def reference_relation_sum(student_layers, teacher_layers, heads, key_mask, query_mask):
    """Σ over query positions of the mean over (layers, q/k/v, heads) of KL(teacher ‖ student), one row and one
    query at a time in float64: a query sees the real keys up to itself, and itself."""
    batch, length = key_mask.shape
    total = 0.0
    for b in range(batch):
        for i in range(length):
            if not query_mask[b, i]:
                continue
            keys = [j for j in range(length) if j == i or (j <= i and key_mask[b, j])]
            divergences = []
            for s_layer, t_layer in zip(student_layers, teacher_layers):
                for name in ("q", "k", "v"):
                    for h in range(heads):
                        def log_probs(states):
                            x = states[b].double()
                            width = x.shape[-1] // heads
                            x = x[:, h * width:(h + 1) * width]
                            scores = torch.stack([x[i] @ x[j] for j in keys]) / math.sqrt(width)
                            return scores - torch.logsumexp(scores, 0)

                        log_s, log_t = log_probs(s_layer[name]), log_probs(t_layer[name])
                        divergences.append(float((log_t.exp() * (log_t - log_s)).sum()))
            total += sum(divergences) / len(divergences)
    return total


def random_states(widths, batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(batch, length, width, generator=gen) for name, width in zip("qkv", widths)}
            for _ in range(2)]


def test_relation_sum_matches_float64_reference():
    batch, length, heads = 3, 6, 2
    student = random_states((8, 4, 4), batch, length, seed=0)  # GQA-like: keys and values narrower than queries
    teacher = random_states((12, 6, 6), batch, length, seed=1)  # another width: relations are positions × positions
    key_mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # right / left padding
    query_mask = key_mask.clone()
    query_mask[0, 2] = False
    got = attention_relation_sum(AttentionStates(student, heads, key_mask, query_mask),
                                 AttentionStates(teacher, heads, key_mask, query_mask))
    expected = reference_relation_sum(student, teacher, heads, key_mask, query_mask)
    assert expected > 1e-3
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_same_states_give_zero_and_padding_gives_finite_gradients():
    states = random_states((8, 8, 8), 2, 5, seed=2)
    key_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)  # a row starting with padding
    leaf = [{name: value.clone().requires_grad_(True) for name, value in layer.items()} for layer in states]
    same = attention_relation_sum(AttentionStates(leaf, 2, key_mask, key_mask), AttentionStates(states, 2, key_mask, key_mask))
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    moved = [{name: value + 0.5 for name, value in layer.items()} for layer in leaf]
    other = attention_relation_sum(AttentionStates(moved, 2, key_mask, None), AttentionStates(states, 2, key_mask, None))
    other.backward()
    grads = torch.cat([value.grad.flatten() for layer in leaf for value in layer.values()])
    assert other.item() > 0 and torch.isfinite(grads).all() and grads.abs().sum() > 0
    # Each query's relation is a distribution over the keys it can see.
    probs = relation_log_probs(states[0]["q"], 2, key_mask).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))
    assert probs[0, :, 3, 4].abs().max() == 0 and probs[0, :, 3, :2].abs().max() == 0  # future and padding unseen


@pytest.mark.parametrize("causal", [True, False])
def test_query_chunks_give_the_same_sum_and_gradients(causal):
    states = random_states((8, 4, 4), 3, 7, seed=3)
    key_mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    runs = []
    for chunk in (7, 3, 1):  # whole rows; chunks of 3 (the last one short); one query at a time
        leaf = [{name: value.clone().requires_grad_(True) for name, value in layer.items()} for layer in states]
        teacher = [{name: value.flip(1) for name, value in layer.items()} for layer in states]
        total = attention_relation_sum(AttentionStates(leaf, 2, key_mask, key_mask),
                                       AttentionStates(teacher, 2, key_mask, key_mask), causal, query_chunk=chunk)
        total.backward()
        runs.append((total.detach(), [value.grad for layer in leaf for value in layer.values()]))
    for total, grads in runs[1:]:
        torch.testing.assert_close(total, runs[0][0])
        for got, expected in zip(grads, runs[0][1]):
            torch.testing.assert_close(got, expected)


def test_query_chunks_keep_no_square_relations_for_backward():
    """What autograd keeps for backward: whole rows keep (B, R, S, S) relations; chunks keep only the projections."""
    length, width = 64, 8

    def saved_bytes(chunk):
        states = random_states((width,) * 3, 2, length, seed=4)
        leaf = [{name: value.clone().requires_grad_(True) for name, value in layer.items()} for layer in states]
        sizes = {}  # by storage: a tensor saved by several chunks is held once

        def pack(tensor):
            sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            attention_relation_sum(AttentionStates(leaf, 2, None, None), AttentionStates(states, 2, None, None),
                                   query_chunk=chunk)
        return sum(sizes.values())

    whole, chunked = saved_bytes(length), saved_bytes(8)
    projections = 2 * (2 * 3 * 2 * length * width * 4)  # both models' layers × q/k/v × (B, S, D), float32
    assert whole > 2 * 3 * 2 * 2 * length * length * 4  # at least one (B, R, S, S) float32 relation each
    assert chunked <= projections  # the inputs of each chunk's recompute, not its relations


def projections64(model, batch, layers):
    """Each listed layer's q/k/v projections of a float64 copy of `model`, read by hooks of the test's own."""
    model = copy.deepcopy(model).double().eval()
    captured = [{} for _ in layers]
    handles = [getattr(model.model.layers[layer].self_attn, f"{name}_proj").register_forward_hook(
        lambda module, args, output, slot=slot, name=name: slot.update({name: output}))
        for slot, layer in zip(captured, layers) for name in "qkv"]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("chunked", [True, False])
def test_trainer_adds_the_term_as_the_reference(tmp_path, cut_pair, tokenizer, chunked):
    teacher, student = cut_pair
    dataset = prompt_response_dataset(tokenizer, n=8)  # ragged rows: right padding, prompts masked
    losses = []
    for weight in (0.0, 2.5):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
            args=config(tmp_path, alpha=0.3, attention_loss_weight=weight, chunked_loss=chunked),
        )
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses.append(trainer.compute_loss(student.eval(), batch).item())
    assert trainer.relation_heads == 2 and trainer.layer_map == [0, 3]
    labels = batch["labels"]
    query_mask = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)  # the distilled positions
    relations = reference_relation_sum(projections64(student, batch, [0, 1]), projections64(teacher, batch, [0, 3]), 2,
                                       batch["attention_mask"].bool(), query_mask)
    assert relations > 1e-3
    assert losses[1] - losses[0] == pytest.approx(2.5 * relations / query_mask.sum().item(), rel=1e-4)


def test_training_lowers_the_logged_attention_loss(tmp_path, causal_pair, tokenizer):
    """Student 32 wide with 1 key/value head, teacher 64 with 2: one relation head, and no hidden projections."""
    teacher, student = causal_pair
    with torch.no_grad():  # peaked relations (a random model's are near uniform, and its term tiny)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(teacher.model.layers[-1].self_attn, name).weight.mul_(20.0)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=prompt_response_dataset(tokenizer, n=16),
        processing_class=tokenizer, args=config(tmp_path, alpha=0.0, attention_loss_weight=1.0, max_steps=15,
                                                learning_rate=2e-2),
    )
    assert trainer.relation_heads == 1 and not hasattr(student, "distill_projections")
    trainer.train()
    logs = [log["attention_loss"] for log in trainer.state.log_history if "attention_loss" in log]
    assert len(logs) == 15 and logs[-1] < 0.7 * logs[0]
    assert not any("hidden_loss" in log for log in trainer.state.log_history)


def test_gradient_accumulation_equals_big_batch_with_attention_term(tmp_path, cut_pair, tokenizer):
    teacher, student = cut_pair
    big, accumulated = one_step_two_ways(tmp_path, teacher, student, tokenizer, alpha=0.5, attention_loss_weight=3.0)
    torch.testing.assert_close(big, accumulated, rtol=1e-5, atol=1e-6)
