"""A recipe run end to end: prepare data, distill, train the no-teacher baseline, evaluate all, report, export."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset
from transformers import AutoTokenizer
from transformers.utils import logging

from ..cache import build_cache
from ..checkpoints import existing_run, resolve_resume
from ..config import DistillationConfig
from ..data import default_collator, labeled_rows
from ..modeling import CAUSAL, load_model
from ..on_policy import generated_batch, generation_seed, sampling_config
from ..pruning import describe_student, prune_student
from ..trainer import DistillationTrainer
from ..quantization import folder_bytes, save_quantized
from ..served import TeacherServer
from .evaluation import evaluate_model, layer_count
from .recipe import STAGE_RECIPE_FIELDS, RecipeArguments, build_student, builder_for, model_columns, prepare_splits
from .report import BASELINE_ROW, DISTILLED_ROW, TEACHER_ROW, comparison_table, results_table, write_report
from .tasks import tokenize_causal

logger = logging.get_logger(__name__)

# What a finished recipe run leaves in `output_dir` besides the student (README.md is the model card).
RUN_FILES = ("report.md", "report.json", "training_curves.png", "samples.json", "README.md")
STAGE_FILE = "stage.json"  # written when a stage of a teacher-assistant chain has finished


def load_teacher_tokenizer(recipe: RecipeArguments, config: DistillationConfig):
    """`cross_tokenizer`: the teacher's own tokenizer, from its folder or Hub id; refused where a recipe can't use it."""
    setting = f"cross_tokenizer={config.cross_tokenizer!r}"
    if recipe.task != CAUSAL or recipe.packing or recipe.label_words:
        raise ValueError(
            f"{setting} in a recipe needs prompt -> response rows of causal LMs (task: causal, no packing, no "
            "label_words), which the teacher reads in its own tokens and chat template; drop cross_tokenizer."
        )
    if recipe.stages:
        raise ValueError(f"{setting} with stages: each stage's student is made from its teacher and shares its "
                         "tokenizer; drop cross_tokenizer or stages.")
    names = _as_list(config.teacher_model_name_or_path)
    if len(names) != 1 or not isinstance(names[0], str):
        raise ValueError(f"{setting} distills from one teacher named by teacher_model_name_or_path; got {names!r}.")
    tokenizer = AutoTokenizer.from_pretrained(names[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(recipe: RecipeArguments, config: DistillationConfig):
    student = recipe.student_model_name_or_path if recipe.student_init == "pretrained" else None
    name = recipe.tokenizer_name_or_path or student or _as_list(config.teacher_model_name_or_path)[0]
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


def _train(student, teacher, config, splits, tokenizer, callbacks=None, resume=None, teacher_tokenizer=None):
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=model_columns(splits["train"]),
        eval_dataset=model_columns(splits["eval"]),
        processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


@dataclasses.dataclass
class RecipeRun:
    """What the steps of `train_recipe` share: the settings, what was loaded, and the report so far."""

    recipe: RecipeArguments  # the last stage's (the recipe's own without stages)
    config: DistillationConfig
    chain: tuple[RecipeArguments, DistillationConfig]  # the recipe and config as given, stages included
    resume: dict[str, str | None]
    tokenizer: Any
    teacher_tokenizer: Any
    teachers: list
    splits: Any
    stats: dict
    rows: list[dict] = dataclasses.field(default_factory=list)
    samples: dict = dataclasses.field(default_factory=dict)
    runs: dict = dataclasses.field(default_factory=dict)  # name -> (model, trainer, folder)
    student: Any = None
    # Agreement (top-1, token by token) and size are measured against the recipe's (first) teacher, unless it reads
    # other tokens; a chain's later stages keep measuring against it.
    reference: Any = None

    def __post_init__(self):
        self.reference = self.teachers[0] if self.teacher_tokenizer is None else None


def train_recipe(recipe: RecipeArguments, config: DistillationConfig, teacher=None, tokenizer=None, callbacks=None):
    """Distill (and, with `recipe.baseline`, train the alpha=0 baseline); evaluate; write report and model card.

    Returns the report rows, the comparison table and the report's paths. Outputs: the student in
    `config.output_dir` (with README.md model card, report.md/json, training_curves.png), the baseline in
    `output_dir/_baseline` (left out of Hub uploads), with `recipe.quantize` the quantized student in
    `output_dir/quantized-<scheme>`, with `recipe.stages` the chain's earlier students in `output_dir/stage-<i>`.
    Folders that hold an earlier run are refused unless `config.resume_from_checkpoint` asks to resume (see
    `resume_points`).
    """
    run = setup_run(recipe, config, teacher, tokenizer)
    evaluate_teachers(run)
    run_stages(run, callbacks)
    train_students(run, callbacks)
    evaluate_students(run)
    table, paths = write_run_report(run)
    export_card(run, table)
    return run.rows, table, paths


def setup_run(recipe: RecipeArguments, config: DistillationConfig, teacher=None, tokenizer=None) -> RecipeRun:
    """Check what can be checked before anything loads, then load the tokenizers, the teachers and the data."""
    if config.teacher_model_name_or_path is None and teacher is None:
        raise ValueError("The recipe names no teacher: set teacher_model_name_or_path (used for evaluation too; with "
                         "teacher_server_url, a local copy of the served model).")
    if config.teacher_server_url is not None and recipe.stages:
        raise ValueError(f"teacher_server_url={config.teacher_server_url!r} with stages: a chain's later stages are "
                         "taught by its earlier students, not by the server; drop stages or the server.")
    if recipe.quantize != "none" and config.student_quantization != "none":
        raise ValueError(
            f"quantize={recipe.quantize!r} quantizes the trained student, but student_quantization="
            f"{config.student_quantization!r} already exports it quantized: set one of them."
        )
    final_recipe, final_config = apply_stage(recipe, config, recipe.stages[-1]) if recipe.stages else (recipe, config)
    # Before anything loads: never overwrite an earlier run, never reuse a stage trained otherwise.
    resume = resume_points(final_config, recipe.baseline)
    for i, stage in enumerate((recipe.stages or [])[:-1], 1):
        finished_stage(i, stage, recipe, config)
    teacher_tokenizer = load_teacher_tokenizer(recipe, config) if config.cross_tokenizer else None
    tokenizer = tokenizer or load_tokenizer(recipe, config)
    teachers = load_teachers(recipe, config) if teacher is None else _as_list(teacher)
    splits, stats = prepare_splits(recipe, tokenizer, seed=config.seed, teacher_tokenizer=teacher_tokenizer)
    return RecipeRun(final_recipe, final_config, (recipe, config), resume, tokenizer, teacher_tokenizer, teachers,
                     splits, stats)


def _evaluate(run: RecipeRun, name: str, model, folder: str | None = None) -> None:
    row, run.samples[name] = evaluate_model(name, model, run.splits["test"], run.tokenizer, run.recipe,
                                            teacher=run.reference)
    run.rows.append(row if folder is None else {**row, "disk_mb": folder_bytes(folder) / 1e6})


def evaluate_teachers(run: RecipeRun) -> None:
    """The teachers' rows, first in the table."""
    recipe = run.chain[0]
    for name, model in zip(_teacher_row_names(run.teachers), run.teachers):
        if run.teacher_tokenizer is None:
            row, run.samples[name] = evaluate_model(name, model, run.splits["test"], run.tokenizer, recipe)
        else:  # the same test rows in the teacher's own tokens: its loss is per teacher token
            name = "teacher (own tokenizer)"
            test = tokenize_causal(run.splits["test"].select_columns(["prompt", "response"]), run.teacher_tokenizer,
                                   max_length=recipe.max_length, min_response_tokens=recipe.min_response_tokens,
                                   use_chat_template=recipe.use_chat_template)[0]
            row, run.samples[name] = evaluate_model(name, model, test, run.teacher_tokenizer, recipe)
        run.rows.append(row)


