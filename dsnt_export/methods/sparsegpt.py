"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with an OBS weight update.

Pure tensor function: ``sparsegpt_prune(W[out, in], H[in, in], pattern) -> (W', keep)``.

The layer's reconstruction loss ``||X W^T - X W'^T||^2`` has Hessian ``H = 2/n X^T X`` (the same for
every output row). SparseGPT walks the input columns left to right. When column ``i`` is reached,
the columns before it are frozen, so the optimal Brain-Surgeon update for removing weight ``w[r, i]``
only touches columns ``i..`` and uses the inverse of the trailing submatrix ``H[i:, i:]``. All these
inverses are rows of one matrix: the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), since
``U[i, i:] = (H[i:, i:])^-1[0, :] / sqrt((H[i:, i:])^-1[0, 0])``. Hence, with ``d = U[i, i]``:

    saliency[r, i] = w[r, i]^2 / d^2                 (OBS error of pruning w[r, i])
    err[r]         = (w[r, i] - q[r, i]) / d          (q = w with the pruned entries zeroed)
    W[:, i:]      -= err (outer) U[i, i:]              (OBS update of the not-yet-frozen columns)

Columns are processed in blocks of ``blocksize``: inside a block the rank-1 updates touch only the
block; the columns to its right receive all of the block's updates at once (``Err @ U[block, rest]``,
"lazy batch" updates), which is mathematically identical and turns most of the work into a matmul.

Mask selection follows the reference code: unstructured sparsity picks the smallest saliencies over
a whole ``[out, block]`` tile at once (so per-row counts vary, adaptively), computed when the block
starts; N:M picks, at every group start, the ``m - n_keep`` smallest saliencies of each row among the
group's ``m`` columns, computed from the weights as updated so far.

Differences from the reference code (on purpose): the unstructured selection prunes exactly
``out * int(in * ratio)`` weights in total (the same count as Wanda/magnitude at that ratio), spread
over blocks in proportion to their width, with ties broken by position (the reference's ``<=``
threshold prunes one more per block and more on ties); N:M ties are also broken by position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsnt_export.errors import NonFiniteError, ShapeError, UserInputError
from dsnt_export.methods.nm_sweep_cpu import kernel_available, nm_block_sweep_cpu
from dsnt_export.patterns import NM, Pattern, Unstructured, parse_pattern
from dsnt_export.precision import matmul_precision
from dsnt_export.refine.loss import dampening

logger = logging.getLogger(__name__)

__all__ = [
    "SparseGPTConfig",
    "inverse_cholesky",
    "inverse_hessian_factor",
    "sparsegpt_factor",
    "sparsegpt_prune",
]


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT's options: ``blocksize`` (columns per lazy-update block, a positive int, a multiple
    of M for N:M) and ``percdamp`` (Hessian dampening fraction, :func:`dsnt_export.refine.loss.dampening`;
    0.01 as in the reference code). Validated when used (:func:`sparsegpt_prune`)."""

    blocksize: int = 128
    percdamp: float = 0.01


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern | str,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    device: torch.device | str | None = None,
    return_pruned_values: bool = False,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] to ``pattern`` with SparseGPT's OBS update.

    With ``return_pruned_values=True`` a third tensor is returned: the value each pruned weight had
    (after the updates of the columns before it) at the moment it was pruned, 0 where kept. It is
    what a later refinement (DSnoT) restores when it grows that weight back.

    ``hessian`` is ``2/n X^T X`` [in, in] of the layer's inputs (``ActivationStats.hessian``); it is
    not modified. Work happens in float32 on ``device`` (default: ``weight.device``). Returns the
    updated weight (``weight``'s dtype and device, exact zeros where pruned) and the keep mask
    (bool [out, in], True = kept). ``factor``: :func:`sparsegpt_factor` of this ``hessian`` and
    ``percdamp`` on ``device``, when already computed (linears reading the same input share it).
    """
    pattern = parse_pattern(pattern)
    _validate(weight, hessian, pattern, blocksize, percdamp)
    dev = torch.device(device) if device is not None else weight.device
    U, dead = factor if factor is not None else sparsegpt_factor(hessian, percdamp, device=dev)
    if isinstance(pattern, NM) and dev.type == "cpu" and kernel_available():
        W, keep, vals = _sweep_nm_cpu(weight, U, dead, pattern, blocksize, return_pruned_values)
    else:
        W, keep, vals = _sweep(weight, U, dead, pattern, blocksize, dev, return_pruned_values)
    out = W.to(device=weight.device, dtype=weight.dtype)
    keep = keep.to(weight.device)
    if weight.dtype != torch.float32 and logger.isEnabledFor(logging.DEBUG):
        n_under = int(((out == 0) & keep).sum())
        if n_under:
            logger.debug(
                "%d kept weights became exactly 0 in the cast to %s", n_under, weight.dtype
            )
    if vals is not None:
        return out, keep, vals.to(device=weight.device, dtype=weight.dtype)
    return out, keep


