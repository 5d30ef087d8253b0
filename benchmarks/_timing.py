"""Timing and environment helpers for the scripts in benchmarks/ (kept for their imports).

The implementation lives in :mod:`dsnt_export.bench.timing` and :mod:`dsnt_export.bench.env`:
warm-up excluded, device synchronised around timing, median and spread of N runs, environment
recorded, rows appended as JSON lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, _ROOT)

from dsnt_export.bench.env import environment  # noqa: E402
from dsnt_export.bench.timing import (  # noqa: E402
    PeakMemory,
    Timing,
    append_rows,
    measure,
    read_rows,
    sync,
    time_fn,
)

__all__ = [
    "PeakMemory",
    "Timing",
    "append_rows",
    "environment",
    "measure",
    "read_rows",
    "sync",
    "time_fn",
]
