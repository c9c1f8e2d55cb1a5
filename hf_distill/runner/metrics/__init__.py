"""Offline `evaluate` metrics shipped with hf_distill: accuracy, f1, bleu and chrf.

`evaluate.load("accuracy")` fetches the metric script from the Hub; these scripts live in the package and load
by path, so they also work without internet:

```python
from hf_distill.metrics import load_metric

accuracy = load_metric("accuracy")
accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])
```
"""

from pathlib import Path

import evaluate


METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "f1", "bleu", "chrf")

__all__ = ["METRICS_DIR", "METRIC_NAMES", "load_metric"]


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load one of the shipped metrics (`METRIC_NAMES`) by path; `kwargs` go to `evaluate.load`."""
    key = name.lower().removesuffix(".py")
    if key not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; hf_distill ships {', '.join(METRIC_NAMES)}.")
    return evaluate.load(str(METRICS_DIR / f"{key}.py"), **kwargs)
