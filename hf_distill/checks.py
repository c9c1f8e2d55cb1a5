"""Settings the trainer refuses before anything loads or trains: each error names what was given and how to fix it.

The checks of one field alone live in `DistillationConfig.__post_init__`; these need the models, tokenizers or data too.
"""

from __future__ import annotations

from transformers.utils import logging

from .config import DistillationConfig
from .data import labeled_rows
from .loss import normalized_weights
from .modeling import CAUSAL, CLASSIFICATION, SEQ2SEQ, model_kind

logger = logging.get_logger(__name__)


def check_args(args) -> DistillationConfig:
    if args is None:
        return DistillationConfig(output_dir="tmp_trainer")
    if not isinstance(args, DistillationConfig):
        raise TypeError(
            f"args is a {type(args).__name__}; DistillationTrainer needs a DistillationConfig (a TrainingArguments "
            "subclass with the distillation settings): DistillationConfig(output_dir=..., alpha=..., ...)."
        )
    return args


def check_generation(args: DistillationConfig, kind, processing_class) -> None:
    """What on-policy distillation (lmbda > 0) and seq_kd need, refused before anything loads."""
    if args.lmbda == 0 and not args.seq_kd:
        return
    # Named as the user set it: lmbda, seq_kd, or both.
    setting = " with ".join(([f"lmbda={args.lmbda}"] if args.lmbda else []) + (["seq_kd=True"] if args.seq_kd else []))
    off = " and ".join((["lmbda=0"] if args.lmbda else []) + (["seq_kd=False"] if args.seq_kd else []))
    whose = " and ".join((["the student's"] if args.lmbda else []) + (["the teacher's"] if args.seq_kd else []))
    if kind != CAUSAL and (args.lmbda or kind != SEQ2SEQ):  # the teacher may write a seq2seq target, too
        works = "causal LMs" if args.lmbda else "causal LMs and seq2seq models"
        raise ValueError(
            f"{setting} trains on {whose} generated responses, which works with {works}; this student is a {kind} "
            f"model. Set {off}."
        )
    if args.teacher_cache is not None:
        raise ValueError(
            f"{setting} needs the teacher live, to generate or score responses; teacher_cache only holds targets for "
            f"the dataset's own tokens. Drop teacher_cache, or set {off}."
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None:
        raise ValueError(
            f"{setting} needs the student's tokenizer to pad the prompts and the responses generated for them: pass "
            "processing_class=tokenizer."
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError(
            f"{setting}: the tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token to pad "
            "generated responses with; set tokenizer.pad_token."
        )
    if args.lmbda and min(args.alpha, 1.0 if args.alpha_end is None else args.alpha_end) < 1:
        logger.warning(
            f"lmbda={args.lmbda} with alpha={args.alpha} (alpha_end={args.alpha_end}): on on-policy steps the CE term "
            "trains the student toward its own samples; GKD distills them with alpha=1."
        )


def check_several_teachers(args, n_teachers: int) -> None:
    """What several teachers can't be combined with, refused before anything loads."""
    if args.cross_tokenizer:
        raise ValueError(
            f"cross_tokenizer={args.cross_tokenizer!r} distills from one teacher, but {n_teachers} are given: pass one "
            "teacher_model."
        )
    for name in ("hidden_loss_weight", "attention_loss_weight"):
        if getattr(args, name):
            raise ValueError(
                f"{name}={getattr(args, name)} matches one teacher's layers, but {n_teachers} teachers are given: "
                f"distill layers from one teacher, or set {name}=0 with several."
            )
    if args.teacher_cache is not None:
        raise ValueError("teacher_cache holds one teacher's targets; with several teachers leave teacher_cache unset.")
    if args.seq_kd:
        raise ValueError(
            f"seq_kd=True trains on one teacher's responses, but {n_teachers} teachers are given: distill from one "
            "teacher, or set seq_kd=False."
        )
    normalized_weights(args.teacher_weights, n_teachers)


def check_cross_tokenizer_models(args, student, teacher, processing_class, teacher_tokenizer) -> None:
    """`cross_tokenizer` pairs the response tokens of two causal LMs, each row tokenized by both tokenizers."""
    setting = f"cross_tokenizer={args.cross_tokenizer!r}"
    if {model_kind(student), model_kind(teacher)} != {CAUSAL}:
        raise ValueError(
            f"{setting} pairs the response tokens of two causal LMs, but the student is a {model_kind(student)} "
            f"model and the teacher a {model_kind(teacher)} model: use causal LMs, or drop cross_tokenizer."
        )
    if processing_class is None or teacher_tokenizer is None:
        missing = "the student's tokenizer (processing_class=...)" if processing_class is None else (
            "the teacher's tokenizer (teacher_processing_class=..., or a teacher folder that holds one)"
        )
        raise ValueError(f"{setting} tokenizes each row again for the teacher, so it needs both tokenizers: pass {missing}.")
    if args.cross_tokenizer == "uld" and args.loss_type != "forward_kl":
        logger.warning(f"{setting} distills with the ULD distance; loss_type={args.loss_type!r} is not used.")


def check_quantized_student(args: DistillationConfig, peft_config) -> None:
    if peft_config is not None:
        raise ValueError(
            f"student_quantization={args.student_quantization!r} fake-quantizes the student's own weights, which "
            "a PEFT student keeps frozen: drop peft_config, or quantize after training (recipe field quantize)."
        )


def check_some_labels(args: DistillationConfig, train_dataset, kind: str) -> None:
    """A classifier trained on labels alone (alpha=0) needs some labeled rows; unlabeled ones are for the teacher."""
    if kind != CLASSIFICATION or args.distills or not hasattr(train_dataset, "column_names"):
        return
    if labeled_rows(train_dataset, CLASSIFICATION) == 0:
        raise ValueError(
            f"None of the {len(train_dataset)} rows of train_dataset has a label, and alpha=0 trains on labels "
            "only: set alpha > 0 to distill the unlabeled rows from the teacher, or add labels."
        )
