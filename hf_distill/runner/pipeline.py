"""A recipe run end to end: prepare data, distill, train the no-teacher baseline, evaluate all, report, export."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import torch
from datasets import load_dataset
from transformers import AutoTokenizer
from transformers.utils import logging

from ..cache import build_cache
from ..checkpoints import existing_run, resolve_resume
from ..config import DistillationConfig
from ..data import default_collator
from ..modeling import load_model
from ..pruning import describe_student, prune_student
from ..trainer import DistillationTrainer
from .evaluation import evaluate_model
from .recipe import RecipeArguments, build_student, builder_for, model_columns, prepare_splits
from .report import comparison_table, write_report

logger = logging.get_logger(__name__)

# What a finished recipe run leaves in `output_dir` besides the student (README.md is the model card).
RUN_FILES = ("report.md", "report.json", "training_curves.png", "samples.json", "README.md")


def load_tokenizer(recipe: RecipeArguments, config: DistillationConfig):
    student = recipe.student_model_name_or_path if recipe.student_init == "pretrained" else None
    name = recipe.tokenizer_name_or_path or student or config.teacher_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def calibration_batches(train, tokenizer, recipe: RecipeArguments, batch_size: int = 4) -> list[dict]:
    """The first `recipe.calibration_rows` training rows as padded batches, for pruning the student."""
    rows = model_columns(train).select(range(min(recipe.calibration_rows, len(train))))
    collator = default_collator(recipe.task, tokenizer)
    return [collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))]) for start in range(0, len(rows), batch_size)]


def resume_points(config: DistillationConfig, baseline: bool) -> dict[str, str | None]:
    """The checkpoint each training run of a recipe starts from (None: from scratch), checked before anything loads.

    An `output_dir` (or its `_baseline`) holding an earlier run is refused unless `config.resume_from_checkpoint`
    asks to resume: "true" (or "last") resumes each run from the last complete checkpoint in its folder, or starts
    it if it never began; a checkpoint path resumes the distilled run from it.
    """
    wanted = config.resume_from_checkpoint
    if isinstance(wanted, str) and wanted.lower() in ("", "false", "none"):
        wanted = None
    last = wanted is True or (isinstance(wanted, str) and wanted.lower() in ("true", "last"))
    folders = {"distilled": (config.output_dir, RUN_FILES)}
    if baseline:
        folders["baseline"] = (os.path.join(config.output_dir, "_baseline"), ())
    points = {}
    for name, (folder, extra) in folders.items():
        if wanted is None:
            points[name] = resolve_resume(folder, None, extra)  # a fresh run: refuses a folder that holds one
        elif name == "distilled" and not last:
            points[name] = resolve_resume(folder, wanted)  # the checkpoint given
        else:  # where this run stopped, or from scratch if it never began
            points[name] = resolve_resume(folder, True) if existing_run(folder) else None
    return points


def _train(student, teacher, config, splits, tokenizer, callbacks=None, resume=None) -> DistillationTrainer:
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=model_columns(splits["train"]),
        eval_dataset=model_columns(splits["eval"]),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


def train_recipe(recipe: RecipeArguments, config: DistillationConfig, teacher=None, tokenizer=None, callbacks=None):
    """Distill (and, with `recipe.baseline`, train the alpha=0 baseline); evaluate; write report and model card.

    Returns the report rows. Outputs: the student in `config.output_dir` (with README.md model card,
    report.md/json, training_curves.png), the baseline in `output_dir/_baseline` (left out of Hub uploads).
    Folders that hold an earlier run are refused unless `config.resume_from_checkpoint` asks to resume (see
    `resume_points`).
    """
    if config.teacher_model_name_or_path is None and teacher is None:
        raise ValueError("The recipe names no teacher: set teacher_model_name_or_path (used for evaluation too).")
    resume = resume_points(config, recipe.baseline)  # before anything loads: never overwrite an earlier run
    tokenizer = tokenizer or load_tokenizer(recipe, config)
    if teacher is None:
        teacher = load_model(config.teacher_model_name_or_path, kind=recipe.task, **(config.teacher_model_init_kwargs or {}))
    splits, stats = prepare_splits(recipe, tokenizer, seed=config.seed)
    student = build_student(recipe, teacher, calibration_batches(splits["train"], tokenizer, recipe))
    initial_student = copy.deepcopy(student) if recipe.baseline else None

    # Pushed once, at the end, with the model card and evaluation table (not at every save).
    trainer = _train(student, teacher, dataclasses.replace(config, push_to_hub=False), splits, tokenizer, callbacks,
                     resume["distilled"])
    runs = {"distilled": (trainer.model, trainer)}
    if recipe.baseline:
        baseline_config = dataclasses.replace(
            config, alpha=0.0, output_dir=os.path.join(config.output_dir, "_baseline"), push_to_hub=False,
            run_name=f"{config.run_name or 'run'}-baseline",
        )
        baseline = _train(initial_student, teacher, baseline_config, splits, tokenizer, callbacks, resume["baseline"])
        runs["baseline (no teacher)"] = (baseline.model, baseline)

    rows, samples = [], {}
    row, samples["teacher"] = evaluate_model("teacher", teacher, splits["test"], tokenizer, recipe)
    rows.append(row)
    for name, (model, _) in runs.items():
        row, samples[name] = evaluate_model(name, model, splits["test"], tokenizer, recipe, teacher=teacher)
        rows.append(row)
    for row in rows[1:]:
        row["size_vs_teacher"] = row["parameters"] / rows[0]["parameters"]
    table = comparison_table(rows)
    histories = {name: run.state.log_history for name, (_, run) in runs.items()}
    paths = write_report(
        rows, histories, config.output_dir, title=f"Distillation report: {recipe.task}", student=describe_student(student)
    )
    with open(os.path.join(config.output_dir, "samples.json"), "w", encoding="utf-8") as handle:
        json.dump({"samples": samples, "truncation": {k: dataclasses.asdict(v) for k, v in stats.items()}}, handle,
                  indent=2, ensure_ascii=False)

    card = {"dataset": recipe.dataset_name or recipe.data_files, "evaluation_table": table}
    trainer.create_model_card(**card)
    if config.push_to_hub:  # push_to_hub writes the card again, from these arguments
        trainer.push_to_hub(commit_message=f"hf-distill: {recipe.task} student distilled from {trainer.teacher_name}",
                            **card)
    return rows, table, paths


def evaluate_saved(recipe: RecipeArguments, models: dict[str, str], teacher_path: str | None, seed: int = 42):
    """Compare saved models (name → path) on the recipe's test split; agreement is measured against the teacher."""
    first = next(iter(models.values()))
    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer_name_or_path or first)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits, _ = prepare_splits(recipe, tokenizer, seed=seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(teacher_path, kind=recipe.task).to(device) if teacher_path else None
    rows = []
    for name, path in models.items():
        model = teacher if path == teacher_path else load_model(path, kind=recipe.task).to(device)
        row, _ = evaluate_model(name, model, splits["test"], tokenizer, recipe,
                                teacher=None if model is teacher else teacher)
        rows.append(row)
    return rows, comparison_table(rows)


def cache_recipe_teacher(recipe: RecipeArguments, config, cache_dir: str, top_k=None, batch_size=8):
    """Build the offline teacher cache for a recipe's training split (the rows `train_recipe` trains on).

    `config` holds the teacher settings: a `DistillationConfig`, or the CLI's `TeacherArguments`.
    """
    tokenizer = load_tokenizer(recipe, config)
    teacher = load_model(config.teacher_model_name_or_path, kind=recipe.task, **(config.teacher_model_init_kwargs or {}))
    splits, _ = prepare_splits(recipe, tokenizer, seed=config.seed)
    return build_cache(
        teacher, model_columns(splits["train"]), tokenizer, cache_dir, temperature=config.temperature, top_k=top_k,
        distill_all_tokens=config.distill_all_tokens, batch_size=batch_size,
        teacher_name=config.teacher_model_name_or_path,
    )


def prune_from_files(teacher_path, data_files, text_column, rows, max_length, num_layers=None, intermediate_size=None):
    """(student, tokenizer): a causal teacher pruned by importance on `rows` of calibration text from `data_files`."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    data = load_dataset(builder_for(data_files), data_files=data_files, split="train")
    head, *nested = text_column.split(".")
    if head not in data.column_names:
        raise ValueError(f"{data_files} has columns {data.column_names}, not {head!r}; set --text_column.")
    texts = []
    for value in data.select(range(min(rows, len(data))))[head]:
        for key in nested:
            value = value[key]
        texts.append(value)
    batches = [
        dict(tokenizer(texts[i : i + 4], truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
        for i in range(0, len(texts), 4)
    ]
    teacher = load_model(teacher_path, kind="causal")
    return prune_student(teacher, batches, num_layers, intermediate_size), tokenizer
