"""A teacher with another tokenizer (cross_tokenizer='uld'): the ULD math, the pairing of positions, training, refusals.

Two genuinely different tokenizers, trained offline: the student's on English lines (300 tokens), the teacher's on
Spanish and English lines (500 tokens).
"""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cross_tokenizer import CrossTokenizerCollator
from hf_distill.data import CausalLMCollator
from hf_distill.loss import (
    aligned_response_masks,
    one_to_one_spans,
    shared_vocabulary,
    shared_vocabulary_divergence,
    uld_distance,
)
from hf_distill.loss.cross_tokenizer import AlignedTeacher, aligned_blended_loss
from hf_distill.forward import target_positions
from hf_distill.modeling import CAUSAL
from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer
from hf_distill.cross_tokenizer import shared_vocabulary_ids as _shared_vocabulary

from conftest import english_lines, prompt_response_dataset, sharpen, spanish_lines, tiny_classifier, tiny_t5


@pytest.fixture(scope="module")
def student_tokenizer():
    return train_bpe_tokenizer(english_lines(300), vocab_size=300)


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return train_bpe_tokenizer(spanish_lines(300) + english_lines(300), vocab_size=500)


def models(student_tokenizer, teacher_tokenizer):
    teacher = sharpen(small_llama(len(teacher_tokenizer), hidden_size=64, num_layers=2, seed=0))
    student = small_llama(len(student_tokenizer), hidden_size=32, num_layers=1, seed=1)
    return teacher, student


def config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_pin_memory=False, learning_rate=1e-3, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, cross_tokenizer="uld",
    )
    settings.update(overrides)
    return DistillationConfig(**settings)


def make_trainer(tmp_path, student_tokenizer, teacher_tokenizer, teacher, student, dataset, **overrides):
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, **overrides), train_dataset=dataset,
        eval_dataset=dataset, processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer,
    )


# ---- (a) the ULD math against float64 NumPy ---------------------------------------------------------------


def uld_reference(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Σ |sort↓ softmax(s/T) − sort↓ softmax(t/T)|, the shorter vector padded with zeros, in float64."""

    def sorted_probs(logits):
        z = logits / temperature
        e = np.exp(z - z.max(-1, keepdims=True))
        return -np.sort(-(e / e.sum(-1, keepdims=True)), axis=-1)

    q, p = sorted_probs(student_logits.astype(np.float64)), sorted_probs(teacher_logits.astype(np.float64))
    width = max(q.shape[-1], p.shape[-1])
    q = np.pad(q, ((0, 0), (0, width - q.shape[-1])))
    p = np.pad(p, ((0, 0), (0, width - p.shape[-1])))
    return np.abs(q - p).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("sizes", [(11, 17), (17, 11), (13, 13)])
def test_uld_matches_float64_reference(temperature, sizes):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, sizes[0], generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(7, sizes[1], generator=generator, dtype=torch.float64) * 3
    expected = uld_reference(student.numpy(), teacher.numpy(), temperature)
    exact = uld_distance(student, teacher, temperature)
    assert exact.dtype == torch.float64
    np.testing.assert_allclose(exact.numpy(), expected, rtol=1e-12, atol=1e-12)
    single = uld_distance(student.float(), teacher.bfloat16(), temperature)  # float32 math from lower precision
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), uld_reference(student.float().numpy(), teacher.bfloat16().float().numpy(),
                                                             temperature), rtol=1e-5, atol=1e-6)


def test_uld_compares_shapes_not_tokens():
    """A permuted copy (another vocabulary order) is at distance 0; a peaked vs a flat distribution is far; ≤ 2."""
    logits = torch.randn(5, 9, dtype=torch.float64)
    permuted = logits[:, torch.randperm(9)]
    assert torch.allclose(uld_distance(logits, permuted), torch.zeros(5, dtype=torch.float64), atol=1e-15)
    padded = torch.cat([logits, torch.full((5, 4), -1e4, dtype=torch.float64)], -1)  # extra tokens with no mass
    assert torch.allclose(uld_distance(logits, padded), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    peaked, flat = torch.tensor([[50.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 6)
    assert uld_distance(peaked, flat).item() == pytest.approx(2 * (1 - 1 / 6), abs=1e-6)


def test_uld_blend_and_gradient_match_reference():
    """alpha·ΣULD/n_kd + (1 − alpha)·ΣCE/n_ce, and the gradient through the sort equals float64 autograd."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(6, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 15, generator=generator, dtype=torch.float64)
    kd_mask = torch.tensor([True, False, True, True, False, True])
    ce_mask = torch.tensor([True, True, True, True, False, True])
    targets = torch.tensor([1, 2, 3, 4, -100, 5])
    loss, kd_sum, ce_sum = aligned_blended_loss(
        student, AlignedTeacher(teacher), targets, kd_mask, ce_mask, 0.3 / 4, 0.7 / 5, temperature=2.0
    )
    uld = uld_reference(student.detach()[kd_mask].numpy(), teacher.numpy(), 2.0).sum()
    log_z = np.log(np.exp(student.detach().numpy()).sum(-1))
    ce = sum(log_z[i] - student.detach().numpy()[i, targets[i]] for i in range(6) if ce_mask[i])
    assert kd_sum.item() == pytest.approx(uld, rel=1e-12)  # ULD keeps float64; CE is float32 math, like every loss
    assert ce_sum.item() == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(0.3 / 4 * uld + 0.7 / 5 * ce, rel=1e-6)
    loss.backward()
    probe = student.detach().clone().requires_grad_(True)  # the same value by plain autograd, row by row
    reference = sum(0.3 / 4 * uld_distance(probe[i : i + 1], teacher[j : j + 1], 2.0).sum()
                    for j, i in enumerate(kd_mask.nonzero().flatten().tolist()))
    reference = reference + 0.7 / 5 * torch.nn.functional.cross_entropy(probe[ce_mask], targets[ce_mask], reduction="sum")
    reference.backward()
    torch.testing.assert_close(student.grad, probe.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="4 aligned rows for 3 distilled student positions"):
        aligned_blended_loss(student, AlignedTeacher(teacher), targets, kd_mask & (targets != 5), ce_mask, 1.0, 0.0)


# ---- (b) which positions are paired ---------------------------------------------------------------------


def test_aligned_masks_pair_kth_with_kth_truncated_to_the_shorter():
    student = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    teacher = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    kept_student, kept_teacher = aligned_response_masks(student, teacher)
    assert kept_student.int().tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert kept_teacher.int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]