def _sweep(
    weight: torch.Tensor,
    U: torch.Tensor,
    dead: torch.Tensor,
    pattern: Pattern,
    blocksize: int,
    dev: torch.device,
    want_vals: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The sweep as torch ops on any device: float32 ``(W' [out, in], keep [out, in], pruned
    values [out, in] or None)`` on ``dev``."""
    rows, cols = weight.shape
    # Work on a float32 copy of W^T [in, out]: a column of W is then a contiguous row, which makes
    # the per-column rank-1 updates (the hot loop) several times faster.
    Wt = torch.empty(cols, rows, dtype=torch.float32, device=dev).copy_(weight.detach().t())
    Wt[dead] = 0.0

    prune = torch.zeros(cols, rows, dtype=torch.bool, device=dev)
    loss = torch.zeros(rows, dtype=torch.float32, device=dev) if _debug() else None
    total_prune = rows * pattern.n_prune_per_row(cols) if isinstance(pattern, Unstructured) else 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        U1 = U[i1:i2, i1:i2]
        if isinstance(pattern, Unstructured):
            # Cumulative integer targets: the blocks' counts add up to exactly total_prune.
            k = total_prune * i2 // cols - total_prune * i1 // cols
            prune[i1:i2] = _smallest_in_tile(Wt[i1:i2], torch.diagonal(U1), k)
        err1 = _prune_block(Wt[i1:i2], U1, pattern, prune[i1:i2])
        if loss is not None:
            loss += (err1 * err1).sum(dim=0)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), err1, alpha=-1.0)
    # A processed column is never updated again (its own rank-1 update is skipped, the later
    # ones only reach columns to its right), so its pruned entries still hold the values they had
    # when pruned: kept for the caller, then zeroed. Kept entries only ever received zero errors
    # from their own column.
    pruned_vals = Wt.masked_fill(prune.logical_not(), 0.0) if want_vals else None
    Wt.masked_fill_(prune, 0.0)
    _log_loss(loss, pattern, rows, cols)
    vals = pruned_vals.t().contiguous() if pruned_vals is not None else None
    return Wt.t().contiguous(), prune.logical_not_().t().contiguous(), vals


def _sweep_nm_cpu(
    weight: torch.Tensor,
    U: torch.Tensor,
    dead: torch.Tensor,
    pattern: NM,
    blocksize: int,
    want_vals: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_sweep` for N:M on CPU, in W's own [out, in] layout: each block's sweep is the
    compiled kernel :func:`~dsnt_export.methods.nm_sweep_cpu.nm_block_sweep_cpu` (which also
    writes the mask, the zeros and the pruned values: no transposes, no masked fills), the
    columns right of the block get its errors in one product, as in :func:`_sweep`."""
    rows, cols = weight.shape
    W = weight.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    W[:, dead] = 0.0
    U = U.contiguous()
    keep = torch.empty(rows, cols, dtype=torch.bool)
    vals = torch.empty(rows, cols, dtype=torch.float32) if want_vals else None
    loss = torch.zeros(rows, dtype=torch.float32) if _debug() else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err = nm_block_sweep_cpu(W, U, i1, i2, pattern.n_prune, pattern.m, keep, vals)
        if loss is not None:
            loss += (err * err).sum(dim=1)
        if i2 < cols:
            W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)
    _log_loss(loss, pattern, rows, cols)
    return W, keep, vals


def _debug() -> bool:
    return logger.isEnabledFor(logging.DEBUG)


