"""Train a tiny student for two steps; run alone or under `torchrun --nproc_per_node 2` (gloo on CPU).

Usage: python tests/ddp_train.py OUT_DIR PER_DEVICE_BATCH
Each rank writes rank{R}.pt with its final parameters, so the test can check ranks stay in sync and that
2 processes x batch B give the same update as 1 process x batch 2B.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import prompt_response_dataset  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer  # noqa: E402
from conftest import english_lines, sharpen  # noqa: E402


def main(out_dir: str, per_device_batch: int) -> None:
    tokenizer = train_bpe_tokenizer(english_lines(200), vocab_size=300)
    teacher = sharpen(small_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0))
    student = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    args = DistillationConfig(
        output_dir=out_dir, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        per_device_train_batch_size=per_device_batch, max_steps=2, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
        dataloader_pin_memory=False, alpha=0.5, temperature=2.0, logging_steps=1,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=prompt_response_dataset(tokenizer, n=16), processing_class=tokenizer,
    )
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save({"params": params, "world_size": trainer.args.world_size, "logs": trainer.state.log_history},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
