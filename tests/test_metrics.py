"""The table's metrics against values computed by hand (BLEU and chrF against sacrebleu called on its own)."""

import os
import subprocess
import sys

import pytest
import sacrebleu

from hf_distill.runner.metrics import METRIC_NAMES, compute_metric, metric_columns

from conftest import error_rate_script


def test_accuracy():
    # 4 of 6 right.
    result = compute_metric("accuracy", predictions=[0, 1, 2, 2, 1, 0], references=[0, 1, 1, 2, 1, 2])
    assert result == {"accuracy": pytest.approx(4 / 6)}
    assert compute_metric("accuracy", predictions=[1, 1], references=[1, 1])["accuracy"] == 1.0
    assert compute_metric(
        "accuracy", predictions=[0, 1, 2, 2, 1, 0], references=[0, 1, 1, 2, 1, 2], normalize=False
    )["accuracy"] == pytest.approx(4)
    weighted = compute_metric("accuracy", predictions=[0, 1], references=[0, 0], sample_weight=[3, 1])
    assert weighted["accuracy"] == pytest.approx(0.75)


def test_accuracy_length_mismatch():
    with pytest.raises(ValueError):
        compute_metric("accuracy", predictions=[0, 1], references=[0])


# 3 classes. Per class (TP, FP, FN):
#   class 0: refs at 0,1,2; preds 0 at 0,1,5 → TP 2, FP 1, FN 1 → F1 = 4/6 = 2/3
#   class 1: refs at 3,4;   preds 1 at 2,3   → TP 1, FP 1, FN 1 → F1 = 2/4 = 1/2
#   class 2: refs at 5,6,7; preds 2 at 4,6,7 → TP 2, FP 1, FN 1 → F1 = 4/6 = 2/3
PREDICTIONS = [0, 0, 1, 1, 2, 0, 2, 2]
REFERENCES = [0, 0, 0, 1, 1, 2, 2, 2]


def test_f1_macro_by_hand():
    expected = (2 / 3 + 1 / 2 + 2 / 3) / 3
    assert compute_metric("f1", predictions=PREDICTIONS, references=REFERENCES)["f1"] == pytest.approx(expected)
    assert compute_metric("f1", predictions=PREDICTIONS, references=REFERENCES, average="macro")["f1"] == (
        pytest.approx(expected)
    )


def test_f1_micro_and_weighted_by_hand():
    # Micro: TP 5, FP 3, FN 3 → 10 / 16, which is the accuracy (5 of 8) for single-label data.
    micro = compute_metric("f1", predictions=PREDICTIONS, references=REFERENCES, average="micro")
    assert micro["f1"] == pytest.approx(5 / 8)
    # Weighted by support 3, 2, 3.
    expected = (3 * 2 / 3 + 2 * 1 / 2 + 3 * 2 / 3) / 8
    weighted = compute_metric("f1", predictions=PREDICTIONS, references=REFERENCES, average="weighted")
    assert weighted["f1"] == pytest.approx(expected)