def run_stages(run: RecipeRun, callbacks=None) -> None:
    """A chain: each earlier stage's student is trained (or reused), evaluated, and teaches the next."""
    recipe, config = run.chain
    for i, stage in enumerate((recipe.stages or [])[:-1], 1):
        student = run_stage(i, stage, recipe, config, run.teachers, run.splits, run.tokenizer, callbacks)
        name = f"stage {i} ({layer_count(student)} layers)"
        row, run.samples[name] = evaluate_model(name, student, run.splits["test"], run.tokenizer, recipe,
                                                teacher=run.reference)
        run.rows.append(row)
        run.teachers = [student]


def train_students(run: RecipeRun, callbacks=None) -> None:
    """The distilled student and, with `baseline`, the same initial student trained without a teacher."""
    recipe, config, splits, tokenizer = run.recipe, run.config, run.splits, run.tokenizer
    run.student = build_student(recipe, run.teachers[0], calibration_batches(splits["train"], tokenizer, recipe))
    initial_student = copy.deepcopy(run.student) if recipe.baseline else None
    served = config.teacher_server_url is not None
    if served:  # the server teaches: its local copy leaves memory while the students train
        run.teachers, run.reference = [], None
    # Pushed once, at the end, with the model card and evaluation table (not at every save).
    trainer = _train(run.student, run.teachers or None, dataclasses.replace(config, push_to_hub=False), splits, tokenizer,
                     callbacks, run.resume["distilled"], run.teacher_tokenizer)
    run.runs[DISTILLED_ROW] = (trainer.model, trainer, config.output_dir)
    if recipe.baseline:
        baseline_config = dataclasses.replace(
            # No teacher in any term (nor to score the student's own samples): the baseline trains on the data only.
            config, alpha=0.0, alpha_end=None, hidden_loss_weight=0.0, attention_loss_weight=0.0, lmbda=0.0,
            seq_kd=False, use_vllm=False, vllm_sync_adapters=False,
            push_to_hub=False, learning_rate=recipe.baseline_learning_rate or config.learning_rate,
            output_dir=os.path.join(config.output_dir, "_baseline"),
            run_name=f"{config.run_name or 'run'}-baseline",
        )
        baseline = _train(initial_student, run.teachers or None, baseline_config, splits, tokenizer, callbacks,
                          run.resume["baseline"], run.teacher_tokenizer)
        run.runs[BASELINE_ROW] = (baseline.model, baseline, baseline_config.output_dir)
    if served:  # back for the students' agreement with the teacher
        run.reference = load_teachers(recipe, config)[0]


