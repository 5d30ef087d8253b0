"""Least-squares re-fit of the kept weights of a pruned linear layer, for a fixed mask (issue 16).

After a mask is chosen (SparseGPT, then hessian-swap's prune-and-grow swaps), the kept weights of
each output row ``r`` can be set to the values that minimise the layer's reconstruction loss
(:mod:`dsnt_export.refine.loss`, SparseGPT's objective, Frantar & Alistarh 2023, section 3)

    L_r(w) = (w0 - w)_r  H_lam  (w0 - w)_r^T,      w_P = 0 on the pruned set P of row r,

with ``w0`` the dense weight and ``H_lam = H + lam * mean(diag H) * I`` (``lam`` = ``percdamp``,
:func:`dsnt_export.refine.loss.dampened_hessian`). Setting the gradient on the kept set ``K`` to
zero gives the closed form (``H_KP = (H_lam)_KP`` since the ridge is diagonal)

    w_K = w0_K + (H_lam)_KK^{-1} H_KP w0_P                                      (1)

SparseGPT reaches (1) only approximately (a column's kept values freeze once its lazy block is
processed) and each hessian-swap grow sets one weight optimally with the others fixed, so (1)
lowers the calibration loss further; the ridge ``lam`` pulls ``w_K`` toward ``w0_K`` (trusting the
calibration Hessian less), the same role the dampening plays in SparseGPT and hessian-swap.

Two pure tensor functions, both batched over the rows:

* :func:`refit_exact` solves (1) with one Cholesky factorisation per row (rows in chunks; the
  rows' kept sets differ, so each row has its own ``[k, k]`` system): ``O(rows * k^3)``.
* :func:`refit_cg` runs ``steps`` conjugate-gradient iterations on (1) for all rows at once,
  warm-started from the given kept values: one ``[rows, in] @ [in, in]`` product per step, and
  the loss never rises (CG on a positive definite system lowers the energy monotonically). Few
  steps = partial re-fit, itself a regulariser toward the starting weights.

Neither changes the mask. Work happens in float32 on the weight's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsnt_export.errors import UserInputError
from dsnt_export.refine.loss import check_layer_shapes, dampened_hessian, quadratic_loss

__all__ = ["RefitInfo", "refit_cg", "refit_exact"]


@dataclass(frozen=True)
class RefitInfo:
    """What a re-fit did: ``loss_before`` / ``loss_after`` (floats, :func:`~dsnt_export.refine.
    loss.quadratic_loss` of ``reference - weight`` on the dampened Hessian, summed over rows) and
    ``steps`` (CG iterations run; 0 for the exact solve)."""

    loss_before: float
    loss_after: float
    steps: int


def _check(weight, keep, reference, hessian, percdamp) -> None:
    R, C = weight.shape
    check_layer_shapes(weight, keep, reference, hessian)
    if not isinstance(percdamp, (int, float)) or percdamp < 0:
        raise UserInputError(f"percdamp must be a number >= 0, got {percdamp!r}")


def refit_exact(
    weight: torch.Tensor,
    keep: torch.Tensor,
    reference: torch.Tensor,
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    chunk: int = 64,
) -> tuple[torch.Tensor, RefitInfo]:
    """Kept weights set to the exact minimiser (1) of the dampened layer loss, row by row.

    ``weight`` [out, in]: current values (read only where ``keep``; used for ``loss_before``);
    ``keep`` bool [out, in] (True = kept; rows may keep different counts); ``reference`` [out, in]:
    the dense weight ``w0``; ``hessian`` [in, in]: ``2/n X^T X``. ``percdamp`` > 0 (the ridge makes
    every ``(H_lam)_KK`` positive definite, dead input channels included). ``chunk``: rows solved
    together (memory ``chunk * k^2`` floats). Returns (new weight in ``weight``'s dtype, exact zeros
    where pruned; :class:`RefitInfo`). Raises ``ShapeError`` for mismatched shapes,
    ``UserInputError`` for ``percdamp <= 0`` or ``chunk < 1``.
    """
    _check(weight, keep, reference, hessian, percdamp)
    if percdamp <= 0:
        raise UserInputError(f"refit_exact needs percdamp > 0 (a ridge), got {percdamp!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise UserInputError(f"chunk must be a positive int, got {chunk!r}")
    dev = weight.device
    H = dampened_hessian(hessian.to(dev), percdamp)
    w0 = reference.to(device=dev, dtype=torch.float32)
    keep = keep.to(dev)
    w = torch.where(keep, weight.to(torch.float32), 0.0)
    loss_before = quadratic_loss(w0 - w, H)
    b_full = torch.where(keep, 0.0, w0) @ H  # [R, C]; at kept columns: H_KP w0_P
    out = torch.zeros_like(w)
    R = w.shape[0]
    for s in range(0, R, chunk):
        kc = keep[s : s + chunk]
        counts = kc.sum(1)
        kmax = int(counts.max()) if kc.numel() else 0
        if kmax == 0:
            continue
        # kept column indices per row, padded (pad slots point at column 0 and are masked out)
        order = torch.argsort((~kc).to(torch.int8), dim=1, stable=True)[:, :kmax]
        valid = torch.arange(kmax, device=dev).unsqueeze(0) < counts.unsqueeze(1)
        idx = torch.where(valid, order, 0)
        A = H[idx.unsqueeze(2), idx.unsqueeze(1)]  # [b, k, k]
        vv = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(kmax, device=dev, dtype=A.dtype).expand_as(A)
        A = torch.where(vv, A, eye)
        rhs = torch.where(valid, torch.gather(b_full[s : s + chunk], 1, idx), 0.0)
        L, _ = torch.linalg.cholesky_ex(A)
        delta = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
        vals = torch.gather(w0[s : s + chunk], 1, idx) + delta
        # pad slots scatter into an extra last column that is dropped
        rows_out = torch.zeros(kc.shape[0], kc.shape[1] + 1, device=dev)
        rows_out.scatter_(1, torch.where(valid, order, kc.shape[1]), vals)
        out[s : s + chunk] = torch.where(kc, rows_out[:, :-1], 0.0)
    loss_after = quadratic_loss(w0 - out, H)
    return out.to(weight.dtype), RefitInfo(loss_before, loss_after, 0)


def refit_cg(
    weight: torch.Tensor,
    keep: torch.Tensor,
    reference: torch.Tensor,
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    steps: int = 20,
) -> tuple[torch.Tensor, RefitInfo]:
    """``steps`` conjugate-gradient iterations toward (1), all rows at once, from ``weight``.

    Same arguments as :func:`refit_exact` (``percdamp`` >= 0 here: CG stays in the range of a
    singular ``H``), plus ``steps`` (int >= 0; enough steps reach the exact solution). Each row has
    its own step lengths; a row whose residual is 0 stays put. Returns (new weight in ``weight``'s
    dtype, exact zeros where pruned; :class:`RefitInfo`); the dampened loss never increases.
    Raises ``ShapeError`` for mismatched shapes, ``UserInputError`` for bad ``percdamp``/``steps``.
    """
    _check(weight, keep, reference, hessian, percdamp)
    if not isinstance(steps, int) or steps < 0:
        raise UserInputError(f"steps must be an int >= 0, got {steps!r}")
    dev = weight.device
    H = dampened_hessian(hessian.to(dev), percdamp)
    w0 = reference.to(device=dev, dtype=torch.float32)
    keep = keep.to(dev)
    w = torch.where(keep, weight.to(torch.float32), 0.0)
    loss_before = quadratic_loss(w0 - w, H)
    # minimise over x = w_K - w0_K: residual r = -grad/2 = ((w0 - w) H) on K
    r = torch.where(keep, (w0 - w) @ H, 0.0)
    p = r.clone()
    rr = (r * r).sum(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(steps):
        Ap = torch.where(keep, p @ H, 0.0)
        pAp = (p * Ap).sum(1, keepdim=True)
        alpha = torch.where(pAp > tiny, rr / pAp.clamp_min(tiny), 0.0)
        w = w + alpha * p
        r = r - alpha * Ap
        rr_new = (r * r).sum(1, keepdim=True)
        beta = torch.where(rr > tiny, rr_new / rr.clamp_min(tiny), 0.0)
        p = r + beta * p
        rr = rr_new
    w = torch.where(keep, w, 0.0)
    loss_after = quadratic_loss(w0 - w, H)
    return w.to(weight.dtype), RefitInfo(loss_before, loss_after, steps)
