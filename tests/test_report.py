"""Report helpers: the comparison table, report files with training curves, and the model card."""

import json
import logging
import sys

import pytest
import yaml

from hf_distill.model_card import distillation_model_card
from hf_distill.runner.report import (
    _curves,
    comparison_table,
    format_value,
    gap_closed,
    results_table,
    steps_to_baseline,
    write_report,
)


def model_card(info, table=None):
    return str(distillation_model_card(info, table))


ROWS = [
    {"model": "teacher", "parameters": 1234567, "eval_loss": 2.312345, "perplexity": 10.0987, "accuracy": 0.91},
    {"model": "distilled", "parameters": 45678, "eval_loss": 2.5, "accuracy": 0.8765432, "agreement": 0.83,
     "latency_ms": 4.2},
    {"parameters": 950, "model": "baseline (no teacher)", "eval_loss": None, "accuracy": 0.7},
]


def history(offset=0.0):
    return [
        {"loss": 3.0 + offset, "kd_loss": 2.0 + offset, "ce_loss": 4.0, "grad_norm": 1.0, "learning_rate": 1e-3,
         "step": 5},
        {"loss": 2.5 + offset, "kd_loss": 1.5 + offset, "ce_loss": 3.5, "learning_rate": 5e-4, "step": 10},
        {"eval_loss": 2.7 + offset, "eval_kd_loss": 1.7, "eval_ce_loss": 3.7, "eval_runtime": 0.1, "step": 10},
        {"train_runtime": 1.0, "train_loss": 2.75, "step": 10},
    ]


def parse_table(table):
    lines = table.strip().splitlines()
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    return split(lines[0]), [split(line) for line in lines[2:]], lines[1]


def test_table_columns_in_first_seen_order_with_model_first():
    header, body, rule = parse_table(comparison_table(ROWS))
    assert header == ["model", "parameters", "eval_loss", "perplexity", "accuracy", "agreement", "latency_ms"]
    assert rule.count("---") == len(header)
    assert len(body) == 3 and all(len(row) == len(header) for row in body)
    assert [row[0] for row in body] == ["teacher", "distilled", "baseline (no teacher)"]


def test_table_formats_numbers_and_missing_values():
    header, body, _ = parse_table(comparison_table(ROWS))
    teacher, distilled, baseline = (dict(zip(header, row)) for row in body)
    assert teacher["parameters"] == "1.23M"
    assert distilled["parameters"] == "45.7K"
    assert baseline["parameters"] == "950"
    assert teacher["eval_loss"] == "2.312"
    assert teacher["perplexity"] == "10.1"
    assert distilled["accuracy"] == "0.8765"
    assert distilled["latency_ms"] == "4.2"
    assert teacher["agreement"] == "–"  # key absent
    assert baseline["eval_loss"] == "–"  # value None
    assert baseline["perplexity"] == "–"


def test_gap_closed_per_metric_in_the_right_direction():
    rows = [{"model": "teacher", "perplexity": 50.0, "accuracy": 0.9, "bleu": 10.0, "chrf": 30.0},
            {"model": "distilled", "perplexity": 80.0, "accuracy": 0.8, "bleu": 12.0, "chrf": float("nan")},
            {"model": "baseline (no teacher)", "perplexity": 100.0, "accuracy": 0.7, "bleu": 14.0, "chrf": 20.0}]
    closed = gap_closed(rows)
    # perplexity: (100 − 80) / (100 − 50); accuracy: (0.8 − 0.7) / (0.9 − 0.7); BLEU: the baseline beats the teacher,
    # so there is no gap; chrF: the student's score is missing.
    assert closed == {"perplexity": pytest.approx(0.4), "accuracy": pytest.approx(0.5)}
    table = results_table(rows)
    assert table.startswith(comparison_table(rows))
    assert "closes 40% on perplexity, 50% on accuracy of the gap" in table
    worse = [dict(rows[0]), dict(rows[1], perplexity=120.0), rows[2]]
    assert gap_closed(worse)["perplexity"] == pytest.approx(-0.4)  # below the baseline: negative
    assert gap_closed(rows[:2]) == {} and results_table(rows[:2]) == comparison_table(rows[:2])  # no baseline row
    assert gap_closed([dict(rows[0], model="teacher (own tokenizer)"), *rows[1:]]) == {}