def evaluate_students(run: RecipeRun) -> None:
    """The trained students' rows, then, with `quantize`, the student exported quantized and its row."""
    for name, (model, _, folder) in run.runs.items():
        _evaluate(run, name, model, folder)
    if run.recipe.quantize != "none":  # after the rows above: the student's folder size leaves this export out
        scheme, output_dir = run.recipe.quantize, run.config.output_dir
        folder = save_quantized(output_dir, os.path.join(output_dir, f"quantized-{scheme}"), scheme, kind=run.recipe.task)
        _evaluate(run, f"distilled + {scheme}", load_model(folder, kind=run.recipe.task), folder)
    for row in run.rows[1:]:
        row["size_vs_teacher"] = row["parameters"] / run.rows[0]["parameters"]


def write_run_report(run: RecipeRun):
    """The comparison table, the report files and samples.json in `output_dir`; returns (table, report paths)."""
    recipe, config, splits = run.recipe, run.config, run.splits
    histories = {name: trainer.state.log_history for name, (_, trainer, _) in run.runs.items()}
    table = results_table(run.rows, histories)
    paths = write_report(run.rows, histories, config.output_dir, title=f"Distillation report: {recipe.task}",
                         student=describe_student(run.student))
    with open(os.path.join(config.output_dir, "samples.json"), "w", encoding="utf-8") as handle:
        json.dump({"samples": run.samples, "truncation": {k: dataclasses.asdict(v) for k, v in run.stats.items()},
                   # Training rows with a target: the rest (unlabeled classifier rows) were distilled from the teacher alone.
                   "labeled_rows": {"train": labeled_rows(model_columns(splits["train"]), recipe.task),
                                    "of": len(splits["train"])}}, handle, indent=2, ensure_ascii=False)
    return table, paths


def export_card(run: RecipeRun, table: str) -> None:
    """The model card beside the student, and with `push_to_hub` the upload."""
    trainer = run.runs["distilled"][1]
    card = {"dataset": data_name(run.recipe), "evaluation_table": table}
    trainer.create_model_card(**card)
    if run.config.push_to_hub:  # push_to_hub writes the card again, from these arguments
        trainer.push_to_hub(commit_message=f"hf-distill: {run.recipe.task} student distilled from {trainer.teacher_name}",
                            **card)