def pairs(student_tokenizer, teacher_tokenizer, prompt: str, response: str, align: bool = False):
    """The collator's two tokenizations of one prompt/response row, and the (student, teacher) target tokens paired."""
    prompt_ids = student_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = student_tokenizer(response, add_special_tokens=False)["input_ids"] + [student_tokenizer.eos_token_id]
    row = {"input_ids": prompt_ids + response_ids, "labels": [-100] * len(prompt_ids) + response_ids}
    batch = CrossTokenizerCollator(CausalLMCollator(0), student_tokenizer, teacher_tokenizer, align=align)([row])
    assert batch["labels"].tolist() == [row["labels"]]  # the student's own labels (its CE) never change
    student_labels = batch["aligned_labels"] if align else batch["labels"]
    student_targets, _, student_mask = target_positions(student_labels, batch["attention_mask"], CAUSAL)
    teacher_targets, _, teacher_mask = target_positions(batch["teacher_labels"], batch["teacher_attention_mask"], CAUSAL)
    kept_student, kept_teacher = aligned_response_masks(student_mask, teacher_mask)
    teacher_tokens = teacher_tokenizer.convert_ids_to_tokens(batch["teacher_input_ids"][0].tolist())
    paired = list(zip(student_tokenizer.convert_ids_to_tokens(student_targets[kept_student].tolist()),
                      teacher_tokenizer.convert_ids_to_tokens(teacher_targets[kept_teacher].tolist())))
    return teacher_tokens, batch["teacher_labels"][0].tolist(), paired


