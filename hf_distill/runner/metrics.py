"""Task metrics of the comparison table: accuracy and F1 from scikit-learn, BLEU and chrF from sacrebleu, and any
`evaluate` metric next to them.

```python
from hf_distill.runner.metrics import compute_metric

compute_metric("accuracy", predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.666...}
compute_metric("chrf", predictions=["el gato"], references=["el gato"])  # {"chrf": 100.0, ...}
compute_metric("metrics/exact_match.py", predictions=["a"], references=["a"])  # an `evaluate` metric script
compute_metric(evaluate.load("exact_match"), predictions=["a"], references=["a"])  # an `evaluate` module
```
"""

from __future__ import annotations

import os
from typing import Any

import sacrebleu
from sklearn.metrics import accuracy_score, f1_score

METRIC_NAMES = ("accuracy", "f1", "bleu", "chrf")
F1_AVERAGES = ("macro", "micro", "weighted")


def _reference_streams(references: list) -> list[list[str | None]]:
    """Per-segment references (a string or a list each) as sacrebleu's per-reference streams, ragged lists padded
    with None."""
    references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if any(len(refs) == 0 for refs in references):
        raise ValueError("Every prediction needs at least one reference.")
    n_streams = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)]


def accuracy(predictions, references, normalize: bool = True, sample_weight=None) -> dict:
    """Fraction (or, with `normalize=False`, weighted count) of predictions equal to their reference."""
    score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
    return {"accuracy": float(score)}


def f1(predictions, references, average: str = "macro", labels=None) -> dict:
    """F1 over the classes seen in predictions or references; a class never predicted counts as 0."""
    if average not in F1_AVERAGES:
        raise ValueError(f"average={average!r} is not supported; choose one of {', '.join(F1_AVERAGES)}.")
    return {"f1": float(f1_score(references, predictions, average=average, labels=labels, zero_division=0))}


def bleu(predictions: list[str], references: list, **kwargs) -> dict:
    """sacrebleu's corpus BLEU (0-100); `kwargs` go to `sacrebleu.corpus_bleu` (tokenize, lowercase, ...)."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    result = sacrebleu.corpus_bleu(predictions, _reference_streams(references), **kwargs)
    return {
        "bleu": float(result.score),
        "precisions": [float(p) for p in result.precisions],
        "brevity_penalty": float(result.bp),
        "translation_length": int(result.sys_len),
        "reference_length": int(result.ref_len),
    }


def chrf(predictions: list[str], references: list, **kwargs) -> dict:
    """sacrebleu's corpus chrF (0-100); `kwargs` go to `sacrebleu.CHRF` (word_order=2 gives chrF++)."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    scorer = sacrebleu.CHRF(**kwargs)
    result = scorer.corpus_score(predictions, _reference_streams(references))
    return {"chrf": float(result.score), "char_order": scorer.char_order, "word_order": scorer.word_order}


_METRICS = {"accuracy": accuracy, "f1": f1, "bleu": bleu, "chrf": chrf}


def load_metric(metric: str | Any):
    """`metric` ready to compute: a built-in name as is, an `evaluate` module as is, or the path of an `evaluate`
    metric script (a `.py` file or its folder) loaded with `evaluate.load`."""
    if not isinstance(metric, str) or metric in _METRICS:
        return metric
    if not os.path.exists(metric):
        raise ValueError(
            f"Unknown metric {metric!r}; choose one of {', '.join(METRIC_NAMES)}, or give the path of an `evaluate` "
            "metric script (or an `evaluate.EvaluationModule` from Python)."
        )
    import evaluate  # only where a user's metric asks for it

    return evaluate.load(metric)


def compute_metric(metric: str | Any, predictions, references, **kwargs) -> dict:
    """The metric of `predictions` against `references`, as a dict. `metric` is one of `METRIC_NAMES`, an
    `evaluate.EvaluationModule` (or anything with its `compute(predictions=..., references=...)`), or the path of
    an `evaluate` metric script."""
    metric = load_metric(metric)
    if isinstance(metric, str):
        return _METRICS[metric](predictions, references, **kwargs)
    if not callable(getattr(metric, "compute", None)):
        raise TypeError(f"metric={metric!r} has no compute(predictions=..., references=...); give an `evaluate` module.")
    return dict(metric.compute(predictions=predictions, references=references, **kwargs) or {})


def metric_columns(metric: str | Any, predictions, references) -> dict[str, float]:
    """The numbers a metric returns, as columns of the comparison table (lists and texts are left out)."""
    result = compute_metric(metric, predictions, references)
    return {key: float(value) for key, value in result.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
