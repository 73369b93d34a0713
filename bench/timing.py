"""Timing helpers shared by every benchmark in bench/.

All comparisons are measured side by side in one process. glibc's malloc returns large blocks
to the OS and faults them in again, which makes allocation-heavy baselines slow and noisy;
``ensure_malloc_env`` re-executes the process with the
thresholds set, so every side of every comparison runs under the same allocator settings.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Callable

import torch

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
}


def ensure_malloc_env() -> None:
    """Re-exec this Python process with the malloc thresholds set (glibc reads them at start)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.environ.update(MALLOC_ENV)
    # orig_argv keeps "-m package.module", which sys.argv turns into a file path.
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = "cpu",
    warmup: int = 2,
    repeats: int = 7,
    min_time: float = 0.0,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs.

    With ``min_time`` > 0, runs continue past ``repeats`` until that many seconds are spent
    (stable medians for sub-millisecond ops).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_ms(
    sides: dict[str, Callable[[], object]],
    rounds: int,
    *,
    round_s: float = 0.005,
    device: torch.device | str | None = "cpu",
) -> dict[str, float]:
    """Median ms per call of every side over ``rounds`` rounds that run each side in turn.

    On a shared machine a burst of load then hits all sides of a comparison alike, where
    timing one side after another would hand it to whichever side ran at the time. Within a
    round a side runs enough back-to-back calls to fill about ``round_s`` seconds (one call
    when a call is longer), so sub-millisecond kernels are not timed one call at a time.
    """
    calls = {}
    for side, fn in sides.items():  # warm-up (tables, caches, thread pool) and calibration
        fn()
        calls[side] = 1
        if round_s > 0:  # a timed call to size the round (skipped for one call per round)
            once = measure(fn, device=device, warmup=0, repeats=1)
            calls[side] = max(1, min(1000, math.ceil(round_s / max(once, 1e-9))))
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, fn in sides.items():
            t0 = time.perf_counter()
            for _ in range(calls[side]):
                fn()
            _sync(device)
            times[side].append((time.perf_counter() - t0) / calls[side])
    return {side: 1e3 * statistics.median(t) for side, t in times.items()}


def cuda_peak_extra_bytes(fn: Callable[[], object], device="cuda") -> int:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (also valid GitHub markdown)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def report(text: str, out: str | None) -> None:
    """Print a result table and, when ``out`` names a file, write it there too."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
