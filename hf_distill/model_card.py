"""The model card of a distilled student: Hub metadata, how it was distilled, its evaluation table and usage."""

from __future__ import annotations

import os
import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

# The pipeline task of each kind of student, for the `pipeline_tag` metadata and the usage example.
PIPELINE_TASKS = {
    "causal": "text-generation",
    "seq2seq": "text2text-generation",
    "classification": "text-classification",
}

TAGS = ["hf-distill", "distillation"]

# Keys rendered by name below; any other key of `info` is listed generically under the settings.
_KNOWN_KEYS = {
    "teacher", "student", "base_model", "task", "pipeline_tag", "dataset", "datasets", "repo_id", "license",
    "loss_type", "temperature", "alpha", "beta", "skew", "max_steps", "steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "learning_rate",
}
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*(For[A-Za-z]+|Model)$")  # e.g. a scratch model's LlamaForCausalLM
_DATA_FILE = re.compile(r"\.(jsonl?|csv|tsv|parquet|txt|arrow)(\.gz)?$")


def looks_like_hub_id(name: Any) -> bool:
    """Whether `name` can be a Hub repo id rather than a local path, a data file or a class name."""
    if not isinstance(name, str) or _CLASS_NAME.match(name) or _DATA_FILE.search(name) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_list(value: Any) -> list[str]:
    """A dataset given as a name, a list of names or a `data_files` dict, as a list of strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = [item for items in value.values() for item in ([items] if isinstance(items, str) else items)]
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    return [str(item) for item in value]


def _loss_description(loss_type: str) -> str | None:
    """The registry's one line for a loss type (imported here, so reading this module needs no torch)."""
    from .loss.divergences import DIVERGENCES

    divergence = DIVERGENCES.get(loss_type)
    return None if divergence is None else divergence.description


def _pipeline_task(info: dict) -> str | None:
    task = info.get("task")
    if task is None:
        return None
    task = str(task).lower()
    return task if task in PIPELINE_TASKS.values() else PIPELINE_TASKS.get(task)


def _settings(info: dict, pipeline_task: str | None, datasets: list[str]) -> list[str]:
    """The "How the model was made" bullet list."""
    teacher, student, loss_type = info.get("teacher"), info.get("student"), info.get("loss_type")
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
        description = _loss_description(loss_type)
        made.append(f"- **Distillation loss:** `{loss_type}`" + (f" ({description})" if description else ""))
    if "temperature" in info:
        made.append(f"- **Temperature:** {info['temperature']}")
    if "alpha" in info:
        made.append(f"- **Alpha:** {info['alpha']} (loss = alpha · KD + (1 − alpha) · CE)")
    if "beta" in info and loss_type in (None, "jsd"):  # beta and skew only shape these losses
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
        made.append(f"- **Learning rate:** {f'{learning_rate:g}' if _is_number(learning_rate) else learning_rate}")
    for key, value in info.items():
        if key not in _KNOWN_KEYS:
            made.append(f"- **{key.replace('_', ' ').capitalize()}:** {value}")
    return made


def _usage(repo_id: str | None, pipeline_task: str | None) -> str:
    if pipeline_task == "text-classification":
        example = 'print(pipe("This movie was great!"))'
    elif pipeline_task == "text2text-generation":
        example = 'print(pipe("Translate: Hello, world!")[0]["generated_text"])'
    else:
        example = 'print(pipe("Hello, my name is")[0]["generated_text"])'
    task_argument = f'"{pipeline_task}", ' if pipeline_task else ""
    return (
        "```python\n"
        "from transformers import pipeline\n\n"
        f'pipe = pipeline({task_argument}model="{repo_id or "path/to/this/model"}")\n'
        f"{example}\n"
        "```"
    )


def distillation_model_card(info: dict, evaluation_table: str | None = None) -> ModelCard:
    """The model card of a distilled student; save it with `card.save(path)` or push it with `card.push_to_hub`.

    Args:
        info (`dict`):
            What is known of the run: teacher, student, task ("causal", "seq2seq" or "classification"),
            dataset, loss_type, temperature, alpha, beta, skew, max_steps (or steps), per_device_train_batch_size,
            gradient_accumulation_steps, learning_rate, repo_id, license, pipeline_tag. Missing or `None` values
            are left out; other keys are listed with the settings.
        evaluation_table (`str`, *optional*):
            A Markdown table of evaluation results, shown under "Evaluation".
    """
    info = {key: value for key, value in info.items() if value is not None and value != ""}
    teacher, student, repo_id = info.get("teacher"), info.get("student"), info.get("repo_id")
    pipeline_task = info.get("pipeline_tag") or _pipeline_task(info)
    datasets = _as_list(info.get("dataset", info.get("datasets")))
    base_model = info.get("base_model", student)

    # Local folders, data files and class names are no Hub ids: they stay out of the metadata.
    card_data = ModelCardData(
        library_name="transformers",
        license=info.get("license"),
        base_model=base_model if looks_like_hub_id(base_model) else None,
        datasets=[dataset for dataset in datasets if looks_like_hub_id(dataset)] or None,
        pipeline_tag=pipeline_task,
        tags=list(TAGS),
    )

    intro = "This model was trained by knowledge distillation with hf-distill"
    if student:
        intro += f", starting from `{student}`"
    if teacher:
        intro += f", learning from the teacher `{teacher}`"
    sections = [f"# {repo_id.split('/')[-1] if repo_id else 'Distilled student'}", intro + "."]
    made = _settings(info, pipeline_task, datasets)
    if made:
        sections.append("## How the model was made\n\n" + "\n".join(made))
    if evaluation_table:
        sections.append("## Evaluation\n\n" + evaluation_table.strip())
    sections.append("## Usage\n\n" + _usage(repo_id, pipeline_task))
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def distillation_info(args, student, teacher_name: str, kind, **known) -> dict:
    """What the card says of a `DistillationTrainer` run: the models, the settings that shaped the loss, the features
    that were on, and `known` (dataset, steps, repo_id, license)."""
    from .modeling import unwrap_model  # the model stack only when a trainer asks (see _loss_description)
    from .pruning import describe_student

    student = unwrap_model(student)
    info = {
        "teacher": teacher_name,
        "student": getattr(student.config, "_name_or_path", None) or type(student).__name__,
        "task": str(kind),
        **known,
        "student_made_by": describe_student(student),
    }
    if args.student_quantization != "none":
        info["quantization"] = (f"{args.student_quantization} weight-only (torchao), trained quantization-aware "
                                "against the full-precision teacher")
    if args.lmbda > 0:
        info["on_policy"] = (f"lmbda={args.lmbda}: that fraction of steps trained on the student's own sampled "
                             f"responses (max_new_tokens={args.max_new_tokens}, generation_temperature="
                             f"{args.generation_temperature})")
    if args.seq_kd:
        info["sequence-level distillation"] = (f"seq_kd: trained on the teacher's "
                                               f"{'sampled' if args.seq_kd_sampling else 'greedy'} responses to the "
                                               f"prompts (max_new_tokens={args.max_new_tokens})")
    for key in ("loss_type", "temperature", "alpha", "beta", "skew", "hidden_loss_weight",
                "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate"):
        info[key] = getattr(args, key)
    if args.attention_loss_weight:
        info["attention_loss_weight"] = args.attention_loss_weight
    if args.alpha_end is not None:  # a schedule: the card says where alpha went
        info["alpha"] = f"{args.alpha} → {args.alpha_end}, linearly over the steps"
    return info
