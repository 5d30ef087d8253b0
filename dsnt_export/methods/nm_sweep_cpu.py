"""SparseGPT's in-block N:M sweep as one compiled CPU kernel (Numba), for float32 CPU tensors.

Inside a block of SparseGPT columns (:func:`dsnt_export.methods.sparsegpt.sparsegpt_prune`) the
work is a chain of tiny steps per group of M columns (choose the group's mask, then M error /
rank-1 update steps); run as torch ops it is bound by op dispatch (~15 ops per group, each on a
few thousand floats). Every output row of ``W`` is independent in that chain (the same ``U``,
its own mask and errors), so this kernel walks the block once per tile of rows, with the tile in
the L1/L2 cache: on one thread, measured ~5x faster than the torch ops on two (a [128, 3072] block
on a 2-core AVX2 CPU: ~3 vs ~17 ms; the embedded model's 30 blocks: ~60 vs ~300 ms per block).

Same arithmetic as the torch path (``_prune_block_nm``): saliency ``(w * w) * (1/d)^2``, mask =
the ``M - N`` smallest of each row's group (ties: the lower column pruned first, as the
reference code's stable sort), error ``e = w * (1/d)`` where pruned, and the updates
``w[c] -= U[i, c] * e[i]`` for the block's later columns. The only difference is the order of
the float32 additions: each later column receives the group's M updates one by one (the torch
path sums them in one rank-M product), so weights agree to float32 rounding and a mask can
differ only on a near-tie. The kernel's arithmetic is IEEE float32 operation by operation (no
fused multiply-add, no reassociation), so it does not depend on the CPU's vector width.

Numba compiles the kernel on first use (~2-3 s, then cached on disk next to this module or in
the user's cache directory). Set ``DSNT_EXPORT_NO_NUMBA=1`` to use the torch path instead; it is
also used when Numba is not installed or cannot compile (logged once).
"""

from __future__ import annotations

import logging
import os
from functools import cache

import numpy as np
import torch

from dsnt_export.errors import ShapeError

logger = logging.getLogger(__name__)

__all__ = ["nm_block_sweep_cpu", "kernel_available"]

#: rows per tile: the kernel's three [count, tile] float32 work arrays stay L2-resident
_TILE = 256


def _sweep(W, U, i1, i2, err, keep, vals, n_prune, m, tile):  # pragma: no cover - Numba
    rows = W.shape[0]
    count = i2 - i1
    with_vals = vals.shape[0] == rows
    inv_d = np.empty(count, np.float32)
    inv_d2 = np.empty(count, np.float32)
    for i in range(count):
        inv_d[i] = np.float32(1.0) / U[i1 + i, i1 + i]
        inv_d2[i] = inv_d[i] * inv_d[i]
    w = np.empty((count, tile), np.float32)  # the tile, transposed: a column's rows contiguous
    e = np.empty((count, tile), np.float32)  # scaled errors (w - q) / d
    pr = np.empty((count, tile), np.bool_)  # pruned
    sal = np.empty((m, tile), np.float32)
    rank = np.empty((m, tile), np.int32)
    for r0 in range(0, rows, tile):
        n = min(tile, rows - r0)
        for r in range(n):
            for c in range(count):
                w[c, r] = W[r0 + r, i1 + c]
        for g in range(0, count, m):
            j = g + m
            for k in range(m):
                wk, sk, dk2 = w[g + k], sal[k], inv_d2[g + k]
                for r in range(n):
                    sk[r] = (wk[r] * wk[r]) * dk2
            # rank of each entry in its row's group: smaller saliencies, plus equal ones of a
            # lower column (ties: lower column pruned first); pruned when rank < M - N
            for k in range(m):
                sk, rk = sal[k], rank[k]
                for r in range(n):
                    rk[r] = 0
                for k2 in range(m):
                    s2 = sal[k2]
                    if k2 < k:
                        for r in range(n):
                            rk[r] += s2[r] <= sk[r]
                    elif k2 > k:
                        for r in range(n):
                            rk[r] += s2[r] < sk[r]
            for k in range(m):
                i = g + k
                ei, wi, pi, rk, di = e[i], w[i], pr[i], rank[k], inv_d[i]
                for r in range(n):
                    pi[r] = rk[r] < n_prune
                    ei[r] = wi[r] * di if pi[r] else np.float32(0.0)
                for c in range(i + 1, j):
                    u, wc = U[i1 + i, i1 + c], w[c]
                    for r in range(n):
                        wc[r] -= u * ei[r]
            if m == 4:  # the same subtractions in the same order, one pass over w per group
                e0, e1, e2, e3 = e[g], e[g + 1], e[g + 2], e[g + 3]
                for c in range(j, count):
                    wc = w[c]
                    u0, u1 = U[i1 + g, i1 + c], U[i1 + g + 1, i1 + c]
                    u2, u3 = U[i1 + g + 2, i1 + c], U[i1 + g + 3, i1 + c]
                    for r in range(n):
                        wc[r] = (((wc[r] - u0 * e0[r]) - u1 * e1[r]) - u2 * e2[r]) - u3 * e3[r]
            else:
                for c in range(j, count):
                    wc = w[c]
                    for k in range(m):
                        u, ek = U[i1 + g + k, i1 + c], e[g + k]
                        for r in range(n):
                            wc[r] -= u * ek[r]
        # A column's pruned entries hold their value at pruning time (no later update reaches
        # the column): written to vals, zeroed in W; its errors go to err for the caller's lazy
        # update of the columns right of the block.
        for r in range(n):
            for c in range(count):
                pruned = pr[c, r]
                err[r0 + r, c] = e[c, r]
                keep[r0 + r, i1 + c] = not pruned
                W[r0 + r, i1 + c] = np.float32(0.0) if pruned else w[c, r]
                if with_vals:
                    vals[r0 + r, i1 + c] = w[c, r] if pruned else np.float32(0.0)


