"""Unlabeled classifier rows: CE where a label exists, KD from the teacher on every row."""

import pytest
import torch
from datasets import Dataset

from hf_distill import DistillationTrainer

from conftest import config, english_lines, sharpen, tiny_classifier

LABELS = [0, None, 2, -100, 1, None]  # rows 1, 3 and 5 have no label


def classifier_pair(tokenizer):
    return sharpen(tiny_classifier(len(tokenizer), 64, 2, seed=0), 30.0), tiny_classifier(len(tokenizer), 32, 1, seed=1)


def rows(tokenizer, labels=LABELS):
    encoded = tokenizer(english_lines(len(labels)), truncation=True, max_length=24)
    return Dataset.from_dict({**encoded, "label": labels})


def test_loss_counts_ce_on_labeled_rows_and_kd_on_all(tmp_path, tokenizer):
    teacher, student = classifier_pair(tokenizer)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=rows(tokenizer), processing_class=tokenizer,
        args=config(tmp_path, alpha=0.6, temperature=2.0, loss_type="forward_kl", per_device_train_batch_size=6,
                    max_steps=1),
    )
    batches, counts = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, torch.device("cpu"))
    batch = batches[0]
    assert counts.tolist() == [3, 6]  # (CE, KD): three labeled rows, six distilled
    assert sorted(batch["labels"].tolist()) == sorted([-100 if label is None else label for label in LABELS])
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), batch, num_items_in_batch=counts)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s, t = student(**inputs).logits.double(), teacher(**inputs).logits.double()

    # By hand, in float64: T²·KL(p_t‖p_s) at T=2 averaged over all 6 rows; CE over the 3 labeled rows.
    T = 2.0
    p = torch.softmax(t / T, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum(-1)
    labeled = batch["labels"] != -100
    ce = -torch.log_softmax(s, -1)[labeled].gather(1, batch["labels"][labeled][:, None]).squeeze(1)
    expected = 0.6 * T * T * kl.sum() / 6 + 0.4 * ce.sum() / 3
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)

    trainer.train()  # and it trains, logging both terms
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert log["kd_loss"] > 0 and log["ce_loss"] > 0


def test_dataset_without_a_label_column(tmp_path, tokenizer):
    teacher, student = classifier_pair(tokenizer)
    dataset = rows(tokenizer).remove_columns("label")
    before = torch.cat([p.detach().flatten() for p in student.parameters()])
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
        args=config(tmp_path, alpha=0.5, per_device_train_batch_size=3, max_steps=2),
    )
    trainer.train()
    assert not torch.equal(torch.cat([p.detach().flatten() for p in student.parameters()]), before)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["kd_loss"] > 0 and "ce_loss" not in log for log in logs)  # no label, no CE
    with pytest.raises(ValueError, match=r"None of the 6 rows of train_dataset has a label, and alpha=0.*set alpha > 0"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=dataset, processing_class=tokenizer,
                            args=config(tmp_path, alpha=0.0))


def test_classifier_recipe_with_unlabeled_rows(tmp_path, tokenizer):
    """Training keeps the unlabeled rows (the report counts the labeled ones); held-out rows need labels to be scored."""
    import json

    from conftest import REPO
    from hf_distill.runner.cli import main
    from conftest import FAST, saved_classifiers

    texts = english_lines(48)
    labels = [None if i % 4 == 0 else int("LORD" in t) for i, t in enumerate(texts)]
    Dataset.from_dict({"sentence": texts, "label": labels}).to_json(tmp_path / "partly_labeled.jsonl")
    teacher_dir, student_dir = saved_classifiers(tmp_path, tokenizer)
    out = tmp_path / "run"
    assert main([
        "train", str(REPO / "recipes" / "sentiment_classifier.yaml"), "--teacher_model_name_or_path", str(teacher_dir),
        "--student_model_name_or_path", str(student_dir), "--tokenizer_name_or_path", str(teacher_dir),
        "--data_files", str(tmp_path / "partly_labeled.jsonl"), "--test_split", "train", "--output_dir", str(out), *FAST,
    ]) == 0
    samples = json.loads((out / "samples.json").read_text())
    truncation = samples["truncation"]
    assert samples["labeled_rows"]["of"] == truncation["train"]["kept"] == 48 - 8  # 8 eval rows carved
    assert 0 < samples["labeled_rows"]["train"] < samples["labeled_rows"]["of"]  # unlabeled rows train too
    # The test split (all 48 rows here) is scored against labels: its 12 unlabeled rows are dropped and counted.
    assert truncation["test"]["dropped"] == truncation["test"]["reasons"]["no label"] == labels.count(None) == 12
    assert truncation["eval"]["dropped"] == truncation["eval"]["reasons"].get("no label", 0)
    unlabeled_eval = truncation["eval"]["dropped"]
    assert samples["labeled_rows"]["train"] == 36 - (8 - unlabeled_eval)  # the labeled rows not carved for eval