def evaluations(key, losses, **extra):
    return [{key: loss, "step": 10 * (i + 1), **extra} for i, loss in enumerate(losses)]


def test_steps_to_baseline_reads_held_out_ce_and_interpolates(tmp_path):
    baseline = evaluations("eval_loss", [5.0, 4.0, 3.5, 3.2])  # plain CE: it logs no KD term; 40 steps, ends at 3.2
    # The distilled run's eval_loss blends KD and CE (here far lower): only its eval_ce_loss counts.
    distilled = [dict(entry, eval_loss=1.0, eval_kd_loss=0.5)
                 for entry in evaluations("eval_ce_loss", [4.5, 3.6, 3.0, 2.8])]
    histories = {"distilled": distilled, "baseline (no teacher)": baseline}
    # 3.6 at step 20, 3.0 at step 30: 3.2 is reached at 20 + 10 · 0.4 / 0.6 = 26.67 of the baseline's 40 steps.
    assert steps_to_baseline(histories) == pytest.approx((20 + 10 * 0.4 / 0.6) / 40)
    table = results_table(ROWS, histories)
    assert "Steps to baseline: the distilled student reached the baseline's final held-out loss after 67% of" in table
    slow = {"distilled": evaluations("eval_ce_loss", [4.5, 3.6, 3.3, 3.25], eval_kd_loss=0.5), **{
        "baseline (no teacher)": baseline}}
    assert steps_to_baseline(slow) == float("inf") and "not within its run" in results_table(ROWS, slow)
    report = json.loads(write_report(ROWS, slow, tmp_path)["json"].read_text())
    assert report["steps_to_baseline"] == "never"
    first = {"distilled": evaluations("eval_ce_loss", [3.1]), "baseline (no teacher)": baseline}
    assert steps_to_baseline(first) == pytest.approx(10 / 40)  # at its first evaluation already
    unevaluated = {"distilled": history(), "baseline (no teacher)": [{"loss": 3.0, "step": 10}]}
    assert steps_to_baseline(unevaluated) is None and results_table(ROWS, unevaluated) == results_table(ROWS)


def test_format_value():
    assert format_value("parameters", 7_241_732_096) == "7.24B"
    assert format_value("eval_loss", float("nan")) == "–"
    assert format_value("eval_loss", 123456.7) == "123457"
    assert format_value("model", "a|b") == "a\\|b"


def test_table_needs_rows():
    with pytest.raises(ValueError):
        comparison_table([])


