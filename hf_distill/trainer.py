"""`DistillationTrainer`: a `transformers.Trainer` whose loss blends a teacher's divergence with the student's own."""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
import torch.nn as nn
from datasets import concatenate_datasets
from peft import get_peft_model
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .cache import CACHE_COLUMNS, CacheSettings, load_cache
from .checks import check_args, check_generation, check_quantized_student, check_several_teachers, check_some_labels
from .checkpoints import DISTILL_STATE_NAME, resolve_resume
from .config import DistillationConfig
from .data import (
    TEACHER_PROMPT_COLUMN,
    CachedTeacherCollator,
    CrossTokenizerCollator,
    check_train_dataset,
    default_collator,
)
from .loss import (
    AlignedTeacher,
    CachedTeacher,
    DistillationLoss,
    StudentOutput,
    TeacherHidden,
    TeacherLogits,
    TeacherOutput,
    aligned_response_masks,
    default_layer_map,
    shared_vocabulary,
)
from .model_card import distillation_model_card
from .on_policy import generated_batch, generation_seed, is_on_policy_step, sampling_config
from .quantization import prepare_qat, quantize_in_place
from .sharding import head_is_shardable, prepare_teacher, whole_heads
from .pruning import describe_student
from .modeling import (
    CAUSAL,
    CLASSIFICATION,
    SEQ2SEQ,
    TEACHER_TOKEN_KEYS,
    check_compatible,
    check_tokenizers,
    load_model,
    load_tokenizer_if_any,
    model_inputs,
    model_kind,
    output_size,
    target_positions,
    unwrap_model,
)

logger = logging.get_logger(__name__)

# The student's submodule that holds the hidden-state projections (when hidden sizes differ).
PROJECTIONS = "distill_projections"


