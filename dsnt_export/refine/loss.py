"""The layer reconstruction loss and the Hessian dampening, written once (docs/dsnot-spec.md section 1).

A linear layer with inputs ``X`` [n_tokens, in] and dense weight ``W`` [out, in] replaced by ``W'``
has the reconstruction loss ``||X W^T - X W'^T||^2``. With ``H = 2/n X^T X`` (SparseGPT's Hessian,
``ActivationStats.hessian``, float32 [in, in]) and ``D = W - W'`` this is, up to the factor 2/n,

    L(W') = sum_r  D_r H D_r^T          (one quadratic form per output row r)

which is what SparseGPT minimises (Frantar & Alistarh 2023, section 3), what the hessian-swap
refiner lowers swap by swap (:mod:`dsnt_export.refine.hessian_swap`), what DSnoT's optional loss
guard checks (:mod:`dsnt_export.refine.dsnot`) and what the driver reports as ``rel_recon_loss``.

Dampening (SparseGPT's ``percdamp``): ``H + percdamp * mean(diag H) * I``, a ridge that keeps ``H``
invertible and pulls the loss toward plain magnitude. The *fraction* is each caller's own option
(SparseGPT: ``SparseGPTConfig.percdamp`` = 0.01 as in the reference code; hessian-swap:
``HessianSwapConfig.percdamp`` = 0.03); the formula lives here.

All functions compute in float32 and return Python floats for losses (units: squared activations
times the 2/n of ``H``, summed over rows). Bit-exactness: the op order is that of the code these
helpers replaced, so results are unchanged to the last bit.
"""

from __future__ import annotations

import torch

from dsnt_export.errors import ShapeError

__all__ = [
    "dampened_hessian",
    "dampening",
    "layer_loss",
    "loss_and_gradient",
    "quadratic_loss",
    "relative_loss",
]


def check_layer_shapes(
    weight: torch.Tensor, keep: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor
) -> None:
    """The shapes every layer-loss refinement reads: ``weight``, ``keep`` and ``reference`` all
    [out, in], ``hessian`` [in, in]. Raises ``ShapeError`` naming the shapes received."""
    C = weight.shape[-1]
    if keep.shape != weight.shape or reference.shape != weight.shape:
        raise ShapeError(
            f"weight {tuple(weight.shape)}, keep {tuple(keep.shape)} and reference "
            f"{tuple(reference.shape)} must have the same shape"
        )
    if hessian.shape != (C, C):
        raise ShapeError(f"hessian has shape {tuple(hessian.shape)}, expected ({C}, {C})")


def dampening(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The diagonal ridge ``percdamp * mean(diag H)`` (0-d tensor, ``hessian``'s dtype and device).

    ``hessian``: [in, in] floating point. ``percdamp``: fraction >= 0 (not validated here; the
    configs that own it validate it).
    """
    return percdamp * torch.diagonal(hessian).mean()


def dampened_hessian(hessian: torch.Tensor, percdamp: float, *, dead: str = "keep") -> torch.Tensor:
    """A float32 copy of ``hessian`` [in, in] with :func:`dampening` added to its diagonal.

    ``dead`` says what happens to input channels that never fire (``H_jj <= 0`` before dampening):
    ``"keep"`` leaves them dampened like the others; ``"inf"`` sets their diagonal entry to +inf,
    so that a weight on such a channel is never chosen to grow (its optimal value is 0 and growing it
    cannot lower the loss; used by the hessian-swap refiner). ``hessian`` is not modified.
    Raises ``ValueError`` for another ``dead`` value.
    """
    if dead not in ("keep", "inf"):
        raise ValueError(f"dead must be 'keep' or 'inf', got {dead!r}")
    H = hessian.to(torch.float32).clone()
    diag = torch.diagonal(H)
    damp = dampening(H, percdamp)
    dead_ch = diag <= 0
    diag += damp
    if dead == "inf" and bool(dead_ch.any()):
        diag[dead_ch] = float("inf")
    return H


def loss_and_gradient(delta: torch.Tensor, hessian: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(sum_r delta_r H delta_r^T, delta @ H)`` for ``delta = W_ref - W'`` [out, in] (float32).

    The second value ``g`` [out, in] is what the swap refiners keep up to date with rank-1 updates;
    the first is :func:`quadratic_loss` computed from it.
    """
    g = delta @ hessian
    return float((delta * g).sum()), g


def quadratic_loss(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_r delta_r H delta_r^T`` for ``delta`` [out, in] and ``H`` [in, in] of one dtype."""
    return float(((delta @ hessian) * delta).sum())


def layer_loss(reference: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """The reconstruction loss of ``weight`` against ``reference`` (both [out, in]), in float32.

    Pass a dampened Hessian (:func:`dampened_hessian`) to get the loss a refiner minimised.
    """
    d = reference.to(torch.float32) - weight.to(torch.float32)
    return quadratic_loss(d, hessian.to(torch.float32))


def relative_loss(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    hessian: torch.Tensor,
    *,
    dampened_loss: tuple[float, float] | None = None,
) -> float:
    """``||X W^T - X W'^T||^2 / ||X W^T||^2`` from ``H = 2/n X^T X`` (float32 [in, in]).

    ``dense`` and ``sparse`` are [out, in]; NaN when the dense layer's output energy is 0 (e.g. all
    calibration inputs of the layer were zero). The driver's ``rel_recon_loss`` per layer.
    ``dampened_loss``: ``(loss, ridge)`` when ``loss`` = ``sum_r D_r (H + ridge * I) D_r^T`` of
    these very weights (``D = dense - sparse``) is already known (a refiner's
    ``RefineSummary.loss_after`` / ``loss_ridge``): the numerator is then ``loss - ridge *
    ||D||^2`` (clamped at 0; equal to the direct product up to float32 rounding), one
    ``[out, in] @ [in, in]`` product fewer.
    """
    if dampened_loss is None:
        num = quadratic_loss(dense.float() - sparse.float(), hessian)
    else:
        loss, ridge = dampened_loss
        # a plain reduction, not a BLAS dot: MKL's sdot may round differently with the
        # buffers' alignment, and the records are compared bit for bit across processes
        num = max(0.0, loss - ridge * float((dense.float() - sparse.float()).square().sum()))
    den = quadratic_loss(dense.float(), hessian)
    return num / den if den > 0 else float("nan")


def mean_error_estimate(
    reference: torch.Tensor, weight: torch.Tensor, channel_sum: torch.Tensor
) -> float:
    """DSnoT's per-row reconstruction-error estimate, averaged over rows (a Python float).

    ``mean_r |sum_j (W_ref - W')[r, j] * s_j|`` (docs/dsnot-spec.md section 2) for ``reference`` and
    ``weight`` [out, in] (``weight`` already zero where pruned) and ``channel_sum`` ``s`` [in]
    (``ActivationStats.sum``); float32. Refiners that minimise the exact loss report it too, so that
    their per-layer records compare with DSnoT's.
    """
    s = channel_sum.reshape(1, -1).float()
    return float(((reference.float() - weight.float()) * s).sum(1).abs().mean())
