#!/usr/bin/env python
"""hf_distill DistillationTrainer vs TRL GKDTrainer: training throughput and memory at a large vocabulary.

    python benchmarks/bench_vs_trl.py            # defaults: vocab 49152 and 65536, a few minutes on 2 CPU cores
    python benchmarks/bench_vs_trl.py --quick    # tiny sizes, a smoke test

Both trainers distill the same RANDOM Llama-architecture teacher (4 layers × 512) into the same RANDOM
student (2 × 256) — identical weights, rebuilt from the same seeds in every process — with the same loss:
generalized JSD, beta = 0.5, temperature 1, no CE blend (hf_distill alpha = 1; GKD has none), no on-policy
generation (GKD lmbda = 0, seq_kd off), same optimizer (Trainer default fused AdamW, lr 1e-4, same
schedule and clipping), float32, bf16=False and gradient_checkpointing=False for TRL (CPU).

Data: REAL English→Spanish Bible verse pairs (recipes/data/bible_en_es.jsonl) as chat `messages`
(user: English, assistant: Spanish), tokenized with a byte-level BPE tokenizer trained on that text
(`hf_distill.runner.scratch.train_bpe_tokenizer`) plus a small chat template. GKD tokenizes the `messages`
itself with its own collator (DataCollatorForChatML, max_length = SEQ: prompt masked, left truncation);
hf_distill gets exactly the token ids and labels that collator produced, as a pre-tokenized dataset.
Rows are exactly SEQ tokens long (no padding) and read in order (sequential sampler), so both trainers
see the same tokens step by step: the script checks each step's token hash and target count.

hf_distill runs twice: with its defaults, and with `compile_loss=True` (the chunk math fused by
torch.compile; `--no-compile` leaves that variant out).

Measurement: each (trainer, vocab, repetition) runs in its own fresh subprocess, alternating
hf_distill, hf_distill+compile, TRL, hf_distill, ... per vocab.
- Target tokens per second: target tokens of a step / median step time over the steps after `--warmup`;
  a step's time is the wall time between consecutive `on_step_end` callbacks (everything the Trainer does).
- Peak memory growth: after models and trainer are built, the heap is trimmed and the kernel's peak-RSS
  counter reset (/proc/self/clear_refs); growth = VmHWM at the end of training − VmRSS at that point.
  It includes what both trainers hold alike (gradients and AdamW state of the student). "Step peak" is
  the same measure over the measured steps only (reset after warm-up): the transient memory of a step.
Sanity: one more subprocess builds both trainers on the same models and computes both losses on the first
batch before any update; they must agree.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "recipes", "data", "bible_en_es.jsonl")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TARGET_SPEED = 2.0
TARGET_MEMORY = 0.3
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# Shared by parent and workers
# ---------------------------------------------------------------------------------------------------------


def model_pair(vocab: int, teacher: str, student: str):
    from hf_distill.runner.scratch import small_llama

    t_layers, t_hidden = map(int, teacher.split("x"))
    s_layers, s_hidden = map(int, student.split("x"))
    return (small_llama(vocab, t_hidden, t_layers, seed=1).eval(), small_llama(vocab, s_hidden, s_layers, seed=2))


def status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> int:
    """Trim the heap, reset VmHWM, return the resident bytes now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_kib("VmRSS") * 1024


