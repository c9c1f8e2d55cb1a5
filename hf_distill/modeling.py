"""Models: task kinds, loading, unwrapping, compatibility checks, and students cut from a teacher."""

from __future__ import annotations

import copy
import math
import os
from enum import Enum
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging

logger = logging.get_logger(__name__)


class TaskKind(str, Enum):
    """What a model predicts, which decides how its outputs align with the labels."""

    CAUSAL = "causal"  # next token: position t predicts token t + 1
    SEQ2SEQ = "seq2seq"  # decoder positions align with the labels
    CLASSIFICATION = "classification"  # one distribution a row

    def __str__(self) -> str:
        return self.value


CAUSAL, SEQ2SEQ, CLASSIFICATION = TaskKind.CAUSAL, TaskKind.SEQ2SEQ, TaskKind.CLASSIFICATION
# A teacher with another tokenizer gets its own tokenization of each row (`cross_tokenizer`); with 'align' the
# student's labels kept for the KD term are `aligned_labels`.
TEACHER_TOKEN_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "aligned_labels")
# A cached teacher's entries, as columns of the cache and keys of a batch (`hf_distill.cache`).
CACHE_COLUMNS = ("teacher_ids", "teacher_logprobs", "teacher_lse")
_AUTO_CLASSES = {
    CAUSAL: AutoModelForCausalLM,
    SEQ2SEQ: AutoModelForSeq2SeqLM,
    CLASSIFICATION: AutoModelForSequenceClassification,
}


def unwrap_model(model):
    """The transformers model under PEFT / DDP / compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def kind_of_config(config) -> TaskKind:
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return CLASSIFICATION
    return CAUSAL


def model_kind(model) -> TaskKind:
    """'causal', 'seq2seq' or 'classification', from the model's class (not its checkpoint)."""
    inner = unwrap_model(model)
    name = type(inner).__name__
    if name.endswith("ForSequenceClassification"):
        return CLASSIFICATION
    if getattr(inner.config, "is_encoder_decoder", False):
        return SEQ2SEQ
    if name.endswith(("ForCausalLM", "LMHeadModel")) or "CausalLM" in name:
        return CAUSAL
    raise TypeError(
        f"{name} is not a model hf_distill can distill: use a causal LM (AutoModelForCausalLM), a seq2seq LM "
        "(AutoModelForSeq2SeqLM) or a sequence classifier (AutoModelForSequenceClassification)."
    )


def resolve_init_kwargs(init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Copy of `from_pretrained` kwargs with a `dtype` given as a string ('bfloat16') turned into a torch dtype."""
    kwargs = dict(init_kwargs or {})
    if "torch_dtype" in kwargs:  # the transformers 4 spelling
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'float32', 'bfloat16', 'float16' or 'auto'.")
        kwargs["dtype"] = resolved
    return kwargs


def load_model(name_or_path: str, kind: str | None = None, **init_kwargs) -> PreTrainedModel:
    """Load a causal LM, seq2seq LM or classifier from a Hub id or a local folder, its kind read from the config."""
    init_kwargs = resolve_init_kwargs(init_kwargs)
    check_model_source(name_or_path)
    if kind is None:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=init_kwargs.get("trust_remote_code", False))
        kind = kind_of_config(config)
    return _AUTO_CLASSES[kind].from_pretrained(name_or_path, **init_kwargs)


def looks_like_path(name: str) -> bool:
    """A path rather than a Hub id: absolute, relative (./, ../, ~) or deeper than org/name."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def check_model_source(name_or_path: str, setting: str | None = None, needs_config: bool = True) -> None:
    """Raise `FileNotFoundError` for a model that cannot load here, before transformers fails on it less clearly:
    a missing folder, a folder without config.json, or a Hub id absent from the local cache while the Hub is off."""
    given = f"{setting}={name_or_path!r}" if setting else repr(name_or_path)
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if needs_config and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{given} is a folder without config.json: give the folder save_pretrained wrote (config.json and weights)."
            )
        return
    if looks_like_path(name_or_path) or os.path.exists(path):
        raise FileNotFoundError(f"{given}: no such folder. Give a local model folder or a Hub id (org/name).")
    cached = os.path.isdir(os.path.join(hf_constants.HF_HUB_CACHE, "models--" + name_or_path.replace("/", "--")))
    if hf_constants.is_offline_mode() and not cached:
        raise FileNotFoundError(
            f"{given} is not a local folder, and the Hub is off (HF_HUB_OFFLINE=1) with no copy in the local cache: "
            f"download it while online (hf download {name_or_path}) or give a local folder."
        )


def load_tokenizer_if_any(name_or_path: str):
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError):
        return None


