"""The `hf-distill` command and recipes end to end on tiny local models: train, report, export, eval, demo."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_distill.config import DistillationConfig
from hf_distill.runner import commands
from hf_distill.runner.cli import TeacherArguments, main, parse_recipe
from hf_distill.runner.scratch import small_llama

from conftest import DATA, FAST, REPO, english_lines, error_rate_script, saved_classifiers, sharpen, tiny_t5

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_parse(recipe):
    args, config = parse_recipe(str(recipe), ["--use_cpu", "true"])  # bf16 recipes are for GPUs; CPU bf16 parses too
    assert args.task in ("causal", "seq2seq", "classification")
    assert config.teacher_model_name_or_path and (args.student_model_name_or_path or args.student_init == "from_teacher")
    assert args.baseline  # every recipe compares with the no-teacher student


def test_overrides_win_over_yaml():
    args, config = parse_recipe(
        str(REPO / "recipes" / "translation.yaml"),
        ["--alpha", "0.9", "--student_init", "from_teacher", "--student_layers", "0", "3", "--learning_rate", "1e-3"],
    )
    assert config.alpha == 0.9 and config.learning_rate == 1e-3
    assert args.student_init == "from_teacher" and args.student_layers == [0, 3]
    assert config.loss_type == "forward_kl"  # from the YAML


# ---- the command a person types: help, one-line errors, paths checked before anything loads ---------------


def test_train_help_groups_fields(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    recipe, distillation, training = (text.index(title) for title in ("recipe:", "distillation", "training:"))
    assert recipe < distillation < training
    assert "--dataset_name" in text[recipe:distillation] and "A Hub dataset id" in text[recipe:distillation]
    assert "--alpha" in text[distillation:training] and "Weight of the distillation term" in text
    assert "--learning_rate" in text[training:] and "--help-all" in text
    assert "--adam_beta1" not in text  # the long tail of TrainingArguments waits for --help-all
    assert main(["train", "--help-all"]) == 0
    assert "--adam_beta1" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "eval", "cache-teacher", "generate-targets"])
def test_help_reads_the_fields_the_parser_takes(command):
    """The help is read from the dataclasses' source; it lists each field the command parses, with its help, and
    its default and choices wherever the source spells them out."""
    from hf_distill.runner.arguments import COMMAND_FIELDS
    from hf_distill.runner.fields import UNKNOWN, command_fields

    real = {spec.name: spec for cls in COMMAND_FIELDS[command] for spec in dataclasses.fields(cls) if spec.init}
    read = {spec.name: spec for spec in command_fields(command)}
    assert read.keys() == real.keys()
    for name, spec in read.items():
        assert spec.help == real[name].metadata.get("help", ""), name
        if spec.default is not UNKNOWN:
            default = real[name].default
            if default is dataclasses.MISSING and real[name].default_factory is not dataclasses.MISSING:
                default = real[name].default_factory()
            assert spec.default == default, name
        if spec.choices is not None and "choices" in real[name].metadata:
            assert spec.choices == list(real[name].metadata["choices"]), name
    assert read["loss_type" if command == "train" else "seed"].help


def test_help_imports_no_torch():
    """`hf-distill --help` and `hf-distill train --help` print without loading torch or transformers."""
    code = ("import sys; from hf_distill.runner.cli import main; main(['train', '--help']); "
            "heavy = {'torch', 'transformers', 'torchao'} & set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "--alpha" in result.stdout and result.stderr == ""
    top = subprocess.run([sys.executable, "-m", "hf_distill.runner.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert top.returncode == 0 and "train" in top.stdout and top.stderr == ""


def test_cache_teacher_help_lists_only_its_fields(capsys):
    assert main(["cache-teacher", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--cache_dir" in text and "--teacher_model_name_or_path" in text and "--max_length" in text
    assert "--learning_rate" not in text and "--alpha" not in text


def refuse_to_run(*args, **kwargs):
    raise AssertionError("a user error must be reported before anything loads")


def as_if_online(monkeypatch):
    # The recipes name Hub models, which the offline check would refuse; nothing is downloaded here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def nothing_runs(monkeypatch):
    as_if_online(monkeypatch)
    for name in ("train_recipe", "evaluate_saved", "cache_recipe_teacher", "run_demo"):
        monkeypatch.setattr(commands, name, refuse_to_run)


def one_line_error(capsys, *words):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-distill: error:"), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "no/such/recipe.yaml"], ["no/such/recipe.yaml", "not found"]),
        (["train", "RECIPE", "--alpah", "0.5"], ["--alpah", "--alpha"]),  # a typo gets a suggestion
        (["train", "RECIPE", "--alpha", "2"], ["alpha=2.0"]),
        (["train", "RECIPE", "--alpha", "high"], ["--alpha", "'high'"]),
        (["train", "RECIPE", "--data_files", "no/such/data.jsonl"], ["data_files", "no/such/data.jsonl"]),
        (["train", "RECIPE", "--dataset_name", "recipes/data/missing.jsonl"], ["missing.jsonl", "Hub dataset id"]),
        (["train", "RECIPE", "--dataset_name", "not a/dataset"], ["'not a/dataset'"]),
        (["train", "RECIPE", "--teacher_model_name_or_path", "./no/teacher"], ["teacher_model_name_or_path"]),
        (["train", "RECIPE", "--student_model_name_or_path", "/no/such/student"], ["student_model_name_or_path"]),
        (["train", "RECIPE", "--teacher_cache", "no_such_cache"], ["teacher_cache"]),
        (["eval", "RECIPE", "--model", "s=./no/student"], ["--model s", "./no/student"]),
        (["eval", "RECIPE", "--model", "s=gpt2", "--learning_rate", "1"], ["does not use --learning_rate"]),
        (["eval", "RECIPE"], ["--model"]),
        (["cache-teacher", "RECIPE", "--cache_dir", "c", "--teacher_model_init_kwargs", "{bad"], ["not valid JSON"]),
        (["cache-teacher", "RECIPE"], ["--cache_dir"]),
        (["distil", "RECIPE"], ["'distil'"]),
        (["demo", "--fast"], ["--fast"]),
    ],
)
def test_user_errors_are_one_line(argv, words, capsys, nothing_runs):
    # eval and cache-teacher read a bf16 recipe on a CPU machine: they build no TrainingArguments.
    recipe = str(REPO / "recipes" / ("translation.yaml" if argv[0] == "train" else "translation_causal.yaml"))
    assert main([recipe if arg == "RECIPE" else arg for arg in argv]) == 2
    one_line_error(capsys, *words)


def test_debug_shows_the_traceback(capsys, monkeypatch, nothing_runs):
    with pytest.raises(ValueError, match="not found"):
        main(["train", "missing.yaml", "--debug"])
    with pytest.raises(ValueError, match="not found"):
        main(["--debug", "train", "missing.yaml"])
    monkeypatch.setenv("HF_DISTILL_DEBUG", "1")
    with pytest.raises(ValueError, match="not found"):
        main(["train", "missing.yaml"])


def test_training_arguments_debug_keeps_its_value(nothing_runs, capsys):
    # TrainingArguments' own --debug takes a value: it is a field, not the traceback switch.
    with pytest.raises(AssertionError, match="before anything loads"):
        main(["train", str(REPO / "recipes" / "translation.yaml"), "--dataset_name", DATA,
              "--debug", "underflow_overflow", "--use_cpu", "true"])


def test_errors_while_running_are_one_line(capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise ValueError("The data has columns ['a']\nbut the recipe needs ['source']")

    as_if_online(monkeypatch)
    monkeypatch.setattr(commands, "train_recipe", fails)
    assert main(["train", str(REPO / "recipes" / "translation.yaml"), "--dataset_name", DATA]) == 2
    assert "--debug" in one_line_error(capsys, "columns ['a'] but the recipe")


def test_eval_and_cache_teacher_build_no_training_arguments(monkeypatch):
    def no_training_arguments(self):
        raise AssertionError("TrainingArguments built")

    monkeypatch.setattr(DistillationConfig, "__post_init__", no_training_arguments)
    recipe_file = str(REPO / "recipes" / "translation_causal.yaml")  # bf16: true, a GPU-only training setting
    recipe, teacher = parse_recipe(recipe_file, ["--temperature", "2"], command="cache-teacher")
    assert isinstance(teacher, TeacherArguments) and teacher.temperature == 2.0
    assert teacher.teacher_model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert teacher.teacher_model_init_kwargs == {"dtype": "bfloat16"} and recipe.task == "causal"
    _, seed = parse_recipe(recipe_file, ["--seed", "7"], command="eval")
    assert seed.seed == 7


def test_unknown_yaml_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: causal\nalpah: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown fields \['alpah'\]"):
        parse_recipe(str(bad), [])


def test_bad_override_value():
    with pytest.raises(ValueError, match="alpha=2.0"):
        parse_recipe(str(REPO / "recipes" / "translation.yaml"), ["--alpha", "2"])


def test_train_causal_translation_recipe(tmp_path, causal_dirs, capsys):
    out = tmp_path / "run"
    code = main([
        "train", str(REPO / "recipes" / "translation_causal.yaml"),
        "--teacher_model_name_or_path", str(causal_dirs / "teacher"), "--teacher_model_init_kwargs", "{}",
        "--student_model_name_or_path", str(causal_dirs / "student"), "--dataset_name", DATA,
        "--max_train_samples", "64", "--max_length", "64", "--output_dir", str(out), *FAST,
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| distilled |" in printed and "| baseline (no teacher) |" in printed
    report = json.loads((out / "report.json").read_text())
    names = [row["model"] for row in report["rows"]]
    assert names == ["teacher", "distilled", "baseline (no teacher)"]
    assert all("chrf" in row and "perplexity" in row for row in report["rows"])
    assert (out / "training_curves.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "skew_reverse_kl" in card and str(causal_dirs / "teacher") in card and "| distilled |" in card
    assert DATA not in card and f"`{os.path.relpath(DATA)}`" in card  # the data as given, never an absolute path
    assert (out / "_baseline" / "model.safetensors").exists()

    # The exported student loads with from_pretrained and runs in a pipeline.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 1
    generator = pipeline("text-generation", model=str(out), device="cpu")
    assert isinstance(generator("English: In the beginning", max_new_tokens=3)[0]["generated_text"], str)

    # eval compares saved models on the recipe's test split.
    capsys.readouterr()
    main(["eval", str(REPO / "recipes" / "translation_causal.yaml"), "--model", f"student={out}",
          "--model", f"baseline={out / '_baseline'}", "--teacher", str(causal_dirs / "teacher"),
          "--dataset_name", DATA, "--held_out_size", "8", "--eval_max_new_tokens", "4", "--max_length", "64",
          "--output", str(tmp_path / "eval.json")])
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [row["model"] for row in rows] == ["student", "baseline"] and all("agreement" in row for row in rows)


def test_cache_teacher_then_train_from_cache(tmp_path, causal_dirs):
    common = [str(REPO / "recipes" / "translation_causal.yaml"),
              "--teacher_model_name_or_path", str(causal_dirs / "teacher"), "--teacher_model_init_kwargs", "{}",
              "--student_model_name_or_path", str(causal_dirs / "student"), "--dataset_name", DATA,
              "--max_train_samples", "32", "--max_length", "64", "--held_out_size", "8"]
    assert main(["cache-teacher", *common, "--cache_dir", str(tmp_path / "cache")]) == 0
    assert (tmp_path / "cache" / "cache_info.json").exists()
    out = tmp_path / "run"
    assert main(["train", *common, "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(out), *FAST[:2],
                 *FAST[6:], "--eval_max_new_tokens", "4", "--per_device_train_batch_size", "4"]) == 0
    history = json.loads((out / "report.json").read_text())["histories"]["distilled"]
    assert any("kd_loss" in log for log in history)


def test_seq2seq_recipe(tmp_path, tokenizer, capsys):
    teacher_dir, student_dir = tmp_path / "t5", tmp_path / "t5-small"
    tiny_t5(len(tokenizer), 32, 2, seed=0).save_pretrained(teacher_dir)
    tiny_t5(len(tokenizer), 16, 1, seed=1).save_pretrained(student_dir)
    tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "run"
    assert main(["train", str(REPO / "recipes" / "translation.yaml"), "--teacher_model_name_or_path", str(teacher_dir),
                 "--student_init", "from_teacher", "--dataset_name", DATA, "--output_dir", str(out), *FAST]) == 2
    assert "two stacks" in capsys.readouterr().err
    assert main([
        "train", str(REPO / "recipes" / "translation.yaml"), "--teacher_model_name_or_path", str(teacher_dir),
        "--student_model_name_or_path", str(student_dir), "--tokenizer_name_or_path", str(teacher_dir),
        "--dataset_name", DATA,
        "--max_train_samples", "32", "--max_length", "48", "--max_target_length", "48", "--output_dir", str(out), *FAST,
    ]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert rows[1]["parameters"] < rows[0]["parameters"] and "bleu" in rows[1]


def test_classification_and_label_word_recipes(tmp_path, tokenizer):
    texts = english_lines(80)
    Dataset.from_dict({"sentence": texts, "label": [int("LORD" in t) for t in texts]}).to_csv(tmp_path / "sst.csv")
    teacher_dir, student_dir = saved_classifiers(tmp_path, tokenizer)
    out = tmp_path / "classifier"
    assert main([
        "train", str(REPO / "recipes" / "sentiment_classifier.yaml"), "--teacher_model_name_or_path", str(teacher_dir),
        "--student_model_name_or_path", str(student_dir), "--tokenizer_name_or_path", str(teacher_dir),
        "--data_files", str(tmp_path / "sst.csv"), "--test_split", "train", "--output_dir", str(out), *FAST,
        "--metrics", error_rate_script(tmp_path),  # a user's `evaluate` metric beside the built-in ones
    ]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert all(0 <= row["accuracy"] <= 1 and "macro_f1" in row for row in rows)
    assert all(row["error_rate"] == pytest.approx(1 - row["accuracy"]) for row in rows)
    classifier = pipeline("text-classification", model=str(out), device="cpu")
    assert classifier("And God said")[0]["label"] in ("LABEL_0", "LABEL_1")

    lm_dir = tmp_path / "lm"
    small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=0).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    out = tmp_path / "label_words"
    assert main([
        "train", str(REPO / "recipes" / "sentiment.yaml"), "--teacher_model_name_or_path", str(lm_dir),
        "--teacher_model_init_kwargs", "{}", "--student_model_name_or_path", str(lm_dir),
        "--data_files", str(tmp_path / "sst.csv"), "--test_split", "train", "--output_dir", str(out), *FAST,
    ]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert all(0 <= row["accuracy"] <= 1 for row in rows)


def test_push_to_hub_uses_the_model_card(tmp_path, causal_dirs, monkeypatch):
    """push_to_hub goes through Trainer's own path; a local stand-in for the Hub API records the upload."""
    import shutil

    import transformers.trainer

    uploads = []

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            target = tmp_path / "hub" / repo_id
            shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns(*ignore_patterns))
            uploads.append(target)

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeHub())
    out = tmp_path / "run"
    assert main([
        "train", str(REPO / "recipes" / "translation_causal.yaml"),
        "--teacher_model_name_or_path", str(causal_dirs / "teacher"), "--teacher_model_init_kwargs", "{}",
        "--student_model_name_or_path", str(causal_dirs / "student"), "--dataset_name", DATA,
        "--max_train_samples", "32", "--max_length", "64", "--output_dir", str(out), "--push_to_hub", "true",
        "--hub_model_id", "someone/tiny-distilled", *FAST,
    ]) == 0
    assert len(uploads) == 1
    pushed = uploads[0]
    assert (pushed / "model.safetensors").exists() and not (pushed / "_baseline").exists()
    card = (pushed / "README.md").read_text()
    assert "someone/tiny-distilled" in card and "| baseline (no teacher) |" in card


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| distilled |" in printed and "| baseline (no teacher) |" in printed
    assert (out / "student" / "report.md").exists() and (out / "student" / "README.md").exists()
    assert (out / "demo_recipe.yaml").exists()
    before = (out / "student" / "report.md").read_text()
    ppl = {row["model"]: row["perplexity"] for row in json.loads((out / "student" / "report.json").read_text())["rows"]}
    assert ppl["teacher"] < ppl["baseline (no teacher)"]  # the demo's teacher is trained: there is a gap to close
    share = (ppl["baseline (no teacher)"] - ppl["distilled"]) / (ppl["baseline (no teacher)"] - ppl["teacher"])
    assert f"closes {100 * share:.0f}% on perplexity" in printed and f"closes {100 * share:.0f}% on perplexity" in before
    assert f"{100 * share:.0f}% on perplexity" in (out / "student" / "README.md").read_text()  # the model card
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "student" / "report.md").read_text() == before