class DistillationTrainer(Trainer):
    """A drop-in `Trainer` that distills `teacher_model` into `model`.

    Each step runs the student, then the teacher under `torch.no_grad()` on the same batch, aligns their
    outputs (causal: position t predicts token t+1; seq2seq: decoder positions and labels; classifiers:
    one distribution a row), and minimises `alpha · KD + (1 − alpha) · CE + hidden_loss_weight · H` over the
    target tokens, each term averaged over the targets of the whole accumulated (and, by default,
    multi-process) batch. `kd_loss`, `ce_loss` (and `hidden_loss`) are logged beside `loss`, in training and
    evaluation.

    Args:
        model: the student, a `PreTrainedModel` or a Hub id / local path.
        teacher_model: a `PreTrainedModel` (PEFT models too) or a Hub id / local path, or a list of them to
            distill from several teachers (see `args.multi_teacher`); defaults to `args.teacher_model_name_or_path`.
        args: a `DistillationConfig`.
        processing_class: the student's tokenizer (pads batches, and is compared with the teacher's).
        teacher_processing_class: the teacher's tokenizer (or a list, one per teacher), when the teacher is given
            as a model; loaded from the teacher's path otherwise.
        peft_config: a `peft.PeftConfig`; the student becomes a PEFT model and only its adapters train.
        Other arguments are those of `Trainer`.
    """

    _tag_names = ["hf-distill", "distillation"]
    # compute_loss divides by the target count of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | list | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        args = check_args(args)
        if model is None:
            raise ValueError("DistillationTrainer needs a student model (a PreTrainedModel or a path).")
        model = load_model(model) if isinstance(model, str) else model
        self.task_kind = model_kind(model)
        check_generation(args, self.task_kind, processing_class)
        teachers = self._load_teachers(model, teacher_model, args, processing_class, teacher_processing_class)
        teacher_model = teachers[0] if teachers else None
        self.layer_map = self._resolve_layer_map(model, teacher_model, args)
        if peft_config is not None:
            model = _peft_student(model, peft_config)
        if args.student_quantization != "none":
            check_quantized_student(args, peft_config)
            prepare_qat(model, args.student_quantization)  # before the projections, which stay in float
        self._attach_projections(model, teacher_model)
        data_collator = data_collator or default_collator(self.task_kind, processing_class)
        if args.cross_tokenizer:  # each row also in the teacher's tokens
            limit = getattr(unwrap_model(teacher_model).config.get_text_config(), "max_position_embeddings", None)
            data_collator = CrossTokenizerCollator(
                data_collator, processing_class, self.teacher_tokenizer, limit, align=args.cross_tokenizer == "align"
            )
        # The rows are in the student's tokens; a teacher with another tokenizer gets its own from the collator.
        row_models = (model,) if args.cross_tokenizer else (model, *teachers)
        # With lmbda=1 or seq_kd every step trains on generated responses, so prompts alone make a training set.
        prompts_suffice = args.lmbda == 1 or args.seq_kd
        check_train_dataset(train_dataset, self.task_kind, models=row_models, prompts_suffice=prompts_suffice)
        check_some_labels(args, train_dataset, self.task_kind)
        check_train_dataset(eval_dataset, self.task_kind, "eval_dataset", models=row_models)
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
        self.model_accepts_loss_kwargs = False  # the student's loss is computed here, never inside its forward
        self.teachers = [prepare_teacher(teacher, self.accelerator) for teacher in teachers]
        self.teacher_model = self.teachers[0] if self.teachers else None
        self.loss_fn = DistillationLoss.from_config(args)
        self._use_chunks: dict[str, bool] = {}  # decided per model on the first batch
        self._metric_sums = {"train": None, "eval": None}
        self._on_policy_steps = [0, 0]  # (on-policy, all) optimizer steps since the last log
        self._aligned_counts = {"train": [0, 0], "eval": [0, 0]}  # cross_tokenizer: (paired, response) positions
        self._generation_configs = {}  # the student's (on-policy) and the teacher's (seq_kd), built on first use
        self.teacher_names = _unique_names(teachers) if teachers else []  # short, for kd_loss/<name>
        if teachers:
            self.teacher_name = ", ".join(_name_or_path(teacher) for teacher in teachers)
        else:
            self.teacher_name = self.cache_info.get("teacher_name") or "cached teacher"

    # ---- setup --------------------------------------------------------------------------------------

    def _load_teachers(self, student, teacher, args, processing_class, teacher_processing_class) -> list:
        """The teacher models (loaded from their paths if need be), each checked to fit the student; [] with a cache."""
        teacher = teacher if teacher is not None else args.teacher_model_name_or_path
        if teacher is None and args.teacher_cache is None:
            raise ValueError(
                "DistillationTrainer needs a teacher: pass teacher_model=..., set teacher_model_name_or_path, or "
                "train from an offline cache with teacher_cache=..."
            )
        self.teacher_tokenizer = None  # kept only for a teacher with another tokenizer
        if teacher is None:
            return []
        teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        tokenizers = teacher_processing_class if isinstance(teacher_processing_class, (list, tuple)) else (
            [teacher_processing_class] * len(teachers)
        )
        if len(tokenizers) != len(teachers):
            raise ValueError(
                f"teacher_processing_class has {len(tokenizers)} tokenizers for {len(teachers)} teachers: give one per "
                "teacher, in the same order, or a single one they all share."
            )
        if args.cross_tokenizer:
            return [self._load_other_tokenizer_teacher(student, teachers, tokenizers[0], args, processing_class)]
        if len(teachers) > 1:
            check_several_teachers(args, len(teachers))
        loaded = []
        for teacher, tokenizer in zip(teachers, tokenizers):
            if isinstance(teacher, str):
                tokenizer = tokenizer or load_tokenizer_if_any(teacher)
                teacher = load_model(teacher, **(args.teacher_model_init_kwargs or {}))
            check_compatible(student, teacher)
            if processing_class is not None and tokenizer is not None and self.task_kind != CLASSIFICATION:
                check_tokenizers(processing_class, tokenizer, min(output_size(student), output_size(teacher)))
            loaded.append(teacher)
        if self.task_kind != CAUSAL and args.distill_all_tokens:
            logger.warning("distill_all_tokens applies to causal LMs only; distilling on the labels.")
        return loaded

    def _load_other_tokenizer_teacher(self, student, teachers, tokenizer, args, processing_class):
        """`cross_tokenizer`: one causal teacher, and both tokenizers (the teacher's loaded from its folder if not given)."""
        setting = f"cross_tokenizer={args.cross_tokenizer!r}"
        if len(teachers) > 1:
            raise ValueError(f"{setting} distills from one teacher, but {len(teachers)} are given: pass one teacher_model.")
        teacher = teachers[0]
        if isinstance(teacher, str):
            tokenizer = tokenizer or load_tokenizer_if_any(teacher)
            teacher = load_model(teacher, **(args.teacher_model_init_kwargs or {}))
        kinds = {model_kind(student), model_kind(teacher)}
        if kinds != {CAUSAL}:
            raise ValueError(
                f"{setting} pairs the response tokens of two causal LMs, but the student is a {model_kind(student)} "
                f"model and the teacher a {model_kind(teacher)} model: use causal LMs, or drop cross_tokenizer."
            )
        if processing_class is None or tokenizer is None:
            missing = "the student's tokenizer (processing_class=...)" if processing_class is None else (
                "the teacher's tokenizer (teacher_processing_class=..., or a teacher folder that holds one)"
            )
            raise ValueError(f"{setting} tokenizes each row again for the teacher, so it needs both tokenizers: pass {missing}.")
        if args.cross_tokenizer == "uld" and args.loss_type != "forward_kl":
            logger.warning(f"{setting} distills with the ULD distance; loss_type={args.loss_type!r} is not used.")
        self.teacher_tokenizer, self.shared_vocabulary = tokenizer, None
        if args.cross_tokenizer == "align":
            self.shared_vocabulary = _shared_vocabulary(processing_class, tokenizer, student, teacher)
        return teacher

    def _resolve_layer_map(self, student, teacher, args) -> list[int] | None:
        """For each student layer, the teacher layer whose output it matches (None without a hidden-state term)."""
        if not args.hidden_loss_weight:
            return None
        if teacher is None:
            raise ValueError(
                "hidden_loss_weight > 0 needs the teacher's hidden states, which an offline teacher_cache does not hold; "
                "train with a live teacher or set hidden_loss_weight=0."
            )
        s_config, t_config = unwrap_model(student).config.get_text_config(), unwrap_model(teacher).config.get_text_config()
        n_student, n_teacher = _num_layers(s_config, self.task_kind), _num_layers(t_config, self.task_kind)
        layer_map = args.layer_map or default_layer_map(n_student, n_teacher, _source_layers(student, teacher))
        if len(layer_map) != n_student or not all(0 <= i < n_teacher for i in layer_map):
            raise ValueError(
                f"layer_map={layer_map} must give one teacher layer (0..{n_teacher - 1}) for each of the student's "
                f"{n_student} layers."
            )
        return list(layer_map)

    def _attach_projections(self, model, teacher) -> None:
        """Where hidden sizes differ, a learned linear map per mapped layer from the student's size to the teacher's.

        They live on the student as `distill_projections`, so the optimizer trains them and checkpoints (and
        resuming) keep them; `save_model` leaves them out of the exported student.
        """
        if not self.layer_map:
            return
        student_size = unwrap_model(model).config.get_text_config().hidden_size
        teacher_size = unwrap_model(teacher).config.get_text_config().hidden_size
        if student_size == teacher_size:
            return
        parameter = next(model.parameters())
        projections = nn.ModuleList(nn.Linear(student_size, teacher_size, bias=False) for _ in self.layer_map)
        model.add_module(PROJECTIONS, projections.to(parameter.device, parameter.dtype))

    def _attach_cache(self, args, train_dataset, data_collator, processing_class):
        """Join the cached teacher entries to the training rows (checked to be built for exactly these rows)."""
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
        kept = [*CACHE_COLUMNS, *TEACHER_TOKEN_KEYS, TEACHER_PROMPT_COLUMN]  # read by the collators, not the model
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *kept]))

    # ---- targets ------------------------------------------------------------------------------------

    def _target_positions(self, inputs: dict[str, Any]):
        """(targets, CE mask, KD mask), shaped like the student's output positions.

        With `cross_tokenizer` the KD mask keeps the response positions paired with the teacher's, so the KD counts
        of `get_batch_samples` (accumulation-exact normalization) count the aligned positions.
        """
        targets, ce_mask, kd_mask = target_positions(
            inputs["labels"], inputs.get("attention_mask"), self.task_kind, self.args.distill_all_tokens
        )
        if self.args.cross_tokenizer:
            kd_mask = self._aligned_masks(inputs, kd_mask)[0]
        return targets, ce_mask, kd_mask

    def _aligned_masks(self, inputs: dict[str, Any], student_mask: torch.Tensor | None = None):
        """`cross_tokenizer`: (student, teacher) masks of the response positions paired k-th with k-th."""
        if "teacher_labels" not in inputs:
            raise ValueError(
                f"cross_tokenizer={self.args.cross_tokenizer!r} needs each batch in the teacher's tokens too "
                f"({', '.join(TEACHER_TOKEN_KEYS)}); this batch has only {sorted(inputs)}. A custom data_collator "
                "must keep the keys that hf_distill.data.CrossTokenizerCollator adds."
            )
        counted = student_mask is not None  # from _target_positions: counted for the aligned_fraction log line
        if student_mask is None:
            student_mask = target_positions(inputs["labels"], inputs.get("attention_mask"), CAUSAL)[2]
        response_mask = student_mask
        if "aligned_labels" in inputs:  # 'align': only the tokens whose span lines up with a teacher token
            student_mask = student_mask & target_positions(inputs["aligned_labels"], inputs.get("attention_mask"), CAUSAL)[2]
        teacher_mask = target_positions(inputs["teacher_labels"], inputs["teacher_attention_mask"], CAUSAL)[2]
        kept_student, kept_teacher = aligned_response_masks(student_mask, teacher_mask)
        if counted:
            counts = self._aligned_counts["train" if self.model.training else "eval"]
            counts[0] += int(kept_student.sum())
            counts[1] += int(response_mask.sum())
        return kept_student, kept_teacher

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their targets (CE, KD) over all of them.

        The counts, summed over processes when `average_tokens_across_devices`, reach `compute_loss` as
        `num_items_in_batch`, so one step of batch 8 equals 4 × gradient accumulation 2 on ragged data.
        On an on-policy step (`lmbda`) each micro-batch is first replaced by its prompts and the student's
        responses, and on the other steps with `seq_kd` by its prompts and the teacher's, so the counts cover the
        generated targets and `compute_loss` sees an ordinary batch.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        on_policy = False
        if batch_samples and self.args.lmbda > 0:
            # One decision for the whole step, so its micro-batches (and processes) are all on- or off-policy.
            on_policy = is_on_policy_step(self.args.lmbda, self.args.seed, self.state.global_step)
            self._on_policy_steps[0] += on_policy
            self._on_policy_steps[1] += 1
            if on_policy:
                batch_samples = [self._generated_batch(batch, i) for i, batch in enumerate(batch_samples)]
        if batch_samples and self.args.seq_kd and not on_policy:  # the other steps: the teacher's responses
            batch_samples = [self._generated_batch(batch, i, by_teacher=True) for i, batch in enumerate(batch_samples)]
        if not batch_samples or "labels" not in batch_samples[0]:
            return batch_samples, None
        counts = sum(torch.stack([m.sum() for m in self._target_positions(b)[1:]]) for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return batch_samples, counts

    def _generated_batch(self, batch: dict[str, Any], micro_batch: int, by_teacher: bool = False) -> dict[str, torch.Tensor]:
        """The batch's prompts answered by the student (sampled), or with `by_teacher` by the teacher (greedy unless
        `seq_kd_sampling`)."""
        # Drops DDP (and a DeepSpeed engine); a PEFT model generates with its adapters.
        generator = self.accelerator.unwrap_model(self.teachers[0] if by_teacher else self.model)
        name = "teacher" if by_teacher else "student"
        if name not in self._generation_configs:
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            self._generation_configs[name] = sampling_config(
                unwrap_model(generator), tokenizer, self.args.max_new_tokens, self.args.generation_temperature,
                do_sample=self.args.seq_kd_sampling if by_teacher else True,
            )
        # Prompt + response must fit every model's positions (learned position embeddings fail beyond them).
        limits = [getattr(unwrap_model(m).config.get_text_config(), "max_position_embeddings", None)
                  for m in (self.model, *self.teachers)]
        return generated_batch(
            generator, self._generation_configs[name], batch, self.args.device,
            seq2seq=self.task_kind == SEQ2SEQ,
            max_positions=min((n for n in limits if isinstance(n, int)), default=None),
            seed=generation_seed(self.args.seed, self.state.global_step, micro_batch, self.args.process_index),
            synced=self.args.world_size > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled),
            what=f"{'seq_kd' if by_teacher else 'On-policy'} step {self.state.global_step}",
        )

    # ---- the loss -----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """alpha · KD + (1 − alpha) · CE + hidden_loss_weight · H over the target positions.

        `num_items_in_batch` holds the (CE, KD) target counts of the whole accumulated batch, from
        `get_batch_samples`; without it (evaluation) the counts of this batch are used.
        """
        mode = "train" if model.training else "eval"
        targets, ce_mask, kd_mask = self._target_positions(inputs)
        select = ce_mask | kd_mask
        accumulated = torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 2
        counts = num_items_in_batch if accumulated else torch.stack([ce_mask.sum(), kd_mask.sum()])
        n_ce, n_kd = (int(c) for c in counts)
        if n_ce == 0 and n_kd == 0:
            logger.warning(
                f"Step {self.state.global_step}: the batch has no target token (every label is -100, e.g. prompt-only "
                "rows), so it is skipped. Drop such rows from the dataset."
            )
        positions = self.loss_fn.positions(targets[select], kd_mask[select], ce_mask[select], n_kd, n_ce)

        outputs, student = self._run_student(model, inputs, select)
        teacher = self._run_teacher(inputs, select) if self._needs_teacher(mode, select) else None
        with self._whole_heads(model, student, teacher):
            result = self.loss_fn(student, teacher, positions)

        self._check_finite(result)
        self._record(mode, result, kd_mask.sum() if teacher is not None else 0, ce_mask.sum())
        loss = result.loss
        if accumulated and mode == "train" and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the counts are global already
        return (loss, outputs) if return_outputs else loss

    def _needs_teacher(self, mode: str, select: torch.Tensor) -> bool:
        """Training with alpha = 0 and no hidden-state term never runs the teacher; evaluation always reports KD."""
        wanted = self.args.alpha > 0 or self.args.hidden_loss_weight > 0 or mode == "eval"
        return wanted and bool(select.any()) and (bool(self.teachers) or self.cache_info is not None)

    def _run_student(self, model, inputs, select) -> tuple[Any, StudentOutput]:
        chunked = self._chunking_works("student", model, inputs)
        outputs = self._forward(model, inputs, chunked)
        layers = self._layer_outputs(outputs, range(len(self.layer_map or [])), select, inputs.get("attention_mask"))
        projections = getattr(self.model, PROJECTIONS, None)
        if projections is not None:
            layers = [project(layer) for project, layer in zip(projections, layers)]
        if chunked:
            head = unwrap_model(model).get_output_embeddings()
            return outputs, StudentOutput(hidden=outputs.hidden_states[-1][select], head=head, layers=layers)
        return outputs, StudentOutput(logits=outputs.logits[select], layers=layers)

    @torch.no_grad()
    def _run_teacher(self, inputs, select) -> TeacherOutput:
        if self.cache_info is not None:
            return TeacherOutput(self._cached_teacher(inputs, select))
        if self.args.cross_tokenizer:
            return self._run_other_tokenizer_teacher(inputs)
        members, layers = [], []
        for i, teacher in enumerate(self.teachers):
            chunked = self._chunking_works("teacher" if i == 0 else f"teacher_{i}", teacher, inputs)
            outputs = self._forward(teacher, inputs, chunked, own_decoder_inputs=True)
            if i == 0:  # the hidden-state term takes one teacher (checked at setup)
                layers = self._layer_outputs(outputs, self.layer_map or [], select, inputs.get("attention_mask"))
            if chunked:
                head = unwrap_model(teacher).get_output_embeddings()
                members.append(TeacherHidden(outputs.hidden_states[-1][select], head))
            else:
                members.append(TeacherLogits(outputs.logits[select]))
            del outputs
        return TeacherOutput(self.loss_fn.teacher_distribution(members), layers)

    def _run_other_tokenizer_teacher(self, inputs) -> TeacherOutput:
        """`cross_tokenizer`: the teacher on its own tokens, at the response positions paired with the student's."""
        teacher = self.teachers[0]
        teacher_keep = self._aligned_masks(inputs)[1]
        teacher_inputs = {"input_ids": inputs["teacher_input_ids"], "attention_mask": inputs["teacher_attention_mask"]}
        chunked = self._chunking_works("teacher", teacher, teacher_inputs)
        outputs = self._forward(teacher, teacher_inputs, chunked)
        if chunked:
            head = unwrap_model(teacher).get_output_embeddings()
            with whole_heads([(teacher, head, False)]):  # only the paired positions are projected
                logits = head(outputs.hidden_states[-1][teacher_keep])
        else:
            logits = outputs.logits[teacher_keep]
        shared = self.shared_vocabulary
        shared = None if shared is None else tuple(ids.to(logits.device) for ids in shared)
        return TeacherOutput(AlignedTeacher(logits, shared))

    def _whole_heads(self, model, student: StudentOutput, teacher: TeacherOutput | None):
        """Gather the heads the chunked loss projects with (sharded under FSDP2); the student's stays for backward."""
        heads = []
        if student.head is not None:
            heads.append((model, student.head, model.training and torch.is_grad_enabled()))
        if teacher is not None:
            members = getattr(teacher.distribution, "members", [teacher.distribution])  # several teachers, or one
            heads += [(owner, member.head, False) for owner, member in zip(self.teachers, members)
                      if isinstance(member, TeacherHidden)]
        return whole_heads(heads)

    def _forward(self, model, inputs, chunked: bool, own_decoder_inputs: bool = False):
        """Run a model; when chunking, it returns the last position's logits only (the loss projects the rest)."""
        kwargs = model_inputs(model, inputs, self.task_kind, own_decoder_inputs)
        if chunked:
            kwargs["logits_to_keep"] = 1
        if chunked or self.layer_map:
            kwargs["output_hidden_states"] = True
        return model(**kwargs)

    def _layer_outputs(self, outputs, layers, select, attention_mask=None) -> list[torch.Tensor]:
        """The outputs of `layers` (0-based block indices) at the selected positions (seq2seq: the decoder's)."""
        if not layers:
            return []
        states = outputs.decoder_hidden_states if self.task_kind == SEQ2SEQ else outputs.hidden_states
        if self.task_kind == CLASSIFICATION:  # one position a row: the mean over its real tokens
            weights = torch.ones(states[0].shape[:2], device=states[0].device) if attention_mask is None else attention_mask
            weights = (weights / weights.sum(-1, keepdim=True).clamp_min(1)).unsqueeze(-1).to(states[0].dtype)
            return [(states[i + 1] * weights).sum(1)[select] for i in layers]
        return [states[i + 1][select] for i in layers]

    def _chunking_works(self, name: str, model, inputs: dict[str, Any]) -> bool:
        """Whether `model`'s logits equal its linear head applied to its last hidden states (checked once)."""
        if name in self._use_chunks:
            return self._use_chunks[name]
        inner = unwrap_model(model)
        head = inner.get_output_embeddings()
        if self.args.chunked_loss and self.task_kind == CAUSAL and not head_is_shardable(model, head):
            logger.warning(
                f"The {name}'s output head is sharded by FSDP1 or DeepSpeed ZeRO-3, whose shards the chunked loss can't "
                "gather with their gradient; it uses full logits at the target positions. FSDP2 (fsdp_config="
                "{'fsdp_version': 2}) keeps the chunked loss."
            )
        works = (
            self.args.chunked_loss
            and self.task_kind == CAUSAL
            and head_is_shardable(model, head)  # whole, or FSDP2 (gathered for the loss)
            and "logits_to_keep" in inspect.signature(inner.forward).parameters
            and (isinstance(head, nn.Linear) or name == "teacher")
        )
        if works:
            # A trial forward: its dropout must not use up the random numbers of step 1 (a resumed run skips it).
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                kwargs = model_inputs(model, inputs, self.task_kind)
                out = self.accelerator.unwrap_model(model)(**kwargs, logits_to_keep=1, output_hidden_states=True)
                with whole_heads([(model, head, False)]):
                    projected = head(out.hidden_states[-1][:, -1])
                works = torch.allclose(out.logits[:, -1].float(), projected.float(), rtol=1e-3, atol=1e-3, equal_nan=True)
            if not works:
                logger.warning(
                    f"The {name}'s logits are not a plain linear projection of its last hidden states (a logit "
                    "soft-cap, scale, or adapter on the head); it uses full logits at the target positions instead."
                )
        self._use_chunks[name] = works
        return works

    def _cached_teacher(self, inputs, select) -> CachedTeacher:
        cached = CachedTeacher(inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["teacher_lse"])
        if len(cached) != int(select.sum()):
            raise ValueError(
                f"The batch has {int(select.sum())} distilled positions but the teacher cache gives {len(cached)}: the "
                "cache was built for other labels or another distill_all_tokens setting. Rebuild it for this data."
            )
        return cached

    def _check_finite(self, result) -> None:
        if torch.isfinite(result.loss):
            return
        term = "the distillation term (kd_loss)" if not torch.isfinite(result.kd_sum) and self.args.alpha > 0 else (
            "the hidden-state term (hidden_loss)" if not torch.isfinite(result.hidden_sum) else "the student's CE loss"
        )
        raise FloatingPointError(
            f"The loss is {result.loss.item()} at step {self.state.global_step}: {term} is not finite. Causes: a teacher "
            "in float16 overflowing (load it with teacher_model_init_kwargs={'dtype': 'bfloat16'} or float32), a "
            "learning rate too high for the student, or NaN/inf in the inputs. Training stopped before applying it."
        )

    def _record(self, mode, result, n_kd, n_ce) -> None:
        sums = (result.kd_sum, result.ce_sum, result.hidden_sum, n_kd, n_ce)
        device = result.kd_sum.device
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in sums])
        if len(self.teachers) > 1:  # each teacher's own divergence, after the five sums
            members = result.member_kd_sums
            members = torch.zeros(len(self.teachers), device=device) if members is None else members.float()
            values = torch.cat([values, members.to(device)])
        if self.args.world_size > 1:
            values = self.accelerator.gather(values[None]).sum(0)
        current = self._metric_sums[mode]
        self._metric_sums[mode] = values if current is None else current + values

    # ---- checkpoints --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, which never overwrites an earlier run and resumes only from a complete checkpoint.

        Without `resume_from_checkpoint`, an `output_dir` holding checkpoints or a saved run is refused.
        `resume_from_checkpoint=True` takes the newest checkpoint whose `trainer_state.json` (written last) is
        whole, so a kill while a checkpoint was being saved falls back to the one before it.
        """
        checkpoint = resolve_resume(self.args.output_dir, resume_from_checkpoint)
        self._resumed_loss = self._load_distill_state(checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    def _save_checkpoint(self, model, trial):
        """Save the running loss sums with the checkpoint, so logs after a resume equal an uninterrupted run's.

        They are written before `Trainer` writes anything: its `trainer_state.json` comes last and marks the
        checkpoint complete.
        """
        loss = self._tr_loss.detach().reshape(1)
        if self.args.world_size > 1:  # each process sums its own loss; the logged value is their mean
            loss = self.accelerator.gather(loss)
        state = {
            "metric_sums": {mode: None if s is None else s.tolist() for mode, s in self._metric_sums.items()},
            "tr_loss": loss.mean().item(),
            "last_logged_step": self._globalstep_last_logged,
            # Decided on the first batch by a trial forward that draws dropout RNG; a resumed run reuses the decision.
            "use_chunks": dict(self._use_chunks),
            "on_policy_steps": list(self._on_policy_steps),
        }
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            stale = os.path.join(folder, TRAINER_STATE_NAME)
            if os.path.exists(stale):  # rewriting an older run's checkpoint: incomplete until the new state is written
                os.remove(stale)
            with open(os.path.join(folder, DISTILL_STATE_NAME), "w", encoding="utf-8") as handle:
                json.dump(state, handle)
        super()._save_checkpoint(model, trial)

    def _load_distill_state(self, checkpoint: str | None) -> dict | None:
        """Restore the kd/ce/hidden sums and chunking decisions saved with `checkpoint`; returns the state (its loss
        sum is put back later)."""
        file = None if checkpoint is None else os.path.join(checkpoint, DISTILL_STATE_NAME)
        if file is None or not os.path.isfile(file):
            return None  # a fresh run, or a checkpoint saved without the sums: the first log after it covers fewer steps
        with open(file, encoding="utf-8") as handle:
            state = json.load(handle)
        for mode, values in state["metric_sums"].items():
            self._metric_sums[mode] = None if values is None else torch.tensor(values, device=self.args.device)
        self._use_chunks.update(state.get("use_chunks", {}))
        self._on_policy_steps = list(state.get("on_policy_steps", [0, 0]))
        return state

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        """On the first step after a resume, add back the loss summed since the last log before the checkpoint."""
        state, self._resumed_loss = getattr(self, "_resumed_loss", None), None
        if state is not None:
            tr_loss += state["tr_loss"]
            self._globalstep_last_logged = state["last_logged_step"]
            self._total_loss_scalar -= state["tr_loss"]  # the final train_loss averages this call's steps only
        return super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)

    # ---- evaluation and logging ---------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss with the teacher (kd_loss, ce_loss logged); logits when metrics need them."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
            if prediction_loss_only:
                return loss, None, None
            logits = model(**model_inputs(model, inputs, self.task_kind)).logits.detach()
        return loss, logits, inputs.get("labels")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums = self._metric_sums[mode]
        if sums is not None:
            kd_sum, ce_sum, hidden_sum, n_kd, n_ce, *member_sums = sums.tolist()
            prefix = "eval_" if mode == "eval" else ""
            if n_kd > 0:
                logs[f"{prefix}kd_loss"] = round(kd_sum / n_kd, 6)
                for name, member_sum in zip(self.teacher_names, member_sums):
                    logs[f"{prefix}kd_loss/{name}"] = round(member_sum / n_kd, 6)
                if self.layer_map:
                    logs[f"{prefix}hidden_loss"] = round(hidden_sum / n_kd, 6)
            if n_ce > 0:
                logs[f"{prefix}ce_loss"] = round(ce_sum / n_ce, 6)
            self._metric_sums[mode] = None
        if mode == "train" and self._on_policy_steps[1]:
            logs["on_policy_fraction"] = round(self._on_policy_steps[0] / self._on_policy_steps[1], 4)
            self._on_policy_steps = [0, 0]
        paired, response = self._aligned_counts[mode]
        if response:  # cross_tokenizer: the share of response positions distilled (this process's)
            logs[f"{'eval_' if mode == 'eval' else ''}aligned_fraction"] = round(paired / response, 4)
            self._aligned_counts[mode] = [0, 0]
        super().log(logs, start_time)

    # ---- export -------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the student; the hidden-state projections go into checkpoints but never into the exported model.

        A student trained quantization-aware (`student_quantization`) is exported quantized, as it trained; its
        checkpoints keep the float weights that training goes on from.
        """
        projections = getattr(self.model, PROJECTIONS, None)
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        if projections is not None:
            delattr(self.model, PROJECTIONS)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            if projections is not None:
                self.model.add_module(PROJECTIONS, projections)
        if self.args.student_quantization != "none" and self.args.should_save:
            quantize_in_place(output_dir or self.args.output_dir, self.args.student_quantization)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset: str | None = None,
        license: str | None = None,
        evaluation_table: str | None = None,
        **kwargs,
    ):
        """Write README.md in `output_dir`: how the student was distilled, and the evaluation table if given."""
        if not self.is_world_process_zero():
            return
        student = unwrap_model(self.model)
        info = {
            "teacher": self.teacher_name,
            "student": getattr(student.config, "_name_or_path", None) or type(student).__name__,
            "task": str(self.task_kind),
            "dataset": dataset,
            "steps": self.state.global_step,
            "repo_id": getattr(self, "hub_model_id", None) or model_name,
            "license": license,
            "student_made_by": describe_student(student),
            **({"quantization": f"{self.args.student_quantization} weight-only (torchao), trained quantization-aware "
                "against the full-precision teacher"} if self.args.student_quantization != "none" else {}),
            **({"on_policy": f"lmbda={self.args.lmbda}: that fraction of steps trained on the student's own sampled "
                f"responses (max_new_tokens={self.args.max_new_tokens}, generation_temperature="
                f"{self.args.generation_temperature})"} if self.args.lmbda > 0 else {}),
            **({"sequence-level distillation": f"seq_kd: trained on the teacher's "
                f"{'sampled' if self.args.seq_kd_sampling else 'greedy'} responses to the prompts (max_new_tokens="
                f"{self.args.max_new_tokens})"} if self.args.seq_kd else {}),
            **{key: getattr(self.args, key) for key in (
                "loss_type", "temperature", "alpha", "beta", "skew", "hidden_loss_weight",
                "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
            )},
        }
        os.makedirs(self.args.output_dir, exist_ok=True)
        distillation_model_card(info, evaluation_table).save(os.path.join(self.args.output_dir, "README.md"))