def load_teachers(recipe: RecipeArguments, config: DistillationConfig) -> list:
    """The recipe's teacher, or teachers when `teacher_model_name_or_path` is a list."""
    kwargs = config.teacher_model_init_kwargs or {}
    return [load_model(name, kind=recipe.task, **kwargs) for name in _as_list(config.teacher_model_name_or_path)]


def data_name(recipe: RecipeArguments) -> str | None:
    """The recipe's data as a model card names it: a Hub id as given, a local path relative to the working
    directory (an absolute path would publish the layout of the machine that trained)."""
    name = recipe.dataset_name or recipe.data_files
    if not name or not (os.path.isabs(name) or name.startswith("~")):
        return name  # a Hub id or a relative path, as given
    try:
        return os.path.relpath(os.path.expanduser(name))
    except ValueError:  # on another drive (Windows): no relative path, so the name alone
        return os.path.basename(name)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _teacher_row_names(teachers) -> list[str]:
    if len(teachers) == 1:
        return [TEACHER_ROW]
    return [f"teacher {i + 1}: {getattr(t.config, '_name_or_path', '') or type(t).__name__}" for i, t in enumerate(teachers)]


# ---- teacher-assistant chains ---------------------------------------------------------------------------------


def apply_stage(recipe: RecipeArguments, config: DistillationConfig, stage: dict, output_dir: str | None = None):
    """(recipe, config) with one stage's overrides: student-building fields on the recipe, the rest on the config."""
    recipe_fields = {key: value for key, value in stage.items() if key in STAGE_RECIPE_FIELDS}
    config_fields = {key: value for key, value in stage.items() if key not in STAGE_RECIPE_FIELDS}
    if output_dir is not None:
        config_fields["output_dir"] = output_dir
    return dataclasses.replace(recipe, stages=None, **recipe_fields), dataclasses.replace(config, **config_fields)


def stage_record(i: int, stage: dict, recipe: RecipeArguments, config: DistillationConfig) -> dict:
    """What stage `i` of a chain is trained with: written in its folder when it finishes, compared before reuse."""
    stage_config = apply_stage(recipe, config, stage)[1]
    return {
        "stage": i, "settings": stage, "data": recipe.dataset_name or recipe.data_files,
        "teachers": _as_list(config.teacher_model_name_or_path) if i == 1 else [f"stage-{i - 1}"],
        "max_steps": stage_config.max_steps, "num_train_epochs": stage_config.num_train_epochs, "seed": stage_config.seed,
    }


def finished_stage(i: int, stage: dict, recipe: RecipeArguments, config: DistillationConfig) -> bool:
    """Whether stage `i` finished earlier with these settings; a folder holding it with other settings is refused."""
    folder = os.path.join(config.output_dir, f"stage-{i}")
    marker = os.path.join(folder, STAGE_FILE)
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as handle:
        done = json.load(handle)
    if done != json.loads(json.dumps(stage_record(i, stage, recipe, config))):
        raise ValueError(
            f"{folder} holds stage {i} of a chain trained with other settings ({done['settings']}, teachers "
            f"{done['teachers']}); move it away or choose another output_dir."
        )
    return True


