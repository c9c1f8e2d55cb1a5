"""Place a tiny teacher with DeepSpeed ZeRO-3 for inference on 2 CPU processes (gloo); run under torchrun.

Usage: torchrun --nproc_per_node 2 tests/zero3_teacher.py OUT_DIR
Each rank writes rank{R}.pt: the sharded teacher's logits on a fixed batch, the same teacher's logits unsharded,
the parameter elements the rank holds and the whole count, and whether the chunked loss would use its head.
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

from hf_distill.runner.scratch import small_llama  # noqa: E402
from hf_distill.sharding import head_is_shardable, prepare_teacher  # noqa: E402


def main(out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    teacher = sharpen(small_llama(300, hidden_size=64, num_layers=2, seed=0))
    whole_teacher = sharpen(small_llama(300, hidden_size=64, num_layers=2, seed=0))
    # The student's training config, as accelerate hands it over: optimizer, scheduler and batch sizes included.
    config = {
        "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
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
    torch.save(
        {
            "sharded": sharded, "whole": whole,
            "held": sum(p.ds_tensor.numel() for p in parameters), "total": sum(p.ds_numel for p in parameters),
            "trainable": any(p.requires_grad for p in parameters),
            "chunkable": head_is_shardable(engine, engine.module.get_output_embeddings()),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