def _log_loss(loss: torch.Tensor | None, pattern: Pattern, rows: int, cols: int) -> None:
    if loss is not None:
        logger.debug(
            "sparsegpt %s on [%d, %d]: OBS loss estimate %.6g (sum over rows of err^2 / 2)",
            pattern,
            rows,
            cols,
            float(loss.sum()) / 2,
        )


def sparsegpt_factor(
    hessian: torch.Tensor, percdamp: float = 0.01, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: SparseGPT's :func:`inverse_hessian_factor` of ``hessian`` [in, in] after
    setting the diagonal of dead input channels (``H_jj == 0``, bool [in] ``dead``) to 1, as the
    reference code does; float32 on ``device`` (default: the Hessian's). Depends only on the
    Hessian and ``percdamp``, so linears that read the same input share it."""
    dev = torch.device(device) if device is not None else hessian.device
    H = hessian.detach().to(device=dev, dtype=torch.float32, copy=True)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # advanced indexing on both axes: only the diagonal entries
    return inverse_hessian_factor(H, percdamp), dead


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + percdamp * mean(diag H) * I)^-1`` (float32).

    The reference code computes ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``. We get the
    same factor from the inverse of one Cholesky factor, without forming ``H^-1`` (several times
    faster on CPU, and as accurate): with ``P`` the index reversal, ``P H P = L L^T`` gives
    ``H^-1 = (P L^-1 P)^T (P L^-1 P)`` where ``P L^-1 P`` is upper triangular with a positive diagonal.
    ``L^-1`` comes from :func:`inverse_cholesky` (blocked, mostly matrix products), computed at
    torch's "highest" float32 matmul precision whatever the caller's setting.

    If the dampened ``H`` is not positive definite, retries once with 10x the dampening (logging a
    warning); if that fails too, raises ``UserInputError``. ``hessian`` is not modified.
    """
    Hf = hessian.to(torch.float32).flip(0, 1)
    for attempt, damp in enumerate((percdamp, 10 * percdamp)):
        A = Hf.clone()
        A.diagonal().add_(dampening(Hf, damp))
        with matmul_precision("highest"):
            L_inv, info = inverse_cholesky(A)
        if int(info) == 0:
            U = L_inv.flip(0, 1)
            if bool(torch.isfinite(U.sum())) or bool(torch.isfinite(U).all()):
                return U
        if attempt == 0:
            logger.warning(
                "SparseGPT: the Hessian [%d, %d] with percdamp=%g is not positive definite "
                "(Cholesky failed); retrying once with percdamp=%g",
                Hf.shape[0],
                Hf.shape[1],
                percdamp,
                10 * percdamp,
            )
    raise UserInputError(
        f"SparseGPT: the Hessian [{Hf.shape[0]}, {Hf.shape[1]}] is not positive definite even with "
        f"dampening percdamp={10 * percdamp:g} (tried {percdamp:g} first); expected a positive "
        "definite 2/n X^T X. Use more (and more varied) calibration data, or a higher percdamp "
        "(e.g. 0.1)."
    )


def inverse_cholesky(A: torch.Tensor, leaf: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L^-1, info)`` for the lower Cholesky factor ``L`` of a symmetric ``A`` [n, n] (float32;
    only its lower triangle is read): ``L^-1`` lower triangular, ``info`` an int tensor, 0 when
    ``A`` is positive definite (otherwise ``L^-1`` is meaningless).

    Blocked recursion, on any device: with ``A = [[A11, .], [A21, A22]]``, ``L11^-1`` of ``A11``,
    ``L21 = A21 L11^-T``, the Schur complement ``S = A22 - L21 L21^T`` (positive definite iff ``A``
    is), ``L22^-1`` of ``S``, and ``(L^-1)21 = -L22^-1 L21 L11^-1``. Blocks of at most ``leaf``
    rows use ``torch.linalg.cholesky_ex`` and a triangular solve. Almost all the work is then in
    matrix products, which torch's CPU and GPU libraries run far faster than a triangular solve
    against the identity (``n^3`` flops; measured 2x faster overall at n = 1536 on 2 CPU cores, same
    accuracy vs float64). The products run at the caller's float32 matmul precision: use
    "highest" (:func:`dsnt_export.precision.matmul_precision`).
    """
    n = A.shape[0]
    if n <= leaf:
        L, info = torch.linalg.cholesky_ex(A)
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular(L, eye, upper=False), info
    h = n // 2
    inv11, info11 = inverse_cholesky(A[:h, :h], leaf)
    L21 = A[h:, :h] @ inv11.t()
    inv22, info22 = inverse_cholesky(torch.addmm(A[h:, h:], L21, L21.t(), alpha=-1.0), leaf)
    out = torch.zeros_like(A)
    out[:h, :h] = inv11
    out[h:, h:] = inv22
    out[h:, :h] = (inv22 @ (L21 @ inv11)).neg_()
    return out, info11 + info22


def _prune_block(Wt1: torch.Tensor, U1: torch.Tensor, pattern: Pattern, prune1: torch.Tensor):
    """Column-by-column OBS inside one block, in place on the transposed block ``Wt1`` [count, out].

    ``prune1`` [count, out] is the block's prune mask: filled in here for N:M
    (:func:`_prune_block_nm`), given (and left as is) for unstructured. Returns the scaled errors
    ``(w - q) / d`` [count, out]. The pruned entries of ``Wt1`` keep their values (the caller
    zeroes them).
    """
    if isinstance(pattern, NM):
        return _prune_block_nm(Wt1, U1, pattern, prune1)
    count = Wt1.shape[0]
    d = torch.diagonal(U1)
    err1 = torch.empty_like(Wt1)
    for i in range(count):
        e = torch.mul(Wt1[i], prune1[i], out=err1[i]).div_(d[i])
        # OBS update of the block's later columns. Column i itself would become w - (w - q) = q:
        # its kept entries have e = 0 and the caller zeroes its pruned ones, so it is skipped. A
        # rank-1 product that is not a matmul: torch's float32 matmul precision setting (which
        # the driver may lower for the Hessian work) routes tiny matmuls to a slower kernel.
        if i + 1 < count:
            Wt1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1.0)
    return err1


def _prune_block_nm(Wt1: torch.Tensor, U1: torch.Tensor, pattern: NM, prune1: torch.Tensor):
    """:func:`_prune_block` for an N:M ``pattern``, one group of M columns at a time.

    The same sequence of OBS steps as the column-by-column sweep, grouped: a group's mask is
    chosen from the saliencies ``w^2 / d^2`` of its M columns as the earlier columns left them;
    its columns then update each other one by one (rank-1 updates of at most M - 1 columns), and
    the rest of the block once per group (one rank-M product). Only the order of the additions
    differs from the plain sweep (float32 rounding). Per column this is two small ops (the CPU
    loop is bound by op dispatch, not by arithmetic): the error ``e = w * (mask / d)`` from a
    per-group scale, and the in-group update; the rows are views taken once (``unbind``), and
    the mask is read off the scales once per block. (On CPU, :func:`_sweep_nm_cpu` runs the
    same steps as one compiled kernel when Numba is available.)
    """
    count, m = Wt1.shape[0], pattern.m
    d = torch.diagonal(U1)
    inv_d = d.reciprocal()[:, None]
    inv_d2 = inv_d.square()
    err1 = torch.empty_like(Wt1)
    scale = torch.empty_like(Wt1)  # 1/d where pruned, 0 where kept
    w_rows, e_rows, s_rows = Wt1.unbind(0), err1.unbind(0), scale.unbind(0)
    row = torch.arange(m, device=Wt1.device)[:, None]
    zero = Wt1.new_zeros(())
    # the rank-M products are tiny matmuls: at "highest" whatever the caller's setting (a lower
    # float32 matmul precision routes them to slower kernels, and buys no speed at K = M)
    with matmul_precision("highest"):
        for g in range(0, count, m):
            j = g + m
            sal = Wt1[g:j].square().mul_(inv_d2[g:j])
            prune_g = _smallest_per_column(sal, pattern.n_prune, row)
            torch.where(prune_g, inv_d[g:j], zero, out=scale[g:j])
            for i in range(g, j):
                e = torch.mul(w_rows[i], s_rows[i], out=e_rows[i])
                if i + 1 < j:
                    Wt1[i + 1 : j].addr_(U1[i, i + 1 : j], e, alpha=-1.0)
            if j < count:
                Wt1[j:].addmm_(U1[g:j, j:].t(), err1[g:j], alpha=-1.0)
    torch.ne(scale, 0.0, out=prune1)  # 1/d > 0: exactly the pruned entries
    return err1


def _smallest_per_row(sal: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` smallest entries of each row; ties go to the lower column index."""
    idx = torch.argsort(sal, dim=1, stable=True)[:, :n]
    return torch.zeros_like(sal, dtype=torch.bool).scatter_(1, idx, True)


def _smallest_per_column(sal: torch.Tensor, n: int, row: torch.Tensor) -> torch.Tensor:
    """Bool mask [m, out] of the ``n`` smallest of each column of ``sal`` [m, out] (non-negative
    float32; ties go to the lower row index): an entry is pruned when fewer than ``n`` entries of
    its column come before it in that order. Same mask as :func:`_smallest_per_row` on the
    transpose, without a sort: a non-negative float's bits, read as an int32, order like the
    float, so ``bits * m + row`` (int64; ``row``: ``arange(m)[:, None]``) are distinct keys in
    exactly that order, and a few broadcast comparisons on the small ``m`` rank them."""
    key = torch.add(row, sal.view(torch.int32), alpha=sal.shape[0])
    return (key[:, None, :] < key[None, :, :]).sum(dim=0) < n


def _smallest_in_tile(Wt1: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask [count, out] of the ``k`` smallest ``w^2 / d^2`` over the whole block.

    Ties go to the lower (column, row) position of W.
    """
    sal = (Wt1.square() / d[:, None].square()).t().reshape(-1)  # row-major over W's [out, count]
    mask = torch.zeros(sal.numel(), dtype=torch.bool, device=Wt1.device)
    if k > 0:
        mask[torch.argsort(sal, stable=True)[:k]] = True
    return mask.reshape(Wt1.shape[1], Wt1.shape[0]).t()


def _validate(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int, percdamp: float
) -> None:
    if not isinstance(weight, torch.Tensor) or not isinstance(hessian, torch.Tensor):
        raise ShapeError(
            f"sparsegpt_prune expects torch.Tensor weight and hessian, got "
            f"{type(weight).__name__} and {type(hessian).__name__}"
        )
    if weight.dim() != 2 or weight.numel() == 0:
        raise ShapeError(
            f"SparseGPT needs a non-empty 2-D weight [out, in], got shape {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ShapeError(
            f"SparseGPT: the Hessian has shape {tuple(hessian.shape)} but the weight "
            f"{tuple(weight.shape)} needs [{cols}, {cols}] (in_features x in_features); "
            "pass the Hessian of this layer's inputs (ActivationStats(in_features, hessian=True))"
        )
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise UserInputError(f"blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(percdamp, (int, float)) or not (0.0 <= float(percdamp) < float("inf")):
        raise UserInputError(f"percdamp must be a finite number >= 0 (e.g. 0.01), got {percdamp!r}")
    if isinstance(pattern, NM):
        if cols % pattern.m:
            raise ShapeError(
                f"SparseGPT {pattern}: in_features={cols} of weight {tuple(weight.shape)} is not "
                f"divisible by M={pattern.m}; use a pattern whose M divides {cols} or skip this layer"
            )
        if blocksize % pattern.m:
            raise ShapeError(
                f"SparseGPT {pattern}: blocksize={blocksize} is not a multiple of M={pattern.m}, so "
                f"groups would straddle blocks; use a blocksize divisible by {pattern.m} (e.g. 128)"
            )
    elif not isinstance(pattern, Unstructured):
        raise UserInputError(f"pattern must be NM or Unstructured, got {type(pattern).__name__}")
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not t.is_floating_point():
            raise UserInputError(f"SparseGPT: {name} must be floating point, got {t.dtype}")
        if bool(torch.isfinite(t.sum())):  # one reduction; the elementwise check only on failure
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_bad = int((~finite).sum())
            raise NonFiniteError(
                f"SparseGPT: {name} of shape {tuple(t.shape)} (weight {tuple(weight.shape)}) has "
                f"{n_bad} NaN/Inf entries; check the model weights and calibration data, or "
                "collect statistics in float32"
            )
