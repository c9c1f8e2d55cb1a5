"""`DistillationTrainer`: a `transformers.Trainer` whose loss blends a teacher's divergence with the student's own.

The overrides below only wire the rooms together: `teachers` (setup), `forward` (targets and forward passes),
`loss` (the objective), `bookkeeping` (logged sums) and `checkpoints` (our part of a checkpoint).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .bookkeeping import LossLog, StopOnNonFiniteLoss
from .cache import CACHE_COLUMNS, attach_cache
from .checkpoints import read_distill_state, resolve_resume, write_distill_state
from .checks import check_args, check_generation, check_quantized_student, check_some_labels
from .config import DistillationConfig
from .cross_tokenizer import CrossTokenizerCollator
from .data import TEACHER_PROMPT_COLUMN, check_train_dataset, default_collator
from .forward import ForwardPasses, batch_targets, model_inputs
from .loss import DistillationLoss
from .model_card import distillation_info, distillation_model_card
from .modeling import SEQ2SEQ, TEACHER_TOKEN_KEYS, load_model, model_kind, position_limit
from .on_policy import StepResponses
from .quantization import prepare_qat, quantize_in_place
from .served import attach_rollouts, attach_server
from .sharding import prepare_teacher
from .teachers import (attach_projections, load_teachers, peft_student, projections, resolve_layer_map,
                       resolve_relation_heads, teacher_title, unique_names, without_projections)

logger = logging.get_logger(__name__)


class DistillationTrainer(Trainer):
    """A drop-in `Trainer` that distills `teacher_model` into `model`.

    Each step runs the student, then the teacher under `torch.no_grad()` on the same batch, aligns their
    outputs (causal: position t predicts token t+1; seq2seq: decoder positions and labels; classifiers:
    one distribution a row), and minimises `alpha · KD + (1 − alpha) · CE` (+ the layer terms `hidden_loss_weight · H`,
    `attention_loss_weight · A`) over the target tokens, each term averaged over the targets of the whole accumulated
    (and, by default, multi-process) batch. `kd_loss`, `ce_loss` (and `hidden_loss`, `attention_loss`) are logged
    beside `loss`, in training and evaluation.

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
        self.task_kind = kind = model_kind(model)
        check_generation(args, kind, processing_class)
        setup = load_teachers(model, teacher_model, args, kind, processing_class, teacher_processing_class)
        teachers, self.teacher_tokenizer = setup.models, setup.tokenizer
        self.layer_map = resolve_layer_map(model, teachers[0] if teachers else None, args, kind)
        self.relation_heads = resolve_relation_heads(model, teachers[0] if teachers else None, args, kind)
        if peft_config is not None:
            model = peft_student(model, peft_config)
        if args.student_quantization != "none":
            check_quantized_student(args, peft_config)
            prepare_qat(model, args.student_quantization)  # before the projections, which stay in float
        attach_projections(model, teachers[0] if teachers else None, self.layer_map if args.hidden_loss_weight else None)
        data_collator = data_collator or default_collator(kind, processing_class)
        if args.cross_tokenizer:  # each row also in the teacher's tokens
            data_collator = CrossTokenizerCollator(data_collator, processing_class, self.teacher_tokenizer,
                                                   position_limit(teachers[0]), align=args.cross_tokenizer == "align")
        # The rows are in the student's tokens; a teacher with another tokenizer gets its own from the collator.
        row_models = (model,) if args.cross_tokenizer else (model, *teachers)
        # With lmbda=1 or seq_kd every step trains on generated responses, so prompts alone make a training set.
        prompts_suffice = args.lmbda == 1 or args.seq_kd
        check_train_dataset(train_dataset, kind, models=row_models, prompts_suffice=prompts_suffice)
        check_some_labels(args, train_dataset, kind)
        check_train_dataset(eval_dataset, kind, "eval_dataset", models=row_models)
        self.cache_info = self.server = None
        if args.teacher_cache is not None:
            train_dataset, data_collator, self.cache_info = attach_cache(
                args, kind, train_dataset, data_collator, processing_class
            )
        if args.teacher_server_url is not None:  # each batch asks the server for its teacher targets
            self.server, data_collator = attach_server(args, kind, data_collator, processing_class, train_dataset)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.model_accepts_loss_kwargs = False  # the student's loss is computed here, never inside its forward
        self.teachers = [prepare_teacher(teacher, self.accelerator) for teacher in teachers]
        self.teacher_model = self.teachers[0] if self.teachers else None
        self.teacher_names = unique_names(teachers) if teachers else []  # short, for kd_loss/<name>
        self.teacher_name = teacher_title(teachers, self.server, self.cache_info)
        self.loss_fn = DistillationLoss.from_config(args)
        self.forwards = ForwardPasses(self.teachers, kind, self.layer_map, args.chunked_loss,
                                      self.accelerator.unwrap_model, setup.shared_vocabulary, projections(model),
                                      hidden_states=args.hidden_loss_weight > 0, relation_heads=self.relation_heads)
        self._use_chunks = self.forwards.use_chunks  # decided per model on the first batch
        gather = self.accelerator.gather if args.world_size > 1 else None
        self.loss_log = LossLog(self.teacher_names, bool(self.layer_map) and args.hidden_loss_weight > 0, args.device,
                                gather, attention=self.relation_heads is not None)
        limits = [limit for limit in map(position_limit, (self.model, *self.teachers)) if limit is not None]
        synced = args.world_size > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        self.responses = StepResponses(
            args, processing_class, seq2seq=kind == SEQ2SEQ, max_positions=min(limits, default=None), synced=synced,
            server=self.server, rollouts=attach_rollouts(args, self.model, processing_class, synced),
            gather_weights=lambda: self.accelerator.get_state_dict(self.model),
        )
        self.add_callback(StopOnNonFiniteLoss(self.loss_log))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        kept = [*CACHE_COLUMNS, *TEACHER_TOKEN_KEYS, TEACHER_PROMPT_COLUMN]  # read by the collators, not the model
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *kept]))

    # ---- one optimizer step ---------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their targets (CE, KD) over all of them.

        The counts, summed over processes when `average_tokens_across_devices`, reach `compute_loss` as
        `num_items_in_batch`, so one step of batch 8 equals 4 × gradient accumulation 2 on ragged data.
        On an on-policy step (`lmbda`) each micro-batch is first replaced by its prompts and the student's
        responses, and on the other steps with `seq_kd` by its prompts and the teacher's, so the counts cover the
        generated targets and `compute_loss` sees an ordinary batch. Each micro-batch carries its target masks on.
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.args.lmbda > 0 or self.args.seq_kd:
            unwrap = self.accelerator.unwrap_model  # drops DDP (and a DeepSpeed engine); PEFT keeps its adapters
            student, teacher = unwrap(self.model), unwrap(self.teachers[0]) if self.teachers else None
            batches, on_policy = self.responses.replace(batches, self.state.global_step, student, teacher)
            if batches and self.args.lmbda > 0:
                self.loss_log.count_step(on_policy)
        if not batches or "labels" not in batches[0]:
            return batches, None
        targets = [self._targets(batch) for batch in batches]
        for batch, batch_target in zip(batches, targets):
            batch_target.into(batch)  # computed once: compute_loss reads them from the batch
        counts = sum(batch_target.counts() for batch_target in targets).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return batches, counts

    def _targets(self, inputs):
        return batch_targets(inputs, self.task_kind, self.args.distill_all_tokens, self.args.cross_tokenizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """alpha · KD + (1 − alpha) · CE + hidden_loss_weight · H + attention_loss_weight · A over the target positions.

        `num_items_in_batch` holds the (CE, KD) target counts of the whole accumulated batch, from
        `get_batch_samples`; without it (evaluation) the counts of this batch are used. Nothing here reads a
        value back to the host: the logged sums stay on the device until `log`.
        """
        mode = "train" if model.training else "eval"
        targets = self._targets(inputs)
        accumulated = torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 2
        counts = num_items_in_batch if accumulated else targets.counts()
        select = targets.select
        self.loss_fn.alpha = self.args.alpha_at(self.state.global_step, self.state.max_steps)
        positions = self.loss_fn.positions(targets.targets[select], targets.kd_mask[select], targets.ce_mask[select],
                                           counts[1], counts[0], targets.kd_everywhere)

        outputs, student = self.forwards.student(model, inputs, targets)
        teacher = self.forwards.teacher(inputs, targets) if self._needs_teacher(mode) else None
        with self.forwards.whole_heads(model, student, teacher):
            result = self.loss_fn(student, teacher, positions)

        n_kd = targets.kd_mask.sum() if teacher is not None else 0
        self.loss_log.record(mode, result, n_kd, targets.ce_mask.sum(), counts)
        if targets.response_mask is not None:  # cross_tokenizer: the share of response positions paired
            self.loss_log.record_aligned(mode, targets.kd_mask, targets.response_mask)
        if mode == "eval" or self.is_deepspeed_enabled:  # no optimizer-step check comes first (DeepSpeed steps in backward)
            self.loss_log.raise_if_not_finite(self.loss_fn.alpha, self.state.global_step)
        loss = result.loss
        if accumulated and mode == "train" and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the counts are global already
        return (loss, outputs) if return_outputs else loss

    def _needs_teacher(self, mode: str) -> bool:
        """Training with alpha = 0 and no hidden-state term never runs the teacher; evaluation always reports KD."""
        wanted = self.args.distills or self.args.matches_layers or mode == "eval"
        return wanted and (bool(self.teachers) or self.cache_info is not None or self.server is not None)

    # ---- checkpoints --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, which never overwrites an earlier run and resumes only from a complete checkpoint.

        Without `resume_from_checkpoint`, an `output_dir` holding checkpoints or a saved run is refused; `True` takes
        the newest checkpoint whose `trainer_state.json` (written last) is whole, so a kill mid-save falls back.
        """
        checkpoint = resolve_resume(self.args.output_dir, resume_from_checkpoint)
        self._resumed_state = state = read_distill_state(checkpoint)
        if state is not None:  # the logged sums and chunking decisions go on; its loss sum is put back on first log
            self.loss_log.load_state_dict(state, self.is_world_process_zero())
            self._use_chunks.update(state.get("use_chunks", {}))
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    def _save_checkpoint(self, model, trial):
        """Save the running loss sums with the checkpoint, so logs after a resume equal an uninterrupted run's."""
        loss = self._tr_loss.detach().reshape(1)
        if self.args.world_size > 1:  # each process sums its own loss; the logged value is their mean
            loss = self.accelerator.gather(loss)
        state = {
            **self.loss_log.state_dict(),
            "tr_loss": loss.mean().item(),
            "last_logged_step": self._globalstep_last_logged,
            # Decided on the first batch by a trial forward that draws dropout RNG; a resumed run reuses the decision.
            "use_chunks": dict(self._use_chunks),
        }
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_distill_state(folder, state)
        super()._save_checkpoint(model, trial)

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        """On the first step after a resume, add back the loss summed since the last log before the checkpoint."""
        state, self._resumed_state = getattr(self, "_resumed_state", None), None
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
        self.loss_log.add_to(logs, self.state.global_step)  # the one place the sums are read and reduced
        if self.args.alpha_end is not None and "loss" in logs:  # the weight of the step just trained
            logs["alpha"] = round(self.args.alpha_at(self.state.global_step - 1, self.state.max_steps), 6)
        super().log(logs, start_time)

    # ---- export -------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the student; the hidden-state projections go into checkpoints but never into the exported model.

        A student trained quantization-aware (`student_quantization`) is exported quantized, as it trained; its
        checkpoints keep the float weights that training goes on from.
        """
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        with without_projections(self.model):
            super().save_model(output_dir, _internal_call)
        if self.args.student_quantization != "none" and self.args.should_save:
            quantize_in_place(output_dir or self.args.output_dir, self.args.student_quantization)

    def create_model_card(self, model_name=None, dataset=None, license=None, evaluation_table=None, **kwargs):
        """Write README.md in `output_dir`: how the student was distilled, and the evaluation table if given."""
        if not self.is_world_process_zero():
            return
        info = distillation_info(
            self.args, self.model, self.teacher_name, self.task_kind, dataset=dataset, steps=self.state.global_step,
            repo_id=getattr(self, "hub_model_id", None) or model_name, license=license,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        distillation_model_card(info, evaluation_table).save(os.path.join(self.args.output_dir, "README.md"))

