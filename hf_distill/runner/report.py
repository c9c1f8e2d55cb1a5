"""Reports of a distillation run: a Markdown comparison table and report files with training curves.

The model card lives in `hf_distill.model_card`. Everything here is a pure function of the rows, logs and settings
passed in; nothing is trained or evaluated.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

MISSING = "–"

# The panels of `training_curves.png`: panel → (title, log keys in order of preference). Only like is set beside
# like: a distilled run's `loss` blends KD and CE, so the CE panels take its `ce_loss` / `eval_ce_loss`, and fall
# back to `loss` / `eval_loss` only for runs that log no KD term at all (their loss is plain CE).
CURVE_PANELS = {
    "ce_loss": ("training CE loss", ("ce_loss", "loss")),
    "eval_ce_loss": ("held-out CE loss", ("eval_ce_loss", "eval_loss")),
    "kd_loss": ("training KD loss", ("kd_loss",)),
    "eval_kd_loss": ("held-out KD loss", ("eval_kd_loss",)),
}
_BLENDED_KEYS = {"loss", "eval_loss"}

# What the usual columns mean, for the notes under the table; only columns present are explained.
COLUMN_NOTES = {
    "parameters": "number of parameters of the model",
    "layers": "number of transformer layers",
    "size_vs_teacher": "parameters as a fraction of the teacher's",
    "eval_loss": "mean cross-entropy on the test split's target tokens (labels)",
    "perplexity": "exp(eval_loss)",
    "accuracy": "fraction of test examples classified correctly",
    "macro_f1": "F1 averaged over classes, each class weighing the same",
    "f1": "F1 averaged over classes",
    "bleu": "corpus BLEU (sacrebleu, 0-100) of greedy generations against the references",
    "chrf": "chrF (sacrebleu, 0-100) of greedy generations against the references",
    "agreement": "fraction of target positions where the model's top-1 prediction equals the teacher's",
    "latency_ms": "forward-pass time per test example, in milliseconds",
}


# ---- table ------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """numpy / torch scalars as Python numbers; anything else unchanged."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, tuple, dict)):
        try:
            return value.item()
        except (ValueError, RuntimeError, TypeError):
            return value
    return value


