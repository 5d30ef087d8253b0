"""Timing and memory helpers for benchmarks (gpt-fast's loop).

Rules every measurement here follows:

- warm-up runs are excluded from the statistics;
- the device is synchronised before the clock starts and before it stops (CUDA kernels are
  asynchronous: without it a GPU timing measures only the launch);
- the result is the median of ``repeats`` runs with its spread (min, max, quartiles, stdev) and the
  raw samples, so a reader can recompute it;
- peak memory is CUDA's ``max_memory_allocated`` after a reset on GPUs, and on CPU the process's
  peak resident set (``VmHWM`` of ``/proc/self/status``), reset through ``/proc/self/clear_refs``
  where the kernel allows it (otherwise the process-lifetime peak, said so in ``peak_mem_kind``).

Nothing here initialises CUDA unless it is handed a CUDA device.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsnt_export.errors import ArtifactError

__all__ = [
    "Timing",
    "sync",
    "measure",
    "time_fn",
    "PeakMemory",
    "cpu_peak_rss_bytes",
    "reset_cpu_peak_rss",
    "append_rows",
    "read_rows",
]


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def sync(device: torch.device | str | None) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    dev = _device(device)
    if dev.type == "cpu":
        return
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "synchronize"):
        acc.synchronize(dev)
    elif dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of ``repeats`` timed runs (seconds), warm-up excluded."""

    samples_s: tuple[float, ...]
    warmup: int

    def __post_init__(self):
        if not self.samples_s:
            raise ValueError("Timing needs at least one sample")

    @property
    def repeats(self) -> int:
        """Number of timed samples."""
        return len(self.samples_s)

    @property
    def median_s(self) -> float:
        """Median sample (s)."""
        return statistics.median(self.samples_s)

    @property
    def min_s(self) -> float:
        """Fastest sample (s)."""
        return min(self.samples_s)

    @property
    def max_s(self) -> float:
        """Slowest sample (s)."""
        return max(self.samples_s)

    @property
    def mean_s(self) -> float:
        """Mean sample (s)."""
        return statistics.fmean(self.samples_s)

    @property
    def stdev_s(self) -> float:
        """Sample standard deviation (s); 0 for one sample."""
        return statistics.stdev(self.samples_s) if len(self.samples_s) > 1 else 0.0

    @property
    def quartiles_s(self) -> tuple[float, float]:
        """(25th, 75th) percentile, inclusive method; both the sample itself for one sample."""
        if len(self.samples_s) < 2:
            return (self.samples_s[0], self.samples_s[0])
        q = statistics.quantiles(self.samples_s, n=4, method="inclusive")
        return (q[0], q[2])

    def to_json(self) -> dict:
        """The statistics and raw samples as a row's ``timing`` dict (seconds)."""
        q1, q3 = self.quartiles_s
        return {
            "median_s": self.median_s,
            "min_s": self.min_s,
            "max_s": self.max_s,
            "mean_s": self.mean_s,
            "stdev_s": self.stdev_s,
            "q1_s": q1,
            "q3_s": q3,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "samples_s": list(self.samples_s),
        }


def measure(
    fn: Callable[..., Any],
    *,
    device: torch.device | str | None = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls.

    With ``setup``, each call (warm-up included) is preceded by an untimed ``state = setup()``
    and times ``fn(state)`` only, e.g. a fresh KV cache from a prefill before timing decode steps.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = _device(device)
    samples = []
    for i in range(warmup + repeats):
        args = (setup(),) if setup is not None else ()
        sync(dev)
        t0 = time.perf_counter()
        fn(*args)
        sync(dev)
        dt = time.perf_counter() - t0
        if i >= warmup:
            samples.append(dt)
    return Timing(tuple(samples), warmup)


def time_fn(fn: Callable[[], Any], *, device="cpu", warmup: int = 1, repeats: int = 5) -> dict:
    """``measure`` as a plain dict (median_s, min_s, max_s, stdev_s, repeats, warmup, ...)."""
    return measure(fn, device=device, warmup=warmup, repeats=repeats).to_json()


# ---------------------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_peak_rss_bytes() -> int | None:
    """Peak resident set size of this process's own address space in bytes (``VmHWM``), or
    ``getrusage`` where /proc is absent; None if neither is readable.

    ``VmHWM`` first: ``getrusage(RUSAGE_SELF).ru_maxrss`` of a process started by ``subprocess``
    also holds its parent's peak (Linux keeps the high-water mark of the image replaced by
    ``execve``, and Python's ``vfork`` shares the parent's), so a child of a 2 GiB parent reports
    at least 2 GiB however little it uses.
    """
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def reset_cpu_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` value 5); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _acc_mem(name: str, dev: torch.device):
    acc = getattr(torch, "accelerator", None)
    fn = getattr(acc, name, None) if acc is not None else None
    if fn is None and dev.type == "cuda":
        fn = getattr(torch.cuda, name)
    return fn


class PeakMemory:
    """Context manager measuring peak memory on ``device`` during its block.

    ``peak_bytes`` and ``kind`` after exit: "cuda_max_allocated" (tensor memory of the caching
    allocator), "cpu_rss_peak" (peak RSS since the block began) or "cpu_rss_peak_process" (the
    kernel refused the reset: process-lifetime peak, an upper bound).
    """

    def __init__(self, device: torch.device | str | None = "cpu"):
        self.device = _device(device)
        self.peak_bytes: int | None = None
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cpu":
            self.kind = "cpu_rss_peak" if reset_cpu_peak_rss() else "cpu_rss_peak_process"
        else:
            sync(self.device)
            _acc_mem("reset_peak_memory_stats", self.device)(self.device)
            self.kind = f"{self.device.type}_max_allocated"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cpu":
            self.peak_bytes = cpu_peak_rss_bytes()
        else:
            sync(self.device)
            self.peak_bytes = int(_acc_mem("max_memory_allocated", self.device)(self.device))

    def to_json(self) -> dict:
        """``{"peak_mem_bytes", "peak_mem_kind"}`` for a row."""
        return {"peak_mem_bytes": self.peak_bytes, "peak_mem_kind": self.kind}


# ------------------------------------------------------------------------------------------ rows


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Append JSON rows (one object per line) to ``path``, flushed and fsynced after each row."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return p


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file; blank lines are skipped, a torn last line (crash) is ignored."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ArtifactError(
                f"{path}, line {i + 1}, is not a JSON row ({e}); expected one JSON object per line"
            ) from e
    return rows
