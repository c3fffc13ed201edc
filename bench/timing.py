"""Timing and reporting shared by the training benchmarks (train_embedding, train_lora, train_hypernetwork).

Each benchmark runs every implementation in a subprocess of its own script (a "worker", `--impl`),
which prints one JSON line; the parent runs them in rounds and prints the comparison. Per worker:

- `StepRecorder` takes the end of every training step: wall time (`perf_counter`) and the
  process's CPU time (`process_time`), and the peak memory over the timed steps (`PeakMemory`).
  With one torch thread, a step's CPU time is what its wall time would be on an idle machine; on a
  shared, busy machine the wall time also holds the time the process waited for a CPU, so the CPU
  time is the steadier measure there.
- `run_child` runs one worker and adds its wall time and the CPU pressure meanwhile (Linux PSI).

    parser = argparse.ArgumentParser(...)
    add_run_arguments(parser, IMPLS)             # --steps --warmup --device --dtype --batch --threads --rounds
    args = finish_run_arguments(parser, parser.parse_args())
    if args.impl:
        run_worker(args, {"ours": run_ours, "reference": run_reference}, shapes)
    runs = run_rounds(args.rounds, IMPLS, lambda impl: child_argv(...), describe)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from _measure import MIB, child_env, reset_peak_rss, rss_kib

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- in a worker --------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory over a stretch of work: its growth over the start, and in total (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            reset_peak_rss()
            self.base = rss_kib("VmRSS") * 1024

    def stop(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = rss_kib("VmHWM") * 1024
        return {"peak_growth_mib": (peak - self.base) / MIB, "peak_total_mib": peak / MIB, "base_mib": self.base / MIB}


class StepRecorder:
    """End-of-step timestamps (wall and CPU) and losses; memory is measured over the steps after `warmup`."""

    def __init__(self, warmup: int, total: int, device: torch.device) -> None:
        self.warmup, self.total = warmup, total
        self.memory = PeakMemory(device)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float | None] = []
        self.memory_result: dict[str, float] = {}

    def step_done(self, step: int, loss: float | None) -> None:
        """Called after optimizer step `step` (1-based) with that step's loss."""
        if step == self.warmup:
            self.memory.start()  # before the timestamp: its gc and sync are not timed
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        self.losses.append(loss)
        if step == self.total:
            self.memory_result = self.memory.stop()

    def result(self) -> dict[str, Any]:
        intervals = _intervals(self.times[self.warmup - 1 :])  # from the end of the last warm-up step
        cpu = _intervals(self.cpu_times[self.warmup - 1 :])
        return {
            "step_s": statistics.median(intervals),
            "fastest_step_s": min(intervals),
            "intervals_s": intervals,
            "cpu_step_s": statistics.median(cpu),
            "losses": self.losses,
        }


def _intervals(stamps: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


class Stopwatch:
    """Wall and CPU seconds of one piece of work (`with Stopwatch(device) as watch: ...; watch.wall`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run_worker(args: argparse.Namespace, workers: Mapping[str, Callable[..., dict[str, Any]]], *inputs: Any) -> None:
    """The worker's side of `--impl`: set the threads, run `workers[args.impl](args, *inputs)`, print its JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(workers[args.impl](args, *inputs)))


# --- in the parent --------------------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser, impls: Iterable[str]) -> None:
    """The options every training benchmark has (and the workers' hidden --impl and --data)."""
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them, at least 1 (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="fp32, or fp16/bf16 autocast (default: fp32 on the CPU, bf16 on a GPU)"
    )
    parser.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the workers (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each implementation; the fastest is kept (1)")
    parser.add_argument("--impl", choices=list(impls), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)


def finish_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check the counts and fill in the dtype's default (fp32 on the CPU, bf16 on a GPU)."""
    if min(args.warmup, args.steps, args.rounds) < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    return args


def child_argv(
    script: str,
    args: argparse.Namespace,
    arch: str,
    impl: str,
    data: Path,
    passed_on: Iterable[str],
    flags: Iterable[str],
) -> list[str]:
    """The command line of one worker: `script` with the same settings (`passed_on` values and the
    `flags` that are set), one arch and one impl."""
    argv = [sys.executable, str(Path(script).resolve()), "--impl", impl, "--arch", arch, "--data", str(data)]
    for name in (*passed_on, "threads"):
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    argv += [flag for flag in flags if getattr(args, flag[2:].replace("-", "_"))]
    return argv


def cpu_stall_us() -> int | None:
    """Microseconds that some runnable task of this machine waited for a CPU, since boot (Linux PSI)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(some.rsplit("total=", 1)[1])
    return None


def run_child(argv: list[str]) -> dict[str, Any]:
    """Run one worker: its JSON result, with its wall time and the CPU pressure meanwhile added."""
    stall, started = cpu_stall_us(), time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"benchmark worker failed (exit code {done.returncode}): {' '.join(argv[1:])}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after = cpu_stall_us()
    result["wall_s"] = wall
    result["cpu_pressure"] = None if stall is None or after is None else (after - stall) / 1e6 / wall
    return result


def describe_run(arch: str, impl: str, result: dict[str, Any], threads: int) -> str:
    line = f"  ({arch} {impl}: {result['wall_s']:.0f} s in all, median step {result['step_s'] * 1000:.1f} ms"
    pressure = result["cpu_pressure"]
    if pressure is not None:
        line += f"; CPU pressure {pressure:.0%}"
        if pressure > 0.1:
            line += ": other work competed for the CPUs, times are noisy"
            line += "; --threads 1 is steadier then" if threads > 1 else ""
    return line + ")"


def run_rounds(
    rounds: int,
    impls: Sequence[str],
    argv_for: Callable[[str], list[str]],
    report: Callable[[str, dict[str, Any]], None],
    *,
    alternate: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Every implementation's results over `rounds` rounds, run one after another within a round so
    that changing machine load hits all alike; `alternate` reverses the order every other round (ABBA),
    so that neither always runs first. `report(impl, result)` after each run."""
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    for round_index in range(rounds):
        order = list(reversed(impls)) if alternate and round_index % 2 else list(impls)
        for impl in order:
            runs[impl].append(run_child(argv_for(impl)))
            report(impl, runs[impl][-1])
    return runs


def fastest(runs: Mapping[str, list[dict[str, Any]]], key: str = "step_s") -> dict[str, dict[str, Any]]:
    """Per implementation, the run with the smallest `key` (the quietest round)."""
    return {impl: min(found, key=lambda r: r[key]) for impl, found in runs.items()}


def relative_difference(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return float("nan")
    return abs(a - b) / max(abs(b), 1e-12)
