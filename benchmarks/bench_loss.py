#!/usr/bin/env python
"""Naive vs chunked distillation loss step: wall time and peak memory of forward + backward.

The step differentiates the blended objective (alpha·forward-KL + (1−alpha)·CE, every position a
target) with respect to the student's final hidden states h_s (BT, D) and its head weight W_s (V, D):

- naive:   logits_s = F.linear(h_s, W_s); logits_t = F.linear(h_t, W_t) under no_grad;
           hf_distill.loss.blended_loss on the full (BT, V) logits; backward.
- chunked: hf_distill.loss.chunked_blended_loss(h_s, W_s, None, TeacherHidden(h_t, teacher_head), ...); backward.

All inputs are random tensors (no real model is loaded). Run `python benchmarks/bench_loss.py --help`.

Measurement
- Each configuration runs in its own fresh subprocess (one at a time, so a huge naive step never
  shares RAM with another run). Inside it the inputs are allocated once, both variants are warmed
  up on tiny shapes, then measured steps alternate naive, chunked, naive, chunked, ...
- Time: wall clock of one forward + backward (CUDA: synchronized before and after).
- Memory, CPU: extra resident memory of the step beyond the inputs. Before each step the gradients
  of the previous step are dropped, garbage is collected and glibc's free heap pages are returned
  to the OS (malloc_trim); the kernel's peak-RSS counter is then reset (write "5" to
  /proc/self/clear_refs), and the step's peak is VmHWM − VmRSS (both read from /proc/self/status).
  VmHWM is maintained by the kernel at page granularity, so no short-lived peak is missed. Where
  that is unavailable a psutil sampling thread (1 ms) is used instead and the output says so.
- Memory, CUDA: torch.cuda.max_memory_allocated() − memory_allocated() before the step, after
  torch.cuda.reset_peak_memory_stats().
- Both figures include the gradients the step produces (W_s.grad is V·D float32 for both variants).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

HIDDEN = 896
ALPHA = 0.5
LOSS_TYPE = "forward_kl"
GRID_V = (32000, 151936)
GRID_BT = (512, 4096)
SWEEP_SIZES = (64, 128, 256, 512, 1024)
LARGE_ELEMENTS = 100_000_000  # BT·V at or above this is a "large" configuration (fewer repetitions)
MIB = 1 << 20

TARGETS = (
    "at V=151936, BT=4096: memory ratio <= 0.2 and time ratio <= 1.0",
    "at small BT (512): time ratio <= 1.0 (chunked no slower than naive)",
)


# --------------------------------------------------------------------------------------------------
# Worker side: inputs, the two steps, memory probes.
# --------------------------------------------------------------------------------------------------


def make_inputs(vocab: int, bt: int, device: str, hidden: int = HIDDEN, seed: int = 0) -> dict:
    """Random student/teacher hidden states and heads; logits come out roughly N(0, 1)."""
    from hf_distill.loss import LossSettings, PositionTargets

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        out = torch.randn(*shape, generator=gen, device=device)
        return out.mul_(scale) if scale != 1.0 else out

    h_s = randn(bt, hidden).requires_grad_(True)
    w_s = randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(True)
    h_t = randn(bt, hidden)
    w_t = randn(vocab, hidden, scale=2.0 * hidden**-0.5)  # a sharper teacher
    targets = torch.randint(0, vocab, (bt,), generator=gen, device=device)
    everywhere = torch.ones(bt, dtype=torch.bool, device=device)
    positions = PositionTargets(targets, everywhere, everywhere.clone(), ALPHA / bt, (1.0 - ALPHA) / bt)
    settings = LossSettings(loss_type=LOSS_TYPE)
    return dict(h_s=h_s, w_s=w_s, h_t=h_t, w_t=w_t, positions=positions, settings=settings)


def step_naive(inp: dict) -> torch.Tensor:
    from hf_distill.loss import blended_loss

    student_logits = F.linear(inp["h_s"], inp["w_s"])
    with torch.no_grad():
        teacher_logits = F.linear(inp["h_t"], inp["w_t"])
    loss, _kd, _ce = blended_loss(student_logits, teacher_logits, inp["positions"], inp["settings"])
    loss.backward()
    return loss.detach()


def step_chunked(inp: dict, chunk_size: int) -> torch.Tensor:
    from hf_distill.loss import TeacherHidden, chunked_blended_loss

    w_t = inp["w_t"]
    teacher = TeacherHidden(inp["h_t"], lambda h: F.linear(h, w_t))
    loss, _kd, _ce = chunked_blended_loss(inp["h_s"], inp["w_s"], None, teacher, inp["positions"], inp["settings"], chunk_size)
    loss.backward()
    return loss.detach()


def run_variant(inp: dict, variant: str) -> torch.Tensor:
    if variant == "naive":
        return step_naive(inp)
    return step_chunked(inp, int(variant.split("@")[1]))


def _trim_heap() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Extra memory of a region beyond what was resident/allocated at its start, in bytes."""

    def __init__(self, device: str):
        self.device = device
        self.method = None
        if device.startswith("cuda"):
            self.method = "torch.cuda.max_memory_allocated() - memory_allocated() at step start"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                _proc_status_kib("VmHWM")
                self.method = "kernel peak RSS: VmHWM - VmRSS after resetting VmHWM (/proc/self/clear_refs)"
            except OSError:
                try:
                    import psutil  # noqa: F401

                    self.method = "psutil RSS sampled every 1 ms (may miss peaks shorter than that)"
                except ImportError:
                    self.method = "unavailable"

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.method.startswith("kernel"):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.base = _proc_status_kib("VmRSS") * 1024
        elif self.method.startswith("psutil"):
            import psutil

            proc = psutil.Process()
            self.base = proc.memory_info().rss
            self.peak = self.base
            self.stop_flag = threading.Event()

            def sample():
                while not self.stop_flag.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()

    def stop(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - self.base)
        if self.method.startswith("kernel"):
            return float(_proc_status_kib("VmHWM") * 1024 - self.base)
        if self.method.startswith("psutil"):
            self.stop_flag.set()
            self.thread.join()
            return float(self.peak - self.base)
        return math.nan


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wait_for_ram(needed: float, limit_s: float = 300.0) -> float:
    """Wait (up to `limit_s`) until `needed` bytes are available, so that a step as large as its previous
    one is not killed by another process's memory use. Returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        available = _mem_available()
        if available is None or available >= needed:
            break
        time.sleep(5)
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_job(job: dict, emit) -> None:
    """Allocate one configuration's inputs and measure its variants, alternating, `reps` times each."""
    device = job["device"]
    # Warm up kernels and thread pools on tiny shapes so the first measured step pays no one-off setup.
    tiny = make_inputs(1024, 64, device, hidden=job["hidden"])
    for variant in job["variants"]:
        run_variant(tiny, variant.split("@")[0] + "@16" if "@" in variant else variant)
    del tiny

    inp = make_inputs(job["V"], job["BT"], device, hidden=job["hidden"])
    probe = PeakMemory(device)
    emit({"kind": "meta", "mem_method": probe.method})
    last_peak: dict[str, float] = {}
    for rep in range(job["reps"]):
        for variant in job["variants"]:
            inp["h_s"].grad = None
            inp["w_s"].grad = None
            gc.collect()
            _trim_heap()
            waited = 0.0
            if device == "cpu":
                waited = wait_for_ram(last_peak.get(variant, 0.0))
            _sync(device)
            probe.start()
            t0 = time.perf_counter()
            loss = run_variant(inp, variant)
            _sync(device)
            seconds = time.perf_counter() - t0
            peak = probe.stop()
            last_peak[variant] = peak
            record = {"kind": "rep", "variant": variant, "rep": rep, "ms": seconds * 1e3, "peak_bytes": peak,
                      "waited_s": waited}
            if rep == 0:  # numerical cross-check of the variants, outside the timed region
                record["loss"] = float(loss)
                record["grad_h_norm"] = float(inp["h_s"].grad.norm())
                record["grad_w_norm"] = float(inp["w_s"].grad.norm())
            emit(record)
            del loss