def test_positions_paired_on_hand_checked_strings(student_tokenizer, teacher_tokenizer):
    """The k-th response token of one tokenization against the k-th of the other, cut to the shorter ('Ġ' = space)."""
    tokens, labels, paired = pairs(student_tokenizer, teacher_tokenizer, "English: God said", " Dios dijo")
    # The teacher sees the same text in its own tokens, its EOS for the student's, labels on the response only.
    assert tokens == ["E", "n", "g", "l", "is", "h", ":", "ĠG", "od", "Ġsaid", "ĠD", "ios", "Ġdijo", "</s>"]
    assert labels == [-100] * 10 + teacher_tokenizer.convert_tokens_to_ids(["ĠD", "ios", "Ġdijo", "</s>"])
    # The student spells " Dios dijo</s>" in 10 tokens, the teacher in 4: the first 4 of each are paired.
    assert paired == [("Ġ", "ĠD"), ("D", "ios"), ("i", "Ġdijo"), ("o", "</s>")]
    _, _, paired = pairs(student_tokenizer, teacher_tokenizer, "And the", " earth was without form")
    assert paired == [("Ġ", "Ġe"), ("e", "ar"), ("ar", "th"), ("th", "Ġwas"), ("Ġw", "Ġwith"), ("a", "ou"), ("s", "t"),
                      ("Ġwi", "Ġfor"), ("th", "m"), ("ou", "</s>")]


def test_align_pairs_tokens_spanning_the_same_characters():
    """Spans close where both tokenizations end a token at the same character; one token a side is kept."""
    # student "a|bc|d|ef" (ends 1 3 4 6), teacher "a|b|cd|ef" (ends 1 2 4 6), then both EOS (zero width)
    assert one_to_one_spans([1, 3, 4, 6, 6], [1, 2, 4, 6, 6]) == [(0, 0), (3, 3), (4, 4)]
    assert one_to_one_spans([2, 4], [1, 2, 3, 4]) == []  # every span is one token against two
    assert one_to_one_spans([], [3]) == []


def test_align_on_hand_checked_strings(student_tokenizer, teacher_tokenizer):
    """" earth was without form</s>": the student spells it in 15 tokens, the teacher in 10; the tokens covering the
    same characters in both are "ar", "th", "ou", "t", "m" and EOS ("Ġe" vs "Ġ"+"e", "Ġwas" vs "Ġw"+"a"+"s", ...)."""
    _, labels, paired = pairs(student_tokenizer, teacher_tokenizer, "And the", " earth was without form", align=True)
    assert paired == [("ar", "ar"), ("th", "th"), ("ou", "ou"), ("t", "t"), ("m", "m"), ("</s>", "</s>")]
    assert sum(label != -100 for label in labels) == 6  # the teacher's other response tokens are not KD targets


