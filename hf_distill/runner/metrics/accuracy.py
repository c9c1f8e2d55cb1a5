"""Accuracy: the fraction of predictions equal to their reference label."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among all predictions:
accuracy = (number of predictions equal to their reference) / (number of predictions).
It lies in [0, 1]; 1 means every prediction is correct.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels, one per prediction.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; if `False`,
        return the (weighted) number of correct predictions.
    sample_weight (`list[float]`, *optional*): a weight for each example.
Returns:
    `dict`: `{"accuracy": float}`.
Examples:
    >>> metric = hf_distill.metrics.load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    {'accuracy': 0.75}
"""

_CITATION = """\
@book{manning2008introduction,
  title={Introduction to Information Retrieval},
  author={Manning, Christopher D. and Raghavan, Prabhakar and Sch{\\"u}tze, Hinrich},
  year={2008},
  publisher={Cambridge University Press}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Classification accuracy, computed with numpy."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        weights = np.ones(len(predictions)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if weights.shape != predictions.shape:
            raise ValueError(f"Got {len(weights)} sample weights for {len(predictions)} predictions.")
        correct = float(np.sum(weights * (predictions == references)))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total > 0 else 0.0}
