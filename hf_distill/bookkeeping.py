"""The sums behind the logged terms (`kd_loss`, `ce_loss`, `hidden_loss`, `attention_loss`, `kd_loss/<teacher>`, `aligned_fraction`,
`on_policy_fraction`): added up on the device every micro-batch, read and reduced across processes only when logged,
so the training step never waits on the host or on the other processes for them."""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

MODES = ("train", "eval")
TERMS = ("kd", "ce", "hidden", "attention", "n_kd", "n_ce")  # the running sums, before each teacher's Σ KD


class LossLog:
    """Running sums per mode: (Σ KD, Σ CE, Σ hidden, Σ attention, KD count, CE count, each teacher's Σ KD with
    several).

    Args:
        teacher_names: the teachers' short names (their own `kd_loss/<name>` lines with more than one).
        hidden: whether the hidden-state term is on (`hidden_loss` is logged).
        attention: whether the attention-relation term is on (`attention_loss` is logged).
        device: where the sums live.
        gather: `accelerator.gather` when several processes train, else None.
    """

    def __init__(self, teacher_names: list[str], hidden: bool, device, gather=None, attention: bool = False):
        self.member_names = teacher_names if len(teacher_names) > 1 else []
        self.hidden = hidden
        self.attention = attention
        self.device = device
        self.gather = gather
        self.sums = {mode: None for mode in MODES}
        self.aligned = {mode: None for mode in MODES}  # cross_tokenizer: (paired, response) positions, this process's
        self.skipped = {mode: None for mode in MODES}  # micro-batches without a target token
        self.on_policy_steps = [0, 0]  # (on-policy, all) optimizer steps since the last log
        self.step_sums = None

    def record(self, mode: str, result, n_kd, n_ce, counts: torch.Tensor) -> None:
        """Add one micro-batch's sums (`counts`: the (CE, KD) counts it was normalized by, to spot empty batches)."""
        values = [result.kd_sum, result.ce_sum, result.hidden_sum, result.attention_sum, n_kd, n_ce]
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in values])
        if self.member_names:  # each teacher's own divergence, after the TERMS
            members = result.member_kd_sums
            members = torch.zeros(len(self.member_names), device=self.device) if members is None else members.float()
            values = torch.cat([values, members.to(self.device)])
        self._add(self.sums, mode, values)
        # Kept apart per optimizer step for `raise_if_not_finite`: (loss, Σ KD, Σ hidden, Σ attention).
        step = [result.loss.detach(), result.kd_sum, result.hidden_sum, result.attention_sum]
        step = torch.stack(step).to(self.device, torch.float32)
        self.step_sums = step if self.step_sums is None else self.step_sums + step
        self._add(self.skipped, mode, (counts.sum() == 0).to(self.device, torch.float32))

    def raise_if_not_finite(self, alpha: float, step: int) -> None:
        """Stop before a non-finite loss is applied, naming the term that overflowed (one read of four numbers)."""
        if self.step_sums is None:
            return
        loss, kd_sum, hidden_sum, attention_sum = self.step_sums.tolist()
        self.step_sums = None
        if math.isfinite(loss):
            return
        if not math.isfinite(kd_sum) and alpha > 0:
            term = "the distillation term (kd_loss)"
        elif not math.isfinite(hidden_sum):
            term = "the hidden-state term (hidden_loss)"
        elif not math.isfinite(attention_sum):
            term = "the attention-relation term (attention_loss)"
        else:
            term = "the student's CE loss"
        raise FloatingPointError(
            f"The loss is {loss} at step {step}: {term} is not finite. Causes: a teacher in float16 overflowing (load "
            "it with teacher_model_init_kwargs={'dtype': 'bfloat16'} or float32), a learning rate too high for the "
            "student, or NaN/inf in the inputs. Training stopped before applying it."
        )

    def record_aligned(self, mode: str, paired: torch.Tensor, response: torch.Tensor) -> None:
        self._add(self.aligned, mode, torch.stack([paired.sum(), response.sum()]).to(self.device, torch.float32))

    def count_step(self, on_policy: bool) -> None:
        self.on_policy_steps[0] += on_policy
        self.on_policy_steps[1] += 1

    @staticmethod
    def _add(store: dict, mode: str, values: torch.Tensor) -> None:
        store[mode] = values if store[mode] is None else store[mode] + values

    def totals(self, mode: str) -> torch.Tensor:
        """The sums over every process (a collective: every process calls it at once)."""
        values = self.sums[mode]
        if values is None:
            values = torch.zeros(len(TERMS) + len(self.member_names), device=self.device)
        if self.gather is not None:
            values = self.gather(values[None]).sum(0)
        return values

    def add_to(self, logs: dict[str, float], step: int) -> None:
        """Write the means since the last log into `logs` and start the sums again."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        kd_sum, ce_sum, hidden_sum, attention_sum, n_kd, n_ce, *member_sums = self.totals(mode).tolist()
        if n_kd > 0:
            logs[f"{prefix}kd_loss"] = round(kd_sum / n_kd, 6)
            for name, member_sum in zip(self.member_names, member_sums):
                logs[f"{prefix}kd_loss/{name}"] = round(member_sum / n_kd, 6)
            if self.hidden:
                logs[f"{prefix}hidden_loss"] = round(hidden_sum / n_kd, 6)
            if self.attention:
                logs[f"{prefix}attention_loss"] = round(attention_sum / n_kd, 6)
        if n_ce > 0:
            logs[f"{prefix}ce_loss"] = round(ce_sum / n_ce, 6)
        self.sums[mode] = None
        if mode == "train" and self.on_policy_steps[1]:
            logs["on_policy_fraction"] = round(self.on_policy_steps[0] / self.on_policy_steps[1], 4)
            self.on_policy_steps = [0, 0]
        if self.aligned[mode] is not None:
            paired, response = self.aligned[mode].tolist()
            if response:  # cross_tokenizer: the share of response positions distilled
                logs[f"{prefix}aligned_fraction"] = round(paired / response, 4)
            self.aligned[mode] = None
        if self.skipped[mode] is not None:
            skipped = int(self.skipped[mode])
            if skipped:
                logger.warning(
                    f"Step {step}: a batch has no target token (every label is -100, e.g. prompt-only rows), so it is "
                    f"skipped ({skipped} since the last log). Drop such rows from the dataset."
                )
            self.skipped[mode] = None

    # ---- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The sums over every process, for a checkpoint (a collective, like `totals`)."""
        return {
            "metric_sums": {mode: None if self.sums[mode] is None else self.totals(mode).tolist() for mode in MODES},
            "on_policy_steps": list(self.on_policy_steps),
        }

    def load_state_dict(self, state: dict, is_main_process: bool) -> None:
        """Restore a checkpoint's sums: on the main process only, since they already cover every process."""
        for mode, values in state["metric_sums"].items():
            if values is not None and len(values) == len(TERMS) - 1 + len(self.member_names):
                values = [*values[:3], 0.0, *values[3:]]  # a checkpoint from before the attention-relation term
            self.sums[mode] = None if values is None or not is_main_process else torch.tensor(values, device=self.device)
        self.on_policy_steps = list(state.get("on_policy_steps", [0, 0]))


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise before the optimizer applies a step whose loss is not finite (read once a step, not per micro-batch)."""

    def __init__(self, loss_log: LossLog):
        self.loss_log = loss_log

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.loss_log.raise_if_not_finite(args.alpha_at(state.global_step, state.max_steps), state.global_step)