def _num_layers(config, kind) -> int:
    """The number of blocks whose outputs the hidden-state term compares (the decoder's for seq2seq)."""
    if kind == SEQ2SEQ:
        return getattr(config, "num_decoder_layers", None) or config.num_hidden_layers
    return config.num_hidden_layers


def _peft_student(model, peft_config):
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


def _shared_vocabulary(student_tokenizer, teacher_tokenizer, student, teacher):
    """cross_tokenizer='align': (student ids, teacher ids) of the tokens both vocabularies spell alike, within both
    models' output rows; refused when there are none."""
    student_vocab = getattr(student_tokenizer, "tokenizer", student_tokenizer).get_vocab()
    teacher_vocab = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer).get_vocab()
    student_ids, teacher_ids = shared_vocabulary(student_vocab, teacher_vocab)
    fits = (student_ids < output_size(student)) & (teacher_ids < output_size(teacher))
    if not bool(fits.any()):
        raise ValueError(
            f"cross_tokenizer='align' compares the tokens both vocabularies spell alike, but the student's "
            f"{len(student_vocab)} tokens and the teacher's {len(teacher_vocab)} share none (a byte-level BPE and a "
            "SentencePiece vocabulary spell words differently): use cross_tokenizer='uld'."
        )
    return student_ids[fits], teacher_ids[fits]


def _name_or_path(model) -> str:
    inner = unwrap_model(model)
    return getattr(inner.config, "_name_or_path", None) or type(inner).__name__


def _unique_names(teachers) -> list[str]:
    """Short names for the teachers' log lines: the last part of each one's path or id, numbered if repeated."""
    names = [os.path.basename(_name_or_path(teacher).rstrip("/")) for teacher in teachers]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


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
