#!/usr/bin/env python
"""Does the plain-text recipe carry over to text it was not tuned on? Three corpora, two teachers each.

    python benchmarks/bench_domains.py                                    # recipe vs twin, 3 domains x 2 regimes, seed 0
    python benchmarks/bench_domains.py --domains devil,jargon --regimes shipped --seeds 0,1,2
    python benchmarks/bench_domains.py --arms twin,recipe,cand --set cand:alpha=1.0   # a candidate setting
    python benchmarks/bench_domains.py --table                            # medians over seeds from --out

Teacher: SmolLM2-135M-Instruct (REAL, float32; benchmarks/export_smollm2.py), in two regimes:
- `shipped`: the teacher as it is (out of domain);
- `in_domain`: the teacher first fine-tuned on the domain's training split (one pass over at most
  --teacher-blocks blocks, AdamW lr 1e-4, warm-up 10, cosine, clip 1.0, batch 8), cached in benchmarks/.models/.
Data (benchmarks/corpora.py): KJV verses, The Devil's Dictionary, The Jargon File — public domain. Documents are
shuffled with random.Random(0); the last 12% are held out (never trained on, never used for calibration or the
teacher's fine-tuning). Each split is tokenized, joined with EOS and packed into 128-token blocks.
Student: 10 of the teacher's 30 layers, pruned from the regime's teacher by block influence on 16 training blocks
(the recipe's `student_num_layers`/`calibration_rows`). Arms:
- `twin`: the same student, data order and steps without a teacher (alpha 0, no hidden-state term) at the
  recipe's baseline_learning_rate (its own best, 1e-3; --set twin:learning_rate=... overrides); any arm named
  `twin...` is one (`--arms twin15,s15 --set twin15:student_num_layers=15 --set s15:student_num_layers=15`: another
  student depth, each arm compared with the twin of its own depth);
- `recipe`: the settings of recipes/lm_from_teacher.yaml, read from the file (what a user gets);
- any other name: the recipe's settings with --set ARM:KEY=VALUE on top.
Training: STEPS optimizer steps of 8 blocks (the recipe's max_steps by default, 120 x 8 x 128; 60 steps stay under
one epoch of every domain, longer runs may start another, where the twin overfits, which is why it is compared at
its best point), seed per run
(data order and init follow the seed, identical across arms of one seed). Held-out perplexity (64 blocks) is
measured every tenth of the run. Reported per domain and regime: teacher / twin / arm perplexity, gap closed =
(twin - arm) / (twin - teacher) with the twin at its BEST point of the run (n/a where that is below the teacher),
and steps-to-baseline = the fraction of the steps after which the arm's held-out perplexity first reaches the
twin's best (log-linear between points; "> 1" if never). Rows append to benchmarks/results/domains.jsonl;
--table prints medians over seeds [min, max].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import corpora  # noqa: E402
from bench_quality import DEFAULT_MODEL_DIR, blocks, load_teacher, perplexity  # noqa: E402

RECIPE = HERE.parent / "recipes" / "lm_from_teacher.yaml"
RESULTS = HERE / "results" / "domains.jsonl"
HELD_OUT_FRACTION = 0.12
CURVE_POINTS = 10


def recipe_file() -> dict:
    return yaml.safe_load(RECIPE.read_text())


def recipe_settings() -> dict:
    """The DistillationConfig fields that recipes/lm_from_teacher.yaml sets (not output, logging or data fields)."""
    from hf_distill import DistillationConfig

    recipe = recipe_file()
    names = {f.name for f in dataclasses.fields(DistillationConfig)}
    skip = {"output_dir", "teacher_model_name_or_path", "logging_steps", "save_strategy", "eval_strategy", "eval_steps", "report_to", "seed", "max_steps",
            "per_device_train_batch_size"}
    settings = {k: v for k, v in recipe.items() if k in names and k not in skip}
    settings["calibration_rows"] = recipe.get("calibration_rows", 16)
    settings["student_num_layers"] = recipe.get("student_num_layers", 10)
    return settings


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="exported SmolLM2 folder")
    parser.add_argument("--domains", default=",".join(corpora.DOMAINS))
    parser.add_argument("--regimes", default="shipped,in_domain")
    parser.add_argument("--arms", default="twin,recipe")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=recipe_file()["max_steps"],
                        help="optimizer steps of each run (default: the recipe's max_steps)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--heldout-blocks", type=int, default=64)
    parser.add_argument("--teacher-blocks", type=int, default=600, help="in_domain: blocks of the teacher's fine-tuning")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="ARM:KEY=VALUE")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--quick", action="store_true", help="RANDOM tiny teacher: a smoke test of the script")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args()


def is_twin(arm: str) -> bool:
    """A no-teacher twin: `twin`, or `twin15 --set twin15:student_num_layers=15` for another student."""
    return arm.startswith("twin")


def arm_settings(name: str, overrides: list[str]) -> dict:
    settings = recipe_settings()
    if is_twin(name):
        # Its own best learning rate, as the recipe's baseline trains: 1e-3 beat 2e-3 on all three domains (RESULTS §10).
        rate = recipe_file().get("baseline_learning_rate") or settings["learning_rate"]
        settings.update(alpha=0.0, hidden_loss_weight=0.0, attention_loss_weight=0.0, learning_rate=rate)
    for item in overrides:
        arm, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        if arm == name:
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
    return settings


def split_domain(domain, tokenizer, seq):
    docs = corpora.documents(domain)
    random.Random(0).shuffle(docs)
    cut = len(docs) - max(1, round(HELD_OUT_FRACTION * len(docs)))
    return blocks(tokenizer, docs[:cut], seq), blocks(tokenizer, docs[cut:], seq)


def in_domain_teacher(base, tokenizer, domain, train, args):
    """The teacher fine-tuned on the domain's training split, cached (one pass, plain loop)."""
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    folder = Path(args.model_dir).parent / f"{Path(args.model_dir).name}-{domain}-{args.teacher_blocks}"
    if (folder / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    import copy

    model = copy.deepcopy(base).train().requires_grad_(True)
    data = train.shuffle(seed=1234).select(range(min(args.teacher_blocks, len(train))))
    steps = len(data) // args.batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, 10, steps)
    torch.manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        ids = torch.tensor(data[step * args.batch : (step + 1) * args.batch]["input_ids"])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 10 == 0:
            print(f"  fine-tuning the {domain} teacher: step {step}/{steps} loss {loss.item():.3f}", flush=True)
    print(f"  fine-tuned in {time.perf_counter() - start:.0f} s", flush=True)
    model.eval().requires_grad_(False)
    if not args.quick:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model


class Curve:
    """Held-out perplexity at every tenth of the run (a TrainerCallback, built lazily to keep imports light)."""

    @staticmethod
    def callback(held_out, steps, points):
        from transformers import TrainerCallback

        marks = sorted({max(1, round(steps * i / CURVE_POINTS)) for i in range(1, CURVE_POINTS + 1)})

        class _Curve(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step in marks:
                    points.append((state.global_step, perplexity(model, held_out)))
                    model.train()

        return _Curve()


def run(name, seed, teacher, tokenizer, train, calibration_split, held_out, args, out_dir):
    from transformers.utils import logging as hf_logging

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.pruning import prune_depth

    hf_logging.set_verbosity_error()
    settings = arm_settings(name, args.set)
    num_layers = settings.pop("student_num_layers")
    num_layers = 2 if args.quick else num_layers
    rows = settings.pop("calibration_rows")
    calibration = [{"input_ids": torch.tensor(calibration_split[i : i + 4]["input_ids"])} for i in range(0, rows, 4)]
    student = prune_depth(teacher, num_layers, calibration)
    config = DistillationConfig(
        output_dir=str(out_dir / f"{name}-seed{seed}-{os.getpid()}"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, seed=seed, data_seed=seed, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_pin_memory=False, **settings,
    )
    points = []
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                                  processing_class=tokenizer, callbacks=[Curve.callback(held_out, args.steps, points)])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return {"arm": name, "seed": seed, "settings": settings, "layers": student.config.distill_source_layers,
            "curve": points, "ppl": points[-1][1], "s_per_step": seconds / args.steps, "steps": args.steps,
            "batch": args.batch, "seq": args.seq}


def steps_to(curve, target) -> float:
    """Fraction of the run after which the curve first reaches `target` (log-linear between points); inf if never."""
    steps = curve[-1][0]
    previous = (0, math.inf)
    for step, ppl in curve:
        if ppl <= target:
            if math.isinf(previous[1]):
                return step / steps
            (s0, p0), (s1, p1) = previous, (step, ppl)
            frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
            return (s0 + frac * (s1 - s0)) / steps
        previous = (step, ppl)
    return math.inf


def main():
    args = parse_args()
    if args.table:
        print_table([json.loads(line) for line in open(args.out, encoding="utf-8")])
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.steps, args.batch, args.seq, args.heldout_blocks, args.teacher_blocks = 4, 2, 32, 4, 8
    base, tokenizer = load_teacher(args)
    base.eval().requires_grad_(False)
    out_dir = HERE / "results" / "quality_runs"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for domain in args.domains.split(","):
        train, held_out = split_domain(domain, tokenizer, args.seq)
        held_out = held_out.select(range(min(args.heldout_blocks, len(held_out))))
        used = min(args.steps * args.batch, len(train))
        if args.steps * args.batch > len(train):  # the Trainer starts another epoch; the twin's best point still counts
            print(f"{domain}: {args.steps * args.batch / len(train):.1f} epochs of its {len(train)} training blocks",
                  flush=True)
        for regime in args.regimes.split(","):
            teacher = base if regime == "shipped" else in_domain_teacher(base, tokenizer, domain, train, args)
            teacher_ppl = perplexity(teacher, held_out)
            print(f"{domain}/{regime}: teacher held-out ppl {teacher_ppl:.2f}; {len(train)} training blocks, "
                  f"{len(held_out)} held out", flush=True)
            for seed in [int(s) for s in args.seeds.split(",")]:
                for name in args.arms.split(","):
                    row = run(name, seed, teacher, tokenizer, train.select(range(used)), train, held_out, args, out_dir)
                    row.update(domain=domain, regime=regime, teacher_ppl=teacher_ppl, train_blocks=len(train))
                    print(json.dumps(row), flush=True)
                    with open(args.out, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")


def print_table(rows):
    """Per domain, regime and arm: medians over seeds [min, max] of ppl, gap closed and steps-to-baseline."""
    # Each arm against the no-teacher twin of the same student (depth), data, seed and budget.
    key = lambda r: (r["domain"], r["regime"], r["seed"], r["steps"], len(r["layers"]))  # noqa: E731
    twins = {key(r): r for r in rows if is_twin(r["arm"])}
    groups = {}
    for r in rows:
        twin = twins.get(key(r))
        if is_twin(r["arm"]) or twin is None:
            continue
        best = min(p for _, p in twin["curve"])
        groups.setdefault((r["domain"], r["regime"], r["arm"], r["steps"]), []).append({
            "teacher": r["teacher_ppl"], "twin": best, "ppl": r["ppl"],
            # No gap to close where the twin ends below the teacher (a teacher far from the text, a long budget)
            "closed": 100 * (best - r["ppl"]) / (best - r["teacher_ppl"]) if best > r["teacher_ppl"] else math.nan,
            "to_base": steps_to(r["curve"], best),
            "wins": r["ppl"] < best, "seed": r["seed"],
        })

    def spread(values, fmt):
        kept = sorted(v for v in values if not math.isnan(v))
        if not kept:
            return "n/a (twin < teacher)"
        text = fmt(statistics.median(kept))
        text = text if len(kept) == 1 else f"{text} [{fmt(kept[0])}, {fmt(kept[-1])}]"
        return text if len(kept) == len(values) else f"{text} (n/a in {len(values) - len(kept)} of {len(values)} seeds)"

    number = lambda v: "never" if math.isinf(v) else f"{v:.2f}"  # noqa: E731
    print("| domain | regime | arm | steps | seeds | teacher ppl | twin ppl (best) | arm ppl | gap closed | "
          "steps-to-baseline | beats twin |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for (domain, regime, arm, steps), runs in sorted(groups.items()):
        print(f"| {domain} | {regime} | {arm} | {steps} | {','.join(str(r['seed']) for r in runs)} | "
              f"{spread([r['teacher'] for r in runs], '{:.1f}'.format)} | {spread([r['twin'] for r in runs], '{:.1f}'.format)} | "
              f"{spread([r['ppl'] for r in runs], '{:.1f}'.format)} | {spread([r['closed'] for r in runs], '{:.0f}%'.format)} | "
              f"{spread([r['to_base'] for r in runs], number)} | {sum(r['wins'] for r in runs)}/{len(runs)} |")


if __name__ == "__main__":
    main()
