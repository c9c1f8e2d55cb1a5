"""Reports of a distillation run: a Markdown comparison table, report files with training curves, a model card.

Everything here is a pure function of the rows, logs and settings passed in; nothing is trained or evaluated.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from transformers.utils import logging


logger = logging.get_logger(__name__)

MISSING = "–"

# Training logs (x = "step") and evaluation logs plotted in `training_curves.png`, in this order.
CURVE_KEYS = ("loss", "kd_loss", "ce_loss", "eval_loss", "eval_kd_loss", "eval_ce_loss")

PIPELINE_TASKS = {
    "causal": "text-generation",
    "seq2seq": "text2text-generation",
    "classification": "text-classification",
}

# What the usual columns mean, for the notes under the table; only columns present are explained.
COLUMN_NOTES = {
    "parameters": "number of parameters of the model",
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

LOSS_DESCRIPTIONS = {
    "forward_kl": "forward KL, KL(teacher ‖ student)",
    "reverse_kl": "reverse KL, KL(student ‖ teacher)",
    "jsd": "generalized Jensen-Shannon divergence",
    "skew_kl": "skew KL (DistiLLM)",
    "skew_reverse_kl": "skew reverse KL (DistiLLM)",
    "tvd": "total variation distance",
    "mse": "mean squared error on logits",
    "cosine": "cosine distance on logits",
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
    """quantity → run → (steps, values) for each of `CURVE_KEYS` found in the logs."""
    curves: dict[str, dict[str, tuple[list, list]]] = {}
    for run, history in histories.items():
        for entry in history or []:
            step = entry.get("step")
            if step is None:
                continue
            for key in CURVE_KEYS:
                value = entry.get(key)
                if _is_number(value) and math.isfinite(float(value)):
                    steps, values = curves.setdefault(key, {}).setdefault(run, ([], []))
                    steps.append(step)
                    values.append(float(value))
    return {key: curves[key] for key in CURVE_KEYS if key in curves}


def plot_training_curves(histories: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Save one subplot per logged loss (training and evaluation), one line per run, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = _curves(histories)
    n_cols = min(3, max(len(curves), 1))
    n_rows = max(math.ceil(len(curves) / n_cols), 1)
    figure = Figure(figsize=(4.5 * n_cols, 3.4 * n_rows))
    FigureCanvasAgg(figure)  # the non-interactive Agg backend, without touching pyplot's global state
    if not curves:
        logger.warning("No loss logs with a step were found in the histories; the training curves plot is empty.")
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, "no loss logs", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
    for index, (key, runs) in enumerate(curves.items()):
        axis = figure.add_subplot(n_rows, n_cols, index + 1)
        for run, (steps, values) in runs.items():
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=run)
        axis.set_title(key)
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
) -> dict[str, Path]:
    """Write `report.md`, `report.json` and `training_curves.png` in `out_dir`; return their paths.

    `histories` maps a run name to its Trainer `state.log_history`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "json": out_dir / "report.json",
        "curves": out_dir / "training_curves.png",
    }
    plot_training_curves(histories, paths["curves"])

    columns = {key for row in rows for key in row}
    notes = [f"- `{column}`: {note}." for column, note in COLUMN_NOTES.items() if column in columns]
    notes.append(f"- {MISSING} marks a value that was not measured for that model.")
    sections = [
        f"# {title}",
        comparison_table(rows) if rows else "_No models were evaluated._",
        "## Notes\n\n" + "\n".join(notes),
        f"## Training curves\n\n![Training curves]({paths['curves'].name})",
    ]
    paths["markdown"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")

    with open(paths["json"], "w", encoding="utf-8") as handle:
        report = _jsonable({"title": title, "rows": rows, "histories": histories})
        json.dump(report, handle, indent=2, ensure_ascii=False)
    logger.info(f"Wrote the report to {out_dir}.")
    return paths


# ---- model card -------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*(For[A-Za-z]+|Model)$")  # e.g. a scratch model's LlamaForCausalLM
_DATA_FILE = re.compile(r"\.(jsonl?|csv|tsv|parquet|txt|arrow)(\.gz)?$")


def _looks_like_hub_id(name: Any) -> bool:
    """Whether `name` can be a Hub repo id rather than a local path, a data file or a class name."""
    return (
        isinstance(name, str)
        and bool(_HUB_ID.match(name))
        and not _CLASS_NAME.match(name)
        and not _DATA_FILE.search(name)
        and not os.path.exists(name)
    )


def _as_list(value: Any) -> list[str]:
    """A dataset given as a name, a list of names or a `data_files` dict, as a list of strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = [item for items in value.values() for item in ([items] if isinstance(items, str) else items)]
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    return [str(item) for item in value]


def _task(info: dict) -> str | None:
    task = info.get("task")
    if task is None:
        return None
    task = str(task).lower()
    if task in PIPELINE_TASKS.values():
        return task
    return PIPELINE_TASKS.get(task)


def model_card(info: dict, table_markdown: str | None = None) -> str:
    """A README.md for the distilled student: YAML front matter, how it was made, evaluation and usage.

    `info` may hold teacher, student, task ("causal", "seq2seq" or "classification"), dataset, loss_type,
    temperature, alpha, beta, skew, max_steps (or steps), per_device_train_batch_size,
    gradient_accumulation_steps, learning_rate, repo_id, license and pipeline_tag; missing keys are left out.
    """
    info = {key: value for key, value in info.items() if value is not None and value != ""}
    teacher, student, repo_id = info.get("teacher"), info.get("student"), info.get("repo_id")
    pipeline_task = _task(info)
    datasets = _as_list(info.get("dataset", info.get("datasets")))

    metadata: dict[str, Any] = {"library_name": "transformers"}
    if "license" in info:
        metadata["license"] = info["license"]
    base_model = info.get("base_model", student)
    if _looks_like_hub_id(base_model):
        metadata["base_model"] = base_model
    hub_datasets = [dataset for dataset in datasets if _looks_like_hub_id(dataset)]
    if hub_datasets:
        metadata["datasets"] = hub_datasets
    if info.get("pipeline_tag") or pipeline_task:
        metadata["pipeline_tag"] = info.get("pipeline_tag") or pipeline_task
    metadata["tags"] = ["hf-distill", "knowledge-distillation"]

    name = repo_id.split("/")[-1] if repo_id else "Distilled student"
    intro = "This model was trained by knowledge distillation with hf-distill"
    if student:
        intro += f", starting from `{student}`"
    if teacher:
        intro += f", learning from the teacher `{teacher}`"
    intro += "."

    loss_type = info.get("loss_type")
    made = []
    if teacher:
        made.append(f"- **Teacher:** `{teacher}`")
    if student:
        made.append(f"- **Student (initialization):** `{student}`")
    if "task" in info:
        made.append(f"- **Task:** {info['task']}" + (f" (`{pipeline_task}`)" if pipeline_task else ""))
    if datasets:
        made.append("- **Data:** " + ", ".join(f"`{dataset}`" for dataset in datasets))
    if loss_type:
        description = LOSS_DESCRIPTIONS.get(loss_type)
        made.append(f"- **Distillation loss:** `{loss_type}`" + (f" ({description})" if description else ""))
    if "temperature" in info:
        made.append(f"- **Temperature:** {info['temperature']}")
    if "alpha" in info:
        made.append(f"- **Alpha:** {info['alpha']} (loss = alpha · KD + (1 − alpha) · CE)")
    if "beta" in info and loss_type in (None, "jsd"):
        made.append(f"- **Beta (JSD mixture):** {info['beta']}")
    if "skew" in info and loss_type in (None, "skew_kl", "skew_reverse_kl"):
        made.append(f"- **Skew:** {info['skew']}")
    steps = info.get("max_steps")
    if not _is_number(steps) or steps <= 0:  # Trainer's max_steps is -1 when training runs by epochs
        steps = info.get("steps")
    if steps is not None:
        made.append(f"- **Training steps:** {steps}")
    if "per_device_train_batch_size" in info:
        made.append(f"- **Batch size per device:** {info['per_device_train_batch_size']}")
    if "gradient_accumulation_steps" in info:
        made.append(f"- **Gradient accumulation steps:** {info['gradient_accumulation_steps']}")
    if "learning_rate" in info:
        learning_rate = info["learning_rate"]
        shown = f"{learning_rate:g}" if _is_number(learning_rate) else learning_rate
        made.append(f"- **Learning rate:** {shown}")

    model_ref = repo_id or "path/to/this/model"
    if pipeline_task == "text-classification":
        example = 'print(pipe("This movie was great!"))'
    elif pipeline_task == "text2text-generation":
        example = 'print(pipe("Translate: Hello, world!")[0]["generated_text"])'
    else:
        example = 'print(pipe("Hello, my name is")[0]["generated_text"])'
    task_argument = f'"{pipeline_task}", ' if pipeline_task else ""
    usage = (
        "```python\n"
        "from transformers import pipeline\n\n"
        f'pipe = pipeline({task_argument}model="{model_ref}")\n'
        f"{example}\n"
        "```"
    )

    front_matter = "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---"
    sections = [front_matter, f"# {name}", intro]
    if made:
        sections.append("## How the model was made\n\n" + "\n".join(made))
    if table_markdown:
        sections.append("## Evaluation\n\n" + table_markdown.strip())
    sections.append("## Usage\n\n" + usage)
    return "\n\n".join(sections) + "\n"
