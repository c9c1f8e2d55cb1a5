"""On-policy distillation (GKD) and sequence-level KD: a batch's prompts, answered by the student (or by the
teacher, `seq_kd`), become the batch it trains on."""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import GenerationConfig

from .modeling import unwrap_model
from .served import add_served_targets


def is_on_policy_step(lmbda: float, seed: int, step: int) -> bool:
    """Whether optimizer step `step` trains on generated responses.

    A draw seeded by (seed, step) alone: every process and every micro-batch of the step agree, and a resumed
    run makes the decisions the uninterrupted one made.
    """
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return random.Random(f"on-policy:{seed}:{step}").random() < lmbda


def generation_seed(seed: int, step: int, micro_batch: int, process: int) -> int:
    """The torch seed of one micro-batch's sampling: reproducible, and different across steps and processes."""
    return random.Random(f"generation:{seed}:{step}:{micro_batch}:{process}").getrandbits(63)


def sampling_config(model, tokenizer, max_new_tokens: int, temperature: float, do_sample: bool = True) -> GenerationConfig:
    """Plain sampling from the model's distribution at `temperature` (greedy with `do_sample=False`), stopping at
    any of its EOS tokens.

    Set explicitly rather than inherited: `generate` fills unset fields from the checkpoint's own generation
    config, whose chat defaults (top-k, top-p, repetition penalty) would sample another distribution.
    """
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0) if do_sample else (
        dict(do_sample=False, num_beams=1)
    )
    return GenerationConfig(
        **sampling,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos or None,
        use_cache=True,
    )


def prompts_of(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt: its real (attention-masked) tokens before its first target label.

    A prompt-only row (every label -100) is its prompt whole; a row trained from its first token (no -100
    prefix, or no labels) keeps that first token as the prompt, since generation needs one to start from.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    prompts = []
    for i in range(input_ids.shape[0]):
        ids = input_ids[i][mask[i]].tolist()
        targets = [True] * len(ids) if labels is None else (labels[i][mask[i]] != -100).tolist()
        end = targets.index(True) if True in targets else len(ids)
        prompts.append(ids[: max(end, 1)])
    return prompts


def left_padded(prompts: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Prompts padded on the left, so every row's generation starts at the same column."""
    length = max(len(p) for p in prompts)
    input_ids = [[pad_id] * (length - len(p)) + p for p in prompts]
    attention_mask = [[0] * (length - len(p)) + [1] * len(p) for p in prompts]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long, device=device),
    }


