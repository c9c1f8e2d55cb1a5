"""Place a tiny teacher with DeepSpeed ZeRO-3 for inference on 2 CPU processes (gloo); run under torchrun.

Usage: torchrun --nproc_per_node 2 tests/zero3_teacher.py OUT_DIR
Each rank writes rank{R}.pt: the sharded teacher's logits on a fixed batch, the same teacher's logits unsharded,
the parameter elements the rank holds and the whole count, whether the chunked loss would use its head, and a
seq_kd batch: the sharded teacher's greedy responses to this rank's prompts (generated in step with the other
rank, which has room for a different number of tokens) and the unsharded teacher's responses to the same prompts.
(accelerate does not build a multi-process DeepSpeed state on CPU, so the student's ZeRO-3 training path runs
on GPUs only; the teacher's placement is the same code either way.)
"""

import os
import sys
import types

import deepspeed
import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import sharpen  # noqa: E402

from hf_distill.on_policy import generated_batch, sampling_config  # noqa: E402
from hf_distill.runner.scratch import small_llama  # noqa: E402
from hf_distill.sharding import head_is_shardable, prepare_teacher  # noqa: E402


def main(out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    # 48 positions: each rank's room to generate depends on its prompts' length.
    teacher = sharpen(small_llama(300, hidden_size=64, num_layers=2, seed=0, max_position_embeddings=48))
    whole_teacher = sharpen(small_llama(300, hidden_size=64, num_layers=2, seed=0, max_position_embeddings=48))
    # The student's training config, as accelerate hands it over: optimizer, scheduler and batch sizes included.
    config = {
        # Threshold 0: every parameter is gathered per forward, as a real model's are (tiny ones would persist whole).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    }
    accelerator = types.SimpleNamespace(
        distributed_type=types.SimpleNamespace(name="DEEPSPEED"), device=torch.device("cpu"),
        state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=config)),
    )
    engine = prepare_teacher(teacher, accelerator)
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sharded, whole = engine(input_ids=ids).logits, whole_teacher(input_ids=ids).logits
    parameters = list(engine.module.parameters())
    rank = int(os.environ.get("RANK", 0))

    # seq_kd: prompt-only rows, 40 tokens on rank 0 (room for 8 new ones), 6 on rank 1 (room for 42).
    prompt_length = 40 if rank == 0 else 6
    prompts = torch.randint(4, 300, (2, prompt_length), generator=torch.Generator().manual_seed(rank + 1))
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts), "labels": torch.full_like(prompts, -100)}
    tokenizer = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    greedy = sampling_config(whole_teacher, tokenizer, max_new_tokens=64, temperature=1.0, do_sample=False)
    answered = generated_batch(engine.module, greedy, batch, "cpu", max_positions=48, synced=True)
    answered_whole = generated_batch(whole_teacher, greedy, batch, "cpu", max_positions=48)
    torch.save(
        {
            "sharded": sharded, "whole": whole,
            "held": sum(p.ds_tensor.numel() for p in parameters), "total": sum(p.ds_numel for p in parameters),
            "trainable": any(p.requires_grad for p in parameters),
            "chunkable": head_is_shardable(engine, engine.module.get_output_embeddings()),
            "answered": answered, "answered_whole": answered_whole,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
