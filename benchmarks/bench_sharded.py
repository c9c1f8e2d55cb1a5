#!/usr/bin/env python
"""Peak memory per process of FSDP2 distillation with the chunked loss against full logits (the old fallback).

    python benchmarks/bench_sharded.py                  # launches 2 CPU processes (gloo) per setting, prints a table
    python benchmarks/bench_sharded.py --vocab 151936 --tokens 2048

Student and teacher are random Llama models with a large vocabulary (the memory the chunked loss saves grows with
it), sharded by FSDP2 through `Trainer` and accelerate (on CPU processes accelerate must be told the process
state is multi-device first; see tests/distributed_train.py). Each rank reports the growth of its peak resident
memory over two training steps (`ru_maxrss`), and the teacher's parameter bytes it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(args) -> None:
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from datasets import Dataset
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback, default_data_collator
    from transformers.utils import logging as hf_logging

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.runner.scratch import small_llama

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    rows = args.tokens // args.seq
    ids = torch.randint(4, args.vocab, (rows * 4, args.seq))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq] * len(ids), "labels": ids.tolist()})
    teacher = small_llama(args.vocab, hidden_size=args.hidden * 2, num_layers=2, seed=0)
    student = small_llama(args.vocab, hidden_size=args.hidden, num_layers=2, seed=1)
    config = DistillationConfig(
        output_dir=args.out, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, max_steps=2,
        per_device_train_batch_size=rows // 2, chunked_loss=args.chunked, logging_steps=1, dataloader_pin_memory=False,
        fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True},
    )
    PartialState().distributed_type = DistributedType.MULTI_GPU  # accelerate builds FSDP state for accelerators only
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                  data_collator=default_data_collator)  # equal-length rows: no padding

    class Peak(TrainerCallback):
        start = None

        def on_step_begin(self, *_, **__):
            if self.start is None:
                self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    peak = Peak()
    trainer.add_callback(peak)
    trainer.train()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak.start) / 1024
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in trainer.teacher_model.parameters())
    whole = sum(p.numel() * p.element_size() for p in trainer.teacher_model.parameters())
    result = {"rank": int(os.environ["RANK"]), "chunked": trainer._use_chunks, "peak_growth_mb": grown_mb,
              "teacher_mb_held": held / 1e6, "teacher_mb_whole": whole / 1e6}
    Path(args.out, f"rank{result['rank']}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step over both processes")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunked", type=lambda v: v == "true", default=True, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"vocab {args.vocab}, {args.tokens} tokens a step over 2 processes, student hidden {args.hidden}")
    print("| loss | rank | chunked (student, teacher) | peak RSS growth (MB) | teacher MB held / whole |\n|---|---|---|---|---|")
    for chunked in ("true", "false"):
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                 __file__, "--worker", "--chunked", chunked, "--out", out, "--vocab", str(args.vocab), "--hidden",
                 str(args.hidden), "--tokens", str(args.tokens), "--seq", str(args.seq)],
                check=True, env=env, stdout=subprocess.DEVNULL,
            )
            for rank in range(2):
                r = json.loads(Path(out, f"rank{rank}.json").read_text())
                flags = f"{r['chunked'].get('student')}, {r['chunked'].get('teacher')}"
                print(f"| {'chunked' if chunked == 'true' else 'full logits'} | {rank} | {flags} | {r['peak_growth_mb']:.0f} | "
                      f"{r['teacher_mb_held']:.0f} / {r['teacher_mb_whole']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
