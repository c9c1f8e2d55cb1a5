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

This module imports no torch: the help is printed from the fields' source (`fields.py`), and the commands
(`commands.py`, `arguments.py`) load only once one runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UsageError

DEBUG_ENV = "HF_DISTILL_DEBUG"
COMMANDS = ("train", "eval", "cache-teacher", "generate-targets", "prune", "demo")
EPILOG = "Add --debug (or set HF_DISTILL_DEBUG=1) to see the traceback of an error."

# The TrainingArguments fields `hf-distill train --help` shows; `--help-all` lists every one.
COMMON_TRAINING_FIELDS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "bf16", "eval_strategy", "eval_steps", "logging_steps",
    "save_strategy", "save_steps", "resume_from_checkpoint", "seed", "report_to", "push_to_hub", "hub_model_id",
)

# The names `from hf_distill.runner.cli import ...` has always offered; they load torch, so only when asked for.
_LAZY = {
    "parse_recipe": "arguments", "COMMAND_FIELDS": "arguments", "TeacherArguments": "arguments",
    "GenerateArguments": "arguments", "EvalArguments": "arguments", "check_paths": "commands",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"hf_distill.runner.{_LAZY[name]}"), name)


class _CommandParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit
        raise UsageError(message)


# Each command's own options (its fields come on top, from the recipe and `--field value`). The same specs build
# the parser and the help, so the two cannot differ.
_HELP = (("-h", "--help"), dict(action="store_true", help="Show this help (fields grouped) and exit."))
OPTIONS = {
    "train": [
        (("recipe",), dict(nargs="?", help="YAML file of RecipeArguments and DistillationConfig fields.")),
        _HELP,
        (("--help-all",), dict(action="store_true", help="Also list every TrainingArguments field.")),
    ],
    "eval": [
        (("recipe",), dict(nargs="?", help="YAML recipe whose data and task to use.")),
        (("--model",), dict(action="append", default=[], help="NAME=PATH (repeat to compare).")),
        (("--teacher",), dict(help="Teacher path, for teacher–student agreement.")),
        (("--output",), dict(help="Write the rows as JSON here.")),
        _HELP,
    ],
    "cache-teacher": [
        (("recipe",), dict(nargs="?", help="YAML recipe (causal task) naming the teacher and data.")),
        (("--cache_dir",), dict(help="Folder for the cache (resumed if it holds a partial one).")),
        (("--top_k",), dict(type=int, default=None, help="Entries per token; default: the most that fit 256 bytes.")),
        (("--batch_size",), dict(type=int, default=8, help="Rows per teacher forward pass.")),
        _HELP,
    ],
    "generate-targets": [
        (("recipe",), dict(nargs="?", help="YAML recipe (causal prompt → response) naming the teacher and data.")),
        (("--output_dir",), dict(help="Folder for the prompt/response dataset (save_to_disk; must be empty).")),
        (("--batch_size",), dict(type=int, default=8, help="Prompts per teacher generate call.")),
        _HELP,
    ],
    "prune": [
        (("teacher",), dict(help="Local folder or Hub id of the teacher (a causal LM).")),
        (("--output_dir",), dict(required=True, help="Folder for the student (must not hold one already).")),
        (("--num_layers",), dict(type=int, help="Layers to keep, chosen by block influence.")),
        (("--intermediate_size",), dict(type=int, help="MLP channels to keep, by activation importance.")),
        (("--data_files",), dict(required=True, help="Calibration text: a .json/.jsonl/.csv/.parquet file.")),
        (("--text_column",), dict(default="text", help="The text column; a.b reads a nested field (translation.en).")),
        (("--rows",), dict(type=int, default=16, help="Calibration rows.")),
        (("--max_length",), dict(type=int, default=128, help="Tokens per calibration row.")),
    ],
    "demo": [
        (("--output_dir",), dict(default="demo_output")),
        (("--quick",), dict(action="store_true", help="Tiny settings (seconds): a smoke test, not a result.")),
    ],
}
SUMMARIES = {
    "train": "Distill a student from a YAML recipe.",
    "eval": "Evaluate saved models on a recipe's test split.",
    "cache-teacher": "Run the teacher once over a recipe's training data and store its top-k.",
    "generate-targets": "Let the teacher answer a recipe's training prompts once (sequence-level KD offline); train on "
    "them later.",
    "prune": "Make a student from a causal teacher by importance (depth and/or MLP width) and save it.",
    "demo": "Offline demo: train a teacher, distill, compare with the baseline.",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = _CommandParser(prog="hf-distill", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for command in COMMANDS:
        # Commands with fields print their own help (grouped fields, see _print_help).
        subparser = commands.add_parser(command, add_help=command in ("prune", "demo"), help=SUMMARIES[command])
        for flags, settings in OPTIONS[command]:
            subparser.add_argument(*flags, **settings)
    return parser


def _add_field(group, spec) -> None:
    """One field as HfArgumentParser shows it: --name, a value (true/false for flags), its help and default."""
    from .fields import UNKNOWN

    settings = {"help": spec.help, "default": argparse.SUPPRESS if spec.default is UNKNOWN else spec.default}
    if spec.is_bool and (spec.annotation == "bool" or spec.default is not None):  # --flag alone means true
        settings["nargs"] = "?"
    elif spec.takes_list:
        settings["nargs"] = "+"
    if spec.choices:
        settings["choices"] = spec.choices
    group.add_argument(f"--{spec.name}", **settings)
    if spec.is_bool and spec.default is True:  # HfArgumentParser's way to turn such a flag off
        group.add_argument(f"--no_{spec.name}", action="store_true", help=settings["help"])


def _print_help(command: str, full: bool) -> None:
    """The command's own options, then its fields grouped: recipe, distillation, training (summarized)."""
    from .fields import command_fields, recipe_fields, training_fields

    fields = command_fields(command)
    recipe, training = {f.name for f in recipe_fields()}, {f.name for f in training_fields()}
    rest = {f.name for f in fields} - recipe - training
    groups = [
        ("recipe: models, data and task format (RecipeArguments)", recipe),
        ("distillation (DistillationConfig)" if command == "train" else "teacher settings", rest - {"seed"}),
    ]
    if command == "train" and not full:
        groups.append((f"training: common TrainingArguments fields ({len(training)} in all: --help-all)",
                       set(COMMON_TRAINING_FIELDS)))
    elif command == "train":
        groups.append(("training (TrainingArguments)", training))
    else:
        groups.append(("training", {"seed"}))
    display = argparse.ArgumentParser(
        prog=f"hf-distill {command}", usage=f"hf-distill {command} RECIPE.yaml [options] [--field value ...]",
        add_help=False, description="Fields are set in the recipe's YAML file (field: value) and overridden as "
        "--field value.", epilog=EPILOG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    own = display.add_argument_group(f"options of hf-distill {command}")
    for flags, settings in OPTIONS[command]:
        own.add_argument(*flags, **(settings | {"default": argparse.SUPPRESS} if flags == ("recipe",) else settings))
    for title, names in groups:
        group = display.add_argument_group(title)
        for spec in fields:
            if spec.name in names:
                _add_field(group, spec)
    print(display.format_help())


def _run(argv: list[str]) -> int:
    args, rest = _build_parser().parse_known_args(argv)
    if getattr(args, "help", False) or getattr(args, "help_all", False):
        _print_help(args.command, full=getattr(args, "help_all", False))
        return 0
    from .commands import run  # torch, transformers and the rest load here

    return run(args, rest)


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
