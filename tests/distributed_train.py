"""Train a tiny student for two steps; run alone or under `torchrun --nproc_per_node 2` (gloo on CPU).

Usage: python tests/distributed_train.py OUT_DIR PER_DEVICE_BATCH [ddp|fsdp2|fsdp2_on_policy] [GRAD_ACCUM] [HIDDEN_WEIGHT]
Each rank writes rank{R}.pt with its first-step gradients, final parameters (gathered whole under FSDP2),
logs, evaluation metrics, whether the chunked loss ran, and the teacher's parameter bytes held by the rank, so the test can check
that ranks stay in sync and that 2 processes x batch B give the same update as 1 process x batch 2B.

`fsdp2` runs the real Trainer -> accelerate -> `fully_shard` path. accelerate builds its FSDP state only for
accelerator backends, so on CPU processes (gloo) the script marks the process state as multi-device first;
everything after that (the plugin, `fully_shard` of the student's blocks and root, the optimizer on
sharded parameters, the teacher's placement) is the code a GPU run takes.

`fsdp2_on_policy` trains every step on the sharded student's own samples (lmbda=1). Positions are few (48), so each
rank's room to generate depends on its longest prompt: ranks run different numbers of forwards unless generation
keeps them in step. Each rank records the length of every generation (`generated`).

`fsdp2_vllm` is `fsdp2_on_policy` with `use_vllm`: the samples come from the vLLM server at $HF_DISTILL_TEST_VLLM_URL,
which serves the model in $HF_DISTILL_TEST_VLLM_MODEL_DIR (its tokenizer and architecture are the student's here), and
the sharded student's weights are gathered whole to be sent to it.
"""

import os
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))

from conftest import english_lines, prompt_response_dataset, sharpen  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer  # noqa: E402


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class FirstGradients(TrainerCallback):
    """Keep the gradients of the first optimizer step, gathered whole."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = torch.cat([whole(p.grad).flatten() for p in self.model.parameters()]).detach().clone()


def local_bytes(model) -> tuple[int, int]:
    """(bytes of the teacher's parameters this rank holds, bytes of the whole teacher)."""
    held = total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        held += local.numel() * local.element_size()
        total += parameter.numel() * parameter.element_size()
    return held, total


def ragged_prompts(dataset):
    """Row i keeps a prompt of 4 + 2i tokens, so the ranks' batches have prompts of different widths."""
    def cut(row, i):
        start = row["labels"].index(next(t for t in row["labels"] if t != -100))
        keep = min(4 + 2 * i, start)
        ids = row["input_ids"][:keep] + row["input_ids"][start:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * keep + row["labels"][start:]}

    return dataset.map(cut, with_indices=True)


def served_models():
    """(tokenizer, teacher, student) for `fsdp2_vllm`: the served model's tokenizer and weights, a student of its shape."""
    folder = os.environ["HF_DISTILL_TEST_VLLM_MODEL_DIR"]
    tokenizer, teacher = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    student = small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=3, num_attention_heads=2,
                          num_key_value_heads=2)
    return tokenizer, teacher, student


def main(out_dir: str, per_device_batch: int, mode: str = "ddp", grad_accum: int = 1, hidden_weight: float = 0.0):
    tokenizer = train_bpe_tokenizer(english_lines(200), vocab_size=300)
    on_policy = mode == "fsdp2_on_policy"
    positions = {"max_position_embeddings": 48} if on_policy else {}
    teacher = sharpen(small_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0, **positions))
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=1, **positions)
    fsdp2 = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}
    sharded = fsdp2 if mode.startswith("fsdp2") else {}
    if mode == "fsdp2_vllm":
        tokenizer, teacher, student = served_models()
        sharded.update(lmbda=1.0, max_new_tokens=6, use_vllm=True, vllm_sync_interval=1,
                       vllm_server_base_url=os.environ["HF_DISTILL_TEST_VLLM_URL"])
    if on_policy:
        sharded.update(lmbda=1.0, max_new_tokens=64)
        generated, generate = [], student.generate

        def recorded(*args, **kwargs):  # the student's own generate, its output lengths kept
            output = generate(*args, **kwargs)
            generated.append(output.shape[1] - kwargs["input_ids"].shape[1])
            return output

        student.generate = recorded
    args = DistillationConfig(
        output_dir=out_dir, report_to=[], save_strategy="steps", save_steps=2, save_only_model=True, disable_tqdm=True, use_cpu=True, seed=0,
        per_device_train_batch_size=per_device_batch, gradient_accumulation_steps=grad_accum, max_steps=2,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
        train_sampling_strategy="sequential", dataloader_pin_memory=False, alpha=1.0 if "lmbda" in sharded else 0.5,
        temperature=2.0,
        logging_steps=1, hidden_loss_weight=hidden_weight, **sharded,
    )
    if mode.startswith("fsdp2") and args.world_size > 1:
        PartialState().distributed_type = DistributedType.MULTI_GPU  # see the module docstring
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=(ragged_prompts if on_policy else lambda rows: rows)(prompt_response_dataset(tokenizer, n=16)),
        eval_dataset=prompt_response_dataset(tokenizer, n=8),
        processing_class=tokenizer,
    )
    first = FirstGradients(trainer.model)
    trainer.add_callback(first)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(out_dir, "exported"))
    rank = int(os.environ.get("RANK", 0))
    params = torch.cat([whole(p.detach()).flatten() for p in trainer.model.parameters()])
    torch.save(
        {
            "params": params, "grads": first.grads, "world_size": trainer.args.world_size,
            "logs": trainer.state.log_history, "eval": metrics, "chunked": dict(trainer._use_chunks),
            "fsdp": trainer.is_fsdp_enabled, "teacher_bytes": local_bytes(trainer.teacher_model),
            "teacher_sharded": all(isinstance(p, DTensor) for p in trainer.teacher_model.parameters()),
            "generated": generated if on_policy else None,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    if torch.distributed.is_initialized():  # gloo's threads left running at exit can abort the process
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4], *[int(a) for a in sys.argv[4:5]], *[float(a) for a in sys.argv[5:6]])
