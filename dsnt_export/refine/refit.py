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
  warm-started from the given kept values and preconditioned by ``diag(H_lam)`` (Jacobi): one
  ``[rows, in] @ [in, in]`` product per step, and the loss never rises (preconditioned CG on a
  positive definite system lowers the energy monotonically). On the embedded model's linears 8
  steps after SparseGPT come within 0.5 % of the exact solve's loss at 1/3-1/25 of its time.

Neither changes the mask. Work happens in float32 on the weight's device.

The registered refiner ``refit`` (:func:`refine_layer`, :class:`RefitConfig`) applies it after the
initial mask (SparseGPT, Wanda, magnitude); it is the default recipe's refiner. Re-fitting the kept
weights of a fixed mask by least squares after SparseGPT is the idea of Boza, "Fast and Optimal
Weight Update for Pruned Large Language Models" (2024, ADMM there; CG here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dsnt_export.errors import UserInputError
from dsnt_export.patterns import Pattern
from dsnt_export.precision import matmul_precision
from dsnt_export.refine.loss import (
    check_layer_shapes,
    dampened_hessian,
    dampening,
    loss_and_gradient,
    mean_error_estimate,
    quadratic_loss,
)
from dsnt_export.refine.registry import (
    RefineOutcome,
    RefinerConfigBase,
    RefineSummary,
    check_number,
    register_refiner,
)
from dsnt_export.stats import ActivationStats

__all__ = ["RefitConfig", "RefitInfo", "refine_layer", "refit_cg", "refit_exact"]

#: the refiner's default ridge (x mean diag H); chosen on held-out layer losses (refine_screen.py)
DEFAULT_PERCDAMP = 0.1
#: the refiner's default CG steps (Jacobi-preconditioned)
DEFAULT_STEPS = 8
SOLVERS = ("cg", "exact")


@dataclass(frozen=True)
class RefitInfo:
    """What a re-fit did: ``loss_before`` / ``loss_after`` (floats, :func:`~dsnt_export.refine.
    loss.quadratic_loss` of ``reference - weight`` on the dampened Hessian, summed over rows) and
    ``steps`` (CG iterations run; 0 for the exact solve)."""

    loss_before: float
    loss_after: float
    steps: int


