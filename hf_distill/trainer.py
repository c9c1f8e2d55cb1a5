"""`DistillationTrainer`: a `transformers.Trainer` whose loss blends a teacher's divergence with the student's own."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging

from .cache import CACHE_COLUMNS, CacheSettings, CachedTeacher, load_cache
from .chunked import LossSettings, PositionTargets, blended_loss, chunked_blended_loss, default_chunk_size
from .config import DistillationConfig
from .data import CachedTeacherCollator, causal_target_masks, check_train_dataset, default_collator
from .modeling import (
    CAUSAL,
    CLASSIFICATION,
    SEQ2SEQ,
    _unwrap,
    check_compatible,
    check_tokenizers,
    load_model,
    load_tokenizer_if_any,
    model_kind,
    output_size,
    prepare_teacher,
)

logger = logging.get_logger(__name__)

# Batch keys that describe targets rather than model inputs.
_TARGET_KEYS = ("labels", "num_items_in_batch", *CACHE_COLUMNS)


class DistillationTrainer(Trainer):
    """A drop-in `Trainer` that distills `teacher_model` into `model`.

    Each step runs the student, then the teacher under `torch.no_grad()` on the same batch, aligns their
    outputs (causal: position t predicts token t+1; seq2seq: decoder positions and labels; classifiers:
    one distribution a row), and minimises `alpha · KD + (1 − alpha) · CE` over the target tokens, each
    term averaged over the targets of the whole accumulated (and, by default, multi-process) batch.
    `kd_loss` and `ce_loss` are logged beside `loss`, in training and evaluation.

    Args:
        model: the student, a `PreTrainedModel` or a Hub id / local path.
        teacher_model: a `PreTrainedModel` (PEFT models too) or a Hub id / local path; defaults to
            `args.teacher_model_name_or_path`.
        args: a `DistillationConfig`.
        processing_class: the student's tokenizer (pads batches, and is compared with the teacher's).
        teacher_processing_class: the teacher's tokenizer, when the teacher is given as a model; loaded from
            the teacher's path otherwise.
        peft_config: a `peft.PeftConfig`; the student becomes a PEFT model and only its adapters train.
        Other arguments are those of `Trainer`.
    """

    _tag_names = ["hf-distill", "distillation"]
    # compute_loss divides by the target count of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="tmp_trainer")
        elif not isinstance(args, DistillationConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; DistillationTrainer needs a DistillationConfig (a TrainingArguments "
                "subclass with the distillation settings): DistillationConfig(output_dir=..., alpha=..., ...)."
            )
        if model is None:
            raise ValueError("DistillationTrainer needs a student model (a PreTrainedModel or a path).")
        if isinstance(model, str):
            model = load_model(model)
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None and args.teacher_cache is None:
            raise ValueError(
                "DistillationTrainer needs a teacher: pass teacher_model=..., set teacher_model_name_or_path, or "
                "train from an offline cache with teacher_cache=..."
            )
        if isinstance(teacher_model, str):
            if teacher_processing_class is None:
                teacher_processing_class = load_tokenizer_if_any(teacher_model)
            teacher_model = load_model(teacher_model, **(args.teacher_model_init_kwargs or {}))

        self.task_kind = model_kind(model)
        if teacher_model is not None:
            check_compatible(model, teacher_model)
            if processing_class is not None and teacher_processing_class is not None and self.task_kind != CLASSIFICATION:
                check_tokenizers(
                    processing_class, teacher_processing_class, min(output_size(model), output_size(teacher_model))
                )
        if self.task_kind != CAUSAL and args.distill_all_tokens:
            logger.warning("distill_all_tokens applies to causal LMs only; distilling on the labels.")

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if data_collator is None:
            data_collator = default_collator(self.task_kind, processing_class)
        check_train_dataset(train_dataset, self.task_kind)
        self.cache_info = None
        if args.teacher_cache is not None:
            train_dataset, data_collator = self._attach_cache(args, train_dataset, data_collator, processing_class)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The student's loss is computed here, never inside its forward.
        self.model_accepts_loss_kwargs = False
        self.teacher_model = None if teacher_model is None else prepare_teacher(teacher_model, self.accelerator)
        self.loss_settings = LossSettings(
            args.loss_type, args.temperature, args.beta, args.skew, args.teacher_cache_tail, compile=args.compile_loss
        )
        self._use_chunks: dict[str, bool] = {}  # decided per model on the first batch
        self._metric_sums = {"train": None, "eval": None}
        if teacher_model is not None:
            self.teacher_name = getattr(_unwrap(teacher_model).config, "_name_or_path", None) or type(_unwrap(teacher_model)).__name__
        else:
            self.teacher_name = self.cache_info.get("teacher_name") or "cached teacher"
        self.evaluation_table: str | None = None  # set by recipe runs; goes into the model card
        self.dataset_name: str | None = None

    def _attach_cache(self, args, train_dataset, data_collator, processing_class):
        """Join the cached teacher entries to the training rows (checked to be built for exactly these rows)."""
        from datasets import concatenate_datasets

        if self.task_kind != CAUSAL:
            raise ValueError(f"teacher_cache works with causal LMs; this student is a {self.task_kind} model.")
        if processing_class is None:
            raise ValueError("teacher_cache needs the processing_class (tokenizer) to check the cache was built with it.")
        settings = CacheSettings(args.temperature, 0, args.distill_all_tokens)
        cache, self.cache_info = load_cache(args.teacher_cache, train_dataset, processing_class, settings)
        train_dataset = concatenate_datasets([train_dataset, cache], axis=1)
        return train_dataset, CachedTeacherCollator(data_collator, self.cache_info["settings"]["top_k"])

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *CACHE_COLUMNS]))

    # ---- targets ------------------------------------------------------------------------------------

    def _position_masks(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, CE mask, KD mask), each shaped like the student's output positions.

        Causal: position t is trained on token t+1, so labels are shifted left. Seq2seq: decoder
        positions align with labels. Classifiers: one position a row.
        """
        labels = inputs["labels"]
        if self.task_kind != CAUSAL:
            ce_mask = labels != -100
            return labels, ce_mask, ce_mask
        return causal_target_masks(labels, inputs.get("attention_mask"), self.args.distill_all_tokens)

    def _target_counts(self, inputs: dict[str, Any]) -> torch.Tensor:
        _, ce_mask, kd_mask = self._position_masks(inputs)
        return torch.stack([ce_mask.sum(), kd_mask.sum()])

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their targets (CE, KD) over all of them.

        The counts, summed over processes when `average_tokens_across_devices`, reach `compute_loss` as
        `num_items_in_batch`, so one step of batch 8 equals 4 × gradient accumulation 2 on ragged data.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples or "labels" not in batch_samples[0]:
            return batch_samples, None
        counts = sum(self._target_counts(batch) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return batch_samples, counts

    # ---- the loss -----------------------------------------------------------------------------------

    def _model_inputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        """The forward arguments of `model`: the batch less its targets; seq2seq decoders get their own start."""
        kwargs = {key: value for key, value in inputs.items() if key not in _TARGET_KEYS}
        if self.task_kind == SEQ2SEQ and (model is self.teacher_model or "decoder_input_ids" not in kwargs):
            kwargs["decoder_input_ids"] = _unwrap(model).prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
        return kwargs

    def _chunking_works(self, name: str, model, inputs: dict[str, Any]) -> bool:
        """Whether `model`'s logits equal its linear head applied to its last hidden states (checked once)."""
        if name in self._use_chunks:
            return self._use_chunks[name]
        inner = _unwrap(model)
        head = inner.get_output_embeddings()
        sharded = self.is_fsdp_enabled or is_deepspeed_zero3_enabled()  # the head's weight is not whole here
        works = (
            self.args.chunked_loss
            and self.task_kind == CAUSAL
            and not (name == "student" and sharded)
            and "logits_to_keep" in inspect.signature(inner.forward).parameters
            and (isinstance(head, nn.Linear) or name == "teacher")
        )
        if works:
            with torch.no_grad():
                out = self.accelerator.unwrap_model(model)(
                    **self._model_inputs(model, inputs), logits_to_keep=1, output_hidden_states=True
                )
                projected = head(out.hidden_states[-1][:, -1])
                works = torch.allclose(out.logits[:, -1].float(), projected.float(), rtol=1e-3, atol=1e-3, equal_nan=True)
            if not works:
                logger.warning(
                    f"The {name}'s logits are not a plain linear projection of its last hidden states (a logit "
                    "soft-cap, scale, or adapter on the head); it uses full logits at the target positions instead."
                )
        self._use_chunks[name] = works
        return works

    def _run(self, name: str, model, inputs: dict[str, Any], select: torch.Tensor):
        """Run a model; return its logits at the selected positions, or (hidden states, head) when chunking."""
        kwargs = self._model_inputs(model, inputs)
        if self.task_kind == CAUSAL and self._chunking_works(name, model, inputs):
            # Logits of the last position only (B × V, negligible); the loss projects the hidden states itself.
            outputs = model(**kwargs, logits_to_keep=1, output_hidden_states=True)
            return outputs, outputs.hidden_states[-1][select], _unwrap(model).get_output_embeddings()
        outputs = model(**kwargs)
        return outputs, outputs.logits[select], None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """alpha · KD + (1 − alpha) · CE over the target positions.

        `num_items_in_batch` holds the (CE, KD) target counts of the whole accumulated batch, from
        `get_batch_samples`; without it (evaluation) the counts of this batch are used.
        """
        mode = "train" if model.training else "eval"
        targets, ce_mask2d, kd_mask2d = self._position_masks(inputs)
        select = ce_mask2d | kd_mask2d
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 2:
            counts = num_items_in_batch
            distributed_counts = self.args.average_tokens_across_devices and self.args.world_size > 1
        else:
            counts, distributed_counts = torch.stack([ce_mask2d.sum(), kd_mask2d.sum()]), False
        n_ce, n_kd = (int(c) for c in counts)
        if n_ce == 0 and n_kd == 0:
            logger.warning(
                f"Step {self.state.global_step}: the batch has no target token (every label is -100, e.g. prompt-only "
                "rows), so it is skipped. Drop such rows from the dataset."
            )
        alpha = self.args.alpha
        want_kd = (alpha > 0 or mode == "eval") and bool(select.any())
        positions = PositionTargets(
            targets=targets[select],
            kd_mask=kd_mask2d[select],
            ce_mask=ce_mask2d[select],
            kd_scale=alpha / max(n_kd, 1),
            ce_scale=(1 - alpha) / max(n_ce, 1),
        )

        outputs, student_out, student_head = self._run("student", model, inputs, select)
        teacher_out = teacher_head = None
        if want_kd and "teacher_ids" in inputs:
            teacher_out = self._cached_teacher(inputs, select)
        elif want_kd and self.teacher_model is not None:
            with torch.no_grad():
                _, teacher_out, teacher_head = self._run("teacher", self.teacher_model, inputs, select)
        if teacher_out is not None and teacher_head is None and student_head is not None:
            teacher_head = nn.Identity()  # logits or cached entries: the chunk loop only slices them
        ran_teacher = teacher_out is not None

        if student_head is not None:
            loss, kd_sum, ce_sum = chunked_blended_loss(
                student_out,
                student_head.weight,
                student_head.bias,
                teacher_out,
                teacher_head,
                positions,
                self.loss_settings,
                self.args.chunk_size
                or default_chunk_size(student_head.weight.shape[0], device_type=student_head.weight.device.type),
            )
        else:
            if teacher_head is not None:  # chunked teacher, unchunked student: project the teacher whole
                with torch.no_grad():
                    teacher_out = teacher_head(teacher_out)
            loss, kd_sum, ce_sum = blended_loss(student_out, teacher_out, positions, self.loss_settings)
        # Keep the student in the graph when no position is selected, so distributed backward stays in step.
        loss = loss + 0.0 * student_out.sum()

        self._check_finite(loss, kd_sum, ce_sum, alpha)
        self._record(mode, kd_sum, ce_sum, kd_mask2d.sum() if ran_teacher else 0, ce_mask2d.sum())
        if distributed_counts and mode == "train":
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, outputs) if return_outputs else loss

    def _cached_teacher(self, inputs, select) -> CachedTeacher:
        cached = CachedTeacher(inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["teacher_lse"])
        if len(cached) != int(select.sum()):
            raise ValueError(
                f"The batch has {int(select.sum())} distilled positions but the teacher cache gives {len(cached)}: the "
                "cache was built for other labels or another distill_all_tokens setting. Rebuild it for this data."
            )
        return cached

    def _check_finite(self, loss, kd_sum, ce_sum, alpha) -> None:
        if torch.isfinite(loss):
            return
        term = "the distillation term (kd_loss)" if not torch.isfinite(kd_sum) and alpha > 0 else "the student's CE loss"
        raise FloatingPointError(
            f"The loss is {loss.item()} at step {self.state.global_step}: {term} is not finite. Causes: a teacher in "
            "float16 overflowing (load it with teacher_model_init_kwargs={'dtype': 'bfloat16'} or float32), a "
            "learning rate too high for the student, or NaN/inf in the inputs. Training stopped before applying it."
        )

    def _record(self, mode, kd_sum, ce_sum, n_kd, n_ce) -> None:
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=kd_sum.device) for v in (kd_sum, ce_sum, n_kd, n_ce)])
        if self.args.world_size > 1:
            values = self.accelerator.gather(values[None]).sum(0)
        current = self._metric_sums[mode]
        self._metric_sums[mode] = values if current is None else current + values

    # ---- evaluation and logging ---------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss with the teacher (kd_loss, ce_loss logged); logits when metrics need them."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
            if prediction_loss_only:
                return loss, None, None
            logits = model(**self._model_inputs(model, inputs)).logits.detach()
        return loss, logits, inputs.get("labels")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums = self._metric_sums[mode]
        if sums is not None:
            kd_sum, ce_sum, n_kd, n_ce = sums.tolist()
            prefix = "eval_" if mode == "eval" else ""
            if n_kd > 0:
                logs[f"{prefix}kd_loss"] = round(kd_sum / n_kd, 6)
            if n_ce > 0:
                logs[f"{prefix}ce_loss"] = round(ce_sum / n_ce, 6)
            self._metric_sums[mode] = None
        super().log(logs, start_time)

    # ---- export -------------------------------------------------------------------------------------

    def create_model_card(self, model_name: str | None = None, dataset: str | None = None, license: str | None = None, **kwargs):
        """Write README.md in `output_dir`: how the student was distilled, and the evaluation table if known."""
        import os

        from .runner.report import model_card

        if not self.is_world_process_zero():
            return
        student = _unwrap(self.model)
        info = {
            "teacher": self.teacher_name,
            "student": getattr(student.config, "_name_or_path", None) or type(student).__name__,
            "task": self.task_kind,
            "dataset": dataset or self.dataset_name,
            "steps": self.state.global_step,
            "repo_id": getattr(self, "hub_model_id", None) or model_name,
            "license": license,
            **{key: getattr(self.args, key) for key in (
                "loss_type", "temperature", "alpha", "beta", "skew", "per_device_train_batch_size",
                "gradient_accumulation_steps", "learning_rate",
            )},
        }
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(model_card(info, self.evaluation_table))