def responses_batch(prompts: list[list[int]], generated: torch.Tensor, eos_ids, pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch: each prompt followed by its generated tokens up to and including the first EOS.

    Labels are -100 on the prompt and the padding, and the generated tokens elsewhere; what `generate` wrote after
    a row's EOS (padding, while other rows went on) is dropped.
    """
    eos_ids = set(eos_ids or [])
    rows = []
    for prompt, tokens in zip(prompts, generated.tolist()):
        stop = next((k + 1 for k, token in enumerate(tokens) if token in eos_ids), len(tokens))
        rows.append((prompt, tokens[:stop]))
    length = max(len(p) + len(r) for p, r in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in rows:
        pad = length - len(prompt) - len(response)
        batch["input_ids"].append(prompt + response + [pad_id] * pad)
        batch["attention_mask"].append([1] * (len(prompt) + len(response)) + [0] * pad)
        batch["labels"].append([-100] * len(prompt) + response + [-100] * pad)
    return {key: torch.tensor(value, dtype=torch.long, device=generated.device) for key, value in batch.items()}


def response_labels(generated: torch.Tensor, eos_ids) -> torch.Tensor:
    """Seq2seq targets from generated decoder tokens: each row up to and including its first EOS, then -100."""
    eos = torch.isin(generated, torch.tensor(list(eos_ids or []), dtype=generated.dtype, device=generated.device))
    after_eos = (eos.cumsum(1) - eos.long()) > 0  # positions after the first EOS
    return generated.masked_fill(after_eos, -100)


def generated_batch(generator, config: GenerationConfig, batch: dict[str, Any], device, *, seq2seq: bool = False,
                    max_positions: int | None = None, seed: int = 0, synced: bool = False,
                    what: str = "Generation") -> dict[str, torch.Tensor]:
    """`batch`'s prompts followed by `generator`'s responses, as a training batch with labels on the responses only.

    A seq2seq batch keeps its sources and takes the generated decoder tokens as labels. Generation runs in eval mode,
    without grad, from its own RNG seeded by `seed`: the training RNG (dropout) stays as it was, and a resumed run
    draws what the uninterrupted one drew. Responses are cut to fit `max_positions` (prompt + response). `synced`:
    the generator is sharded across processes (FSDP, ZeRO-3), so each one's forwards gather parameters with the
    others and every process must go on until all have finished their rows.
    """
    if seq2seq:
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask") if key in batch}
        width = 1  # the decoder starts from its start token
    else:
        prompts = prompts_of(batch)
        inputs = left_padded(prompts, config.pad_token_id, device)
        width = inputs["input_ids"].shape[1]
    room = config.max_new_tokens if max_positions is None else min(config.max_new_tokens, max_positions - width)
    if room < 1:
        raise ValueError(
            f"{what}: a prompt of {width} tokens leaves no room to generate within {max_positions} positions "
            "(max_position_embeddings of the student or teacher); truncate the prompts shorter."
        )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = generator.generate(**inputs, generation_config=config, max_new_tokens=room,
                                        synced_gpus=True if synced else None)  # None: transformers' own detection
    finally:
        generator.train(was_training)
    if seq2seq:  # the output starts with the decoder's start token, which is no target
        return {**inputs, "labels": response_labels(output[:, 1:], config.eos_token_id)}
    return responses_batch(prompts, output[:, width:], config.eos_token_id, config.pad_token_id)


def served_batch(server, batch: dict[str, Any], max_new_tokens: int, temperature: float, greedy: bool, seed: int,
                 eos_ids, pad_id: int, max_positions: int | None = None) -> dict[str, torch.Tensor]:
    """Like `generated_batch`, with a server (`hf_distill.served.TeacherServer` or `RolloutServer`) writing the
    responses."""
    prompts = prompts_of(batch)
    room = max_new_tokens if max_positions is None else min(max_new_tokens, max_positions - max(map(len, prompts)))
    if room < 1:
        raise ValueError(f"A prompt leaves no room to generate within {max_positions} positions; truncate it.")
    responses = server.generate(prompts, room, temperature, greedy, seed)
    width = max(1, max(map(len, responses)))
    generated = torch.tensor([response + [pad_id] * (width - len(response)) for response in responses])
    device = batch["input_ids"].device
    return {key: value.to(device) for key, value in responses_batch(prompts, generated, eos_ids, pad_id).items()}


class StepResponses:
    """Each optimizer step's micro-batches, replaced by their prompts answered by the student (an on-policy step,
    `lmbda`) or, on the other steps with `seq_kd`, by the teacher (greedy unless `seq_kd_sampling`).

    Args:
        args: the `DistillationConfig` (lmbda, seq_kd, seed, max_new_tokens, generation_temperature, ...).
        tokenizer: the student's tokenizer (pads prompts and responses).
        seq2seq: whether the models are seq2seq (the teacher writes each source's target).
        max_positions: the fewest positions any model takes (prompt + response must fit), or None.
        synced: the generator is sharded across processes (FSDP, ZeRO-3).
        server: a served teacher (`TeacherServer`), which writes the `seq_kd` responses and scores generated rows.
        rollouts: the student's copy in vLLM (`use_vllm`: a `RolloutServer`, or `ColocatedRollouts` in this process),
            which writes the on-policy responses after being sent the student's weights (every `vllm_sync_interval`
            steps).
        gather_weights: for a sharded student, gathers its whole weights (every process takes part; the main one
            gets them), e.g. `accelerator.get_state_dict`.
    """

    def __init__(self, args, tokenizer, seq2seq: bool = False, max_positions: int | None = None, synced: bool = False,
                 server=None, rollouts=None, gather_weights=None):
        self.server, self.rollouts, self.gather_weights = server, rollouts, gather_weights
        self.synced_at: int | None = None  # the step whose weights the rollout server holds
        self.args = args
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.seq2seq = seq2seq
        self.max_positions = max_positions
        self.synced = synced
        self.configs: dict[str, GenerationConfig] = {}  # the student's (on-policy) and the teacher's (seq_kd)

    def replace(self, batches: list, step: int, student, teacher) -> tuple[list, bool]:
        """(the step's batches, whether it is on-policy): one decision for the whole step, so its micro-batches (and
        processes) are all on- or off-policy."""
        on_policy = bool(batches) and is_on_policy_step(self.args.lmbda, self.args.seed, step)
        if on_policy and self.rollouts is not None:
            self._sync_rollouts(student, step)
            batches = [self._served(self.rollouts, batch, step, i, greedy=False) for i, batch in enumerate(batches)]
        elif on_policy:
            batches = [self._answered(student, batch, step, i, by_teacher=False) for i, batch in enumerate(batches)]
        elif batches and self.args.seq_kd:
            batches = [self._answered(teacher, batch, step, i, by_teacher=True) for i, batch in enumerate(batches)]
        if self.server is not None:  # generated rows: the served teacher scores them now
            batches = [batch if "teacher_ids" in batch else add_served_targets(batch, self.server,
                                                                              self.args.distill_all_tokens)
                       for batch in batches]
        return batches, on_policy

    def _sync_rollouts(self, student, step: int) -> None:
        if self.synced_at is not None and step - self.synced_at < self.args.vllm_sync_interval:
            return
        from accelerate import PartialState

        state = PartialState()
        # DDP: every process holds the same weights and one sends them; sharded, all gather them first.
        weights = self.gather_weights() if self.synced and self.gather_weights is not None else None
        if state.is_main_process:
            self.rollouts.push_weights(student, self.args.vllm_weights_dir, weights)
        state.wait_for_everyone()
        self.synced_at = step

    def _served(self, server, batch: dict[str, Any], step: int, micro_batch: int, greedy: bool):
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        return served_batch(server, batch, self.args.max_new_tokens, self.args.generation_temperature, greedy,
                            generation_seed(self.args.seed, step, micro_batch, self.args.process_index), [eos],
                            eos if pad is None else pad, self.max_positions)

    def _answered(self, generator, batch: dict[str, Any], step: int, micro_batch: int, by_teacher: bool):
        if by_teacher and self.server is not None:
            return self._served(self.server, batch, step, micro_batch, greedy=not self.args.seq_kd_sampling)
        name = "teacher" if by_teacher else "student"
        if name not in self.configs:
            self.configs[name] = sampling_config(
                unwrap_model(generator), self.tokenizer, self.args.max_new_tokens, self.args.generation_temperature,
                do_sample=self.args.seq_kd_sampling if by_teacher else True,
            )
        return generated_batch(
            generator, self.configs[name], batch, self.args.device,
            seq2seq=self.seq2seq,
            max_positions=self.max_positions,
            seed=generation_seed(self.args.seed, step, micro_batch, self.args.process_index),
            synced=self.synced,
            what=f"{'seq_kd' if by_teacher else 'On-policy'} step {step}",
        )
