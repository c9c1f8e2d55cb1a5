#!/usr/bin/env python
"""What data should the student learn from? Off-policy KD, on-policy (lmbda), seq_kd and a teacher with another
tokenizer, at equal steps, with a REAL teacher, on a prompt -> response task.

    python benchmarks/bench_policy.py                                 # the default arms, a few minutes an arm on 2 CPU cores
    python benchmarks/bench_policy.py --arms no_teacher,lmbda_1 --seeds 0,1
    python benchmarks/bench_policy.py --list                          # the arms and their settings
    python benchmarks/bench_policy.py --table                         # the table of benchmarks/results/policy.jsonl
    python benchmarks/bench_policy.py --quick                         # RANDOM tiny teacher: a smoke test of the script

Teacher: SmolLM2-135M-Instruct (REAL, 30 layers, vocab 49,152, float32; benchmarks/export_smollm2.py). Student: 10 of
its 30 layers chosen by block influence (`hf_distill.pruning.prune_depth`, 16 calibration rows of the training split).
Task: verse continuation, from the English side of recipes/data/bible_en_es.jsonl (public-domain KJV), shuffled as
in bench_quality.py (random.Random(0)); the last 600 verses are held out, of which the first --heldout are scored.
Prompt: a verse's first 40% of words (at least 4); response: the rest of the verse, then EOS.
Metrics, on the held-out prompts:
  nll_teacher  nats per token of the TEACHER'S greedy continuation (up to --max-new-tokens) given the prompt: how close
               the student is to the teacher's behaviour on prompts it never saw (the issue's metric);
  bpc_teacher  the same in bits per character (tokenizer-free: compares students with different tokenizers);
  bpc_ref      bits per character of the verse's true remainder;
  chrf_teacher chrF of the student's greedy continuation against the teacher's (sacrebleu): generation, where the
               train/inference mismatch of off-policy KD shows.
Training: `DistillationTrainer`, --steps optimizer steps of --batch rows, AdamW at the bench_quality learning rate,
cosine schedule, the same rows in the same order for every arm of a seed. gen_s_per_step is the time spent in
`generate` (student on on-policy steps, teacher with seq_kd) per step, out of s_per_step.
Cross-tokenizer arms (xtok/*): the same student re-tokenized with a byte-level BPE of --bpe-vocab tokens trained on the
training verses; each new token's embedding starts as the mean of the teacher's embeddings of its text (tied head).
Staged arms (`off_policy/then_*`): the off_policy student after --steps, trained --continue-steps more on the next
training rows at --continue-lr, off-policy or on-policy: does on-policy pay once the student writes sensible text?
Their s_per_step is the second stage's. Results append to benchmarks/results/policy.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import BASE, DEFAULT_MODEL_DIR, HELD_OUT_VERSES, english_verses, load_teacher  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "policy.jsonl"

# DistillationConfig settings of each arm; `tokenizer: bpe` gives the student its own tokenizer.
ARMS = {
    "no_teacher": dict(alpha=0.0),
    "off_policy": dict(alpha=1.0),
    "lmbda_0.5": dict(alpha=1.0, lmbda=0.5),
    "lmbda_1": dict(alpha=1.0, lmbda=1.0),
    "seq_kd": dict(alpha=0.5, seq_kd=True),
    "off_policy@alpha_0.5": dict(alpha=0.5),
    "lmbda_1/reverse_kl": dict(alpha=1.0, lmbda=1.0, loss_type="reverse_kl"),
    "xtok/no_teacher": dict(alpha=0.0, cross_tokenizer="uld", tokenizer="bpe"),  # alpha 0: the teacher never runs
    "xtok/uld": dict(alpha=0.5, cross_tokenizer="uld", tokenizer="bpe"),
    "xtok/align": dict(alpha=0.5, cross_tokenizer="align", tokenizer="bpe"),
    # Staged: the off_policy student, then --continue-steps more on new rows, off-policy or on-policy.
    "off_policy/then_off_policy": dict(alpha=1.0, after="off_policy"),
    "off_policy/then_lmbda_0.5": dict(alpha=1.0, lmbda=0.5, after="off_policy"),
    "off_policy/then_lmbda_1": dict(alpha=1.0, lmbda=1.0, after="off_policy"),
}
DEFAULT_ARMS = "no_teacher,off_policy,lmbda_0.5,lmbda_1,seq_kd,xtok/no_teacher,xtok/uld,xtok/align"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="exported SmolLM2 folder")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated arm names (see --list)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--continue-steps", type=int, default=30, help="the second stage of the `A/then_B` arms")
    parser.add_argument("--continue-lr", type=float, default=3e-4, help="its learning rate (cosine, from this)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="training generation and teacher continuations")
    parser.add_argument("--heldout", type=int, default=128, help="held-out prompts scored")
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the table of --out (and its means over seeds)")
    parser.add_argument("--quick", action="store_true", help="RANDOM tiny teacher and BPE tokenizer: a smoke test")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args()


def split_verse(verse: str) -> tuple[str, str]:
    """(prompt, response): the first 40% of the words (at least 4), and the rest with its leading space."""
    words = verse.split(" ")
    cut = max(4, int(0.4 * len(words)))
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def rows_of(tokenizer, pairs) -> dict[str, list]:
    """Training rows: prompt tokens (labels -100), then the response's tokens and EOS."""
    columns = {"input_ids": [], "labels": []}
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        columns["input_ids"].append(p + r)
        columns["labels"].append([-100] * len(p) + r)
    return columns


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of `prompts`, decoded up to the first EOS."""
    from hf_distill.on_policy import left_padded, sampling_config

    model.eval()
    config = sampling_config(model, tokenizer, max_new_tokens, 1.0, do_sample=False)
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        inputs = left_padded(ids, config.pad_token_id, model.device)
        output = model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1] :]
        for tokens in output.tolist():
            stop = next((k for k, t in enumerate(tokens) if t in config.eos_token_id), len(tokens))
            texts.append(tokenizer.decode(tokens[:stop], skip_special_tokens=True))
    return texts


@torch.no_grad()
def continuation_nll(model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 16):
    """(nats summed, tokens, characters) of `continuations` given `prompts`, in the model's own tokens."""
    from hf_distill.data import CausalLMCollator

    model.eval()
    pairs = [(p, c) for p, c in zip(prompts, continuations) if c.strip()]
    rows = rows_of(tokenizer, pairs)
    rows["labels"] = [labels[:-1] + [-100] for labels in rows["labels"]]  # text only: the EOS is not scored
    collate = CausalLMCollator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = collate([{k: rows[k][i] for k in rows} for i in range(start, min(start + batch_size, len(pairs)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    return total, tokens, sum(len(c) for _, c in pairs)


def score(model, tokenizer, held_out, max_new_tokens, outputs=None) -> dict:
    """The metrics of the module's docstring; `outputs` are the model's greedy continuations, if already made."""
    import sacrebleu

    prompts = [h["prompt"] for h in held_out]
    nats, tokens, chars = continuation_nll(model, tokenizer, prompts, [h["teacher"] for h in held_out])
    ref_nats, _, ref_chars = continuation_nll(model, tokenizer, prompts, [h["reference"] for h in held_out])
    outputs = outputs or greedy(model, tokenizer, prompts, max_new_tokens)
    return {
        "nll_teacher": nats / tokens,
        "bpc_teacher": nats / chars / math.log(2),
        "bpc_ref": ref_nats / ref_chars / math.log(2),
        "chrf_teacher": sacrebleu.corpus_chrf(outputs, [[h["teacher"] for h in held_out]]).score,
        "chrf_ref": sacrebleu.corpus_chrf(outputs, [[h["reference"] for h in held_out]]).score,
        "sample": prompts[0] + " |" + outputs[0],
    }


def retokenized(student, teacher_tokenizer, tokenizer):
    """The student with `tokenizer`'s vocabulary: each token's embedding the mean of the teacher's over its text."""
    old = student.get_input_embeddings().weight.detach().clone()
    special = {tokenizer.pad_token_id: teacher_tokenizer.pad_token_id or teacher_tokenizer.eos_token_id,
               tokenizer.eos_token_id: teacher_tokenizer.eos_token_id, tokenizer.bos_token_id: teacher_tokenizer.bos_token_id}
    rows = []
    for token_id in range(len(tokenizer)):
        if token_id in special and special[token_id] is not None:
            rows.append(old[special[token_id]])
            continue
        ids = teacher_tokenizer(tokenizer.decode([token_id]), add_special_tokens=False)["input_ids"] or [teacher_tokenizer.eos_token_id]
        rows.append(old[ids].mean(0))
    student.resize_token_embeddings(len(tokenizer))
    student.get_input_embeddings().weight.data.copy_(torch.stack(rows))
    if not student.config.tie_word_embeddings:
        student.get_output_embeddings().weight.data.copy_(torch.stack(rows))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(student.config, key, getattr(tokenizer, key))
        setattr(student.generation_config, key, getattr(tokenizer, key))
    return student


def calibration_batches(tokenizer, pairs, size=4) -> list[dict]:
    """Prompt + response rows in padded batches, for choosing the student's layers."""
    from hf_distill.data import CausalLMCollator

    rows, collate = rows_of(tokenizer, pairs)["input_ids"], CausalLMCollator(tokenizer.pad_token_id)
    batches = [collate([{"input_ids": ids} for ids in rows[s : s + size]]) for s in range(0, len(rows), size)]
    return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]


class GenerateTimer:
    """Seconds spent in the models' `generate` while in the `with` block."""

    def __init__(self, *models):
        self.models, self.seconds = models, 0.0

    def __enter__(self):
        for model in self.models:
            original = model.generate

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            model.generate = timed
        return self

    def __exit__(self, *exc):
        for model in self.models:  # the instance attribute would be copied into the next student made from the teacher
            del model.generate


def run_arm(name, seed, teacher, tokenizer, bpe, pairs, held_out, calibration, args, out_dir, stage_one):
    """Train and score one arm. An arm `A/then_B` continues A's student (trained once per seed, kept in `stage_one`)
    for --continue-steps on the next training rows with B's settings; its time columns are that stage's alone."""
    settings = {**BASE, **ARMS[name]}
    after = settings.pop("after", None)
    own = settings.pop("tokenizer", None) == "bpe"
    if after is None:
        student = prune_depth_of(teacher, calibration, args)
        if own:
            student = retokenized(student, tokenizer, bpe)
        rows, steps = pairs, args.steps
    else:
        if (after, seed) not in stage_one:
            first = prune_depth_of(teacher, calibration, args)
            train_student(first, {**BASE, **ARMS[after]}, seed, teacher, tokenizer, pairs, args.steps, args, out_dir, after)
            stage_one[(after, seed)] = first
        student = copy.deepcopy(stage_one[(after, seed)])
        settings["learning_rate"] = args.continue_lr
        rows, steps = args.more_pairs, args.continue_steps
    student_tokenizer = bpe if own else tokenizer
    seconds, generation, logs = train_student(student, settings, seed, teacher, student_tokenizer, rows, steps, args,
                                              out_dir, name, teacher_tokenizer=tokenizer if own else None)
    return {
        "arm": name, "seed": seed, "settings": settings, "tokenizer": "bpe" if own else "teacher's",
        **score(student, student_tokenizer, held_out, args.max_new_tokens),
        "s_per_step": seconds / steps, "gen_s_per_step": generation / steps,
        "steps": steps, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        **({"after": after, "after_steps": args.steps} if after else {}),
        **{key: mean_of(logs, key) for key in ("on_policy_fraction", "aligned_fraction") if mean_of(logs, key) is not None},
    }


def prune_depth_of(teacher, calibration, args):
    from hf_distill.pruning import prune_depth

    return prune_depth(teacher, 10 if not args.quick else 2, calibration)


def train_student(student, settings, seed, teacher, student_tokenizer, pairs, steps, args, out_dir, name,
                  teacher_tokenizer=None):
    """Distil `student` in place; (seconds, seconds in `generate`, the loss logs)."""
    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    from hf_distill import DistillationConfig, DistillationTrainer

    hf_logging.set_verbosity_error()
    config = DistillationConfig(
        output_dir=str(out_dir / f"{name.replace('/', '_')}-seed{seed}-{os.getpid()}"), max_steps=steps,
        per_device_train_batch_size=args.batch, seed=seed, data_seed=seed, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_pin_memory=False,
        max_new_tokens=args.max_new_tokens, **settings,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_dict(rows_of(student_tokenizer, pairs)),
        processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer,
    )
    with GenerateTimer(student, teacher) as timer:
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return seconds, timer.seconds, [entry for entry in trainer.state.log_history if "loss" in entry]


def mean_of(logs, key):
    values = [entry[key] for entry in logs if key in entry]
    return sum(values) / len(values) if values else None


METRICS = ("nll_teacher", "bpc_teacher", "bpc_ref", "chrf_teacher", "chrf_ref", "s_per_step", "gen_s_per_step")


def averaged(rows) -> list[dict]:
    """One row per arm: each metric's mean over the arm's seeds, in the order the arms first appear."""
    arms = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    return [{**runs[0], "seed": ",".join(str(r["seed"]) for r in runs),
             **{key: sum(r[key] for r in runs) / len(runs) for key in METRICS}} for runs in arms.values()]


def print_table(rows):
    teacher = rows[0]["teacher"]
    print("\n| arm | seeds | tokenizer | nll teacher text (nats/token) | bpc teacher text | bpc true text | "
          "chrF vs teacher | chrF vs truth | s/step | generate s/step |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['seed']} | {r['tokenizer']} | {r['nll_teacher']:.3f} | {r['bpc_teacher']:.3f} | "
              f"{r['bpc_ref']:.3f} | {r['chrf_teacher']:.1f} | {r['chrf_ref']:.1f} | {r['s_per_step']:.2f} | "
              f"{r['gen_s_per_step']:.2f} |")
    print(f"| teacher | | | {teacher['nll_teacher']:.3f} | {teacher['bpc_teacher']:.3f} | {teacher['bpc_ref']:.3f} | "
          f"100 | {teacher['chrf_ref']:.1f} | | |")


def main():
    args = parse_args()
    if args.list:
        for name, settings in ARMS.items():
            print(f"{name:24s} {settings}")
        return
    if args.table:
        rows = [json.loads(line) for line in open(args.out, encoding="utf-8")]
        print_table(rows)
        if len({r["seed"] for r in rows}) > 1:
            print("\nMean over seeds:")
            print_table(averaged(rows))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.steps, args.continue_steps, args.batch, args.heldout, args.max_new_tokens, args.bpe_vocab = 3, 2, 4, 8, 6, 600
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; --list shows them")

    from hf_distill.runner.scratch import train_bpe_tokenizer

    teacher, tokenizer = load_teacher(args)
    teacher.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    verses = english_verses()
    train_verses, held_verses = verses[:-HELD_OUT_VERSES], verses[-HELD_OUT_VERSES:][: args.heldout]
    pairs = [split_verse(v) for v in train_verses[: args.steps * args.batch]]  # exactly the rows the runs see
    seen = args.steps * args.batch  # the second stage of `A/then_B` arms reads the rows after those
    args.more_pairs = [split_verse(v) for v in train_verses[seen : seen + args.continue_steps * args.batch]]
    bpe = train_bpe_tokenizer(train_verses, vocab_size=args.bpe_vocab) if any(ARMS[a].get("tokenizer") for a in arms) else None
    calibration = calibration_batches(tokenizer, pairs[:16])

    start = time.perf_counter()
    prompts, references = zip(*(split_verse(v) for v in held_verses))
    continuations = greedy(teacher, tokenizer, list(prompts), args.max_new_tokens)
    held_out = [dict(prompt=p, reference=r, teacher=c) for p, r, c in zip(prompts, references, continuations)]
    reference = score(teacher, tokenizer, held_out, args.max_new_tokens, outputs=continuations)
    print(f"teacher continuations of {len(held_out)} held-out prompts in {time.perf_counter() - start:.0f} s: "
          f"{json.dumps(reference)}", flush=True)

    out_dir = HERE / "results" / "policy_runs"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows, stage_one = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in arms:
            row = run_arm(name, seed, teacher, tokenizer, bpe, pairs, held_out, calibration, args, out_dir, stage_one)
            row["teacher"] = reference
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
