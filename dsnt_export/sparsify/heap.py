"""Host-heap policy of the prune drivers (glibc's ``malloc``; every function is a no-op elsewhere).

PyTorch has no caching allocator on CPU: every tensor is a ``malloc`` and every release a
``free``. glibc serves large requests with ``mmap`` (fresh pages, zero-filled by the kernel on
first touch) and gives the top of its heap back to the OS once more than ``M_TRIM_THRESHOLD``
bytes of it are free. Both thresholds move with the process's history unless set. The two
drivers want opposite things:

* in memory (:func:`dsnt_export.sparsify.driver.sparsify`): speed. A block's statistics,
  SparseGPT's working copies and the Hessian factors are freed after the block and allocated
  again for the next; when glibc returns those pages and then faults them back in, the prune
  pays for it (measured 2026-12-01, embedded model, 2 CPU cores: 1-4 s of a ~20 s prune of 16
  calibration windows, and the gains of batched Hessian products and a blocked factor halved).
  :func:`hold_freed_memory` keeps freed memory for reuse (:data:`HOLD_MMAP_THRESHOLD`,
  :data:`HOLD_TRIM_THRESHOLD`); the process then keeps up to that much freed heap.
* streamed from disk (:mod:`dsnt_export.sparsify.streaming`): peak memory. Its
  :func:`pin_mmap_threshold` sends every allocation of at least :data:`STREAM_MMAP_THRESHOLD`
  straight to ``mmap`` (released at once on ``free``) and :func:`trim_heap` returns the rest after
  each block.

Both settings are process-wide and stay in force after the driver returns (glibc has no way to
read back the previous values; setting them also stops glibc's own adjustment).
"""

from __future__ import annotations

import functools
import gc
import sys
from typing import Any

#: streaming: allocations at least this large (bytes) come straight from mmap
STREAM_MMAP_THRESHOLD = 1 << 20
#: in memory: allocations up to this size (bytes) come from the heap ...
HOLD_MMAP_THRESHOLD = 64 << 20
#: ... and up to this much free heap (bytes) is kept for reuse instead of returned to the OS
HOLD_TRIM_THRESHOLD = 256 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library (glibc on Linux) through ctypes, or None elsewhere / when not found."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    libc = _libc()
    fn = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(fn(param, value)) if fn is not None else False


def pin_mmap_threshold() -> bool:
    """glibc: serve allocations of at least :data:`STREAM_MMAP_THRESHOLD` bytes from mmap, for the
    rest of the process (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc raising the
    threshold after each free). Without it, once a freed block tensor raised the dynamic
    threshold, the next blocks' tensors of that size came from the heap and fragmented it: peak
    RSS grew ~30 MB per block on a 2048-hidden Llama (measured). Returns whether it was set."""
    return _mallopt(_M_MMAP_THRESHOLD, STREAM_MMAP_THRESHOLD)


def hold_freed_memory() -> bool:
    """glibc: serve allocations up to :data:`HOLD_MMAP_THRESHOLD` bytes from the heap and keep up
    to :data:`HOLD_TRIM_THRESHOLD` bytes of freed heap for reuse, for the rest of the process
    (module docstring). Returns whether both were set."""
    return _mallopt(_M_MMAP_THRESHOLD, HOLD_MMAP_THRESHOLD) & _mallopt(
        _M_TRIM_THRESHOLD, HOLD_TRIM_THRESHOLD
    )


def trim_heap() -> None:
    """Return the heap's free pages to the OS after a block: first collect reference cycles (a
    released block's hooks and closures can keep its tensors alive until the cyclic GC happens to
    run, which depends on object counts, not bytes), then glibc ``malloc_trim`` (else no-op)."""
    gc.collect()
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None) if libc is not None else None
    if fn is not None:
        fn(0)
