"""The `hf-distill` command: train from a YAML recipe, evaluate saved models, cache a teacher, run the offline demo.

    hf-distill train recipes/translation.yaml --max_steps 200 --alpha 0.7
    hf-distill eval recipes/translation.yaml --model student=runs/translation --model teacher=Helsinki-NLP/opus-mt-en-es
    hf-distill cache-teacher recipes/translation_causal.yaml --cache_dir cache/  # then train with --teacher_cache cache/
    hf-distill generate-targets recipes/translation_causal.yaml --output_dir targets/  # the teacher's responses, once
    hf-distill prune TEACHER --output_dir student/ --num_layers 10 --data_files text.jsonl  # a student made alone
    hf-distill demo
    accelerate launch -m hf_distill.runner.cli train recipes/translation.yaml    # multi-GPU
    hf-distill train recipes/translation.yaml --resume_from_checkpoint true     # after a crash or kill

Every field of RecipeArguments and DistillationConfig (so every TrainingArguments field) can be set in the
YAML file and overridden on the command line as `--field value`. Mistakes are reported in one line (exit status 2);
`--debug` or HF_DISTILL_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import glob
import json
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from ..config import DistillationConfig, parse_init_kwargs
from ..model_card import looks_like_hub_id
from ..modeling import check_model_source
from .demo import run_demo
from ..pruning import describe_student
from .pipeline import cache_recipe_teacher, evaluate_saved, generate_recipe_targets, prune_from_files, train_recipe
from .recipe import RecipeArguments, builder_for

DEBUG_ENV = "HF_DISTILL_DEBUG"
COMMANDS = ("train", "eval", "cache-teacher", "generate-targets", "prune", "demo")

# The TrainingArguments fields `hf-distill train --help` shows; `--help-all` lists every one.
COMMON_TRAINING_FIELDS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "bf16", "eval_strategy", "eval_steps", "logging_steps",
    "save_strategy", "save_steps", "resume_from_checkpoint", "seed", "report_to", "push_to_hub", "hub_model_id",
)


class UsageError(ValueError):
    """A mistake in the command line, the recipe or its paths: reported in one line, exit status 2."""


def _config_field(name: str):
    """A field with the default and help of `DistillationConfig.<name>`, so the two cannot drift apart."""
    spec = next(spec for spec in dataclasses.fields(DistillationConfig) if spec.name == name)
    return dataclasses.field(default=spec.default, metadata=spec.metadata)


@dataclass
class _TeacherFields:
    """The teacher and how it loads, shared by the commands that run a teacher without training."""

    teacher_model_name_or_path: str | None = _config_field("teacher_model_name_or_path")
    teacher_model_init_kwargs: dict[str, Any] | str | None = _config_field("teacher_model_init_kwargs")
    seed: int = _config_field("seed")

    def __post_init__(self):
        try:
            self.teacher_model_init_kwargs = parse_init_kwargs(self.teacher_model_init_kwargs)
        except ValueError as error:
            raise UsageError(str(error)) from None


@dataclass
class TeacherArguments(_TeacherFields):
    """The `DistillationConfig` fields `cache-teacher` reads: parsing them builds no `TrainingArguments`."""

    temperature: float = _config_field("temperature")
    distill_all_tokens: bool = _config_field("distill_all_tokens")

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise UsageError(f"temperature={self.temperature} must be > 0.")


@dataclass
class GenerateArguments(_TeacherFields):
    """The `DistillationConfig` fields `generate-targets` reads: the teacher and how it answers."""

    max_new_tokens: int = _config_field("max_new_tokens")
    seq_kd_sampling: bool = _config_field("seq_kd_sampling")
    generation_temperature: float = _config_field("generation_temperature")

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens} must be >= 1 tokens per response.")
        if not self.generation_temperature > 0:
            raise UsageError(f"generation_temperature={self.generation_temperature} must be > 0.")


@dataclass
class EvalArguments:
    """The one `DistillationConfig` field `eval` reads: the seed that carves the held-out splits."""

    seed: int = _config_field("seed")


# Which dataclasses each command parses from the recipe and `--field value` options.
COMMAND_FIELDS = {
    "train": (RecipeArguments, DistillationConfig),
    "eval": (RecipeArguments, EvalArguments),
    "cache-teacher": (RecipeArguments, TeacherArguments),
    "generate-targets": (RecipeArguments, GenerateArguments),
}


class _FieldParser(HfArgumentParser):
    def error(self, message):  # argparse would print the usage and exit
        raise UsageError(message)


class _CommandParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _field_names(*classes) -> set[str]:
    return {spec.name for cls in classes for spec in dataclasses.fields(cls)}


def parse_recipe(config_path: str | None, overrides: list[str], dataclass_types=None, command: str = "train"):
    """The dataclasses of `command` (RecipeArguments and DistillationConfig for train) from a YAML file, with
    `--field value` overrides on top. Raises `UsageError` (a `ValueError`) for a missing file or an unknown field."""
    dataclass_types = dataclass_types or COMMAND_FIELDS[command]
    parser = _FieldParser(dataclass_types)
    accepted = _field_names(*dataclass_types)
    if config_path:
        if not os.path.isfile(config_path):
            raise UsageError(
                f"recipe file {config_path!r} not found; give the path of a YAML recipe, like recipes/translation.yaml."
            )
        with open(config_path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f"line {mark.line + 1}: " if mark is not None else ""
                raise UsageError(
                    f"{config_path} is not valid YAML ({where}{getattr(error, 'problem', None) or error}); write one "
                    "`field: value` a line."
                ) from None
        if not isinstance(values, dict):
            raise UsageError(f"{config_path} must hold a mapping of field: value, not a {type(values).__name__}.")
        known = _field_names(RecipeArguments, DistillationConfig)
        unknown = sorted(set(values) - known)
        if unknown:
            match = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            raise UsageError(
                f"{config_path} sets unknown fields {unknown}" + (f" (did you mean {match[0]}?)" if match else "")
                + ". Fields are those of RecipeArguments and DistillationConfig (TrainingArguments included); see "
                "`hf-distill train --help`."
            )
        # A recipe holds training settings too; eval and cache-teacher take only the fields they use.
        values = {key: value for key, value in values.items() if key in accepted}
        parser.set_defaults(**_typed_yaml_values(values, parser, dataclass_types, config_path))
    namespace, rest = parser.parse_known_args(overrides)  # unknown options first: before any dataclass validates
    if rest:
        flag = next((arg for arg in rest if arg.startswith("-")), rest[0])
        name = flag.lstrip("-").replace("-", "_")
        if name in _field_names(RecipeArguments, DistillationConfig) - accepted:
            message = f"hf-distill {command} does not use {flag}"
            if name == "max_new_tokens":  # the training (on-policy) setting; metrics have their own
                message += " (the generation length of the metrics is --eval_max_new_tokens)"
        else:
            match = difflib.get_close_matches(name, sorted(accepted), n=1)
            message = f"unknown option {flag}" + (f" (did you mean --{match[0]}?)" if match else "")
        raise UsageError(f"{message}; see `hf-distill {command} --help`.")
    check_precision(namespace)
    parsed = parser.parse_args_into_dataclasses(args=overrides, look_for_args_file=False)
    return tuple(parsed)


def bf16_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def check_precision(settings) -> None:
    """A GPU recipe (`bf16: true`) on a machine without bf16 hardware: name the flag to change, where
    `TrainingArguments` would ask to "assign use_cpu"."""
    for flag in ("bf16", "bf16_full_eval"):
        if getattr(settings, flag, False) and not getattr(settings, "use_cpu", False) and not bf16_available():
            raise UsageError(
                f"{flag}=True needs a GPU with bfloat16 support (or a TPU), and this machine has none: pass "
                f"`--{flag} false` (or set `{flag}: false` in the recipe) to train in float32, or `--use_cpu true` "
                "for bfloat16 on the CPU."
            )


def _typed_yaml_values(values: dict, parser: HfArgumentParser, dataclass_types, config_path: str) -> dict:
    """YAML values converted to each field's type. argparse converts only string defaults, so a YAML list, mapping
    or number of the wrong kind would otherwise reach the dataclasses as is and fail deep inside training."""
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)
    # From the annotations: HfArgumentParser rewrites the fields' own `type` (dict | str becomes str).
    annotations = {name: str(hint) for cls in dataclass_types for name, hint in typing.get_type_hints(cls).items()}
    typed = {}
    for key, value in values.items():
        action, annotation = actions[key], annotations.get(key, "")
        takes_list = action.nargs in ("+", "*")
        convert = action.type or (lambda v: v)
        kind = "true or false" if action.type is string_to_bool else getattr(action.type, "__name__", "value")
        as_is = value is None or (isinstance(value, str) and not takes_list) or (isinstance(value, dict) and "dict" in annotation)
        try:
            if as_is:
                typed[key] = value  # strings are converted by argparse itself
            elif isinstance(value, list) and takes_list:
                typed[key] = [convert(str(item)) for item in value]
            elif isinstance(value, list) and "list" in annotation:
                typed[key] = value
            elif takes_list or isinstance(value, (list, dict)):
                raise ValueError
            else:
                typed[key] = convert(str(value))
        except (ValueError, TypeError):
            if takes_list:
                example = f"[{value!r}]" if not isinstance(value, (list, dict)) else f"[<{kind}>, ...]"
            else:
                example = json.dumps(action.default) if isinstance(action.default, (int, float, str)) else f"<one {kind}>"
            example = f"{key}: {example}"
            wanted = f"a list of {kind}" if takes_list else f"one {kind}"
            raise UsageError(f"{config_path}: {key}={value!r} is not {wanted}; write it like `{example}`.") from None
    return typed


# ---- checks before anything heavy loads ----------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id: absolute, relative (./, ../, ~) or deeper than org/name."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def check_paths(recipe: RecipeArguments, models: dict[str, str | None], student: bool = True) -> None:
    """Refuse missing local data and model folders, and a `dataset_name` that cannot be a Hub id, before any
    model or data loads. `models` maps a setting's name to a model path or Hub id; `student` adds the recipe's."""
    if recipe.data_files:
        if not glob.glob(recipe.data_files):
            raise UsageError(
                f"data_files={recipe.data_files!r}: no such file; give a .json, .jsonl, .csv or .parquet file (a glob works)."
            )
    elif recipe.dataset_name and not os.path.exists(recipe.dataset_name):
        if _looks_local(recipe.dataset_name) or not looks_like_hub_id(recipe.dataset_name):
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
    for setting, path in sorted(models.items(), key=lambda item: not _looks_local(item[1] or "")):
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


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's parser."""
    parser = _CommandParser(prog="hf-distill", description=__doc__.split("\n\n")[0],
                            epilog="Add --debug (or set HF_DISTILL_DEBUG=1) to see the traceback of an error.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    # Field options go through parse_recipe; each command's --help lists them (see _print_help).
    train = commands.add_parser("train", add_help=False, help="Distill a student from a YAML recipe.")
    train.add_argument("recipe", nargs="?", help="YAML file of RecipeArguments and DistillationConfig fields.")
    evaluate = commands.add_parser("eval", add_help=False, help="Evaluate saved models on a recipe's test split.")
    evaluate.add_argument("recipe", nargs="?", help="YAML recipe whose data and task to use.")
    evaluate.add_argument("--model", action="append", default=[], help="NAME=PATH (repeat to compare).")
    evaluate.add_argument("--teacher", help="Teacher path, for teacher–student agreement.")
    evaluate.add_argument("--output", help="Write the rows as JSON here.")
    cache = commands.add_parser(
        "cache-teacher", add_help=False, help="Run the teacher once over a recipe's training data and store its top-k."
    )
    cache.add_argument("recipe", nargs="?", help="YAML recipe (causal task) naming the teacher and data.")
    cache.add_argument("--cache_dir", help="Folder for the cache (resumed if it holds a partial one).")
    cache.add_argument(
        "--top_k", type=int, default=None, help="Entries per token; default: the most that fit 256 bytes."
    )
    cache.add_argument("--batch_size", type=int, default=8, help="Rows per teacher forward pass.")
    targets = commands.add_parser(
        "generate-targets", add_help=False,
        help="Let the teacher answer a recipe's training prompts once (sequence-level KD offline); train on them later.",
    )
    targets.add_argument("recipe", nargs="?", help="YAML recipe (causal prompt → response) naming the teacher and data.")
    targets.add_argument("--output_dir", help="Folder for the prompt/response dataset (save_to_disk; must be empty).")
    targets.add_argument("--batch_size", type=int, default=8, help="Prompts per teacher generate call.")
    prune = commands.add_parser(
        "prune", help="Make a student from a causal teacher by importance (depth and/or MLP width) and save it."
    )
    prune.add_argument("teacher", help="Local folder or Hub id of the teacher (a causal LM).")
    prune.add_argument("--output_dir", required=True, help="Folder for the student (must not hold one already).")
    prune.add_argument("--num_layers", type=int, help="Layers to keep, chosen by block influence.")
    prune.add_argument("--intermediate_size", type=int, help="MLP channels to keep, by activation importance.")
    prune.add_argument("--data_files", required=True, help="Calibration text: a .json/.jsonl/.csv/.parquet file.")
    prune.add_argument("--text_column", default="text", help="The text column; a.b reads a nested field (translation.en).")
    prune.add_argument("--rows", type=int, default=16, help="Calibration rows.")
    prune.add_argument("--max_length", type=int, default=128, help="Tokens per calibration row.")
    demo = commands.add_parser("demo", help="Offline demo: train a teacher, distill, compare with the baseline.")
    demo.add_argument("--output_dir", default="demo_output")
    demo.add_argument("--quick", action="store_true", help="Tiny settings (seconds): a smoke test, not a result.")
    for command in (train, evaluate, cache, targets):
        command.add_argument("-h", "--help", action="store_true", help="Show this help (fields grouped) and exit.")
    train.add_argument("--help-all", action="store_true", help="Also list every TrainingArguments field.")
    return parser, commands.choices


def _print_help(subparser: argparse.ArgumentParser, command: str, full: bool) -> None:
    """The command's own options, then its fields grouped: recipe, distillation, training (summarized)."""
    fields = _FieldParser(COMMAND_FIELDS[command])  # the field options, with their help text
    recipe, training = _field_names(RecipeArguments), _field_names(TrainingArguments)
    rest = _field_names(*COMMAND_FIELDS[command]) - recipe - training
    groups = [
        (f"options of hf-distill {command}", None),
        ("recipe: models, data and task format (RecipeArguments)", recipe),
        ("distillation (DistillationConfig)" if command == "train" else "teacher settings", rest - {"seed"}),
    ]
    if command == "train" and not full:
        shown = set(COMMON_TRAINING_FIELDS)
        groups.append((f"training: common TrainingArguments fields ({len(training)} in all: --help-all)", shown))
    elif command == "train":
        groups.append(("training (TrainingArguments)", training))
    else:
        groups.append(("training", {"seed"}))
    display = argparse.ArgumentParser(
        prog=subparser.prog, usage=f"{subparser.prog} RECIPE.yaml [options] [--field value ...]", add_help=False,
        description="Fields are set in the recipe's YAML file (field: value) and overridden as --field value.",
        epilog="Add --debug (or set HF_DISTILL_DEBUG=1) to see the traceback of an error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for title, names in groups:
        group = display.add_argument_group(title)
        actions = subparser._actions if names is None else [a for a in fields._actions if a.dest in names]
        for action in actions:
            if action.option_strings:  # shown once, as --field_name (--field-name is accepted too)
                shown = copy.copy(action)
                shown.option_strings = [o for o in action.option_strings if "-" not in o[2:]] or action.option_strings
                group._group_actions.append(shown)
    print(display.format_help())


def _run(argv: list[str]) -> int:
    parser, commands = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
        run_demo(args.output_dir, quick=args.quick)
        return 0
    if args.command == "prune":
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
        return _prune(args)
    if args.help or getattr(args, "help_all", False):
        _print_help(commands[args.command], args.command, full=getattr(args, "help_all", False))
        return 0
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
    if _looks_local(args.teacher) and not os.path.isdir(os.path.expanduser(args.teacher)):
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


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take out a bare `--debug` (TrainingArguments' own `--debug` always has a value after it)."""
    debug = os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false")
    kept = []
    for index, arg in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg == "--debug" and (following is None or following.startswith("-") or following in COMMANDS):
            debug = True
        else:
            kept.append(arg)
    return kept, debug


def main(argv: list[str] | None = None) -> int:
    argv, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(argv)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if debug:
            raise
        message = " ".join(str(error).split("\n"))
        hint = "" if isinstance(error, UsageError) else " (--debug shows the traceback)"
        print(f"hf-distill: error: {message}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
