"""Task metrics of the comparison table: accuracy and F1 from scikit-learn, BLEU and chrF from sacrebleu.

```python
from hf_distill.runner.metrics import compute_metric

compute_metric("accuracy", predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.666...}
compute_metric("chrf", predictions=["el gato"], references=["el gato"])  # {"chrf": 100.0, ...}
```
"""

from __future__ import annotations

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


def compute_metric(name: str, predictions, references, **kwargs) -> dict:
    """The metric `name` (one of `METRIC_NAMES`) of `predictions` against `references`, as a dict."""
    if name not in _METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(METRIC_NAMES)}.")
    return _METRICS[name](predictions, references, **kwargs)
