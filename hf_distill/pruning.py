"""Students made from the teacher by importance: which layers to keep (depth) and which MLP channels (width).

Depth follows ShortGPT's block influence: a layer whose output is nearly its input (cosine close to 1)
changes little and goes first. Width follows Minitron's activation importance: an MLP channel's score is
the mean magnitude of its activation (the input of `down_proj`) on calibration batches. Both produce a
plain `PreTrainedModel` that saves, reloads with `AutoModelForCausalLM` and generates.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from transformers.utils import logging

from .forward import model_inputs
from .modeling import layer_stack, model_kind, student_from_teacher

logger = logging.get_logger(__name__)


@torch.no_grad()
def block_influence(model, batches: Iterable[dict]) -> list[float]:
    """Per layer: 1 − mean cosine similarity between its input and output hidden states over real tokens."""
    model.eval()
    kind = model_kind(model)
    totals, count = None, 0
    for batch in batches:
        outputs = model(**model_inputs(model, batch, kind), output_hidden_states=True)
        states = outputs.hidden_states
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        # The last entry has the final norm applied; compare it as the last layer's output anyway (its direction).
        cosines = torch.stack([
            nn.functional.cosine_similarity(states[i][mask].float(), states[i + 1][mask].float(), dim=-1).sum()
            for i in range(len(states) - 1)
        ])
        totals = cosines if totals is None else totals + cosines
        count += int(mask.sum())
    return (1.0 - totals / max(count, 1)).tolist()


def layers_to_keep(scores: list[float], num_layers: int, keep_ends: bool = True) -> list[int]:
    """The `num_layers` highest-scoring layers in their original order; the first and last always kept when asked."""
    total = len(scores)
    if not 1 <= num_layers <= total:
        raise ValueError(f"student_num_layers={num_layers} must lie in 1..{total} (the teacher's layers).")
    forced = [0, total - 1] if keep_ends and num_layers >= 2 else []
    rest = sorted((i for i in range(total) if i not in forced), key=lambda i: scores[i], reverse=True)
    return sorted(forced + rest[: num_layers - len(forced)])


def prune_depth(teacher, num_layers: int, batches: Iterable[dict], keep_ends: bool = True):
    """A student of `num_layers` of the teacher's layers, chosen by block influence on `batches`."""
    scores = block_influence(teacher, batches)
    kept = layers_to_keep(scores, num_layers, keep_ends)
    logger.info(f"depth pruning: keeping teacher layers {kept} of {len(scores)} (block influence)")
    student = student_from_teacher(teacher, kept)
    student.config.distill_pruning = {"method": "block_influence", "kept_layers": kept, "teacher_layers": len(scores)}
    return student


@torch.no_grad()
def mlp_channel_importance(model, batches: Iterable[dict]) -> list[torch.Tensor]:
    """Per layer: the mean |activation| of each MLP channel (the input of `down_proj`) over real tokens."""
    model.eval()
    kind = model_kind(model)
    blocks = layer_stack(model)
    sums = [None] * len(blocks)
    masks: list[torch.Tensor] = []

    def hook(index):
        def record(module, args):
            values = args[0][masks[-1]].abs().float().sum(0)
            sums[index] = values if sums[index] is None else sums[index] + values
        return record

    handles = [_mlp(block).down_proj.register_forward_pre_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        for batch in batches:
            masks.append(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool())
            model(**model_inputs(model, batch, kind))
    finally:
        for handle in handles:
            handle.remove()
    return sums


def prune_mlp(model, intermediate_size: int, batches: Iterable[dict]):
    """Keep the `intermediate_size` most important MLP channels of every layer (in place); returns the model."""
    current = model.config.get_text_config().intermediate_size
    if not 1 <= intermediate_size <= current:
        raise ValueError(f"student_intermediate_size={intermediate_size} must lie in 1..{current} (the model's).")
    scores = mlp_channel_importance(model, batches)
    for block, score in zip(layer_stack(model), scores):
        keep = score.topk(intermediate_size).indices.sort().values
        mlp = _mlp(block)
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, _slice_linear(getattr(mlp, name), keep, dim=0))
        mlp.down_proj = _slice_linear(mlp.down_proj, keep, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate_size
    model.config.get_text_config().intermediate_size = intermediate_size
    info = dict(getattr(model.config, "distill_pruning", None) or {})
    model.config.distill_pruning = {**info, "intermediate_size": intermediate_size, "teacher_intermediate_size": current}
    return model


def prune_student(teacher, batches: list[dict], num_layers: int | None = None, intermediate_size: int | None = None):
    """A student made from the teacher: depth by block influence, then MLP width by activation importance."""
    if num_layers is None and intermediate_size is None:
        raise ValueError("Say how small the student is: num_layers and/or intermediate_size.")
    student = prune_depth(teacher, num_layers, batches) if num_layers else student_from_teacher(
        teacher, list(range(len(layer_stack(teacher))))
    )
    if intermediate_size:
        prune_mlp(student, intermediate_size, batches)
    student.train()
    return student


def describe_student(model) -> str | None:
    """How a student was made from its teacher, from what its config records (None for other students)."""
    config = model.config
    source = getattr(config, "distill_source_layers", None)
    if source is None:
        return None
    pruning = getattr(config, "distill_pruning", None) or {}
    teacher_layers = pruning.get("teacher_layers")
    of = f" of the teacher's {teacher_layers}" if teacher_layers else " of the teacher's"
    how = "chosen by block influence" if pruning.get("method") == "block_influence" else "kept at fixed positions"
    text = f"{len(source)}{of} layers ({', '.join(map(str, source))}), {how}"
    if "intermediate_size" in pruning:
        text += (f"; MLPs pruned to {pruning['intermediate_size']} of {pruning['teacher_intermediate_size']} "
                 "channels by activation importance")
    return text


def _mlp(block) -> nn.Module:
    mlp = getattr(block, "mlp", None)
    if mlp is None or not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(
            f"Width pruning needs a gated MLP (gate_proj, up_proj, down_proj) as in Llama, Qwen or Mistral; "
            f"{type(block).__name__} has none. Prune depth only (student_num_layers)."
        )
    return mlp


def _slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `layer` keeping the output rows (dim 0) or input columns (dim 1) in `keep`."""
    weight = layer.weight.detach().index_select(dim, keep.to(layer.weight.device))
    bias = layer.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, keep.to(bias.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new