def _is_number(value: Any) -> bool:
    """True for ints and floats (and numpy/torch scalars), not for bools."""
    value = _scalar(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_count(value: float) -> str:
    """A count in short form: 950, 12.3K, 1.23M, 7.24B."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}" if isinstance(value, float) and not float(value).is_integer() else str(int(value))


def format_value(column: str, value: Any) -> str:
    """One table cell: parameter counts in short form, floats with 4 significant digits, missing values as "–"."""
    if value is None:
        return MISSING
    value = _scalar(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return MISSING
    if isinstance(value, (int, float)) and "param" in column.lower():
        return format_count(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value != 0 and abs(value) >= 1e4:
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def comparison_table(rows: list[dict]) -> str:
    """A Markdown table of `rows`: one row per model, columns the union of keys in first-seen order, "model" first."""
    if not rows:
        raise ValueError("comparison_table needs at least one row.")
    columns = ["model"]
    for row in rows:
        columns += [key for key in row if key not in columns]

    def numeric(column):
        values = [row[column] for row in rows if row.get(column) is not None]
        return bool(values) and all(_is_number(value) for value in values)

    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---:" if numeric(column) else "---" for column in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(column, row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


# The rows a recipe run names, and the metrics a gap is measured on (True: lower is better).
TEACHER_ROW, DISTILLED_ROW, BASELINE_ROW = "teacher", "distilled", "baseline (no teacher)"
GAP_METRICS = {"perplexity": True, "accuracy": False, "macro_f1": False, "bleu": False, "chrf": False}


def gap_closed(rows: list[dict]) -> dict[str, float]:
    """Per metric, the share of the baseline-to-teacher gap the distilled student closes: 1 at the teacher's score,
    0 at the baseline's, negative below the baseline. Only metrics on which the teacher beats the baseline, and only
    when the rows hold all three runs (a teacher scored with its own tokenizer is named otherwise and left out: its
    perplexity counts other tokens)."""
    named = {row.get("model"): row for row in rows}
    runs = [named.get(name) for name in (TEACHER_ROW, DISTILLED_ROW, BASELINE_ROW)]
    if not all(runs):
        return {}
    closed = {}
    for metric, lower_is_better in GAP_METRICS.items():
        values = [_scalar(run.get(metric)) for run in runs]
        if not all(_is_number(value) and math.isfinite(value) for value in values):
            continue
        teacher, distilled, baseline = (-v if lower_is_better else v for v in values)
        if teacher > baseline:
            closed[metric] = (distilled - baseline) / (teacher - baseline)
    return closed


def held_out_losses(history: list[dict]) -> list[tuple[int, float]]:
    """(step, held-out CE) of a run's evaluations, as the held-out CE panel of the curves reads them."""
    steps, values = _curves({"run": history}).get("eval_ce_loss", {}).get("run", ([], []))
    return list(zip(steps, values))


def steps_to_baseline(histories: dict[str, list[dict]]) -> float | None:
    """The fraction of the baseline's steps after which the distilled student's held-out CE first reaches the
    baseline's last one (linear between evaluations, from the start of training); inf if it never does in its run,
    None without evaluations of both runs."""
    distilled = held_out_losses(histories.get(DISTILLED_ROW))
    baseline = held_out_losses(histories.get(BASELINE_ROW))
    if not distilled or not baseline:
        return None
    (steps, target), previous = baseline[-1], None
    for step, loss in distilled:
        if loss <= target:
            if previous is None:
                return step / steps
            (s0, l0) = previous
            return (s0 + (l0 - target) / (l0 - loss) * (step - s0)) / steps
        previous = (step, loss)
    return math.inf


def _reached(fraction: float | None) -> float | str | None:
    return "never" if fraction == math.inf else fraction


def results_table(rows: list[dict], histories: dict[str, list[dict]] | None = None) -> str:
    """The comparison table, and under it the gap the distilled student closes where the rows allow it, and (with
    the runs' histories, when both evaluated during training) how soon it reached the baseline."""
    lines = [comparison_table(rows)]
    closed = gap_closed(rows)
    if closed:
        shares = ", ".join(f"{100 * share:.0f}% on {metric}" for metric, share in closed.items())
        lines.append(f"Gap closed: the distilled student closes {shares} of the gap between the baseline (no teacher) "
                     "and the teacher (100% = the teacher's score, 0% = the baseline's).")
    fraction = steps_to_baseline(histories or {})
    if fraction is not None:
        reached = (f"after {100 * fraction:.0f}% of the baseline's steps" if math.isfinite(fraction)
                   else "not within its run")
        lines.append(f"Steps to baseline: the distilled student reached the baseline's final held-out loss {reached} "
                     "(from the evaluations during training; fewer is better).")
    return "\n\n".join(lines)


# ---- report files -----------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """`value` with numpy/torch scalars as Python numbers, paths as strings and NaN/inf as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    value = _scalar(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _curves(histories: dict[str, list[dict]]) -> dict[str, dict[str, tuple[list, list]]]:
    """panel → run → (steps, values), for the panels of `CURVE_PANELS` that some run logged."""
    curves: dict[str, dict[str, tuple[list, list]]] = {}
    for run, history in histories.items():
        history = [entry for entry in history or [] if entry.get("step") is not None]
        distilled = any("kd_loss" in entry or "eval_kd_loss" in entry for entry in history)
        for panel, (_, keys) in CURVE_PANELS.items():
            for key in keys:
                if distilled and key in _BLENDED_KEYS:
                    continue
                points = [(entry["step"], float(entry[key])) for entry in history
                          if _is_number(entry.get(key)) and math.isfinite(float(entry[key]))]
                if points:
                    curves.setdefault(panel, {})[run] = ([step for step, _ in points], [value for _, value in points])
                    break
    return {panel: curves[panel] for panel in CURVE_PANELS if panel in curves}


def plot_training_curves(histories: dict[str, list[dict]], path: str | os.PathLike) -> Path | None:
    """Save one subplot per loss (training and held-out CE, then KD), one line per run, as a PNG.

    Returns None, and saves nothing, when matplotlib is not installed (`pip install hf-distill[plot]`).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no training_curves.png (pip install 'hf-distill[plot]').")
        return None

    curves = _curves(histories)
    n_cols = min(2, max(len(curves), 1))
    n_rows = max(math.ceil(len(curves) / n_cols), 1)
    figure = Figure(figsize=(4.5 * n_cols, 3.4 * n_rows))
    FigureCanvasAgg(figure)  # the non-interactive Agg backend, without touching pyplot's global state
    if not curves:
        logger.warning("No loss logs with a step were found in the histories; the training curves plot is empty.")
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, "no loss logs", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
    for index, (panel, runs) in enumerate(curves.items()):
        axis = figure.add_subplot(n_rows, n_cols, index + 1)
        for run, (steps, values) in runs.items():
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=run)
        axis.set_title(CURVE_PANELS[panel][0])
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def write_report(
    rows: list[dict],
    histories: dict[str, list[dict]],
    out_dir: str | os.PathLike,
    title: str = "Distillation report",
    student: str | None = None,
) -> dict[str, Path]:
    """Write `report.md`, `report.json` and (with matplotlib) `training_curves.png` in `out_dir`; return their paths.

    `histories` maps a run name to its Trainer `state.log_history`; `student` says how the student was made.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json"}
    curves = plot_training_curves(histories, out_dir / "training_curves.png")
    if curves is not None:
        paths["curves"] = curves

    columns = {key for row in rows for key in row}
    notes = [f"- `{column}`: {note}." for column, note in COLUMN_NOTES.items() if column in columns]
    notes.append(f"- {MISSING} marks a value that was not measured for that model.")
    sections = [
        f"# {title}",
        *([f"Student: {student}."] if student else []),
        results_table(rows, histories) if rows else "_No models were evaluated._",
        "## Notes\n\n" + "\n".join(notes),
    ]
    if curves is not None:
        sections.append(f"## Training curves\n\n![Training curves]({curves.name})")
    paths["markdown"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")

    with open(paths["json"], "w", encoding="utf-8") as handle:
        report = _jsonable({"title": title, "student": student, "rows": rows, "gap_closed": gap_closed(rows),
                            "steps_to_baseline": _reached(steps_to_baseline(histories)), "histories": histories})
        json.dump(report, handle, indent=2, ensure_ascii=False)
    logger.info(f"Wrote the report to {out_dir}.")
    return paths
