#!/usr/bin/env python
"""Trainer vs the limit: one DistillationTrainer optimizer step against the bare work it cannot avoid.

    python benchmarks/bench_trainer_overhead.py            # defaults, a few minutes on 2 CPU cores
    python benchmarks/bench_trainer_overhead.py --quick    # tiny sizes, a smoke test (seconds)

A (trainer): one optimizer step of a real `DistillationTrainer.train()` run — the teacher's no-grad
    forward, the student's forward/backward, the blended loss alpha·forward-KL + (1 − alpha)·CE
    (alpha = 0.5, T = 1), gradient clipping (Trainer default max_grad_norm = 1.0), the optimizer and
    scheduler steps, and the Trainer's own per-step work (data loading and collation, target counting,
    callbacks). Step time = the wall time between the end of one plain step (below) and the next
    `on_step_end` callback, so it covers everything the Trainer loop does for a step.
B (the limit): on the same batch, a plain loop of teacher no-grad forward (full logits) + the student's
    plain CE `model(**batch).loss` forward/backward + the same optimizer (`Trainer.get_optimizer_cls_and_kwargs`,
    i.e. fused AdamW) step + zero_grad. No distillation term at all, so A/B − 1 is what distillation and the
    Trainer add on top of training the student alone next to a teacher forward.

A and B alternate step by step (A, B, A, B, ...): B runs inside the trainer's `on_step_end` callback,
outside A's timed window. The first `--warmup` steps of each are discarded; medians of the rest.
Run three times, each against its own interleaved B: `chunked_loss=True` (the default), the same with
`compile_loss=True` (chunk math fused by torch.compile; its compile happens in the warm-up steps), and
`chunked_loss=False` (full-logits loss).

Models: RANDOM Llama-architecture teacher and student built from configs (no real model), float32;
data: random token ids, every token a target (labels = input_ids).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import torch

TARGET = 1.05


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that runs in seconds")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size of both models (SmolLM2's)")
    parser.add_argument("--teacher", default="4x512", help="teacher LAYERSxHIDDEN")
    parser.add_argument("--student", default="2x256", help="student LAYERSxHIDDEN")
    parser.add_argument("--batch", default="8x128", help="BATCHxSEQ")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.teacher, args.student, args.batch, args.steps, args.warmup = 2048, "2x64", "1x32", "2x32", 3, 1
    return args


def header(args) -> None:
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print("load average at start (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | python {platform.python_version()} | "
        f"torch {torch.__version__} | threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    header(args)

    import transformers
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.data import CausalLMCollator
    from hf_distill.runner.scratch import small_llama

    transformers.logging.set_verbosity_error()
    t_layers, t_hidden = map(int, args.teacher.split("x"))
    s_layers, s_hidden = map(int, args.student.split("x"))
    batch_size, seq = map(int, args.batch.split("x"))
    total_steps = args.warmup + args.steps

    teacher = small_llama(args.vocab, t_hidden, t_layers, seed=1).eval()
    student0 = small_llama(args.vocab, s_hidden, s_layers, seed=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (batch_size, seq), generator=gen)
    rows = [{"input_ids": row, "labels": row} for row in ids.tolist()]
    # The same batch every step (sequential sampler over repeated rows): A and B see identical tokens.
    dataset = Dataset.from_list(rows * total_steps)
    collator = CausalLMCollator(pad_token_id=0)
    batch = collator([dict(r) for r in rows])
    targets = int((batch["labels"][:, 1:] != -100).sum())

    print(
        f"models: RANDOM teacher Llama {t_layers} layers × hidden {t_hidden} "
        f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params), RANDOM student {s_layers} × {s_hidden} "
        f"({sum(p.numel() for p in student0.parameters()) / 1e6:.1f}M), vocab {args.vocab}, float32; "
        f"batch {batch_size}×{seq} random token ids, {targets} target tokens/step"
    )
    print(f"steps: {args.warmup} warm-up + {args.steps} measured per variant, A/B interleaved step by step; medians\n")

    def config(out_dir, chunked, compiled):
        return DistillationConfig(
            output_dir=out_dir,
            per_device_train_batch_size=batch_size,
            max_steps=total_steps,
            learning_rate=1e-4,
            alpha=0.5,
            loss_type="forward_kl",
            temperature=1.0,
            chunked_loss=chunked,
            compile_loss=compiled,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",
            seed=0,
        )

    class Interleave(TrainerCallback):
        """Times the trainer's steps and runs one plain step (B) after each, outside A's timed window."""

        def __init__(self, plain_step):
            self.plain_step = plain_step
            self.a, self.b = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.a.append(time.perf_counter() - self.mark)
            start = time.perf_counter()
            self.plain_step()
            self.b.append(time.perf_counter() - start)
            self.mark = time.perf_counter()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunked, compiled in ((True, False), (True, True), (False, False)):
            cfg = config(tmp, chunked, compiled)
            student_a = copy.deepcopy(student0)
            student_b = copy.deepcopy(student0)
            opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(cfg, student_b)
            cfg_lr = dict(opt_kwargs, lr=cfg.learning_rate)
            optimizer_b = opt_cls(student_b.parameters(), **cfg_lr)

            def plain_step(student_b=student_b, optimizer_b=optimizer_b):
                with torch.no_grad():
                    teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss = student_b(**batch).loss
                loss.backward()
                optimizer_b.step()
                optimizer_b.zero_grad(set_to_none=True)

            timer = Interleave(plain_step)
            trainer = DistillationTrainer(
                model=student_a,
                teacher_model=teacher,
                args=cfg,
                train_dataset=dataset,
                data_collator=collator,
                callbacks=[timer],
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            assert trainer.state.global_step == total_steps, trainer.state.global_step
            used_chunks = trainer._use_chunks.get("student", False)
            a = statistics.median(timer.a[args.warmup:])
            b = statistics.median(timer.b[args.warmup:])
            ratios = [x / y for x, y in zip(timer.a[args.warmup:], timer.b[args.warmup:])]
            results.append((chunked, compiled, used_chunks, a, b, a / b, min(ratios), max(ratios), type(trainer.optimizer).__name__))
            del trainer, student_a, student_b, optimizer_b

    print("RANDOM models — trainer step (A) / limit step (B), same batch, same optimizer")
    print(f"{'chunked_loss':<13} {'compile_loss':<13} {'chunking used':<14} {'A trainer s':>11} {'B limit s':>10} {'A/B':>7} "
          f"{'A/B range':>13} {'A tok/s':>9} {'B tok/s':>9}")
    for chunked, compiled, used, a, b, ratio, lo, hi, _ in results:
        print(f"{str(chunked):<13} {str(compiled):<13} {str(used):<14} {a:11.3f} {b:10.3f} {ratio:7.3f} {f'{lo:.2f}–{hi:.2f}':>13} "
              f"{targets / a:9.0f} {targets / b:9.0f}")
    for row in results[:2]:
        print(f"\ntarget: A/B <= {TARGET} with chunked_loss=True, compile_loss={row[1]} -> measured {row[5]:.3f} "
              f"({'MET' if row[5] <= TARGET else 'NOT MET'})", end="")
    print(f"\nchunking buys: unchunked/chunked trainer step time = {results[2][3] / results[0][3]:.3f}")
    print(f"(optimizer: {results[0][8]} {opt_kwargs}; 'A/B range' = min–max of the per-step ratios)")
    print("load average at end (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
