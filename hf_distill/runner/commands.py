"""What each `hf-distill` command does once its arguments are parsed: paths checked first, then the run."""

from __future__ import annotations

import glob
import json
import os

from ..model_card import looks_like_hub_id
from ..modeling import check_model_source, looks_like_path
from ..pruning import describe_student
from .arguments import parse_recipe
from .demo import run_demo
from .errors import UsageError
from .pipeline import cache_recipe_teacher, evaluate_saved, generate_recipe_targets, prune_from_files, train_recipe
from .recipe import RecipeArguments, builder_for


# ---- checks before anything heavy loads ----------------------------------------------------------------------


def check_paths(recipe: RecipeArguments, models: dict[str, str | None], student: bool = True) -> None:
    """Refuse missing local data and model folders, and a `dataset_name` that cannot be a Hub id, before any
    model or data loads. `models` maps a setting's name to a model path or Hub id; `student` adds the recipe's."""
    if recipe.data_files:
        if not glob.glob(recipe.data_files):
            raise UsageError(
                f"data_files={recipe.data_files!r}: no such file; give a .json, .jsonl, .csv or .parquet file (a glob works)."
            )
    elif recipe.dataset_name and not os.path.exists(recipe.dataset_name):
        if looks_like_path(recipe.dataset_name) or not looks_like_hub_id(recipe.dataset_name):
            raise UsageError(
                f"dataset_name={recipe.dataset_name!r} is neither a local file or folder nor a Hub dataset id "
                "(name or org/name)."
            )
    files = glob.glob(recipe.data_files or "") or [name for name in [recipe.dataset_name] if name and os.path.isfile(name)]
    for file in files:
        try:
            builder_for(file)  # a .txt or .tsv file is refused here, not after the teacher has loaded
        except ValueError as error:
            raise UsageError(str(error)) from None
        if os.path.getsize(file) == 0:  # `datasets` would stop with a bare StopIteration
            raise UsageError(f"data file {file!r} is empty; give a file with at least one row.")
    if student and recipe.student_init == "pretrained":
        models = {"student_model_name_or_path": recipe.student_model_name_or_path, **models}
    models = {"tokenizer_name_or_path": recipe.tokenizer_name_or_path, **models}
    for setting, value in list(models.items()):  # several teachers: each one is checked
        if isinstance(value, list):
            del models[setting]
            models.update({f"{setting}[{i}]": path for i, path in enumerate(value)})
    # Local paths first, then Hub ids: a mistyped folder is the likelier mistake.
    for setting, path in sorted(models.items(), key=lambda item: not looks_like_path(item[1] or "")):
        if path:
            try:
                check_model_source(path, setting, needs_config=setting != "tokenizer_name_or_path")
            except FileNotFoundError as error:
                raise UsageError(str(error)) from None


# ---- commands ----------------------------------------------------------------------------------------------


def _models_option(values: list[str]) -> dict[str, str]:
    models = {}
    for value in values:
        name, _, path = value.rpartition("=")
        models[name or path] = path
    return models


def run(args, rest: list[str]) -> int:
    """Run the parsed command `args` (from cli's parser); `rest` holds its `--field value` options."""
    if args.command == "demo":
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
        run_demo(args.output_dir, quick=args.quick)
        return 0
    if args.command == "prune":
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
        return _prune(args)
    if args.recipe is None and args.command != "train":  # train can take every field from the command line
        raise UsageError(f"hf-distill {args.command} needs a recipe file: hf-distill {args.command} RECIPE.yaml ...")
    parsed = parse_recipe(args.recipe, rest, command=args.command)
    recipe = parsed[0]

    if args.command == "train":
        config = parsed[1]
        check_paths(recipe, {"teacher_model_name_or_path": config.teacher_model_name_or_path})
        if config.teacher_cache and not os.path.isdir(config.teacher_cache):
            raise UsageError(f"teacher_cache={config.teacher_cache!r}: no such folder.")
        _, table, paths = train_recipe(recipe, config)
        print(table)
        print("\n".join(f"{name}: {path}" for name, path in paths.items()))
        return 0
    if args.command == "eval":
        if not args.model:
            raise UsageError("hf-distill eval needs at least one --model NAME=PATH.")
        models = _models_option(args.model)
        # eval loads the --model folders, not the recipe's student
        paths = {**{f"--model {name}": path for name, path in models.items()}, "--teacher": args.teacher}
        check_paths(recipe, paths, student=False)
        rows, table = evaluate_saved(recipe, models, args.teacher, seed=parsed[1].seed)
        print(table)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                json.dump(rows, handle, indent=2)
        return 0
    teacher = parsed[1]
    if args.command == "generate-targets":
        if not args.output_dir:
            raise UsageError("hf-distill generate-targets needs --output_dir.")
        if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
            raise UsageError(f"--output_dir {args.output_dir!r} is not empty; choose another folder (nothing was changed).")
        check_paths(recipe, {"teacher_model_name_or_path": teacher.teacher_model_name_or_path}, student=False)
        path = generate_recipe_targets(recipe, teacher, args.output_dir, batch_size=args.batch_size)
        print(f"teacher responses written to {path}; train on them with --dataset_name {path} --eval_split eval "
              "--test_split test")
        return 0
    if not args.cache_dir:
        raise UsageError("hf-distill cache-teacher needs --cache_dir.")
    check_paths(recipe, {"teacher_model_name_or_path": teacher.teacher_model_name_or_path})
    path = cache_recipe_teacher(recipe, teacher, args.cache_dir, top_k=args.top_k, batch_size=args.batch_size)
    print(f"teacher cache written to {path}; train from it with --teacher_cache {path}")
    return 0


def _prune(args) -> int:
    """`hf-distill prune`: score the teacher on calibration text, keep the most important parts, save the student."""
    if args.num_layers is None and args.intermediate_size is None:
        raise UsageError("hf-distill prune needs --num_layers and/or --intermediate_size.")
    if not glob.glob(args.data_files):
        raise UsageError(f"--data_files {args.data_files!r}: no such file.")
    if looks_like_path(args.teacher) and not os.path.isdir(os.path.expanduser(args.teacher)):
        raise UsageError(f"teacher {args.teacher!r}: no such folder.")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir!r} is not empty; choose another folder (nothing was changed).")
    student, tokenizer = prune_from_files(
        args.teacher, args.data_files, args.text_column, args.rows, args.max_length, args.num_layers, args.intermediate_size
    )
    student.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"student ({describe_student(student)}; {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M "
          f"parameters) saved to {args.output_dir}")
    return 0