def test_shared_vocabulary_divergence_matches_float64_reference(student_tokenizer, teacher_tokenizer):
    """Tokens spelled alike are compared one by one, the rest of each vocabulary as one bucket."""
    student_ids, teacher_ids = shared_vocabulary(student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    shared = set(student_vocab) & set(teacher_vocab)
    assert 0 < len(student_ids) == len(shared) < len(teacher_vocab)
    inverse = {i: t for t, i in student_vocab.items()}
    assert all(teacher_vocab[inverse[s]] == t for s, t in zip(student_ids.tolist(), teacher_ids.tolist()))
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(5, len(student_vocab), generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(5, len(teacher_vocab), generator=generator, dtype=torch.float64) * 2

    def buckets(logits, ids, temperature):
        z = logits / temperature
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        inside = probs[:, ids]
        return np.concatenate([inside, 1 - inside.sum(-1, keepdims=True)], -1)

    for loss_type, temperature in (("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 2.0)):
        q = buckets(student.numpy(), student_ids.numpy(), temperature)
        p = buckets(teacher.numpy(), teacher_ids.numpy(), temperature)
        if loss_type == "forward_kl":
            expected = (p * np.log(p / q)).sum(-1)
        elif loss_type == "reverse_kl":
            expected = (q * np.log(q / p)).sum(-1)
        else:
            m = 0.5 * (p + q)
            expected = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
        values = shared_vocabulary_divergence(student, teacher, student_ids, teacher_ids, loss_type=loss_type,
                                              temperature=temperature, beta=0.5)
        np.testing.assert_allclose(values.numpy(), temperature**2 * expected, rtol=1e-10)


def test_row_without_prompt_keeps_first_token_out_on_both_sides(student_tokenizer, teacher_tokenizer):
    """A row trained on every token (no labels): neither side has a target for its first token."""
    ids = student_tokenizer("God said", add_special_tokens=False)["input_ids"]
    collate = CrossTokenizerCollator(CausalLMCollator(0), student_tokenizer, teacher_tokenizer)
    batch = collate([{"input_ids": ids}])
    teacher_ids = teacher_tokenizer("God said", add_special_tokens=False)["input_ids"]
    assert batch["teacher_input_ids"][0].tolist() == teacher_ids and batch["teacher_labels"][0].tolist() == teacher_ids


def test_teacher_rows_cut_to_the_teacher_positions(student_tokenizer, teacher_tokenizer):
    ids = student_tokenizer("In the beginning God created the heaven", add_special_tokens=False)["input_ids"]
    collate = CrossTokenizerCollator(CausalLMCollator(0), student_tokenizer, teacher_tokenizer, max_length=4)
    batch = collate([{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}, {"input_ids": ids[:2]}])
    whole = teacher_tokenizer("In the beginning God created the heaven", add_special_tokens=False)["input_ids"]
    short = teacher_tokenizer(student_tokenizer.decode(ids[:2]), add_special_tokens=False)["input_ids"]
    assert len(whole) > 4 and len(short) < 4 and batch["input_ids"].shape[1] == len(ids)  # the student's rows stay whole
    assert batch["teacher_input_ids"].tolist() == [whole[:4], short + [0] * (4 - len(short))]
    assert batch["teacher_attention_mask"][1].tolist() == [1] * len(short) + [0] * (4 - len(short))


def test_prompt_in_the_teachers_tokens_is_used_as_given(student_tokenizer, teacher_tokenizer):
    """A row carrying `teacher_prompt_ids` (a recipe's, with the teacher's chat template): the teacher's row is those
    ids, then the response tokenized again; the student's batch is unchanged and never sees the column."""
    prompt = student_tokenizer("Translate: In the beginning", add_special_tokens=False)["input_ids"]
    response = student_tokenizer(" God created", add_special_tokens=False)["input_ids"] + [student_tokenizer.eos_token_id]
    templated = [7, 8, 9, 10, 11]  # stands for <|user|> ... <|assistant|> in the teacher's own tokens
    row = {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}
    collate = CrossTokenizerCollator(CausalLMCollator(0), student_tokenizer, teacher_tokenizer)
    batch = collate([{**row, "teacher_prompt_ids": templated}])
    teacher_response = teacher_tokenizer(" God created", add_special_tokens=False)["input_ids"] + [teacher_tokenizer.eos_token_id]
    assert batch["teacher_input_ids"][0].tolist() == templated + teacher_response
    assert batch["teacher_labels"][0].tolist() == [-100] * len(templated) + teacher_response
    assert batch["input_ids"][0].tolist() == row["input_ids"] and "teacher_prompt_ids" not in batch
    plain = collate([row])  # without the column: the prompt text, tokenized again
    assert plain["teacher_input_ids"][0].tolist()[-len(teacher_response):] == teacher_response
    assert plain["teacher_input_ids"][0].tolist()[: -len(teacher_response)] != templated


# ---- the trainer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_trainer_loss_matches_reference(tmp_path, student_tokenizer, teacher_tokenizer, chunked):
    """compute_loss = alpha·mean ULD over the paired positions + (1 − alpha)·CE, each model on its own tokens
    (chunked: the teacher projects only the paired positions' hidden states)."""
    teacher, student = models(student_tokenizer, teacher_tokenizer)
    dataset = prompt_response_dataset(student_tokenizer, n=8)
    for alpha in (1.0, 0.4):
        trainer = make_trainer(tmp_path, student_tokenizer, teacher_tokenizer, teacher, student, dataset, alpha=alpha,
                               temperature=2.0, chunked_loss=chunked)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["teacher_input_ids"].shape != batch["input_ids"].shape  # two tokenizations, not one
        student.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(student, batch)
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
            own = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        s_targets = batch["labels"][:, 1:] != -100
        t_targets = batch["teacher_labels"][:, 1:] != -100
        distances = []
        for row in range(len(batch["input_ids"])):
            s_rows, t_rows = s_logits[row, :-1][s_targets[row]], t_logits[row, :-1][t_targets[row]]
            n = min(len(s_rows), len(t_rows))
            distances.append(uld_reference(s_rows[:n].double().numpy(), t_rows[:n].double().numpy(), 2.0))
        kd = np.concatenate(distances).mean()
        assert loss.item() == pytest.approx(alpha * kd + (1 - alpha) * own.item(), rel=1e-5)
        assert trainer._use_chunks["teacher"] is chunked


@pytest.mark.parametrize("mode", ["uld", "align"])
def test_gradient_accumulation_counts_paired_positions(tmp_path, student_tokenizer, teacher_tokenizer, mode):
    """One step of batch 8 equals batch 4 × accumulation 2: the KD term is divided by the paired positions of the step."""
    teacher, student = models(student_tokenizer, teacher_tokenizer)
    dataset = prompt_response_dataset(student_tokenizer, n=8)
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = copy.deepcopy(student)
        make_trainer(
            tmp_path, student_tokenizer, teacher_tokenizer, teacher, model, dataset, alpha=0.7, cross_tokenizer=mode,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
            learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
        ).train()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# ---- (c) the student moves toward the teacher ----------------------------------------------------------------


def test_distilled_student_moves_toward_the_teacher(tmp_path, student_tokenizer, teacher_tokenizer):
    """On held-out rows the ULD distance to the teacher falls by half, and below that of the same student trained for the
    same steps on its labels alone (which also sharpens its distributions, but not to the teacher's shape)."""
    teacher, student = models(student_tokenizer, teacher_tokenizer)
    rows = prompt_response_dataset(student_tokenizer, n=48)
    train, held_out = rows.select(range(32)), rows.select(range(32, 48))
    runs = {}
    for alpha in (1.0, 0.0):  # distilled, and the same student trained on its own labels only
        trainer = DistillationTrainer(
            model=copy.deepcopy(student), teacher_model=teacher, train_dataset=train, eval_dataset=held_out,
            args=config(tmp_path, alpha=alpha, max_steps=30, learning_rate=1e-2),
            processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer,
        )
        before = trainer.evaluate()["eval_kd_loss"]
        trainer.train()
        runs[alpha] = (before, trainer.evaluate()["eval_kd_loss"])
    (before, distilled), (_, baseline) = runs[1.0], runs[0.0]
    assert distilled < 0.5 * before, runs
    assert distilled < baseline, runs
    assert teacher.training is False and all(not p.requires_grad for p in teacher.parameters())


def test_align_with_one_tokenizer_is_the_ordinary_divergence(tmp_path, student_tokenizer):
    """The same tokenizer on both sides: every token pairs with itself and the whole vocabulary is shared, so 'align'
    gives exactly the divergence of a run without cross_tokenizer (the check on the pairing and the id mapping)."""
    teacher = sharpen(small_llama(len(student_tokenizer), hidden_size=64, num_layers=2, seed=0))
    student = small_llama(len(student_tokenizer), hidden_size=32, num_layers=1, seed=1)
    dataset = prompt_response_dataset(student_tokenizer, n=8)
    losses = {}
    for mode in (None, "align"):
        trainer = make_trainer(tmp_path, student_tokenizer, student_tokenizer, teacher, student, dataset, alpha=0.6,
                               temperature=2.0, loss_type="jsd", cross_tokenizer=mode)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses[mode] = trainer.compute_loss(student.eval(), batch)
    assert batch["aligned_labels"].tolist() == batch["labels"].tolist()
    torch.testing.assert_close(losses["align"], losses[None], rtol=1e-5, atol=1e-6)


def test_align_training_lowers_the_divergence_and_logs_the_aligned_fraction(tmp_path, student_tokenizer, teacher_tokenizer):
    """'align' on two tokenizers: the held-out divergence at the aligned positions falls by half, and the share of
    response positions distilled is logged every step (here about a third of them line up)."""
    teacher, student = models(student_tokenizer, teacher_tokenizer)
    rows = prompt_response_dataset(student_tokenizer, n=48)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=rows.select(range(32)), eval_dataset=rows.select(range(32, 48)),
        args=config(tmp_path, cross_tokenizer="align", alpha=1.0, max_steps=30, learning_rate=1e-2),
        processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_kd_loss"] < 0.5 * before["eval_kd_loss"], (before, after)
    assert 0.2 < after["eval_aligned_fraction"] < 0.6
    logged = [entry["aligned_fraction"] for entry in trainer.state.log_history if "aligned_fraction" in entry]
    assert len(logged) == 30 and all(0.2 < value < 0.6 for value in logged)


def test_teacher_folder_brings_its_own_tokenizer(tmp_path, student_tokenizer, teacher_tokenizer):
    """A teacher given as a folder: its tokenizer is loaded from it; without cross_tokenizer the mismatch is refused."""
    teacher, student = models(student_tokenizer, teacher_tokenizer)
    teacher.save_pretrained(tmp_path / "teacher")
    teacher_tokenizer.save_pretrained(tmp_path / "teacher")
    dataset = prompt_response_dataset(student_tokenizer, n=8)
    trainer = DistillationTrainer(
        model=student, teacher_model=str(tmp_path / "teacher"), args=config(tmp_path, max_steps=1),
        train_dataset=dataset, processing_class=student_tokenizer,
    )
    assert len(trainer.teacher_tokenizer) == len(AutoTokenizer.from_pretrained(tmp_path / "teacher"))
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(ValueError, match="differ: id"):
        DistillationTrainer(model=student, teacher_model=str(tmp_path / "teacher"), args=config(tmp_path, cross_tokenizer=None),
                            train_dataset=dataset, processing_class=student_tokenizer)


# ---- (d) refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, error, message",
    [
        (dict(cross_tokenizer="bpe"), ValueError, r"cross_tokenizer='bpe'; choose one of uld, align, or None"),
        (dict(cross_tokenizer="align", loss_type="mse"), ValueError, r"loss_type='mse' compares raw logits: choose"),
        (dict(teacher_cache="cache"), ValueError, r"teacher_cache='cache'.*drop teacher_cache"),
        (dict(hidden_loss_weight=1.0), ValueError, r"hidden_loss_weight=1\.0.*set hidden_loss_weight=0"),
        (dict(teacher_model_name_or_path="a,b"), ValueError, r"2 teachers: distill from one teacher"),
        (dict(lmbda=0.5), ValueError, r"lmbda=0\.5.*set lmbda=0"),
        (dict(distill_all_tokens=True), ValueError, r"distill_all_tokens=True.*drop it"),
        (dict(seq_kd=True), ValueError, r"seq_kd=True.*drop seq_kd"),
    ],
)
def test_config_refusals(tmp_path, settings, error, message):
    with pytest.raises(error, match=message):
        config(tmp_path, **settings)


def test_trainer_refusals(tmp_path, student_tokenizer, teacher_tokenizer):
    teacher, student = models(student_tokenizer, teacher_tokenizer)
    dataset = prompt_response_dataset(student_tokenizer, n=8)

    def build(**kwargs):
        arguments = dict(model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=dataset,
                         processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer)
        return DistillationTrainer(**{**arguments, **kwargs})

    with pytest.raises(ValueError, match=r"distills from one teacher, but 2 are given"):
        build(teacher_model=[teacher, teacher])
    with pytest.raises(ValueError, match=r"the student is a seq2seq model and the teacher a seq2seq model: use causal LMs"):
        build(model=tiny_t5(len(student_tokenizer), 32, 1, seed=1), teacher_model=tiny_t5(len(teacher_tokenizer), 32, 1, seed=0))
    with pytest.raises(ValueError, match=r"student is a classification model .* use causal LMs"):
        build(model=tiny_classifier(len(student_tokenizer), 32, 1, seed=1),
              teacher_model=tiny_classifier(len(teacher_tokenizer), 32, 1, seed=0))
    with pytest.raises(ValueError, match=r"needs both tokenizers: pass the teacher's tokenizer \(teacher_processing_class"):
        build(teacher_processing_class=None)
    with pytest.raises(ValueError, match=r"needs both tokenizers: pass the student's tokenizer \(processing_class"):
        build(processing_class=None, data_collator=CausalLMCollator(0))
    plain = CausalLMCollator(0)([dataset[i] for i in range(2)])  # no teacher tokens, no paired positions
    with pytest.raises(ValueError, match=r"needs each batch in the teacher's tokens too, with the positions of both"):
        build().compute_loss(student, plain)


    class Vocabulary:  # tokenizers that spell no token alike (a byte-level BPE and a SentencePiece, say)
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    with pytest.raises(ValueError, match=r"share none .*: use cross_tokenizer='uld'"):
        _shared_vocabulary(Vocabulary({"▁the": 5}), Vocabulary({"Ġthe": 5}), student, teacher)
