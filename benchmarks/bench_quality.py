#!/usr/bin/env python
"""Does distillation pay with a REAL teacher? Held-out perplexity of students trained with and without it.

    python benchmarks/bench_quality.py                           # the default arms, ~5 min an arm on 2 CPU cores
    python benchmarks/bench_quality.py --arms no_teacher,defaults,recommended --seeds 0,1
    python benchmarks/bench_quality.py --list                    # the arms and their settings
    python benchmarks/bench_quality.py --quick                   # RANDOM tiny teacher: a smoke test of the script

Teacher: SmolLM2-135M-Instruct (REAL, 30 layers, vocab 49,152, float32), exported by
benchmarks/export_smollm2.py into benchmarks/.models/ (built when missing). Student: 10 of its 30 layers
(1/3), either cut at fixed layers (0, 3, ..., 24, 29; `student_from_teacher`) or chosen by block influence
(`hf_distill.pruning.prune_depth` on 16 calibration blocks of the training split).
Data: REAL public-domain English, the English side of recipes/data/bible_en_es.jsonl (KJV). Verses are
shuffled with random.Random(0); the last 600 are held out (never trained on, never used for calibration).
Each split is tokenized, joined with EOS and packed into 128-token blocks (`hf_distill.data.pack_dataset`).
Training: `DistillationTrainer`, STEPS optimizer steps of BATCH blocks (60 × 8 × 128 by default), AdamW,
cosine schedule, seed per run (the data order follows the seed, identical across arms of one seed).
Metric: held-out perplexity over 64 blocks (exp of the mean next-token CE). Gap closed
= (ppl no-teacher twin − ppl arm) / (ppl no-teacher twin − ppl teacher), where the twin has the same
student init, data, steps and seed. Results append to benchmarks/results/quality.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "recipes" / "data" / "bible_en_es.jsonl"
DEFAULT_MODEL_DIR = HERE / ".models" / "smollm2-135m-instruct"
RESULTS = HERE / "results" / "quality.jsonl"
CUT_LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]
HELD_OUT_VERSES = 600

# Each arm: how the student is made, and the DistillationConfig settings that differ from plain training.
ARMS = {
    "no_teacher": dict(student="cut", alpha=0.0),
    "defaults": dict(student="cut", alpha=0.5),
    "hidden": dict(student="cut", alpha=0.5, hidden_loss_weight=1.0),
    "pruned/no_teacher": dict(student="pruned", alpha=0.0),
    "pruned/defaults": dict(student="pruned", alpha=0.5),
    "pruned/hidden": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0),
    "pruned/hidden_cosine": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, hidden_loss_type="cosine"),
    "pruned/alpha_0.9+hidden": dict(student="pruned", alpha=0.9, hidden_loss_weight=1.0),
    "pruned/reverse_kl+hidden": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, loss_type="reverse_kl"),
    "pruned/jsd+hidden": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, loss_type="jsd"),
    "pruned/skew_kl+hidden": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, loss_type="skew_kl"),
    "pruned/t_2+hidden": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, temperature=2.0),
    "pruned/hidden_3": dict(student="pruned", alpha=0.5, hidden_loss_weight=3.0),
    "pruned/no_teacher@lr_1.5e-3": dict(student="pruned", alpha=0.0, learning_rate=1.5e-3, warmup_steps=6),
    "pruned/hidden@lr_1.5e-3": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, learning_rate=1.5e-3, warmup_steps=6),
    # Quantization: post-training (`ptq`: the trained float student quantized at export) against quantization-aware
    # distillation (`student_quantization`: trained with fake-quantized weights, exported quantized).
    "pruned/hidden+ptq": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, ptq=["int8", "int4"]),
    "pruned/hidden+qat_int8": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, student_quantization="int8"),
    "pruned/hidden+qat_int4": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, student_quantization="int4"),
    # Teacher-assistant chain (30 -> 20 -> 10 layers) and several teachers: `ta20/hidden` distills a 20-layer
    # assistant from the teacher and keeps it for the arms after it (same seed, same invocation); `teachers` names
    # whom an arm distills from ("assistant": the chain's second stage, its student pruned from the assistant;
    # "teacher+assistant": both at once).
    "ta20/hidden": dict(student="pruned", student_num_layers=20, alpha=0.5, hidden_loss_weight=1.0, keep_as_assistant=True),
    "chain/hidden": dict(student="pruned", alpha=0.5, hidden_loss_weight=1.0, teachers="assistant"),
    "chain/defaults": dict(student="pruned", alpha=0.5, teachers="assistant"),
    "multi/mean_probs": dict(student="pruned", alpha=0.5, teachers="teacher+assistant", multi_teacher="mean_probs"),
    "multi/mean_loss": dict(student="pruned", alpha=0.5, teachers="teacher+assistant", multi_teacher="mean_loss"),
    "lr_5e-4/no_teacher": dict(student="cut", alpha=0.0, learning_rate=5e-4),
    "lr_5e-4/defaults": dict(student="cut", alpha=0.5, learning_rate=5e-4),
}
DEFAULT_ARMS = "no_teacher,defaults,hidden,pruned/no_teacher,pruned/defaults,pruned/hidden"
# The no-teacher baseline's best learning rate in a sweep (5e-4, 1e-3, 2e-3; benchmarks/RESULTS.md); every arm uses it.
BASE = dict(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)


ASSISTANTS = {}  # seed -> the teacher-assistant trained by `ta20/hidden` in this invocation


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="exported SmolLM2 folder")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated arm names (see --list)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each arm runs once per seed")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--heldout-blocks", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="ARM:KEY=VALUE",
                        help="add or override a setting of an arm (new arm names are created from 'cut'/'pruned')")
    parser.add_argument("--list", action="store_true", help="print the arms and exit")
    parser.add_argument("--table", action="store_true", help="print the table of the results in --out and exit")
    parser.add_argument("--quick", action="store_true", help="RANDOM tiny teacher and BPE tokenizer: a smoke test")
    parser.add_argument("--out", default=str(RESULTS), help="JSON-lines file the results are appended to")
    return parser.parse_args()


def apply_overrides(overrides: list[str]) -> None:
    for item in overrides:
        arm, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a plain string such as reverse_kl
        ARMS.setdefault(arm, dict(student="cut", alpha=0.5))[key] = value


def load_teacher(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.quick:
        from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer(english_verses()[:2000], vocab_size=512)
        return small_llama(len(tokenizer), hidden_size=64, num_layers=6, seed=0), tokenizer
    if not Path(args.model_dir, "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "export_smollm2.py"), args.model_dir], check=True)
    teacher = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    return teacher, AutoTokenizer.from_pretrained(args.model_dir)


def english_verses() -> list[str]:
    with open(DATA, encoding="utf-8") as handle:
        verses = [json.loads(line)["translation"]["en"] for line in handle]
    random.Random(0).shuffle(verses)
    return verses


def blocks(tokenizer, verses, seq):
    from datasets import Dataset

    from hf_distill.data import pack_dataset

    ids = Dataset.from_dict({"text": verses}).map(
        lambda rows: tokenizer(rows["text"], add_special_tokens=False), batched=True, remove_columns=["text"]
    )
    return pack_dataset(ids.select_columns(["input_ids"]), seq, separator_id=tokenizer.eos_token_id)


@torch.no_grad()
def perplexity(model, held_out, batch_size=8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(held_out), batch_size):
        ids = torch.tensor(held_out[start : start + batch_size]["input_ids"])
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def make_student(kind, teacher, calibration, num_layers):
    from hf_distill.modeling import student_from_teacher
    from hf_distill.pruning import prune_depth

    if kind == "cut":
        total = teacher.config.num_hidden_layers
        layers = CUT_LAYERS if total == 30 else sorted({round(i * (total - 1) / (num_layers - 1)) for i in range(num_layers)})
        return student_from_teacher(teacher, layers)
    if kind == "pruned":
        return prune_depth(teacher, num_layers, calibration)
    raise ValueError(f"unknown student kind {kind!r}")


def run_arm(name, seed, teacher, tokenizer, train, held_out, calibration, args, out_dir):
    from transformers.utils import logging as hf_logging

    from hf_distill import DistillationConfig, DistillationTrainer

    hf_logging.set_verbosity_error()
    settings = {**BASE, **ARMS[name]}
    kind = settings.pop("student")
    ptq = settings.pop("ptq", [])
    keep_as_assistant = settings.pop("keep_as_assistant", False)
    teachers = settings.pop("teachers", "teacher")
    num_layers = settings.pop("student_num_layers", 10 if not args.quick else 2)
    if args.quick and keep_as_assistant:
        num_layers = 4
    if teachers != "teacher" and seed not in ASSISTANTS:
        raise SystemExit(f"arm {name} needs the assistant: run ta20/hidden before it in --arms")
    source = ASSISTANTS[seed] if teachers == "assistant" else teacher  # a chain's student is made from its teacher
    student = make_student(kind, source, calibration, num_layers)
    teacher = {"teacher": teacher, "assistant": source, "teacher+assistant": [teacher, ASSISTANTS.get(seed)]}[teachers]
    config = DistillationConfig(
        output_dir=str(out_dir / f"{name.replace('/', '_')}-seed{seed}-{os.getpid()}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        seed=seed, data_seed=seed, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=True,
        dataloader_pin_memory=False, **settings,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if keep_as_assistant:
        ASSISTANTS[seed] = student.eval().requires_grad_(False)
    row = {
        "arm": name, "seed": seed, "student": kind, "layers": student.config.distill_source_layers,
        "settings": {**settings, **({"teachers": teachers} if teachers != "teacher" else {})}, "ppl": perplexity(student, held_out), "s_per_step": seconds / args.steps,
        "steps": args.steps, "batch": args.batch, "seq": args.seq,
        **quantized_perplexities(trainer, ptq, held_out, Path(config.output_dir)),
    }
    shutil.rmtree(config.output_dir, ignore_errors=True)  # exported students, measured above
    return row


def quantized_perplexities(trainer, ptq, held_out, out_dir) -> dict:
    """Held-out perplexity and bytes of the exported quantized student: trained quantization-aware, or quantized after."""
    from transformers import AutoModelForCausalLM

    from hf_distill.quantization import folder_bytes, save_quantized

    results = {}
    scheme = trainer.args.student_quantization
    if scheme != "none":
        trainer.save_model(str(out_dir / f"qat-{scheme}"))  # exported quantized
        results[f"qat_{scheme}"] = str(out_dir / f"qat-{scheme}")
    if ptq:
        trainer.save_model(str(out_dir / "float"))
        for scheme in ptq:
            results[f"ptq_{scheme}"] = save_quantized(str(out_dir / "float"), str(out_dir / f"ptq-{scheme}"), scheme)
    rows = {}
    for key, folder in results.items():
        rows[f"ppl_{key}"] = perplexity(AutoModelForCausalLM.from_pretrained(folder), held_out)
        rows[f"bytes_{key}"] = folder_bytes(folder)
    if ptq:
        rows["bytes_float"] = folder_bytes(str(out_dir / "float"))
    return rows


def main():
    args = parse_args()
    apply_overrides(args.set)
    if args.list:
        for name, settings in ARMS.items():
            print(f"{name:24s} {settings}")
        return
    if args.table:
        rows = [json.loads(line) for line in open(args.out, encoding="utf-8")]
        print_table(rows, rows[0]["teacher_ppl"])
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.steps, args.batch, args.seq, args.heldout_blocks = 4, 2, 32, 4
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; --list shows them")
    teacher, tokenizer = load_teacher(args)
    teacher.eval().requires_grad_(False)
    verses = english_verses()
    train = blocks(tokenizer, verses[:-HELD_OUT_VERSES], args.seq)
    held_out = blocks(tokenizer, verses[-HELD_OUT_VERSES:], args.seq)
    held_out = held_out.select(range(min(args.heldout_blocks, len(held_out))))
    train = train.select(range(args.steps * args.batch))  # exactly the blocks the runs see
    calibration = [{"input_ids": torch.tensor(train[i : i + 4]["input_ids"])} for i in range(0, min(16, len(train)), 4)]
    teacher_ppl = perplexity(teacher, held_out)
    print(f"teacher held-out perplexity {teacher_ppl:.2f}; {len(train)} training blocks of {args.seq}", flush=True)

    out_dir = HERE / "results" / "quality_runs"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in arms:
            row = run_arm(name, seed, teacher, tokenizer, train, held_out, calibration, args, out_dir)
            row["teacher_ppl"] = teacher_ppl
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    print_table(rows, teacher_ppl)


def twin_key(row):
    """Runs that share a no-teacher twin: same seed, student construction, learning rate and warm-up."""
    settings = row["settings"]
    return row["seed"], row["student"], settings["learning_rate"], settings.get("warmup_steps", 0)


def print_table(rows, teacher_ppl):
    twins = {twin_key(r): r["ppl"] for r in rows if r["settings"].get("alpha") == 0.0 and not r["settings"].get("hidden_loss_weight")}
    print("\n| arm | seed | student | held-out ppl | no-teacher twin | gap closed | s/step | quantized ppl (MB) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        twin = twins.get(twin_key(r))
        closed = "" if twin is None else f"{100 * (twin - r['ppl']) / (twin - teacher_ppl):.0f}%"
        quantized = ", ".join(
            f"{key[4:]} {r[key]:.1f} ({r['bytes_' + key[4:]] / 1e6:.0f})" for key in sorted(r) if key.startswith("ppl_")
        )
        print(f"| {r['arm']} | {r['seed']} | {r['student']} | {r['ppl']:.1f} | {'' if twin is None else f'{twin:.1f}'} | "
              f"{closed} | {r['s_per_step']:.2f} | {quantized} |")
    print(f"teacher: {teacher_ppl:.1f}")


if __name__ == "__main__":
    main()
