"""The offline metrics against values computed by hand (BLEU and chrF against sacrebleu, which they wrap)."""

import os
import subprocess
import sys

import pytest
import sacrebleu

from hf_distill.runner.metrics import METRIC_NAMES, METRICS_DIR, load_metric


def test_shipped_files_exist():
    for name in METRIC_NAMES:
        assert (METRICS_DIR / f"{name}.py").is_file()


def test_one_import_per_line():
    # evaluate's dependency scan misreads `import a, b`.
    for name in METRIC_NAMES:
        for line in (METRICS_DIR / f"{name}.py").read_text().splitlines():
            if line.startswith("import "):
                assert "," not in line, line


def test_accuracy():
    accuracy = load_metric("accuracy")
    # 4 of 6 right.
    result = accuracy.compute(predictions=[0, 1, 2, 2, 1, 0], references=[0, 1, 1, 2, 1, 2])
    assert result == {"accuracy": pytest.approx(4 / 6)}
    assert accuracy.compute(predictions=[1, 1], references=[1, 1])["accuracy"] == 1.0
    assert accuracy.compute(predictions=[0, 1, 2, 2, 1, 0], references=[0, 1, 1, 2, 1, 2], normalize=False)[
        "accuracy"
    ] == pytest.approx(4)
    weighted = accuracy.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3, 1])
    assert weighted["accuracy"] == pytest.approx(0.75)


def test_accuracy_batches():
    accuracy = load_metric("accuracy")
    accuracy.add_batch(predictions=[0, 1], references=[0, 0])
    accuracy.add_batch(predictions=[2, 2], references=[2, 2])
    assert accuracy.compute()["accuracy"] == pytest.approx(0.75)


# 3 classes. Per class (TP, FP, FN):
#   class 0: refs at 0,1,2; preds 0 at 0,1,5 → TP 2, FP 1, FN 1 → F1 = 4/6 = 2/3
#   class 1: refs at 3,4;   preds 1 at 2,3   → TP 1, FP 1, FN 1 → F1 = 2/4 = 1/2
#   class 2: refs at 5,6,7; preds 2 at 4,6,7 → TP 2, FP 1, FN 1 → F1 = 4/6 = 2/3
PREDICTIONS = [0, 0, 1, 1, 2, 0, 2, 2]
REFERENCES = [0, 0, 0, 1, 1, 2, 2, 2]


def test_f1_macro_by_hand():
    f1 = load_metric("f1")
    expected = (2 / 3 + 1 / 2 + 2 / 3) / 3
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES)["f1"] == pytest.approx(expected)
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="macro")["f1"] == pytest.approx(expected)


def test_f1_micro_and_weighted_by_hand():
    f1 = load_metric("f1")
    # Micro: TP 5, FP 3, FN 3 → 10 / 16, which is the accuracy (5 of 8) for single-label data.
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="micro")["f1"] == pytest.approx(5 / 8)
    # Weighted by support 3, 2, 3.
    expected = (3 * 2 / 3 + 2 * 1 / 2 + 3 * 2 / 3) / 8
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="weighted")["f1"] == pytest.approx(
        expected
    )


def test_f1_class_never_predicted_counts_as_zero():
    # Class 1 is never predicted: F1_1 = 0; class 0: TP 1, FP 1, FN 0 → 2/3.
    f1 = load_metric("f1")
    assert f1.compute(predictions=[0, 0], references=[0, 1])["f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_f1_bad_average():
    with pytest.raises(ValueError, match="macro"):
        load_metric("f1").compute(predictions=[0], references=[0], average="samples")


def test_bleu_identical_and_disjoint():
    bleu = load_metric("bleu")
    sentences = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    result = bleu.compute(predictions=sentences, references=sentences)
    assert result["bleu"] == pytest.approx(100)
    assert result["precisions"] == pytest.approx([100, 100, 100, 100])
    assert result["brevity_penalty"] == pytest.approx(1)
    disjoint = bleu.compute(predictions=["one two three four five"], references=[["six seven eight nine ten"]])
    assert disjoint["bleu"] == pytest.approx(0)


def test_bleu_matches_sacrebleu():
    predictions = ["the cat is on the mat", "there is a dog in the garden today"]
    references = [["the cat sat on the mat", "a cat is on the mat"], ["a dog is in the garden", "the dog is outside"]]
    result = load_metric("bleu").compute(predictions=predictions, references=references)
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
    result = load_metric("bleu").compute(predictions=predictions, references=references)
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)


def test_bleu_ragged_references():
    predictions = ["the cat is on the mat", "there is a dog in the garden today"]
    references = [["the cat sat on the mat"], ["a dog is in the garden", "the dog is outside"]]
    result = load_metric("bleu").compute(predictions=predictions, references=references)
    expected = sacrebleu.corpus_bleu(predictions, [["the cat sat on the mat", "a dog is in the garden"],
                                                   [None, "the dog is outside"]])
    assert result["bleu"] == pytest.approx(expected.score)


def test_chrf():
    chrf = load_metric("chrf")
    assert chrf.compute(predictions=["the cat sat"], references=["the cat sat"])["chrf"] == pytest.approx(100)
    assert chrf.compute(predictions=["aaaa"], references=["zzzz"])["chrf"] == pytest.approx(0)
    predictions = ["the cat is on the mat", "there is a dog in the garden today"]
    references = [["the cat sat on the mat", "a cat is on the mat"], ["a dog is in the garden", "the dog is outside"]]
    streams = [list(stream) for stream in zip(*references)]
    assert chrf.compute(predictions=predictions, references=references)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(predictions, streams).score
    )
    plus = chrf.compute(predictions=predictions, references=references, word_order=2)
    assert plus["chrf"] == pytest.approx(sacrebleu.CHRF(word_order=2).corpus_score(predictions, streams).score)
    assert plus["word_order"] == 2


def test_unknown_metric_lists_shipped_names():
    with pytest.raises(ValueError) as error:
        load_metric("nope")
    for name in METRIC_NAMES:
        assert name in str(error.value)


def test_loads_offline_in_a_fresh_process(tmp_path):
    # A clean cache, and the Hub switched off: the scripts must load from the package alone.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    code = (
        "from hf_distill.runner.metrics import METRIC_NAMES, load_metric\n"
        "for name in METRIC_NAMES:\n"
        "    load_metric(name)\n"
        "print(load_metric('accuracy').compute(predictions=[1, 0], references=[1, 1])['accuracy'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0.5"
