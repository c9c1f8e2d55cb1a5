"""Translation recipe: distill, train the no-teacher baseline, compare, export.

    python recipes/translation.py                                   # recipes/translation.yaml
    python recipes/translation.py recipes/translation_causal.yaml   # the causal-LM variant
    python recipes/translation.py recipes/translation.yaml --max_steps 100 --data_files recipes/data/bible_en_es.jsonl
"""

import sys
from pathlib import Path

from hf_distill.runner.cli import parse_recipe
from hf_distill.runner.pipeline import train_recipe

if __name__ == "__main__":
    args = sys.argv[1:]
    config_file = args.pop(0) if args and args[0].endswith((".yaml", ".yml")) else Path(__file__).with_name("translation.yaml")
    recipe, training = parse_recipe(str(config_file), args)
    rows, table, paths = train_recipe(recipe, training)
    print(table)
    for name, path in paths.items():
        print(f"{name}: {path}")