def test_write_report(tmp_path):
    histories = {"distilled": history(), "baseline (no teacher)": history(offset=0.5)}
    paths = write_report(ROWS, histories, tmp_path / "out", title="My report")
    assert set(paths) == {"markdown", "json", "curves"}
    for path in paths.values():
        assert path.is_file() and path.parent == tmp_path / "out"
    assert {path.name for path in paths.values()} == {"report.md", "report.json", "training_curves.png"}

    png = paths["curves"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert markdown.startswith("# My report")
    assert comparison_table(ROWS) in markdown
    assert "training_curves.png" in markdown

    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["rows"] == ROWS
    assert data["histories"] == histories


def test_write_report_without_curves(tmp_path):
    paths = write_report(ROWS[:1], {"run": [{"train_runtime": 1.0, "step": 0}]}, tmp_path)
    assert paths["curves"].read_bytes().startswith(b"\x89PNG")


def baseline_history():
    """A plain-CE run (no KD term): its `loss` and `eval_loss` are cross-entropy."""
    return [{"loss": 3.9, "step": 5}, {"loss": 3.4, "step": 10}, {"eval_loss": 3.6, "step": 10}]


def test_curves_compare_like_with_like():
    curves = _curves({"distilled": history(), "plain": baseline_history()})
    # CE beside CE: the distilled run's ce_loss (not its blended loss) next to the plain run's loss.
    assert curves["ce_loss"] == {"distilled": ([5, 10], [4.0, 3.5]), "plain": ([5, 10], [3.9, 3.4])}
    assert curves["eval_ce_loss"] == {"distilled": ([10], [3.7]), "plain": ([10], [3.6])}
    # KD terms only for the run that has them; the blended loss is no panel.
    assert curves["kd_loss"] == {"distilled": ([5, 10], [2.0, 1.5])}
    assert curves["eval_kd_loss"] == {"distilled": ([10], [1.7])}
    assert set(curves) == {"ce_loss", "eval_ce_loss", "kd_loss", "eval_kd_loss"}


def test_curves_never_show_a_distilled_runs_blended_loss():
    # A distilled run that logged no CE term has no CE curve, rather than its alpha-blended loss.
    curves = _curves({"distilled": [{"loss": 3.0, "kd_loss": 2.0, "step": 5}, {"eval_loss": 2.7, "step": 5}]})
    assert "ce_loss" not in curves and "eval_ce_loss" not in curves


def test_write_report_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        paths = write_report(ROWS, {"distilled": history()}, tmp_path)
    assert set(paths) == {"markdown", "json"} and not (tmp_path / "training_curves.png").exists()
    assert "training_curves" not in paths["markdown"].read_text(encoding="utf-8")
    assert sum("matplotlib" in record.getMessage() for record in caplog.records) == 1


INFO = {
    "teacher": "Qwen/Qwen3-1.7B",
    "student": "Qwen/Qwen3-0.6B",
    "task": "causal",
    "dataset": "my-org/bible-en-es",
    "loss_type": "forward_kl",
    "temperature": 2.0,
    "alpha": 0.7,
    "beta": 0.5,
    "skew": 0.1,
    "max_steps": 500,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 4,
    "learning_rate": 5e-5,
    "repo_id": "me/qwen3-0.6b-distilled",
    "license": "apache-2.0",
}


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card():
    table = comparison_table(ROWS)
    card = model_card(INFO, table)
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["hf-distill", "distillation"]
    assert meta["base_model"] == "Qwen/Qwen3-0.6B"
    assert meta["datasets"] == ["my-org/bible-en-es"]
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert "Qwen/Qwen3-1.7B" in card
    assert "0.7" in card and "Alpha" in card
    assert "forward_kl" in card and "500" in card and "5e-05" in card
    assert "Beta" not in card and "Skew" not in card  # neither matters for forward KL
    assert table in card
    assert 'pipeline("text-generation", model="me/qwen3-0.6b-distilled")' in card


@pytest.mark.parametrize(
    "task, pipeline_task", [("causal", "text-generation"), ("seq2seq", "text2text-generation"),
                            ("classification", "text-classification")]
)
def test_model_card_pipeline_task(task, pipeline_task):
    card = model_card({**INFO, "task": task}, None)
    assert f'pipeline("{pipeline_task}"' in card
    assert front_matter(card)["pipeline_tag"] == pipeline_task
    assert "## Evaluation" not in card


def test_model_card_loss_specific_settings():
    assert "Beta (JSD mixture):** 0.5" in model_card({**INFO, "loss_type": "jsd"})
    assert "Skew:** 0.1" in model_card({**INFO, "loss_type": "skew_reverse_kl"})


def test_model_card_with_few_keys():
    card = model_card({"teacher": "t", "student": "./runs/student", "steps": 3, "license": None}, None)
    meta = front_matter(card)
    assert meta == {"library_name": "transformers", "tags": ["hf-distill", "distillation"]}
    assert "`t`" in card and "Training steps:** 3" in card
    assert 'pipeline(model="path/to/this/model")' in card
    # Trainer's max_steps is -1 when it trains by epochs: the steps actually run are shown instead.
    assert "Training steps:** 120" in model_card({"max_steps": -1, "steps": 120})


def test_model_card_keeps_local_names_out_of_front_matter():
    # A scratch student is named by its class, local data by file: neither is a Hub id.
    card = model_card({"student": "LlamaForCausalLM", "dataset": {"train": "data/train.jsonl"}, "task": "causal"})
    meta = front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta
    assert "`data/train.jsonl`" in card and "`LlamaForCausalLM`" in card
    assert front_matter(model_card({"student": "gpt2", "dataset": ["wmt16", "data.csv"]}))["datasets"] == ["wmt16"]


def test_model_card_object_and_extra_keys(tmp_path):
    card = distillation_model_card({**INFO, "hidden_loss_weight": 0.25}, comparison_table(ROWS))
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.library_name == "transformers"
    assert "Hidden loss weight:** 0.25" in card.text  # keys the card does not know are still shown
    card.save(tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == str(card)