def make_trainer(kind: str, job: dict, teacher, student, tokenizer, callbacks=()):
    """A Trainer of `kind` ('hf_distill' or 'trl') on the job's data, with a per-step input recorder."""
    from datasets import Dataset

    common = dict(
        output_dir=job["out_dir"],
        per_device_train_batch_size=job["batch"],
        max_steps=job["warmup"] + job["steps"],
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        train_sampling_strategy="sequential",
        seed=0,
    )
    with open(job["data"]) as handle:
        rows = json.load(handle)

    def record(trainer, inputs):
        ids = inputs["input_ids"].cpu().numpy().astype("int64")
        trainer.seen.append((hashlib.sha1(ids.tobytes()).hexdigest()[:12], int((inputs["labels"][:, 1:] != -100).sum())))

    if kind.startswith("hf_distill"):
        from hf_distill import DistillationConfig, DistillationTrainer

        class Recording(DistillationTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                record(self, inputs)
                return super().training_step(model, inputs, num_items_in_batch)

        args = DistillationConfig(**common, alpha=1.0, loss_type="jsd", beta=0.5, temperature=1.0,
                                  compile_loss=kind == "hf_distill+compile")
        dataset = Dataset.from_list([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
        trainer = Recording(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=list(callbacks))
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class Recording(GKDTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                record(self, inputs)
                return super().training_step(model, inputs, num_items_in_batch)

        args = GKDConfig(**common, lmbda=0.0, beta=0.5, temperature=1.0, seq_kd=False, max_length=job["seq"],
                         bf16=False, gradient_checkpointing=False)
        dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        trainer = Recording(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=list(callbacks))
    trainer.seen = []
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


# ---------------------------------------------------------------------------------------------------------
# Worker: one trainer, one vocab, one repetition
# ---------------------------------------------------------------------------------------------------------


def worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    import transformers
    from transformers import AutoTokenizer, TrainerCallback

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])

    if job["mode"] == "sanity":
        losses = {}
        first = None
        for kind in ("hf_distill", "trl"):
            teacher, student = model_pair(job["vocab"], job["teacher"], job["student"])
            trainer = make_trainer(kind, job, teacher, student, tokenizer)
            batch = next(iter(trainer.get_train_dataloader()))
            batch = trainer._prepare_inputs(batch)
            ids = batch["input_ids"]
            first = ids if first is None else first
            count = (batch["labels"][:, 1:] != -100).sum()
            with torch.no_grad():
                if kind == "hf_distill":
                    loss = trainer.compute_loss(trainer.model, batch)
                else:
                    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=count)
            losses[kind] = {"loss": float(loss), "targets": int(count), "same_ids": bool(torch.equal(first, ids))}
        return losses

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.mark)
            if len(self.times) == job["warmup"]:
                self.after_warmup = reset_peak()
            self.mark = time.perf_counter()

    teacher, student = model_pair(job["vocab"], job["teacher"], job["student"])
    timer = StepTimer()
    trainer = make_trainer(job["kind"], job, teacher, student, tokenizer, [timer])
    optimizer_info = str(trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model))
    base = reset_peak()
    trainer.train()
    peak = status_kib("VmHWM") * 1024
    measured = timer.times[job["warmup"]:]
    return {
        "kind": job["kind"],
        "vocab": job["vocab"],
        "step_s": statistics.median(measured),
        "all_steps_s": timer.times,
        "targets_per_step": [n for _, n in trainer.seen],
        "hashes": [h for h, _ in trainer.seen],
        "growth": peak - base,
        "step_peak": peak - timer.after_warmup,
        "rss_after_load": base,
        "optimizer": optimizer_info,
    }