def _prepare(weight, keep, reference, hessian, percdamp):
    """Checks shared by both solvers, then ``(H_lam, w0, keep, w, loss_before, g)`` in float32 on
    the weight's device (``w``: ``weight`` with zeros where pruned; ``g = (w0 - w) H_lam``)."""
    check_layer_shapes(weight, keep, reference, hessian)
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or percdamp < 0:
        raise UserInputError(f"percdamp must be a number >= 0, got {percdamp!r}")
    dev = weight.device
    H = dampened_hessian(hessian.to(dev), percdamp)
    w0 = reference.to(device=dev, dtype=torch.float32)
    keep = keep.to(dev)
    w = torch.where(keep, weight.to(torch.float32), 0.0)
    loss_before, g = loss_and_gradient(w0 - w, H)
    return H, w0, keep, w, loss_before, g


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
    H, w0, keep, w, loss_before, _ = _prepare(weight, keep, reference, hessian, percdamp)
    if percdamp <= 0:
        raise UserInputError(f"refit_exact needs percdamp > 0 (a ridge), got {percdamp!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise UserInputError(f"chunk must be a positive int, got {chunk!r}")
    dev = w.device
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
    precondition: bool = True,
) -> tuple[torch.Tensor, RefitInfo]:
    """``steps`` conjugate-gradient iterations toward (1), all rows at once, from ``weight``.

    Same arguments as :func:`refit_exact` (``percdamp`` >= 0 here: CG stays in the range of a
    singular ``H``), plus ``steps`` (int >= 0; enough steps reach the exact solution) and
    ``precondition`` (Jacobi: ``diag(H_lam)``, default; False = plain CG). Each row has its own
    step lengths; a row whose residual is 0 stays put. No host synchronisation inside the loop.
    Returns (new weight in ``weight``'s dtype, exact zeros where pruned; :class:`RefitInfo`); the
    dampened loss never increases. Raises ``ShapeError`` for mismatched shapes,
    ``UserInputError`` for bad ``percdamp``/``steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UserInputError(f"steps must be an int >= 0, got {steps!r}")
    H, w0, keep, w, loss_before, g = _prepare(weight, keep, reference, hessian, percdamp)
    # Minimise over x = w_K - w0_K. The residual is r = -grad/2 = g on K, with g = (w0 - w) H the
    # full gradient, kept up to date (g -= alpha p H) instead of r, so that no step needs a mask:
    # M^-1 is 0 off K, hence z = M^-1 g and every direction p (a sum of z's) are 0 off K, so
    # r.z = g.z, p.(Ap) = p.(pH) and w += alpha p stays 0 off K. The final g gives the loss
    # sum((w0 - w) * g) without another product. In place, one [rows, in] buffer per vector.
    if precondition:
        dinv = torch.diagonal(H).clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
        minv = torch.where(keep, dinv, 0.0)
    else:  # plain CG: M = I on K
        minv = keep.to(torch.float32)
    z = g * minv
    p = z.clone()
    ph = torch.empty_like(p)
    rz = torch.linalg.vecdot(g, z).unsqueeze(1)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(steps):
        torch.mm(p, H, out=ph)
        pap = torch.linalg.vecdot(p, ph).unsqueeze(1)
        alpha = torch.where(pap > tiny, rz / pap.clamp_min(tiny), 0.0)
        w.addcmul_(p, alpha)
        g.addcmul_(ph, alpha, value=-1.0)
        torch.mul(g, minv, out=z)
        rz_new = torch.linalg.vecdot(g, z).unsqueeze(1)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), 0.0)
        p.mul_(beta).add_(z)
        rz = rz_new
    loss_after = float(torch.linalg.vecdot(w0 - w, g).sum()) if steps else loss_before
    return w.to(weight.dtype), RefitInfo(loss_before, loss_after, steps)


@dataclass(frozen=True)
class RefitConfig(RefinerConfigBase):
    """Options of the ``refit`` refiner (module docstring).

    percdamp: the ridge ``lam`` of (1), a fraction of ``mean(diag H)`` (number >= 0; > 0 for
              ``solver: exact``). Larger values trust the calibration data less and keep the
              weights nearer their dense values; 0.1 gave the lowest loss on held-out text of
              both domains of the embedded model (benchmarks/refine_screen.py).
    steps:    preconditioned CG iterations (int >= 0; ``solver: cg``).
    solver:   ``"cg"`` (:func:`refit_cg`, default) or ``"exact"`` (:func:`refit_exact`, one
              Cholesky per row: exact, ``O(rows * k^3)``, ~25x slower on a 1536-input layer).

    Raises ``UserInputError`` for an invalid value.
    """

    json_what: ClassVar[str] = "refit option"

    percdamp: float = DEFAULT_PERCDAMP
    steps: int = DEFAULT_STEPS
    solver: str = "cg"

    def __post_init__(self):
        check_number("percdamp", self.percdamp, nonneg=True, hint=" (e.g. 0.1)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise UserInputError(f"refit steps must be an int >= 0 (e.g. 8), got {self.steps!r}")
        if self.solver not in SOLVERS:
            raise UserInputError(f"refit solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.solver == "exact" and self.percdamp <= 0:
            raise UserInputError(
                f"refit solver 'exact' needs percdamp > 0 (a ridge), got {self.percdamp!r}"
            )

    @property
    def needs_variance(self) -> bool:
        """False: the re-fit never reads ``ActivationStats.var``."""
        return False

    @property
    def needs_hessian(self) -> bool:
        """Always True: (1) is the Hessian's normal equation."""
        return True


@register_refiner("refit", RefitConfig, record_refine="refit")
def refine_layer(
    reference: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    stats: ActivationStats,
    pattern: Pattern | str,
    config: RefitConfig,
    *,
    metric: torch.Tensor | None = None,
    name: str | None = None,
) -> RefineOutcome:
    """The ``refit`` refiner (signature: :mod:`dsnt_export.refine.registry`): the kept weights
    re-fitted by (1) on ``stats.hessian``; the mask (``keep``, hence the pattern) is unchanged.

    ``loss_before`` / ``loss_after`` are the dampened loss of (1); DSnoT's mean-based estimate is
    reported too (as every refiner does); ``loss_ridge`` is the ridge of (1) (``loss_after`` is
    the dampened loss of the returned weights). ``pattern``, ``metric`` and ``name`` are not used. The
    products run at ``stats.matmul_precision`` (:mod:`dsnt_export.precision`: the driver's
    resolved ``matmul_precision``; "highest" unless set).
    Raises ``EmptyStatisticsError`` when ``stats`` has no Hessian.
    """
    H = stats.hessian
    with matmul_precision(stats.matmul_precision):  # the statistics' precision (driver's choice)
        if config.solver == "exact":
            new_w, info = refit_exact(weight, keep, reference, H, percdamp=config.percdamp)
        else:
            new_w, info = refit_cg(
                weight, keep, reference, H, percdamp=config.percdamp, steps=config.steps
            )
    return RefineOutcome(
        new_w,
        keep,
        RefineSummary(
            err_before=mean_error_estimate(reference, torch.where(keep, weight, 0), stats.sum),
            err_after=mean_error_estimate(reference, new_w, stats.sum),
            swaps=0,
            cycles=info.steps,
            loss_before=info.loss_before,
            loss_after=info.loss_after,
            loss_ridge=float(dampening(H.to(torch.float32), config.percdamp)),
        ),
    )
