"""The `hf-distill` command: train from a YAML recipe, evaluate saved models, run the offline demo.

    hf-distill train recipes/translation.yaml --max_steps 200 --alpha 0.7
    hf-distill eval recipes/translation.yaml --model student=runs/translation --model teacher=Helsinki-NLP/opus-mt-en-es
    hf-distill cache-teacher recipes/translation_causal.yaml --cache_dir cache/  # then train with --teacher_cache cache/
    hf-distill demo
    accelerate launch -m hf_distill.runner.cli train recipes/translation.yaml    # multi-GPU

Every field of RecipeArguments and DistillationConfig (so every TrainingArguments field) can be set in the
YAML file and overridden on the command line as `--field value`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml
from transformers import HfArgumentParser

from ..config import DistillationConfig
from .recipe import RecipeArguments


def parse_recipe(config_path: str | None, overrides: list[str]) -> tuple[RecipeArguments, DistillationConfig]:
    """RecipeArguments and DistillationConfig from a YAML file, with `--field value` overrides on top."""
    parser = HfArgumentParser((RecipeArguments, DistillationConfig))
    if config_path:
        with open(config_path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must hold a mapping of field: value, not a {type(values).__name__}.")
        known = {f.name for cls in (RecipeArguments, DistillationConfig) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{config_path} sets unknown fields {unknown}. Fields are those of RecipeArguments and "
                "DistillationConfig (TrainingArguments included); see `hf-distill train --help`."
            )
        parser.set_defaults(**values)
    recipe, config = parser.parse_args_into_dataclasses(args=overrides, look_for_args_file=False)
    return recipe, config


# eval and cache-teacher use a recipe's data, task and teacher settings only: a GPU-only training setting
# (bf16 on a CPU machine) must not stop them. Models run in the dtype they are loaded with.
_NO_MIXED_PRECISION = ["--bf16", "false", "--fp16", "false"]


def _models_option(values: list[str]) -> dict[str, str]:
    models = {}
    for value in values:
        name, _, path = value.rpartition("=")
        models[name or path] = path
    return models


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-distill", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Distill a student from a YAML recipe (and --field value overrides).")
    train.add_argument("recipe", nargs="?", help="YAML file of RecipeArguments and DistillationConfig fields.")
    evaluate = commands.add_parser("eval", help="Evaluate saved models on a recipe's test split.")
    evaluate.add_argument("recipe", help="YAML recipe whose data and task to use.")
    evaluate.add_argument("--model", action="append", required=True, help="NAME=PATH (repeat to compare).")
    evaluate.add_argument("--teacher", help="Teacher path, for teacher–student agreement.")
    evaluate.add_argument("--output", help="Write the rows as JSON here.")
    cache = commands.add_parser("cache-teacher", help="Run the teacher once over a recipe's training data and store its top-k.")
    cache.add_argument("recipe", help="YAML recipe (causal task) naming the teacher and data.")
    cache.add_argument("--cache_dir", required=True, help="Folder for the cache (resumed if it holds a partial one).")
    cache.add_argument("--top_k", type=int, default=None, help="Entries per token; default: the most that fit 256 bytes.")
    cache.add_argument("--batch_size", type=int, default=8)
    demo = commands.add_parser("demo", help="Offline demo: train a teacher, distill, compare with the baseline.")
    demo.add_argument("--output_dir", default="demo_output")
    demo.add_argument("--quick", action="store_true", help="Tiny settings (seconds): a smoke test, not a result.")

    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from .pipeline import train_recipe

        recipe, config = parse_recipe(args.recipe, rest)
        _, table, paths = train_recipe(recipe, config)
        print(table)
        print("\n".join(f"{name}: {path}" for name, path in paths.items()))
        return 0
    if args.command == "eval":
        import json

        from .pipeline import evaluate_saved

        recipe, config = parse_recipe(args.recipe, [*rest, *_NO_MIXED_PRECISION])
        rows, table = evaluate_saved(recipe, _models_option(args.model), args.teacher, seed=config.seed)
        print(table)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                json.dump(rows, handle, indent=2)
        return 0
    if args.command == "cache-teacher":
        from .pipeline import cache_recipe_teacher

        recipe, config = parse_recipe(args.recipe, [*rest, *_NO_MIXED_PRECISION])
        path = cache_recipe_teacher(recipe, config, args.cache_dir, top_k=args.top_k, batch_size=args.batch_size)
        print(f"teacher cache written to {path}; train from it with --teacher_cache {path}")
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from .demo import run_demo

    run_demo(args.output_dir, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
