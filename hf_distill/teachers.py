"""Setting up the teachers before training: loading and checking them against the student, the hidden-state
term's layer map and projections, and the short names their log lines use."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from peft import get_peft_model
from transformers.utils import logging

from .checks import check_cross_tokenizer_models, check_several_teachers
from .cross_tokenizer import shared_vocabulary_ids
from .loss import default_layer_map
from .modeling import (
    CAUSAL,
    CLASSIFICATION,
    SEQ2SEQ,
    attention_projections,
    check_compatible,
    check_tokenizers,
    load_model,
    load_tokenizer_if_any,
    output_size,
    relation_heads,
    unwrap_model,
)

logger = logging.get_logger(__name__)

# The student's submodule that holds the hidden-state projections (when hidden sizes differ).
PROJECTIONS = "distill_projections"


@dataclass
class Teachers:
    """The loaded teachers ([] when training from a cache) and, for a teacher with another tokenizer, its tokenizer
    and (`cross_tokenizer='align'`) the (student ids, teacher ids) both vocabularies spell alike."""

    models: list = field(default_factory=list)
    tokenizer: object = None
    shared_vocabulary: tuple[torch.Tensor, torch.Tensor] | None = None


def load_teachers(student, teacher, args, kind, processing_class, teacher_processing_class) -> Teachers:
    """The teacher models (loaded from their paths if need be), each checked to fit the student."""
    if teacher is not None and args.teacher_server_url is not None:
        raise ValueError(
            f"teacher_server_url={args.teacher_server_url!r} serves the teacher, and a teacher_model was passed too: "
            "give one or the other."
        )
    if args.teacher_server_url is not None:  # teacher_model_name_or_path, if set, is a local copy that stays on disk
        return Teachers()
    teacher = teacher if teacher is not None else args.teacher_model_name_or_path
    if teacher is None and args.teacher_cache is None:
        raise ValueError(
            "DistillationTrainer needs a teacher: pass teacher_model=..., set teacher_model_name_or_path, train from "
            "an offline cache with teacher_cache=..., or from a served one with teacher_server_url=..."
        )
    if teacher is None:
        return Teachers()
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    tokenizers = teacher_processing_class if isinstance(teacher_processing_class, (list, tuple)) else (
        [teacher_processing_class] * len(teachers)
    )
    if len(tokenizers) != len(teachers):
        raise ValueError(
            f"teacher_processing_class has {len(tokenizers)} tokenizers for {len(teachers)} teachers: give one per "
            "teacher, in the same order, or a single one they all share."
        )
    if len(teachers) > 1:
        check_several_teachers(args, len(teachers))
    if args.cross_tokenizer:
        return _other_tokenizer_teacher(student, teachers[0], tokenizers[0], args, processing_class)
    loaded = []
    for teacher, tokenizer in zip(teachers, tokenizers):
        teacher, tokenizer = _load(teacher, tokenizer, args)
        check_compatible(student, teacher)
        if processing_class is not None and tokenizer is not None and kind != CLASSIFICATION:
            check_tokenizers(processing_class, tokenizer, min(output_size(student), output_size(teacher)))
        loaded.append(teacher)
    if kind != CAUSAL and args.distill_all_tokens:
        logger.warning("distill_all_tokens applies to causal LMs only; distilling on the labels.")
    return Teachers(loaded)


def _load(teacher, tokenizer, args):
    """A teacher given as a path, loaded with `teacher_model_init_kwargs`, and its tokenizer if it has one."""
    if isinstance(teacher, str):
        tokenizer = tokenizer or load_tokenizer_if_any(teacher)
        teacher = load_model(teacher, **(args.teacher_model_init_kwargs or {}))
    return teacher, tokenizer


def _other_tokenizer_teacher(student, teacher, tokenizer, args, processing_class) -> Teachers:
    """`cross_tokenizer`: one causal teacher, and both tokenizers (the teacher's loaded from its folder if not given)."""
    teacher, tokenizer = _load(teacher, tokenizer, args)
    check_cross_tokenizer_models(args, student, teacher, processing_class, tokenizer)
    shared = shared_vocabulary_ids(processing_class, tokenizer, student, teacher) if args.cross_tokenizer == "align" else None
    return Teachers([teacher], tokenizer, shared)


# ---- the layer terms (hidden states, attention relations) ---------------------------------------


def resolve_layer_map(student, teacher, args, kind) -> list[int] | None:
    """For each student layer, the teacher layer whose output it matches (None without a layer term)."""
    if not args.matches_layers:
        return None
    if teacher is None:
        name = "hidden_loss_weight" if args.hidden_loss_weight else "attention_loss_weight"
        raise ValueError(
            f"{name} > 0 needs the teacher's layers, which an offline teacher_cache does not hold; train with a live "
            f"teacher or set {name}=0."
        )
    s_config, t_config = unwrap_model(student).config.get_text_config(), unwrap_model(teacher).config.get_text_config()
    n_student, n_teacher = _num_layers(s_config, kind), _num_layers(t_config, kind)
    layer_map = args.layer_map or default_layer_map(n_student, n_teacher, _source_layers(student, teacher))
    if len(layer_map) != n_student or not all(0 <= i < n_teacher for i in layer_map):
        raise ValueError(
            f"layer_map={layer_map} must give one teacher layer (0..{n_teacher - 1}) for each of the student's "
            f"{n_student} layers."
        )
    return list(layer_map)


def resolve_relation_heads(student, teacher, args, kind) -> int | None:
    """The attention-relation term's heads (None without it), after checking both models have what it reads."""
    if not args.attention_loss_weight or teacher is None:  # no teacher: refused by resolve_layer_map
        return None
    if kind != CAUSAL:
        raise ValueError(
            f"attention_loss_weight={args.attention_loss_weight} compares causal self-attention relations; this is a "
            f"{kind} model. Set attention_loss_weight=0 (hidden_loss_weight matches its layers' outputs)."
        )
    for model in (student, teacher):
        attention_projections(model)  # raises, naming the model, where its blocks have no q/k/v projections
    return relation_heads(student, teacher)


def attach_projections(model, teacher, layer_map) -> None:
    """Where hidden sizes differ, a learned linear map per mapped layer from the student's size to the teacher's.

    They live on the student as `distill_projections`, so the optimizer trains them and checkpoints (and
    resuming) keep them; `DistillationTrainer.save_model` leaves them out of the exported student.
    """
    if not layer_map:
        return
    student_size = unwrap_model(model).config.get_text_config().hidden_size
    teacher_size = unwrap_model(teacher).config.get_text_config().hidden_size
    if student_size == teacher_size:
        return
    parameter = next(model.parameters())
    projections = nn.ModuleList(nn.Linear(student_size, teacher_size, bias=False) for _ in layer_map)
    model.add_module(PROJECTIONS, projections.to(parameter.device, parameter.dtype))


def _num_layers(config, kind) -> int:
    """The number of blocks whose outputs the hidden-state term compares (the decoder's for seq2seq)."""
    if kind == SEQ2SEQ:
        return getattr(config, "num_decoder_layers", None) or config.num_hidden_layers
    return config.num_hidden_layers


def _source_layers(student, teacher) -> list[int] | None:
    """The teacher layer each student layer was made from, when the student was cut or pruned from this teacher.

    Configs record layers of the original model (`distill_source_layers`), so a student made from an assistant
    that was itself made from the original (a teacher-assistant chain) is matched through those.
    """
    source = getattr(unwrap_model(student).config, "distill_source_layers", None)
    teacher_source = getattr(unwrap_model(teacher).config, "distill_source_layers", None)
    if source is None or teacher_source is None:
        return source
    position = {layer: i for i, layer in enumerate(teacher_source)}
    return [position[layer] for layer in source] if all(layer in position for layer in source) else None


# ---- the student and the names --------------------------------------------------------------------


def peft_student(model, peft_config):
    """The student wrapped by PEFT; a config whose target_modules match nothing is refused with the names that exist."""
    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:  # peft's NoMatchingPeftModuleError
        if "not found in the base model" not in str(error):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})
        raise ValueError(
            f"peft_config.target_modules={peft_config.target_modules!r} matches no module of {type(model).__name__}; "
            f"target some of its linear layers: {linear}."
        ) from None


def name_or_path(model) -> str:
    inner = unwrap_model(model)
    return getattr(inner.config, "_name_or_path", None) or type(inner).__name__


def unique_names(teachers) -> list[str]:
    """Short names for the teachers' log lines: the last part of each one's path or id, numbered if repeated."""
    names = [os.path.basename(name_or_path(teacher).rstrip("/")) for teacher in teachers]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def teacher_title(teachers, server=None, cache_info=None) -> str:
    """The teacher as the model card and Hub commit name it: its path(s), the served model, or the cache's teacher."""
    if teachers:
        return ", ".join(map(name_or_path, teachers))
    if server is not None:
        return f"{server.model} (served)"
    return (cache_info or {}).get("teacher_name") or "cached teacher"


def projections(model) -> nn.ModuleList | None:
    """The student's hidden-state projections, if it has them."""
    return getattr(model, PROJECTIONS, None)


@contextlib.contextmanager
def without_projections(model):
    """The student as exported: its hidden-state projections taken off for the duration (checkpoints keep them)."""
    taken = projections(model)
    if taken is not None:
        delattr(model, PROJECTIONS)
    try:
        yield model
    finally:
        if taken is not None:
            model.add_module(PROJECTIONS, taken)
