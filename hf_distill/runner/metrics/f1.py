"""F1 score for single-label classification, averaged over classes (macro by default)."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """\
The F1 score is the harmonic mean of precision and recall. For one class c, with true positives TP,
false positives FP and false negatives FN: F1_c = 2·TP / (2·TP + FP + FN), and 0 when that denominator is 0.
Averages over the classes found in the predictions or the references:
- "macro": the unweighted mean of F1_c;
- "weighted": the mean of F1_c weighted by the number of references of class c (its support);
- "micro": F1 from the TP, FP and FN summed over classes (equal to accuracy for single-label data).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels, one per prediction.
    average (`str`, defaults to `"macro"`): one of `"macro"`, `"micro"` or `"weighted"`.
    labels (`list[int]`, *optional*): the classes to average over; defaults to every class seen in
        the predictions or the references.
Returns:
    `dict`: `{"f1": float}`, in [0, 1].
Examples:
    >>> metric = hf_distill.metrics.load_metric("f1")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666}
"""

_CITATION = """\
@book{van1979information,
  title={Information Retrieval},
  author={van Rijsbergen, C. J.},
  edition={2},
  year={1979},
  publisher={Butterworths}
}
"""

AVERAGES = ("macro", "micro", "weighted")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """Macro, micro or weighted F1, computed with numpy."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="macro", labels=None):
        if average not in AVERAGES:
            raise ValueError(f"average={average!r} is not supported; choose one of {', '.join(AVERAGES)}.")
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        if labels is None:
            labels = np.union1d(predictions, references)
        labels = np.asarray(labels)
        if labels.size == 0:
            return {"f1": 0.0}

        tp = np.array([np.sum((predictions == c) & (references == c)) for c in labels], dtype=float)
        fp = np.array([np.sum((predictions == c) & (references != c)) for c in labels], dtype=float)
        fn = np.array([np.sum((predictions != c) & (references == c)) for c in labels], dtype=float)

        if average == "micro":
            denominator = 2 * tp.sum() + fp.sum() + fn.sum()
            return {"f1": float(2 * tp.sum() / denominator) if denominator > 0 else 0.0}

        denominators = 2 * tp + fp + fn
        per_class = np.divide(2 * tp, denominators, out=np.zeros_like(tp), where=denominators > 0)
        if average == "macro":
            return {"f1": float(per_class.mean())}
        support = tp + fn
        total = support.sum()
        return {"f1": float(np.sum(per_class * support) / total) if total > 0 else 0.0}
