"""chrF (and chrF++), computed with sacrebleu."""

import datasets
import evaluate
import sacrebleu


_DESCRIPTION = """\
chrF is the character n-gram F-score between a translation and its references: character n-gram
precision and recall (n = 1..6) averaged over n and combined into an F-beta score with beta = 2, so recall
weighs more. With `word_order=2` it is chrF++, which also counts word unigrams and bigrams. This metric
wraps sacrebleu's `CHRF`; scores are in [0, 100].
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): the translations to score, one per segment.
    references (`list[str]` or `list[list[str]]`): one reference per segment, or a list of references
        per segment (segments may have different numbers of references).
    char_order (`int`, defaults to 6): the largest character n-gram order.
    word_order (`int`, defaults to 0): the largest word n-gram order; 2 gives chrF++.
    beta (`int`, defaults to 2): weight of recall relative to precision.
    lowercase (`bool`, defaults to `False`): compare lowercased text.
    whitespace (`bool`, defaults to `False`): keep whitespace in character n-grams.
    eps_smoothing (`bool`, defaults to `False`): smooth as in the reference chrF++.py implementation.
Returns:
    `dict`: `chrf` (0-100), `char_order`, `word_order` and `beta`.
Examples:
    >>> metric = hf_distill.metrics.load_metric("chrf")
    >>> metric.compute(predictions=["the cat sat"], references=["the cat sat"])["chrf"]
    100.0
"""

_CITATION = """\
@inproceedings{popovic-2015-chrf,
  title={chr{F}: character n-gram {F}-score for automatic {MT} evaluation},
  author={Popovi{\\'c}, Maja},
  booktitle={Proceedings of the Tenth Workshop on Statistical Machine Translation},
  year={2015},
  pages={392--395}
}
@inproceedings{popovic-2017-chrf,
  title={chr{F}++: words helping character n-grams},
  author={Popovi{\\'c}, Maja},
  booktitle={Proceedings of the Second Conference on Machine Translation},
  year={2017},
  pages={612--618}
}
"""


def reference_streams(references):
    """Turn per-segment references into sacrebleu's per-reference streams, padding ragged lists with None."""
    references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if any(len(refs) == 0 for refs in references):
        raise ValueError("Every prediction needs at least one reference.")
    n_streams = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    """sacrebleu's corpus chrF."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            homepage="https://github.com/mjpost/sacrebleu",
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        char_order=6,
        word_order=0,
        beta=2,
        lowercase=False,
        whitespace=False,
        eps_smoothing=False,
    ):
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        chrf = sacrebleu.CHRF(
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )
        result = chrf.corpus_score(predictions, reference_streams(references))
        return {"chrf": float(result.score), "char_order": char_order, "word_order": word_order, "beta": beta}
