"""Corpus BLEU, computed with sacrebleu."""

import datasets
import evaluate
import sacrebleu


_DESCRIPTION = """\
BLEU compares machine translations with one or more references by the geometric mean of modified
n-gram precisions (n = 1..4), times a brevity penalty for outputs shorter than the references. This
metric wraps `sacrebleu.corpus_bleu`, whose tokenization and defaults make scores comparable across
papers. Scores are in [0, 100].
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): the translations to score, one per segment.
    references (`list[str]` or `list[list[str]]`): one reference per segment, or a list of references
        per segment (segments may have different numbers of references).
    tokenize (`str`, *optional*): sacrebleu tokenizer, e.g. `"13a"` (default), `"intl"`, `"zh"`, `"char"`.
    lowercase (`bool`, defaults to `False`): compare lowercased text.
    smooth_method (`str`, defaults to `"exp"`): `"none"`, `"floor"`, `"add-k"` or `"exp"`.
    smooth_value (`float`, *optional*): the value for `"floor"` and `"add-k"` smoothing.
    use_effective_order (`bool`, defaults to `False`): skip n-gram orders with no matches (sentence BLEU).
Returns:
    `dict`: `bleu` (0-100), `precisions` (n-gram precisions, 0-100), `counts`, `totals`,
    `brevity_penalty`, `length_ratio`, `translation_length` and `reference_length`.
Examples:
    >>> metric = hf_distill.metrics.load_metric("bleu")
    >>> metric.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])["bleu"]
    100.00000000000004
"""

_CITATION = """\
@inproceedings{papineni-etal-2002-bleu,
  title={{B}leu: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics},
  year={2002},
  pages={311--318}
}
@inproceedings{post-2018-call,
  title={A Call for Clarity in Reporting {BLEU} Scores},
  author={Post, Matt},
  booktitle={Proceedings of the Third Conference on Machine Translation: Research Papers},
  year={2018},
  pages={186--191}
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
class Bleu(evaluate.Metric):
    """sacrebleu's corpus BLEU."""

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
        tokenize=None,
        lowercase=False,
        smooth_method="exp",
        smooth_value=None,
        use_effective_order=False,
    ):
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        kwargs = {"tokenize": tokenize} if tokenize is not None else {}
        result = sacrebleu.corpus_bleu(
            predictions,
            reference_streams(references),
            lowercase=lowercase,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            use_effective_order=use_effective_order,
            **kwargs,
        )
        return {
            "bleu": float(result.score),
            "precisions": [float(p) for p in result.precisions],
            "counts": list(result.counts),
            "totals": list(result.totals),
            "brevity_penalty": float(result.bp),
            "length_ratio": float(result.sys_len / result.ref_len) if result.ref_len else 0.0,
            "translation_length": int(result.sys_len),
            "reference_length": int(result.ref_len),
        }