def position_limit(model) -> int | None:
    """The most positions a model takes (`max_position_embeddings`), or None where its config sets no limit."""
    limit = getattr(unwrap_model(model).config.get_text_config(), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def output_size(model) -> int:
    """Size of the model's output distribution: the vocabulary (LMs) or the number of classes (classifiers)."""
    inner = unwrap_model(model)
    if model_kind(inner) == CLASSIFICATION:
        return inner.config.num_labels
    head = inner.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return head.weight.shape[0]
    return inner.config.get_text_config().vocab_size


def check_compatible(student, teacher) -> None:
    """Raise if the teacher cannot be compared with the student position by position."""
    student_kind, teacher_kind = model_kind(student), model_kind(teacher)
    student_name, teacher_name = type(unwrap_model(student)).__name__, type(unwrap_model(teacher)).__name__
    if student_kind != teacher_kind:
        raise ValueError(
            f"The teacher is a {teacher_kind} model ({teacher_name}) but the student is a {student_kind} model "
            f"({student_name}). Distillation compares their outputs position by position, so both must be of one "
            "kind: load the teacher with the same AutoModelFor... class as the student."
        )
    student_size, teacher_size = output_size(student), output_size(teacher)
    if student_kind == CLASSIFICATION and student_size != teacher_size:
        raise ValueError(
            f"The teacher ({teacher_name}) predicts {teacher_size} classes but the student ({student_name}) predicts "
            f"{student_size}. Give the student num_labels={teacher_size} and the teacher's label2id."
        )
    if student_size != teacher_size:
        logger.warning(
            f"Teacher vocabulary ({teacher_size} rows) and student vocabulary ({student_size} rows) differ in size; "
            f"the divergence compares the first {min(student_size, teacher_size)} rows, which is right when the "
            "difference is padding (as in Qwen2's 151,936 vs 152,064). Pass both tokenizers to have this checked."
        )


def check_tokenizers(student_tokenizer, teacher_tokenizer, shared_rows: int) -> None:
    """Raise a `ValueError` naming both tokenizers and the first id they map to different tokens."""
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)  # processors wrap one
    teacher_tokenizer = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)
    if not hasattr(student_tokenizer, "get_vocab") or not hasattr(teacher_tokenizer, "get_vocab"):
        return
    student_name = getattr(student_tokenizer, "name_or_path", type(student_tokenizer).__name__)
    teacher_name = getattr(teacher_tokenizer, "name_or_path", type(teacher_tokenizer).__name__)
    student_tokens = {i: t for t, i in student_tokenizer.get_vocab().items()}
    teacher_tokens = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    for token_id in range(max(len(student_tokens), len(teacher_tokens))):
        if student_tokens.get(token_id) != teacher_tokens.get(token_id):
            raise ValueError(
                f"The teacher tokenizer ({teacher_name!r}, {len(teacher_tokens)} tokens) and the student tokenizer "
                f"({student_name!r}, {len(student_tokens)} tokens) differ: id {token_id} is "
                f"{teacher_tokens.get(token_id)!r} for the teacher and {student_tokens.get(token_id)!r} for the "
                "student. Token-level distillation needs one vocabulary: choose a teacher and student of one model "
                "family (or the same tokenizer), or set cross_tokenizer='uld' to distill across tokenizers."
            )
    if len(student_tokens) > shared_rows:
        raise ValueError(
            f"The tokenizers have {len(student_tokens)} tokens but the smaller model has only {shared_rows} output rows; "
            "resize its embeddings (model.resize_token_embeddings(len(tokenizer))) before distilling."
        )


# ---- students cut from a teacher --------------------------------------------------------------------


def layer_stack(model) -> nn.ModuleList:
    """The ModuleList holding a model's repeated blocks (the decoder layers of a causal LM)."""
    count = model.config.get_text_config().num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"Cannot find the {count} layers of {type(model).__name__} to cut a student from.")


def attention_projections(model) -> list[dict[str, nn.Module]]:
    """Each block's query, key and value projections (`self_attn.q_proj`/`k_proj`/`v_proj`, as in Llama, Mistral,
    Qwen, Gemma, SmolLM), for the attention-relation term."""
    inner = unwrap_model(model)
    found = []
    for block in layer_stack(inner):
        attention = getattr(block, "self_attn", None)
        modules = {name: getattr(attention, f"{name}_proj", None) for name in ("q", "k", "v")}
        if not all(isinstance(module, nn.Module) for module in modules.values()):
            raise ValueError(
                f"attention_loss_weight > 0 reads each block's self_attn.q_proj, k_proj and v_proj, which "
                f"{type(inner).__name__} does not have (a fused or differently named attention); set "
                "attention_loss_weight=0 for this model."
            )
        found.append(modules)
    return found


def relation_heads(*models) -> int:
    """Relation heads of the attention-relation term: the greatest common divisor of the models' key/value head
    counts, so that every query, key and value width of every model splits into them."""
    counts = []
    for model in models:
        config = unwrap_model(model).config.get_text_config()
        counts.append(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return math.gcd(*counts)


def student_from_teacher(teacher, layers: list[int] | None = None):
    """A copy of the teacher keeping only `layers` (default: every other one, the last included).

    The kept teacher layers are recorded in the student's config as `distill_source_layers`, so a
    hidden-state loss can map each student layer to the teacher layer it came from.
    """
    if getattr(teacher.config, "is_encoder_decoder", False):
        raise ValueError(
            f"student_init=from_teacher cuts the layer stack of a causal LM or an encoder classifier; "
            f"{type(teacher).__name__} has two stacks. Give a smaller seq2seq student with student_model_name_or_path."
        )
    total = len(layer_stack(teacher))
    if layers is None:
        layers = sorted(set(list(range(0, total, 2)) + [total - 1]))
    bad = [i for i in layers if not -total <= i < total]
    if bad or not layers:
        raise ValueError(f"student_layers={layers} must be indices of the teacher's {total} layers (0..{total - 1}).")
    layers = [i % total for i in layers]
    student = copy.deepcopy(teacher)
    blocks = layer_stack(student)
    kept = [blocks[i] for i in layers]
    blocks._modules.clear()
    for new_index, block in enumerate(kept):
        blocks.append(block)
        for module in block.modules():  # attention caches are indexed by layer
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = student.config.get_text_config()
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    source = getattr(teacher.config, "distill_source_layers", None)  # a student cut from a student keeps the chain
    student.config.distill_source_layers = [source[i] if source else i for i in layers]
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    student.train()
    return student