_NO_VALS = np.empty((0, 1), np.float32)


@cache
def _compiled():
    """The jitted kernel, or None (Numba missing, disabled, or failing to compile)."""
    if os.environ.get("DSNT_EXPORT_NO_NUMBA", "").strip() not in ("", "0"):
        return None
    try:
        import numba
    except ImportError:
        logger.info("Numba is not installed: SparseGPT's CPU sweep runs as torch ops (slower)")
        return None
    opts = dict(nogil=True, fastmath=False, error_model="numpy", boundscheck=False)
    try:
        fn = numba.njit(cache=True, **opts)(_sweep)
    except Exception:  # no writable cache location: compile every process instead
        fn = numba.njit(cache=False, **opts)(_sweep)
    try:  # compile (or load from the cache) now, on a tiny problem, to fail here if at all
        w = np.zeros((2, 4), np.float32)
        keep = np.zeros((2, 4), np.bool_)
        fn(w, np.eye(4, dtype=np.float32), 0, 4, np.empty_like(w), keep, w[:0], 2, 4, 2)
    except Exception as exc:  # pragma: no cover - depends on the local toolchain
        logger.warning("Numba could not compile SparseGPT's CPU sweep (%s); using torch ops", exc)
        return None
    return fn


def kernel_available() -> bool:
    """True when :func:`nm_block_sweep_cpu` can run here (Numba importable, compiled, enabled)."""
    return _compiled() is not None


def nm_block_sweep_cpu(
    W: torch.Tensor,
    U: torch.Tensor,
    i1: int,
    i2: int,
    n_prune: int,
    m: int,
    keep: torch.Tensor,
    vals: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseGPT's N:M sweep over the block of columns ``i1:i2`` of ``W``, in place, on CPU.

    ``W``: float32 [out, in], C-contiguous: the block's columns are updated by the sweep, then
    their pruned entries set to 0 (their values at pruning time go to ``vals`` [out, in] float32
    when given, 0 where kept); the columns right of the block are not touched. ``U``: float32
    [in, in], the upper Cholesky factor of ``H^-1`` (C-contiguous). ``n_prune``: ``M - N``;
    ``i2 - i1`` a multiple of ``m``. ``keep``: bool [out, in], its block columns filled (True =
    kept). Returns the scaled errors ``(w - q) / d``, float32 [out, i2 - i1], for the caller's
    lazy update ``W[:, i2:] -= err @ U[i1:i2, i2:]``. Raises ``ShapeError`` on arguments that do
    not fit (checked here: the kernel itself runs without bounds checks) and ``RuntimeError``
    when the kernel is not available (check :func:`kernel_available`).
    """
    fn = _compiled()
    if fn is None:
        raise RuntimeError("the Numba N:M sweep is not available here (see kernel_available())")
    _check(W, U, i1, i2, n_prune, m, keep, vals)  # the kernel runs without bounds checks
    err = torch.empty(W.shape[0], i2 - i1, dtype=torch.float32)
    # one thread: torch's OpenMP workers still spin after the preceding product and take the
    # other cores (measured: no gain from splitting the rows over two threads on 2 cores)
    v = vals.numpy() if vals is not None else _NO_VALS
    fn(W.numpy(), U.contiguous().numpy(), i1, i2, err.numpy(), keep.numpy(), v, n_prune, m, _TILE)
    return err


def _check(W, U, i1, i2, n_prune, m, keep, vals) -> None:
    rows, cols = W.shape
    problems = []
    if W.dtype != torch.float32 or W.device.type != "cpu" or not W.is_contiguous():
        problems.append(f"W must be a C-contiguous float32 CPU tensor, got {W.dtype} {W.device}")
    if tuple(U.shape) != (cols, cols) or U.dtype != torch.float32 or U.device.type != "cpu":
        problems.append(f"U must be float32 CPU [{cols}, {cols}], got {U.dtype} {tuple(U.shape)}")
    if not (0 <= i1 < i2 <= cols) or (i2 - i1) % m or not (0 <= n_prune <= m):
        problems.append(f"block {i1}:{i2} of {cols} columns with {m - n_prune}:{m}")
    for name, t, dt in (("keep", keep, torch.bool), ("vals", vals, torch.float32)):
        if t is not None and (
            tuple(t.shape) != (rows, cols) or t.dtype != dt or not t.is_contiguous()
        ):
            problems.append(f"{name} must be C-contiguous {dt} [{rows}, {cols}]")
    if problems:
        raise ShapeError("nm_block_sweep_cpu: " + "; ".join(problems))