# ---- students made from the teacher, and plain-text language modeling ---------------------------------------


@pytest.fixture(scope="module")
def deep_teacher_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("deep")
    teacher = sharpen(small_llama(len(tokenizer), hidden_size=48, num_layers=6, seed=2), 5.0)
    teacher.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_prune_command_saves_a_student_that_reloads_and_generates(tmp_path, deep_teacher_dir, capsys):
    out = tmp_path / "student"
    code = main(["prune", str(deep_teacher_dir), "--output_dir", str(out), "--num_layers", "3",
                 "--intermediate_size", "96", "--data_files", DATA, "--text_column", "translation.en", "--rows", "8"])
    assert code == 0
    assert "3 of the teacher's 6 layers" in capsys.readouterr().out
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == 96
    generator = pipeline("text-generation", model=str(out))
    assert generator("And God said", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("And God said")
    # a second run never overwrites the student
    capsys.readouterr()
    assert main(["prune", str(deep_teacher_dir), "--output_dir", str(out), "--num_layers", "2", "--data_files", DATA,
                 "--text_column", "translation.en"]) == 2
    one_line_error(capsys, "not empty")


def test_lm_from_teacher_recipe(tmp_path, deep_teacher_dir, capsys):
    out = tmp_path / "lm"
    code = main([
        "train", str(REPO / "recipes" / "lm_from_teacher.yaml"), "--teacher_model_name_or_path", str(deep_teacher_dir),
        "--dataset_name", DATA, "--student_num_layers", "2", "--max_length", "32", "--max_train_samples", "200",
        "--output_dir", str(out), *FAST, "--eval_strategy", "steps", "--eval_steps", "1",  # as the recipe evaluates
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| distilled |" in printed and "| baseline (no teacher) |" in printed
    report = json.loads((out / "report.json").read_text())
    # Both runs evaluated at each step: the report says when the distilled student reached the baseline's last loss.
    assert report["steps_to_baseline"] == "never" or 0 < report["steps_to_baseline"] <= 1
    assert "Steps to baseline: the distilled student reached the baseline's final held-out loss" in printed
    assert "2 of the teacher's 6 layers" in report["student"] and "block influence" in report["student"]
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["distilled"]["layers"] == 2 and rows["distilled"]["size_vs_teacher"] < 1
    assert "perplexity" in rows["distilled"] and "bleu" not in rows["distilled"]  # plain text: perplexity is the metric
    history = report["histories"]["distilled"]
    assert any("hidden_loss" in log for log in history)  # the recipe's hidden-state term is on
    baseline = report["histories"]["baseline (no teacher)"]  # ... and off for the baseline, which never sees the teacher
    assert any("loss" in log for log in baseline) and not any("hidden_loss" in log or "kd_loss" in log for log in baseline)
    ppl = {name: rows[name]["perplexity"] for name in ("teacher", "distilled", "baseline (no teacher)")}
    gap = ppl["baseline (no teacher)"] - ppl["teacher"]  # the share of it the student closes, where there is one
    expected = {"perplexity": (ppl["baseline (no teacher)"] - ppl["distilled"]) / gap} if gap > 0 else {}
    assert report["gap_closed"] == pytest.approx(expected)
    assert ("Gap closed: the distilled student closes" in printed) == bool(expected)
    rates = [[log["learning_rate"] for log in h if "learning_rate" in log] for h in (history, baseline)]
    assert rates[1][0] == pytest.approx(rates[0][0] / 2)  # the recipe's baseline_learning_rate: 1e-3 against 2e-3
    assert (out / "_baseline").is_dir()
    assert "block influence" in (out / "README.md").read_text()
    student = AutoModelForCausalLM.from_pretrained(out)
    assert len(student.config.distill_source_layers) == 2


def write_plain_text(root, shape: str) -> str:
    """The same English text as a user may hold it: rows of {"text"} in a file or save_to_disk folder, or .txt files."""
    lines = english_lines(120)
    if shape in ("jsonl", "csv", "parquet", "save_to_disk"):
        rows = Dataset.from_dict({"text": lines})
        path = root / (f"text.{shape}" if shape != "save_to_disk" else "saved")
        {"jsonl": rows.to_json, "csv": rows.to_csv, "parquet": rows.to_parquet, "save_to_disk": rows.save_to_disk}[shape](
            str(path))
        return str(path)
    folder = root / "texts"
    folder.mkdir()
    for part in range(2):  # paragraphs of a few wrapped lines, separated by blank lines
        paragraphs = ["\n".join(lines[i : i + 2]) for i in range(part * 60, part * 60 + 60, 2)]
        (folder / f"part{part}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return str(folder if shape == "txt_folder" else folder / "part0.txt")


@pytest.mark.parametrize("shape", ["jsonl", "csv", "parquet", "save_to_disk", "txt_folder", "txt_file"])
def test_lm_recipe_reads_plain_text(tmp_path, deep_teacher_dir, shape):
    """recipes/lm_from_teacher.yaml as shipped takes plain text in every shape, with no column option."""
    out = tmp_path / "lm"
    code = main(["train", LM_RECIPE, "--teacher_model_name_or_path", str(deep_teacher_dir), "--dataset_name",
                 write_plain_text(tmp_path, shape), "--student_num_layers", "2", "--max_length", "32", "--baseline",
                 "false", "--output_dir", str(out), *FAST[:2], "--held_out_size", "4", *FAST[4:]])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "samples.json").read_text())["labeled_rows"]["of"] > 0  # packed training blocks
    rows = {row["model"]: row for row in report["rows"]}
    assert math.isfinite(rows["distilled"]["perplexity"]) and math.isfinite(rows["teacher"]["perplexity"])


# ---- chains, several teachers, quantization -----------------------------------------------------------------

LM_RECIPE = str(REPO / "recipes" / "lm_from_teacher.yaml")
LM_FAST = ["--dataset_name", DATA, "--max_length", "32", "--max_train_samples", "200", *FAST]


def test_chain_recipe_reports_each_stage_reuses_finished_ones_and_quantizes(tmp_path, deep_teacher_dir, capsys):
    """6 layers -> 4 -> 2: a row per stage, the last stage is the recipe's run, then an int8 export."""
    out = tmp_path / "chain"
    stages = json.dumps([{"student_num_layers": 4, "max_steps": 3}, {"student_num_layers": 2}])
    command = ["train", LM_RECIPE, "--teacher_model_name_or_path", str(deep_teacher_dir), "--stages", stages,
               "--quantize", "int8", "--output_dir", str(out), *LM_FAST]
    assert main(command) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["teacher", "stage 1 (4 layers)", "distilled", "baseline (no teacher)", "distilled + int8"]
    assert rows["distilled"]["layers"] == 2 and rows["distilled + int8"]["layers"] == 2
    assert rows["distilled + int8"]["disk_mb"] < 0.7 * rows["distilled"]["disk_mb"]
    stage = json.loads((out / "stage-1" / "stage.json").read_text())
    assert stage["settings"] == {"student_num_layers": 4, "max_steps": 3}
    assert stage["max_steps"] == 3 and stage["teachers"] == [str(deep_teacher_dir)]
    # The final student was made from the stage-1 student: its layers map to the teacher's through it.
    assert set(AutoModelForCausalLM.from_pretrained(out).config.distill_source_layers) <= set(
        AutoModelForCausalLM.from_pretrained(out / "stage-1").config.distill_source_layers)
    generator = pipeline("text-generation", model=str(out / "quantized-int8"))
    assert generator("And God said", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("And God said")

    # Killed after stage 1: a rerun reuses it (not retrained) and finishes the chain.
    weights = out / "stage-1" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    for path in out.iterdir():
        if path.name != "stage-1":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(command) == 0
    assert weights.stat().st_mtime_ns == stamp and (out / "report.json").exists()

    # A stage trained with other settings is refused, not reused.
    for path in out.iterdir():
        if path.name != "stage-1":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    capsys.readouterr()
    other = json.dumps([{"student_num_layers": 3, "max_steps": 3}, {"student_num_layers": 2}])
    assert main([*command[:5], other, *command[6:]]) == 2
    one_line_error(capsys, "holds stage 1 of a chain trained with other settings")


def test_recipe_with_two_teachers(tmp_path, deep_teacher_dir, capsys):
    second = tmp_path / "second"
    sharpen(small_llama(len(AutoTokenizer.from_pretrained(deep_teacher_dir)), hidden_size=32, num_layers=2, seed=9),
            3.0).save_pretrained(second)
    AutoTokenizer.from_pretrained(deep_teacher_dir).save_pretrained(second)
    out = tmp_path / "two"
    assert main(["train", LM_RECIPE, "--teacher_model_name_or_path", f"{deep_teacher_dir},{second}",
                 "--teacher_weights", "2", "1", "--multi_teacher", "mean_loss", "--hidden_loss_weight", "0",
                 "--student_num_layers", "2", "--output_dir", str(out), *LM_FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [row["model"] for row in report["rows"]]
    assert names[:2] == [f"teacher 1: {deep_teacher_dir}", f"teacher 2: {second}"]
    logs = [log for log in report["histories"]["distilled"] if "kd_loss" in log]
    assert any(key.startswith("kd_loss/") for key in logs[0]) and len([k for k in logs[0] if k.startswith("kd_loss/")]) == 2


def test_recipe_refuses_quantize_with_quantization_aware_training(tmp_path, deep_teacher_dir, capsys):
    assert main(["train", LM_RECIPE, "--teacher_model_name_or_path", str(deep_teacher_dir), "--quantize", "int8",
                 "--student_quantization", "int8", "--output_dir", str(tmp_path / "q"), *LM_FAST]) == 2
    one_line_error(capsys, "already exports it quantized")


def test_cross_tokenizer_recipe_reads_prompts_through_the_teachers_template(tmp_path, causal_dirs, capsys):
    """A teacher with another tokenizer and a chat template: the training rows carry each prompt as the teacher's
    template writes it, distillation runs (kd_loss, aligned_fraction), and the teacher is scored in its own tokens."""
    from hf_distill.runner.recipe import prepare_splits
    from hf_distill.runner.scratch import train_bpe_tokenizer

    from conftest import spanish_lines

    teacher_tokenizer = train_bpe_tokenizer(spanish_lines(300) + english_lines(300), vocab_size=500)
    teacher_tokenizer.chat_template = "<s>{{ messages[0]['content'] }}</s>"  # <s>, </s>: its bos and eos
    teacher = tmp_path / "teacher"
    sharpen(small_llama(len(teacher_tokenizer), hidden_size=48, num_layers=2, seed=0), 5.0).save_pretrained(teacher)
    teacher_tokenizer.save_pretrained(teacher)
    recipe_path = str(REPO / "recipes" / "translation_causal_cross_tokenizer.yaml")
    common = ["--teacher_model_name_or_path", str(teacher), "--teacher_model_init_kwargs", "{}",
              "--student_model_name_or_path", str(causal_dirs / "student"), "--dataset_name", DATA,
              "--max_train_samples", "32", "--max_length", "64"]

    recipe, _ = parse_recipe(recipe_path, [*common, *FAST])
    student_tokenizer = AutoTokenizer.from_pretrained(causal_dirs / "student")
    train = prepare_splits(recipe, student_tokenizer, seed=42, teacher_tokenizer=teacher_tokenizer)[0]["train"]
    row = train[0]
    templated = teacher_tokenizer(f"<s>{row['prompt']}</s>", add_special_tokens=False)["input_ids"]
    assert row["teacher_prompt_ids"] == templated and templated[0] == teacher_tokenizer.bos_token_id

    out = tmp_path / "run"
    assert main(["train", recipe_path, *common, "--output_dir", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["teacher (own tokenizer)", "distilled", "baseline (no teacher)"]
    assert all("chrf" in row for row in report["rows"]) and not any("agreement" in row for row in report["rows"])
    logs = [log for log in report["histories"]["distilled"] if "kd_loss" in log]
    assert logs and all(0 < log["aligned_fraction"] <= 1 for log in logs)

    # A recipe that packs plain text has no prompts for the teacher's template: refused before anything loads.
    assert main(["train", LM_RECIPE, "--teacher_model_name_or_path", str(teacher), "--cross_tokenizer", "uld",
                 "--hidden_loss_weight", "0", "--output_dir", str(tmp_path / "lm")]) == 2
    assert "cross_tokenizer='uld' in a recipe needs prompt -> response rows" in capsys.readouterr().err
