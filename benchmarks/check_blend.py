#!/usr/bin/env python
"""Is the blended loss right on the REAL model, and how do alpha 0, 0.5 and 1 start to train?

    python benchmarks/check_blend.py              # about 3 minutes on 2 CPU cores

1. On bench_policy.py's pruned 10-layer student and one batch of its training rows, `compute_loss` at alpha 0.5
   (chunked and not), 1 and 0 against alpha·KL(teacher‖student) + (1 − alpha)·CE computed here in float64 from
   the full logits: the loss and the gradient of the embedding (tied head) matrix, relative errors.
2. --steps optimizer steps at each alpha (bench_policy's settings, seed 2, logged every step): CE, KD and the
   gradient norm before clipping, step by step.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_policy as bp  # noqa: E402


def reference_loss(student, teacher, batch, alpha):
    """alpha·KL(p‖q) + (1 − alpha)·CE over the labeled next tokens, float64, from the full logits."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    student_logits = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_q, log_p = F.log_softmax(student_logits[mask], -1), F.log_softmax(teacher_logits[mask], -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return alpha * kl + (1 - alpha) * F.cross_entropy(student_logits[mask], labels[mask])


def embedding_grad(student, loss):
    student.zero_grad()
    loss.backward()
    grad = student.get_input_embeddings().weight.grad.double().clone()
    student.zero_grad()
    return grad


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(bp.DEFAULT_MODEL_DIR))
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    args.quick = False
    torch.set_num_threads(2)

    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.data import CausalLMCollator
    from hf_distill.pruning import prune_depth

    hf_logging.set_verbosity_error()
    scratch = tempfile.mkdtemp(prefix="check_blend-")  # nothing is saved there
    teacher, tokenizer = bp.load_teacher(args)
    teacher.eval().requires_grad_(False)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    pairs = [bp.split_verse(v) for v in bp.english_verses()[: -bp.HELD_OUT_VERSES][:480]]
    calibration = bp.calibration_batches(tokenizer, pairs[:16])
    rows = bp.rows_of(tokenizer, pairs)
    batch = CausalLMCollator(tokenizer.pad_token_id)([{k: rows[k][i] for k in rows} for i in range(100, 108)])

    student = prune_depth(teacher, 10, calibration).train()
    for alpha, chunked in [(0.5, True), (0.5, False), (1.0, True), (0.0, True)]:
        config = DistillationConfig(output_dir=scratch, use_cpu=True, report_to=[], alpha=alpha, chunked_loss=chunked)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, processing_class=tokenizer)
        loss = trainer.compute_loss(student, dict(batch))
        value = loss.item()
        grad = embedding_grad(student, loss)
        reference = reference_loss(student, teacher, batch, alpha)
        grad_ref = embedding_grad(student, reference)
        print(f"alpha {alpha} chunked {chunked}: loss {value:.5f}, float64 reference {reference.item():.5f} "
              f"(rel. {abs(value - reference.item()) / reference.item():.1e}); gradient rel. error "
              f"{((grad - grad_ref).norm() / grad_ref.norm()).item():.1e}", flush=True)

    for alpha in (0.0, 0.5, 1.0):
        config = DistillationConfig(
            output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=8, seed=2, data_seed=2,
            use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            dataloader_pin_memory=False, **{**bp.BASE, "alpha": alpha},
        )
        trainer = DistillationTrainer(
            model=prune_depth(teacher, 10, calibration), teacher_model=teacher, args=config,
            train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
        )
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        for key in ("ce_loss", "kd_loss", "grad_norm"):
            if any(key in entry for entry in logs):
                print(f"alpha {alpha} {key:9s}", " ".join(f"{entry[key]:6.2f}" for entry in logs if key in entry), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