def run_worker(job: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker failed: {job['mode']} {job.get('kind')} vocab {job['vocab']}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit("worker printed no result:\n" + proc.stdout[-4000:])


# ---------------------------------------------------------------------------------------------------------
# Parent: data, tokenizer, the interleaved runs, the table
# ---------------------------------------------------------------------------------------------------------


def build_data(tmp: str, seq: int, rows_needed: int, bpe_vocab: int):
    """Tokenizer (BPE on the bible text + chat template) and rows of exactly `seq` tokens with a prompt."""
    from trl.experimental.utils import DataCollatorForChatML

    from hf_distill.runner.scratch import train_bpe_tokenizer

    with open(DATA, encoding="utf-8") as handle:
        pairs = [json.loads(line)["translation"] for line in handle]
    tokenizer = train_bpe_tokenizer([p["en"] for p in pairs] + [p["es"] for p in pairs], vocab_size=bpe_vocab)
    tokenizer.chat_template = CHAT_TEMPLATE
    tok_dir = os.path.join(tmp, "tokenizer")
    tokenizer.save_pretrained(tok_dir)

    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=seq)
    rows, index = [], 0
    while len(rows) < rows_needed and index < len(pairs):
        en, es = [], []
        while index < len(pairs) and len(tokenizer(" ".join(en + es))["input_ids"]) < seq + 24:
            en.append(pairs[index]["en"])
            es.append(pairs[index]["es"])
            index += 1
        messages = [{"role": "user", "content": "Translate to Spanish: " + " ".join(en)},
                    {"role": "assistant", "content": " ".join(es)}]
        try:
            out = collator([{"messages": messages}])
        except ValueError:
            continue  # the completion alone filled the window
        prompt = int(out["prompt_attention_mask"].sum())
        if out["input_ids"].shape[1] != seq or prompt < 8:
            continue
        rows.append({"messages": messages, "input_ids": out["input_ids"][0].tolist(),
                     "attention_mask": out["attention_mask"][0].tolist(), "labels": out["labels"][0].tolist()})
    if len(rows) < rows_needed:
        raise SystemExit(f"only {len(rows)} rows of {seq} tokens could be built; lower --batch/--steps")
    data_path = os.path.join(tmp, "rows.json")
    with open(data_path, "w") as handle:
        json.dump(rows, handle)
    targets = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows) / len(rows)
    return tok_dir, data_path, len(tokenizer), targets


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--vocabs", default="49152,65536", help="comma-separated model vocabulary sizes")
    parser.add_argument("--teacher", default="4x512", help="teacher LAYERSxHIDDEN")
    parser.add_argument("--student", default="2x256", help="student LAYERSxHIDDEN")
    parser.add_argument("--batch", default="8x128", help="BATCHxSEQ")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per subprocess")
    parser.add_argument("--warmup", type=int, default=1, help="discarded steps per subprocess")
    parser.add_argument("--reps", type=int, default=2, help="subprocesses per (trainer, vocab), interleaved")
    parser.add_argument("--bpe-vocab", type=int, default=8000, help="size of the BPE tokenizer trained on the text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile_loss=True variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.vocabs, args.teacher, args.student, args.batch = "4096", "2x64", "1x32", "2x64"
        args.steps, args.warmup, args.reps, args.bpe_vocab = 2, 1, 1, 1000
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print("load average at start (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())
    import transformers
    import trl

    print(f"machine: {platform.machine()} | python {platform.python_version()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | transformers {transformers.__version__} | trl {trl.__version__}")
    batch, seq = map(int, args.batch.split("x"))
    vocabs = [int(v) for v in args.vocabs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir, data_path, tok_size, mean_targets = build_data(tmp, seq, batch * (args.warmup + args.steps), args.bpe_vocab)
        print(f"models: RANDOM teacher {args.teacher} and student {args.student} (layers x hidden), float32; "
              f"data: REAL bible en->es chat rows, BPE tokenizer of {tok_size} tokens; batch {batch}x{seq}, "
              f"{mean_targets * batch:.0f} target tokens/step on average")
        print(f"loss: jsd beta=0.5 T=1, hf_distill alpha=1, GKD lmbda=0; {args.warmup} warm-up + {args.steps} measured "
              f"steps per subprocess, {args.reps} subprocess(es) per trainer and vocab, interleaved\n")
        job = dict(teacher=args.teacher, student=args.student, batch=batch, seq=seq, steps=args.steps,
                   warmup=args.warmup, threads=args.threads, tokenizer=tok_dir, data=data_path,
                   out_dir=os.path.join(tmp, "out"))

        kinds = ("hf_distill", "trl") if args.no_compile else ("hf_distill", "hf_distill+compile", "trl")
        sanity = run_worker(dict(job, mode="sanity", vocab=vocabs[0]))
        results = {}
        for vocab in vocabs:
            for rep in range(args.reps):
                for kind in kinds:
                    res = run_worker(dict(job, mode="train", kind=kind, vocab=vocab))
                    results.setdefault((vocab, kind), []).append(res)
                    print(f"  vocab {vocab} rep {rep} {kind:<18} median step {res['step_s']:.3f} s, "
                          f"growth {res['growth'] / MIB:.0f} MiB, step peak {res['step_peak'] / MIB:.0f} MiB", flush=True)

    print("\nsanity (vocab %d, RANDOM models, first batch, before any update):" % vocabs[0])
    h, t = sanity["hf_distill"], sanity["trl"]
    rel = abs(h["loss"] - t["loss"]) / max(abs(t["loss"]), 1e-12)
    print(f"  hf_distill loss {h['loss']:.6f} | GKDTrainer loss {t['loss']:.6f} | relative difference {rel:.2e} | "
          f"target tokens {h['targets']} vs {t['targets']} | same input_ids: {t['same_ids']}")

    print("\nRANDOM models, REAL text — hf_distill DistillationTrainer (A) vs TRL GKDTrainer (B)")
    print(f"{'vocab':>6} {'A':<18} {'A tok/s':>8} {'B tok/s':>8} {'A/B speed':>9} {'A growth MiB':>12} {'B growth MiB':>12} "
          f"{'A/B mem':>8} {'A step-peak':>11} {'B step-peak':>11} {'A/B':>6} {'same tokens':>11}")
    summary = []
    for vocab in vocabs:
        b_runs = results[(vocab, "trl")]
        for kind in kinds[:-1]:
            a_runs = results[(vocab, kind)]
            same = all(r["hashes"] == a_runs[0]["hashes"] and r["targets_per_step"] == a_runs[0]["targets_per_step"]
                       for r in a_runs + b_runs)
            targets = statistics.mean(a_runs[0]["targets_per_step"])
            a_tps = targets / statistics.median(r["step_s"] for r in a_runs)
            b_tps = targets / statistics.median(r["step_s"] for r in b_runs)
            a_mem = statistics.median(r["growth"] for r in a_runs)
            b_mem = statistics.median(r["growth"] for r in b_runs)
            a_step = statistics.median(r["step_peak"] for r in a_runs)
            b_step = statistics.median(r["step_peak"] for r in b_runs)
            summary.append((vocab, kind, a_tps / b_tps, a_mem / b_mem))
            print(f"{vocab:>6} {kind:<18} {a_tps:8.0f} {b_tps:8.0f} {a_tps / b_tps:9.2f} {a_mem / MIB:12.0f} "
                  f"{b_mem / MIB:12.0f} {a_mem / b_mem:8.2f} {a_step / MIB:11.0f} {b_step / MIB:11.0f} "
                  f"{a_step / b_step:6.2f} {str(same):>11}")
    print(f"\noptimizers: hf_distill {results[(vocabs[0], 'hf_distill')][0]['optimizer']}; "
          f"trl {results[(vocabs[0], 'trl')][0]['optimizer']}")
    for vocab, kind, speed, mem in summary:
        print(f"target at vocab {vocab} ({kind}): tokens/s ratio >= {TARGET_SPEED} -> {speed:.2f} "
              f"({'MET' if speed >= TARGET_SPEED else 'NOT MET'}); memory growth ratio <= {TARGET_MEMORY} -> {mem:.2f} "
              f"({'MET' if mem <= TARGET_MEMORY else 'NOT MET'})")

    print("load average at end (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
