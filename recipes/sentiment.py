"""Sentiment recipe: distill, train the no-teacher baseline, compare, export.

    python recipes/sentiment.py                                   # recipes/sentiment.yaml
    python recipes/sentiment.py recipes/sentiment_classifier.yaml # the sequence-classification variant
    python recipes/sentiment.py recipes/sentiment.yaml --max_steps 100 --alpha 0.7
"""

import sys
from pathlib import Path

from hf_distill.runner.cli import parse_recipe
from hf_distill.runner.pipeline import train_recipe

if __name__ == "__main__":
    args = sys.argv[1:]
    config_file = args.pop(0) if args and args[0].endswith((".yaml", ".yml")) else Path(__file__).with_name("sentiment.yaml")
    recipe, training = parse_recipe(str(config_file), args)
    rows, table, paths = train_recipe(recipe, training)
    print(table)
    for name, path in paths.items():
        print(f"{name}: {path}")
