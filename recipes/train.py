"""Run a recipe from Python: the same as `hf-distill train RECIPE.yaml [--field value ...]`.

    python recipes/train.py recipes/translation.yaml --max_steps 100 --data_files recipes/data/bible_en_es.jsonl
"""

import sys

from hf_distill.runner.cli import parse_recipe
from hf_distill.runner.pipeline import train_recipe

if __name__ == "__main__":
    recipe, config = parse_recipe(sys.argv[1], sys.argv[2:])
    rows, table, paths = train_recipe(recipe, config)
    print(table)
    for name, path in paths.items():
        print(f"{name}: {path}")
