#!/usr/bin/env python
"""A teacher served by vLLM (its CPU build) against the same teacher in the training process, on this machine.

    python benchmarks/bench_served.py                 # the REAL SmolLM2-135M-Instruct teacher, ~15 min on 2 cores
    python benchmarks/bench_served.py --quick         # RANDOM tiny teacher: a smoke test of the script

Needs vLLM's CPU build in .vllm-venv/ (docs/served_teacher.md; `.ci/run` installs it) or --vllm-python.
Teacher: SmolLM2-135M-Instruct (REAL, float32, benchmarks/export_smollm2.py), served by vLLM with --dtype float32.
Student: the teacher's architecture with STUDENT_LAYERS layers, random init (the step's cost is what counts here).
Data: KJV English (recipes/data/bible_en_es.jsonl) tokenized as one stream, cut into rows of SEQ tokens.

Each arm runs in its own process (its peak RSS is its own), one at a time; a server is up only when a chosen arm
asks it (then it idles while the others run):
1. `cache-local`: `build_cache` with the teacher loaded here, top-k K, over ROWS rows: tokens/s.
   `cache-served`: `build_cache` from the server at the same K: tokens/s. Both after one warm-up batch.
2. `train-cached`: STEPS steps from the cache of 1 (forward_kl, alpha 0.5); `train-served`: the same steps with the
   targets asked from the server (dataloader_num_workers 1: the next batches' requests run during the step);
   `train-live`: the same steps with the teacher in the process. Median s/step (wall time from one step's end to the
   next's, so waiting for batches counts) after 2 warm-up steps, and the process's peak RSS.
3. `generate-hf`: the teacher's greedy answers to BATCH prompts of 32 tokens, NEW tokens each, with HF `generate`;
   `generate-served`: the same through the server. Generated tokens/s, after one warm-up call.
4. With the teacher's server stopped and a second one started on the student (VLLM_SERVER_DEV_MODE=1):
   `onpolicy-hf`: STEPS on-policy steps (lmbda 1, alpha 1, the teacher in the process scoring) on BATCH prompts of 32
   tokens, the student sampling NEW tokens with HF `generate`; `onpolicy-vllm`: the same with `use_vllm`, the
   student's weights sent to its server before every step. Median s/step after 2 warm-up steps, and the KD losses.
5. With a third server on the student that takes LoRA adapters at run time (--enable-lora): a LoRA student (rank 16
   on every attention and MLP projection, adapters moved off zero) is sent to it STEPS times, `sync-merged` with its
   adapters merged into whole weights (what `use_vllm` sends by default), `sync-adapters` its adapters alone
   (`vllm_sync_adapters`). Median seconds per send (save + the server's reload), and the bytes written.
6. With no server: `generate-colocate`, the teacher's answers of 3. from a vLLM engine inside the arm's process, and
   `onpolicy-colocate`, the steps of 4. with `use_vllm` and `vllm_mode="colocate"` (the student's engine in the
   training process, handed its weights in memory every step). These run with --vllm-python, where vLLM imports (and
   hf_distill is installed: `.ci/run` does it).
Ratios are printed side by side; rows append to benchmarks/results/served.jsonl. By default the server and the
trainer share the machine's cores, so the served step pays for the teacher's forward on them too; `--server-cpus 0
--trainer-cpus 1 --threads 1` gives each a core of its own, as a server on its own GPU would have.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO / "recipes" / "data" / "bible_en_es.jsonl"
DEFAULT_MODEL_DIR = HERE / ".models" / "smollm2-135m-instruct"
RESULTS = HERE / "results" / "served.jsonl"
ARMS = ("cache-local", "cache-served", "train-cached", "train-served", "train-live", "generate-hf", "generate-served")
ROLLOUT_ARMS = ("onpolicy-hf", "onpolicy-vllm")  # with a second server, holding the student
SYNC_ARMS = ("sync-merged", "sync-adapters")  # with a third, holding the student and taking LoRA adapters
SERVED = {"cache-served", "train-served", "generate-served", "onpolicy-vllm", *SYNC_ARMS}  # the arms that ask a server
COLOCATE_ARMS = ("generate-colocate", "onpolicy-colocate")  # vLLM inside the arm's process: run by --vllm-python


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--vllm-python", default=str(REPO / ".vllm-venv" / "bin" / "python"))
    parser.add_argument("--rows", type=int, default=64, help="rows cached")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--new", type=int, default=64, help="generated tokens per prompt")
    parser.add_argument("--threads", type=int, default=2, help="the training process's torch threads")
    parser.add_argument("--trainer-cpus", help="cores of each arm's process, e.g. 1 (default: any)")
    parser.add_argument("--server-cpus", help="cores of the vLLM servers, e.g. 0 (default: vLLM's own binding)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arm", choices=ARMS + ROLLOUT_ARMS + SYNC_ARMS + COLOCATE_ARMS, help=argparse.SUPPRESS)  # one arm, in a child process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--arms", default=",".join(ARMS + ROLLOUT_ARMS + SYNC_ARMS + COLOCATE_ARMS),
                        help="the arms to run (ratios need pairs)")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


# ---- inside one arm's process ------------------------------------------------------------------------


def rows(tokenizer, count, seq):
    from datasets import Dataset

    ids = []
    with open(DATA, encoding="utf-8") as handle:
        for line in handle:
            ids += tokenizer(json.loads(line)["translation"]["en"] + "\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= count * seq:
                break
    blocks = [ids[i * seq:(i + 1) * seq] for i in range(count)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * seq] * count, "labels": blocks})


def cpu_list(text: str) -> list[int]:
    return [int(core) for core in text.split(",")]


def student(teacher_dir, layers):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def step_timer():
    """A callback keeping the wall time between successive optimizer steps' ends (its `times`): fetching the step's
    batches (waiting for a server's answers, generating) happens before `on_step_begin`, so it is counted this way."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepTimes()


def run_arm(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.cache import build_cache
    from hf_distill.served import TeacherServer

    if args.trainer_cpus:
        os.sched_setaffinity(0, cpu_list(args.trainer_cpus))
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    work = Path(args.work)
    data = rows(tokenizer, args.rows, args.seq)
    server = TeacherServer(args.url, "teacher", top_k=args.top_k) if args.url else None
    arm = args.arm
    result = {"arm": arm}
    if arm.startswith("cache"):
        teacher = server if arm == "cache-served" else AutoModelForCausalLM.from_pretrained(args.model_dir)
        if server:
            server.check(tokenizer, args.seq)
        build_cache(teacher, data.select(range(args.batch)), tokenizer, work / f"{arm}-warm-up", top_k=args.top_k,
                    batch_size=args.batch)  # first shapes: compilation and allocation, not counted
        start = time.perf_counter()
        build_cache(teacher, data, tokenizer, work / arm, top_k=args.top_k, batch_size=args.batch)
        seconds = time.perf_counter() - start
        result.update(tokens_per_s=args.rows * (args.seq - 1) / seconds, seconds=seconds)
    elif arm.startswith("onpolicy"):
        times = step_timer()
        prompts = [row[:32] for row in data["input_ids"][: args.batch * args.steps]]
        from datasets import Dataset

        rows_ = Dataset.from_dict({"input_ids": prompts, "attention_mask": [[1] * 32] * len(prompts),
                                   "labels": [[-100] * 32] * len(prompts)})
        settings = dict(output_dir=str(work / f"{arm}-run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                        learning_rate=1e-4, alpha=1.0, lmbda=1.0, max_new_tokens=args.new, report_to=[],
                        save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                        dataloader_pin_memory=False, seed=0)
        if arm == "onpolicy-vllm":
            settings.update(use_vllm=True, vllm_server_base_url=args.url)
        elif arm == "onpolicy-colocate":
            settings.update(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=32 + args.new + 8)
        trainer = DistillationTrainer(model=student(args.model_dir, args.student_layers),
                                      teacher_model=AutoModelForCausalLM.from_pretrained(args.model_dir),
                                      args=DistillationConfig(**settings), train_dataset=rows_,
                                      processing_class=tokenizer, callbacks=[times])
        trainer.train()
        kd = [log["kd_loss"] for log in trainer.state.log_history if "kd_loss" in log]
        result.update(s_per_step=statistics.median(times.times[2:]), step_times=times.times, kd_loss=kd)
    elif arm.startswith("sync"):
        from peft import LoraConfig, get_peft_model

        from hf_distill.served import RolloutServer

        model = get_peft_model(student(args.model_dir, args.student_layers), LoraConfig(
            r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.01)
        rollouts = RolloutServer(args.url, "student", sync_adapters=arm == "sync-adapters")
        rollouts.check(tokenizer)
        folder, seconds = work / arm, []
        for _ in range(args.steps + 1):  # the first send is a warm-up, not counted
            start = time.perf_counter()
            rollouts.push_weights(model, str(folder))
            seconds.append(time.perf_counter() - start)
        written = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        result.update(s_per_sync=statistics.median(seconds[1:]), sync_times=seconds, mb_written=written / 2**20)
    elif arm.startswith("train"):
        times = step_timer()
        settings = dict(output_dir=str(work / f"{arm}-run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                        learning_rate=1e-4, alpha=0.5, report_to=[], save_strategy="no", logging_steps=1,
                        use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
        teacher = None
        if arm == "train-cached":
            settings["teacher_cache"] = str(work / "cache-local")
        elif arm == "train-served":
            settings.update(teacher_server_url=args.url, teacher_server_model="teacher", teacher_server_top_k=args.top_k)
        else:
            teacher = AutoModelForCausalLM.from_pretrained(args.model_dir)
        trainer = DistillationTrainer(model=student(args.model_dir, args.student_layers), teacher_model=teacher,
                                      args=DistillationConfig(**settings), train_dataset=data, processing_class=tokenizer,
                                      callbacks=[times])
        trainer.train()
        kd = [log["kd_loss"] for log in trainer.state.log_history if "kd_loss" in log]
        result.update(s_per_step=statistics.median(times.times[2:]), step_times=times.times, kd_loss=kd)
    else:
        prompts = [row[:32] for row in data["input_ids"][: args.batch]]
        if arm == "generate-served":
            server.check(tokenizer, 32 + args.new)

            def generate():
                return server.generate(prompts, args.new, greedy=True)
        elif arm == "generate-colocate":
            from hf_distill.colocated import ColocatedRollouts

            engine = ColocatedRollouts(AutoModelForCausalLM.from_pretrained(args.model_dir), tokenizer,
                                       str(work / "colocated-teacher"), 32 + args.new + 8)

            def generate():
                return engine.generate(prompts, args.new, greedy=True)
        else:
            teacher = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()

            def generate():
                with torch.no_grad():
                    output = teacher.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), 32, dtype=torch.long),
                                              max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                              pad_token_id=tokenizer.pad_token_id)
                return output[:, 32:].tolist()
        generate()  # warm-up, not counted
        start = time.perf_counter()
        answers = generate()
        seconds = time.perf_counter() - start
        result.update(tokens_per_s=sum(map(len, answers)) / seconds, seconds=seconds,
                      generated=sum(map(len, answers)))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ---- the driver ----------------------------------------------------------------------------------------


def main():
    args = parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args)))
        return
    from hf_distill.served import LocalVLLMServer

    if args.quick:
        args = quick_setup(args)
    elif not Path(args.model_dir).exists():
        subprocess.run([sys.executable, str(HERE / "export_smollm2.py"), args.model_dir], check=True)
    if not Path(args.vllm_python).exists():
        sys.exit(f"vLLM is not installed at {args.vllm_python}: see docs/served_teacher.md")
    work = Path(tempfile.mkdtemp(prefix="bench_served_"))
    chosen = args.arms.split(",")
    if "train-cached" in chosen and "cache-local" not in chosen:
        sys.exit("--arms: train-cached trains from cache-local's cache; run both")
    results = {}
    cpus = cpu_list(args.server_cpus) if args.server_cpus else None
    log = work / "vllm.log"
    started = time.perf_counter()

    def server_for(group, *args_, **kwargs):
        """A server for `group`'s chosen arms, started only when one of them asks it (the in-process arms run with
        no server beside them)."""
        if not SERVED.intersection(group, chosen):
            return contextlib.nullcontext()
        return LocalVLLMServer(args.vllm_python, *args_, cpus=cpus, **kwargs)

    def run_group(group, server):
        for arm in group:
            if arm in chosen:
                results[arm] = run_child(args, arm, server.url if arm in SERVED else None, work)

    if any(arm in chosen for arm in ARMS):
        with server_for(ARMS, args.model_dir, name="teacher", max_logprobs=max(args.top_k, 20),
                        max_model_len=max(args.seq, 32 + args.new) + 8, log_file=str(log)) as server:
            if server is not None:
                print(f"vLLM ready at {server.url} after {time.perf_counter() - started:.0f} s (log: {log})", flush=True)
            run_group(ARMS, server)
    if any(arm in chosen for arm in ROLLOUT_ARMS):
        student_dir = work / "student"
        save_student(args, student_dir)
        with server_for(ROLLOUT_ARMS, str(student_dir), name="student", max_model_len=32 + args.new + 8,
                        log_file=str(work / "vllm-student.log"), env={"VLLM_SERVER_DEV_MODE": "1"}) as server:
            run_group(ROLLOUT_ARMS, server)
    if any(arm in chosen for arm in SYNC_ARMS):
        student_dir = work / "student"
        save_student(args, student_dir)
        with server_for(SYNC_ARMS, str(student_dir), name="student", max_model_len=32 + args.new + 8,
                        log_file=str(work / "vllm-lora.log"), extra_args=("--enable-lora", "--max-lora-rank", "16"),
                        env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as server:
            run_group(SYNC_ARMS, server)
    for arm in COLOCATE_ARMS:
        if arm in chosen:
            results[arm] = run_child(args, arm, None, work, python=args.vllm_python)
    pairs = {
        "served_step_over_cached_step": ("train-served", "train-cached", "s_per_step"),
        "served_step_over_live_step": ("train-served", "train-live", "s_per_step"),
        "cache_served_over_local_tokens_per_s": ("cache-served", "cache-local", "tokens_per_s"),
        "generate_served_over_hf_tokens_per_s": ("generate-served", "generate-hf", "tokens_per_s"),
        "onpolicy_vllm_step_over_hf_step": ("onpolicy-vllm", "onpolicy-hf", "s_per_step"),
        "generate_colocate_over_hf_tokens_per_s": ("generate-colocate", "generate-hf", "tokens_per_s"),
        "onpolicy_colocate_step_over_hf_step": ("onpolicy-colocate", "onpolicy-hf", "s_per_step"),
        "sync_adapters_over_merged_seconds": ("sync-adapters", "sync-merged", "s_per_sync"),
    }
    ratios = {name: results[a][key] / results[b][key] for name, (a, b, key) in pairs.items()
              if a in results and b in results}
    if "train-live" in results and "train-served" in results:
        ratios["rss_live_minus_served_mb"] = results["train-live"]["peak_rss_mb"] - results["train-served"]["peak_rss_mb"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    paths = ("model_dir", "vllm_python")  # kept relative to the repository, not this machine's absolute paths
    settings = {k: (os.path.relpath(v, REPO) if k in paths else v) for k, v in vars(args).items()
                if k not in ("arm", "url", "work", "out")}
    row = {"settings": settings,
           "results": results, "ratios": ratios, "time": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def run_child(args, arm: str, url: str | None, work: Path, python: str = sys.executable) -> dict:
    command = [python, __file__, "--arm", arm, *(["--url", url] if url else []), "--work", str(work),
               "--model-dir", args.model_dir, "--rows", str(args.rows), "--seq", str(args.seq),
               "--batch", str(args.batch), "--steps", str(args.steps), "--top-k", str(args.top_k),
               "--student-layers", str(args.student_layers), "--new", str(args.new), "--threads", str(args.threads)]
    if args.trainer_cpus:
        command += ["--trainer-cpus", args.trainer_cpus]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(arm, {k: v for k, v in result.items() if k not in ("step_times", "kd_loss", "sync_times")}, flush=True)
    return result


def save_student(args, folder: Path) -> None:
    """The on-policy arms' starting student (the same seed as in the arms), for its vLLM server."""
    from transformers import AutoTokenizer

    student(args.model_dir, args.student_layers).save_pretrained(folder)
    AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(folder)


def quick_setup(args):
    """A RANDOM tiny teacher with a BPE tokenizer, saved to a temporary folder."""
    from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench_served_tiny_"))
    with open(DATA, encoding="utf-8") as handle:
        lines = [json.loads(line)["translation"]["en"] for _, line in zip(range(400), handle)]
    tokenizer = train_bpe_tokenizer(lines, vocab_size=384)
    small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=0, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args.model_dir, args.rows, args.steps, args.new, args.student_layers = str(folder), 16, 4, 16, 1
    args.out = str(Path(tempfile.gettempdir()) / "bench_served_quick.jsonl")
    return args


if __name__ == "__main__":
    main()