def worker_main(job_json: str) -> None:
    job = json.loads(job_json)

    def emit(record):
        print("RESULT " + json.dumps(record), flush=True)

    run_job(job, emit)


# --------------------------------------------------------------------------------------------------
# Driver side.
# --------------------------------------------------------------------------------------------------


def run_job_isolated(job: dict, in_process: bool) -> tuple[list[dict], str | None]:
    """Run a job in a fresh subprocess (or in this process); return its records and an error, if any."""
    records: list[dict] = []
    if in_process:
        run_job(job, records.append)
        return records, None
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            records.append(json.loads(line[len("RESULT "):]))
    if proc.returncode != 0:
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return records, reason + (f": {last}" if last else "")
    return records, None


def summarize(records: list[dict], variant: str) -> dict:
    reps = [r for r in records if r.get("kind") == "rep" and r["variant"] == variant]
    if not reps:
        return {"ms": math.nan, "mib": math.nan, "n": 0, "ms_all": [], "mib_all": [], "first": {}, "waited": 0.0}
    ms = [r["ms"] for r in reps]
    mib = [r["peak_bytes"] / MIB for r in reps]
    return {"ms": statistics.median(ms), "mib": statistics.median(mib), "n": len(reps), "ms_all": ms,
            "mib_all": mib, "first": reps[0], "waited": sum(r.get("waited_s", 0.0) for r in reps)}


def fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU-seconds busy on the whole machine, CPU-seconds of this process and its children, wall seconds)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # everything but idle and iowait (guest is inside user)
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system, time.time()


def others_share(before, after) -> float:
    """Fraction of the machine's CPU capacity used by other processes between two snapshots."""
    if before is None or after is None or after[2] <= before[2]:
        return math.nan
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / ((after[2] - before[2]) * (os.cpu_count() or 1))


def package_chunk_size(vocab: int, device: str) -> int:
    """The package's default chunk size for this vocabulary on this kind of device."""
    from hf_distill.loss import default_chunk_size

    try:
        return default_chunk_size(vocab, device_type=device)
    except TypeError:  # versions whose default does not depend on the device
        return default_chunk_size(vocab)


def reps_for(vocab: int, bt: int, args) -> int:
    return args.reps_large if vocab * bt >= LARGE_ELEMENTS else args.reps_small


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, in-process, a few seconds (smoke test)")
    parser.add_argument("--reps-small", type=int, default=5, help="measured steps per variant, BT·V < 1e8")
    parser.add_argument("--reps-large", type=int, default=3, help="measured steps per variant, BT·V >= 1e8")
    parser.add_argument("--sweep-v", type=int, default=151936, help="vocabulary of the chunk-size sweep")
    parser.add_argument("--sweep-bt", type=int, default=None,
                        help="positions of the chunk-size sweep (default: 4096 on CUDA, 512 on CPU)")
    parser.add_argument("--sweep-sizes", type=str, default=",".join(map(str, SWEEP_SIZES)))
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--vocabs", default=",".join(map(str, GRID_V)), help="comma-separated vocabularies of the grid")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        worker_main(args.worker)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    started = time.perf_counter()
    hidden = HIDDEN
    grid_v, grid_bt = tuple(int(v) for v in args.vocabs.split(",")), GRID_BT
    sweep_sizes = tuple(int(s) for s in args.sweep_sizes.split(",") if s)
    sweep_v = args.sweep_v
    sweep_bt = args.sweep_bt or (4096 if args.device == "cuda" else 512)
    if args.quick:
        hidden, grid_v, grid_bt = 64, (1000, 5000), (32, 128)
        sweep_sizes, sweep_v, sweep_bt = (8, 16, 32, 64), 5000, 128
        args.reps_small = args.reps_large = 2

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print("Distillation loss step benchmark: naive (full logits) vs hf_distill.loss.chunked_blended_loss")
    print(f"torch {torch.__version__}, device {args.device} ({device_name}), torch threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}")
    print(f"Inputs are RANDOM TENSORS, not real models: hidden {hidden} (student and teacher), float32, "
          f"loss {LOSS_TYPE}, alpha {ALPHA}, T=1, every position a KD and CE target.")
    print("Step = forward + backward w.r.t. student hidden states and student head weight.")
    print("Targets: " + "; ".join(TARGETS))
    print()
    run_snapshot = cpu_snapshot()

    # Numerical cross-check in the quick run: chunked must equal naive.
    if args.quick:
        a = make_inputs(1000, 96, args.device, hidden=hidden)
        b = make_inputs(1000, 96, args.device, hidden=hidden)
        la, lb = step_naive(a), step_chunked(b, 40)
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b["h_s"].grad, a["h_s"].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b["w_s"].grad, a["w_s"].grad, rtol=1e-4, atol=1e-6)
        print("quick check: chunked loss and gradients match naive (assert_close) -- ok")
        print()

    rows, notes, mem_method = [], [], None
    for vocab in grid_v:
        for bt in grid_bt:
            chunk = package_chunk_size(vocab, args.device)
            job = {"device": args.device, "V": vocab, "BT": bt, "hidden": hidden,
                   "reps": reps_for(vocab, bt, args), "variants": ["naive", f"chunked@{chunk}"]}
            t0, snap = time.perf_counter(), cpu_snapshot()
            records, error = run_job_isolated(job, in_process=args.quick)
            share = others_share(snap, cpu_snapshot())
            mem_method = mem_method or next((r["mem_method"] for r in records if r.get("kind") == "meta"), None)
            naive, chunked = summarize(records, "naive"), summarize(records, f"chunked@{chunk}")
            rows.append((vocab, bt, chunk, naive, chunked, error, time.perf_counter() - t0))
            print(f"  measured V={vocab} BT={bt} (chunk {chunk}, {job['reps']} reps) in "
                  f"{time.perf_counter() - t0:.0f} s; other processes used {fmt(share * 100, '.0f')}% of the CPU"
                  + (f" -- ERROR {error}" if error else ""), flush=True)

    sweep = None
    if not args.no_sweep:
        reps = reps_for(sweep_v, sweep_bt, args)
        skipped = [s for s in sweep_sizes if s > sweep_bt]  # same single chunk as chunk == BT
        variants = ["naive"] + [f"chunked@{s}" for s in sweep_sizes if s <= sweep_bt]
        job = {"device": args.device, "V": sweep_v, "BT": sweep_bt, "hidden": hidden, "reps": reps,
               "variants": variants}
        t0, snap = time.perf_counter(), cpu_snapshot()
        records, error = run_job_isolated(job, in_process=args.quick)
        share = others_share(snap, cpu_snapshot())
        sweep = (job, {v: summarize(records, v) for v in variants}, error, skipped)
        print(f"  measured chunk-size sweep V={sweep_v} BT={sweep_bt} ({reps} reps) in "
              f"{time.perf_counter() - t0:.0f} s; other processes used {fmt(share * 100, '.0f')}% of the CPU"
              + (f" -- ERROR {error}" if error else ""), flush=True)

    print()
    print(f"Peak memory method: {mem_method}; includes the gradients the step produces.")
    print("Times and peaks: median over measured steps; naive and chunked alternate within one fresh process per "
          "configuration.")
    print()
    header = ("V", "BT", "naive ms", "chunked ms", "time ratio", "naive peak MiB", "chunked peak MiB", "memory ratio")
    widths = (7, 5, 10, 11, 10, 14, 16, 12)
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for vocab, bt, chunk, naive, chunked, error, _ in rows:
        cells = (str(vocab), str(bt), fmt(naive["ms"], ".1f"), fmt(chunked["ms"], ".1f"),
                 fmt(chunked["ms"] / naive["ms"], ".3f"), fmt(naive["mib"], ".1f"), fmt(chunked["mib"], ".1f"),
                 fmt(chunked["mib"] / naive["mib"], ".3f"))
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    for vocab, bt, chunk, naive, chunked, error, _ in rows:
        wanted = reps_for(vocab, bt, args)
        if error or naive["n"] < wanted or chunked["n"] < wanted:
            print(f"  ! V={vocab} BT={bt}: only {naive['n']} naive and {chunked['n']} chunked of {wanted} steps "
                  f"completed" + (f" ({error})" if error else ""))
    print()
    print(f"Chunk size used by `chunked`: default_chunk_size(V, device_type={args.device!r}) = "
          + ", ".join(f"{v} -> {package_chunk_size(v, args.device)}" for v in grid_v) + ".")
    print("Details (every measured step, in order; check = relative difference naive vs chunked of loss, "
          "|grad h|, |grad W| on the first step):")
    for vocab, bt, chunk, naive, chunked, error, wall in rows:
        check = "n/a"
        if naive["first"] and chunked["first"]:
            check = "/".join(format(rel_diff(naive["first"][k], chunked["first"][k]), ".1e")
                             for k in ("loss", "grad_h_norm", "grad_w_norm"))
        print(f"  V={vocab} BT={bt}: naive ms {[round(x, 1) for x in naive['ms_all']]} "
              f"MiB {[round(x, 1) for x in naive['mib_all']]}; chunked@{chunk} ms "
              f"{[round(x, 1) for x in chunked['ms_all']]} MiB {[round(x, 1) for x in chunked['mib_all']]}; "
              f"check {check}" + (f"; ERROR {error}" if error else "")
              + (f"; waited {naive['waited'] + chunked['waited']:.0f} s for free RAM before steps"
                 if naive["waited"] + chunked["waited"] >= 1 else ""))

    if sweep is not None:
        job, results, error, skipped = sweep
        base = results["naive"]
        print()
        print(f"Chunk-size sweep at V={job['V']}, BT={job['BT']} ({job['reps']} reps, all variants alternating in one "
              f"process; default_chunk_size -> {package_chunk_size(job['V'], args.device)})"
              + (f"; ERROR {error}" if error else ""))
        sheader = ("chunk", "ms", "time ratio", "peak MiB", "memory ratio")
        swidths = (7, 10, 10, 10, 12)
        print("  ".join(h.rjust(w) for h, w in zip(sheader, swidths)))
        for variant, res in results.items():
            label = "naive" if variant == "naive" else variant.split("@")[1]
            if variant != "naive" and int(label) >= job["BT"]:
                label += "*"  # a single chunk
            cells = (label, fmt(res["ms"], ".1f"), fmt(res["ms"] / base["ms"], ".3f"), fmt(res["mib"], ".1f"),
                     fmt(res["mib"] / base["mib"], ".3f"))
            print("  ".join(c.rjust(w) for c, w in zip(cells, swidths)))
        if any(int(v.split("@")[1]) >= job["BT"] for v in results if v != "naive"):
            print("  (* chunk >= BT: a single chunk)")
        if skipped:
            print(f"  (chunk sizes {skipped} skipped: larger than BT, identical to a single chunk)")

    print()
    print("Targets:" + (" (quick run: tiny shapes, not the targets' configurations; not evaluated)" if args.quick else ""))
    for vocab, bt, chunk, naive, chunked, error, _ in rows:
        if args.quick:
            break
        t_ratio, m_ratio = chunked["ms"] / naive["ms"], chunked["mib"] / naive["mib"]
        if vocab == 151936 and bt == 4096:
            ok_m, ok_t = m_ratio <= 0.2, t_ratio <= 1.0
            print(f"  V={vocab} BT={bt}: memory ratio {fmt(m_ratio, '.3f')} <= 0.2 {'PASS' if ok_m else 'FAIL'}; "
                  f"time ratio {fmt(t_ratio, '.3f')} <= 1.0 {'PASS' if ok_t else 'FAIL'}")
        elif bt == min(grid_bt):
            print(f"  V={vocab} BT={bt}: time ratio {fmt(t_ratio, '.3f')} <= 1.0 {'PASS' if t_ratio <= 1.0 else 'FAIL'}")
    share = others_share(run_snapshot, cpu_snapshot())
    print(f"\nOther processes used {fmt(share * 100, '.0f')}% of the machine's CPU during the run"
          + (" -- timings are contaminated by background load" if share > 0.05 else ""))
    print(f"Total benchmark wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