def test_f1_class_never_predicted_counts_as_zero():
    # Class 1 is never predicted: F1_1 = 0; class 0: TP 1, FP 1, FN 0 → 2/3.
    assert compute_metric("f1", predictions=[0, 0], references=[0, 1])["f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_f1_bad_average():
    with pytest.raises(ValueError, match="macro"):
        compute_metric("f1", predictions=[0], references=[0], average="samples")


def test_bleu_identical_and_disjoint():
    sentences = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    result = compute_metric("bleu", predictions=sentences, references=sentences)
    assert result["bleu"] == pytest.approx(100)
    assert result["precisions"] == pytest.approx([100, 100, 100, 100])
    assert result["brevity_penalty"] == pytest.approx(1)
    disjoint = compute_metric("bleu", predictions=["one two three four five"], references=[["six seven eight nine ten"]])
    assert disjoint["bleu"] == pytest.approx(0)


def test_bleu_matches_sacrebleu():
    predictions = ["the cat is on the mat", "there is a dog in the garden today"]
    references = [["the cat sat on the mat", "a cat is on the mat"], ["a dog is in the garden", "the dog is outside"]]
    result = compute_metric("bleu", predictions=predictions, references=references)
    expected = sacrebleu.corpus_bleu(predictions, [list(stream) for stream in zip(*references)])
    assert result["bleu"] == pytest.approx(expected.score)
    assert result["precisions"] == pytest.approx(expected.precisions)
    assert result["brevity_penalty"] == pytest.approx(expected.bp)
    assert result["translation_length"] == expected.sys_len
    assert result["reference_length"] == expected.ref_len
    assert 0 < result["bleu"] < 100


def test_bleu_single_string_references():
    predictions = ["the cat is on the mat", "there is a dog in the garden today"]
    references = ["the cat sat on the mat", "a dog is in the garden"]
    result = compute_metric("bleu", predictions=predictions, references=references)
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)


def test_bleu_ragged_references():
    predictions = ["the cat is on the mat", "there is a dog in the garden today"]
    references = [["the cat sat on the mat"], ["a dog is in the garden", "the dog is outside"]]
    result = compute_metric("bleu", predictions=predictions, references=references)
    expected = sacrebleu.corpus_bleu(predictions, [["the cat sat on the mat", "a dog is in the garden"],
                                                   [None, "the dog is outside"]])
    assert result["bleu"] == pytest.approx(expected.score)


def test_chrf():
    assert compute_metric("chrf", predictions=["the cat sat"], references=["the cat sat"])["chrf"] == pytest.approx(100)
    assert compute_metric("chrf", predictions=["aaaa"], references=["zzzz"])["chrf"] == pytest.approx(0)
    predictions = ["the cat is on the mat", "there is a dog in the garden today"]
    references = [["the cat sat on the mat", "a cat is on the mat"], ["a dog is in the garden", "the dog is outside"]]
    streams = [list(stream) for stream in zip(*references)]
    assert compute_metric("chrf", predictions=predictions, references=references)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(predictions, streams).score
    )
    plus = compute_metric("chrf", predictions=predictions, references=references, word_order=2)
    assert plus["chrf"] == pytest.approx(sacrebleu.CHRF(word_order=2).corpus_score(predictions, streams).score)
    assert plus["word_order"] == 2


def test_unknown_metric_lists_names():
    with pytest.raises(ValueError) as error:
        compute_metric("nope", [], [])
    for name in METRIC_NAMES:
        assert name in str(error.value)


def test_evaluate_metric_script_and_module(tmp_path):
    """A local `evaluate` metric script, by path or loaded, computes beside the built-in metrics, offline."""
    evaluate = pytest.importorskip("evaluate")
    script = error_rate_script(tmp_path)
    predictions, references = [0, 1, 2, 2, 1], [0, 1, 1, 2, 0]  # 2 of 5 wrong
    assert compute_metric(script, predictions, references) == {"error_rate": pytest.approx(0.4), "note": "text"}
    module = evaluate.load(script)
    assert compute_metric(module, predictions=predictions, references=references)["error_rate"] == pytest.approx(0.4)
    assert metric_columns(script, predictions, references) == {"error_rate": pytest.approx(0.4)}  # numbers only
    assert metric_columns("accuracy", predictions, references) == {"accuracy": pytest.approx(0.6)}
    with pytest.raises(ValueError, match=r"'no_such_metric\.py'.*path of an `evaluate` metric script"):
        compute_metric("no_such_metric.py", predictions, references)


def test_offline_in_a_fresh_process(tmp_path):
    # A clean cache and the Hub switched off: nothing is fetched to score.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    code = (
        "from hf_distill.runner.metrics import compute_metric\n"
        "print(compute_metric('accuracy', predictions=[1, 0], references=[1, 1])['accuracy'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0.5"