def run_stage(i: int, stage: dict, recipe, config, teachers, splits, tokenizer, callbacks=None):
    """Train stage `i` of a chain into `output_dir/stage-<i>` and return its student, or reuse it if it finished."""
    folder = os.path.join(config.output_dir, f"stage-{i}")
    if finished_stage(i, stage, recipe, config):
        logger.info(f"Stage {i} finished earlier: reusing the student in {folder}.")
        return load_model(folder, kind=recipe.task)
    stage_recipe, stage_config = apply_stage(recipe, config, stage, output_dir=folder)
    wants_resume = str(config.resume_from_checkpoint).lower() in ("true", "last")
    resume = resolve_resume(folder, True) if wants_resume and existing_run(folder) else None
    student = build_student(stage_recipe, teachers[0], calibration_batches(splits["train"], tokenizer, stage_recipe))
    trainer = _train(student, teachers, dataclasses.replace(stage_config, push_to_hub=False), splits, tokenizer,
                     callbacks, resume)
    with open(os.path.join(folder, STAGE_FILE), "w", encoding="utf-8") as handle:  # written last: the stage is finished
        json.dump(stage_record(i, stage, recipe, config), handle, indent=2)
    return trainer.model


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
    if len(_as_list(config.teacher_model_name_or_path)) > 1:
        raise ValueError("A teacher cache holds one teacher's targets; cache-teacher takes one teacher_model_name_or_path.")
    tokenizer = load_tokenizer(recipe, config)
    splits, _ = prepare_splits(recipe, tokenizer, seed=config.seed)
    rows = model_columns(splits["train"])
    if getattr(config, "teacher_server_url", None):  # the served model answers; the teacher's folder gives the tokenizer
        teacher = TeacherServer.from_config(config)
        teacher.check(tokenizer, max((len(ids) for ids in rows["input_ids"]), default=None))
        name = f"{teacher.model} (served at {teacher.url})"
    else:
        teacher = load_model(config.teacher_model_name_or_path, kind=recipe.task, **(config.teacher_model_init_kwargs or {}))
        name = config.teacher_model_name_or_path
    return build_cache(
        teacher, rows, tokenizer, cache_dir, temperature=config.temperature, top_k=top_k,
        distill_all_tokens=config.distill_all_tokens, batch_size=batch_size, teacher_name=name,
    )


def generate_recipe_targets(recipe: RecipeArguments, config, output_dir: str, batch_size: int = 8) -> str:
    """Compute the targets first, train later: the teacher answers the recipe's training prompts once.

    Writes a `save_to_disk` folder with prompt/response splits: `train` holds the teacher's responses (greedy, or
    sampled with `seq_kd_sampling`, up to `max_new_tokens`), `eval` and `test` the recipe's held-out rows with their
    own references, so `hf-distill train RECIPE --dataset_name DIR --eval_split eval --test_split test` trains on the
    teacher's responses and is scored on the data. `config` holds the teacher settings (the CLI's
    `GenerateArguments`, or a `DistillationConfig`).
    """
    if recipe.task != CAUSAL or recipe.packing or recipe.label_words:
        raise ValueError(
            "generate-targets writes the teacher's responses to prompts: it needs task=causal prompt → response rows "
            "(not packing or label_words)."
        )
    if len(_as_list(config.teacher_model_name_or_path)) > 1:
        raise ValueError("generate-targets answers with one teacher; give one teacher_model_name_or_path.")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"--output_dir {output_dir!r} is not empty; choose another folder (nothing was changed).")
    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer_name_or_path or config.teacher_model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = config.teacher_model_init_kwargs or {}
    teacher = load_model(config.teacher_model_name_or_path, kind=CAUSAL, **kwargs).to(device).eval()
    splits, _ = prepare_splits(recipe, tokenizer, seed=config.seed)
    settings = sampling_config(teacher, tokenizer, config.max_new_tokens, config.generation_temperature,
                               do_sample=config.seq_kd_sampling)
    limit = getattr(teacher.config.get_text_config(), "max_position_embeddings", None)
    collator, train = default_collator(CAUSAL, tokenizer), model_columns(splits["train"])
    responses = []
    for start in range(0, len(train), batch_size):
        rows = collator([train[i] for i in range(start, min(start + batch_size, len(train)))])
        batch = generated_batch(teacher, settings, rows, device, max_positions=limit, what="generate-targets",
                                seed=generation_seed(config.seed, 0, start // batch_size, 0))  # sampled runs repeat
        for labels in batch["labels"].tolist():
            tokens = [token for token in labels if token != -100]
            # Training appends the EOS again after the response text.
            responses.append(tokenizer.decode(tokens, skip_special_tokens=True))
    data = DatasetDict({
        "train": Dataset.from_dict({"prompt": splits["train"]["prompt"], "response": responses}),
        **{name: splits[name].select_columns(["prompt", "response"]) for name in ("eval", "test")},
    })
    data.save_to_disk(output_dir)
    info = {"teacher": config.teacher_model_name_or_path, "max_new_tokens": config.max_new_tokens,
            "decoding": f"sampled at {config.generation_temperature}" if config.seq_kd_sampling else "greedy",
            "seed": config.seed, "rows": {name: len(split) for name, split in data.items()}}
    with open(os.path.join(output_dir, "targets_info.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    return output_dir


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
