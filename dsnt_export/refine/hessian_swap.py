"""The ``hessian-swap`` refiner: prune-and-grow swaps chosen by the exact second-order layer loss.

Name: this is dsnt-export's default refiner. It used to be reachable only as ``refine: dsnot`` with
``dsnot.criterion: hessian``, which hid a different algorithm (it changes weight values, DSnoT never
does) behind DSnoT's name and config. It keeps DSnoT's *cycle structure* (docs/dsnot-spec.md sections 2-3: one
grow and one prune per row and cycle, inside one N:M group, at most ``max_cycles`` cycles) but
replaces DSnoT's mean-based choice by the exact loss of SparseGPT's objective, hence "hessian"
(the matrix it is driven by) and "swap" (what it does); old recipe keys are translated by
:func:`dsnt_export.refine.config_from_legacy`.

DSnoT (spec sections 2-4) picks, in every cycle of a row, one pruned weight to grow and one kept
weight to prune so that the row's *mean-based* error estimate ``sum_j (w_j - w'_j) E[x_j]`` shrinks;
weights are never changed. That estimate ignores the covariance of the inputs, and on top of
SparseGPT (whose kept weights carry an OBS update) it undoes part of the compensation.

Here every cycle of a row still swaps one pruned and one kept weight inside the row (inside one N:M
group for N:M patterns, so per-row counts and the pattern hold after every swap), but the pair is
the one that lowers the row's exact reconstruction loss (:mod:`dsnt_export.refine.loss`)

    L_r = (w_ref - w')_r  H  (w_ref - w')_r^T,      H = 2/n X^T X + damp * mean(diag H) * I

the most (SparseGPT's objective, with its dampening), and the grown weight takes its loss-optimal
value instead of its dense value. With ``d = w_ref - w'`` and ``g = d H`` (kept up to date with two
rank-1 row updates per swap), pruning kept ``j`` (value ``u``) and growing pruned ``i`` changes

    dL = 2 u g_j + u^2 H_jj  -  (g_i + u H_ij)^2 / H_ii,       new w'_i = (g_i + u H_ij) / H_ii

A row stops after ``max_cycles`` swaps or when no swap lowers its loss. For N:M every (grow, prune)
pair of every group is scored (``n_keep * n_prune`` per group); for unstructured sparsity the grow
with the largest ``g_i^2 / H_ii`` is paired with the prune of smallest cost (then scored exactly).

Pure tensor function: ``hessian_refine(weight, keep, reference, hessian, pattern) -> (w', keep', info)``;
the registered refiner is :func:`refine_layer` with :class:`HessianSwapConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dsnt_export.patterns import NM, Pattern, parse_pattern
from dsnt_export.refine.loss import (
    check_layer_shapes,
    dampened_hessian,
    layer_loss,
    loss_and_gradient,
    mean_error_estimate,
    quadratic_loss,
)
from dsnt_export.refine.registry import (
    RefineOutcome,
    RefinerConfigBase,
    RefineSummary,
    check_max_cycles,
    check_number,
    register_refiner,
)
from dsnt_export.stats import ActivationStats

__all__ = [
    "HessianRefineInfo",
    "HessianSwapConfig",
    "hessian_refine",
    "layer_loss",
    "refine_layer",
]

#: the default dampening fraction of the swap loss, chosen on the embedded model (README, "Quality")
DEFAULT_PERCDAMP = 0.03
#: the default cap on swaps per row (DSnoT's max_cycles)
DEFAULT_MAX_CYCLES = 50


@dataclass(frozen=True)
class HessianSwapConfig(RefinerConfigBase):
    """Options of the ``hessian-swap`` refiner (module docstring).

    max_cycles: at most this many swaps per row (int >= 0; DSnoT's cycle cap, default 50).
    percdamp:   the swap loss's Hessian is dampened by ``percdamp * mean(diag H)`` on its diagonal
                (:func:`dsnt_export.refine.loss.dampened_hessian`; a ridge toward plain magnitude).
                Larger values trust the calibration data less; 0.03 was chosen on the embedded
                model (README, "Quality"). SparseGPT's own dampening is a separate option
                (``sparsegpt.percdamp``, 0.01).

    Raises ``UserInputError`` for an invalid value.
    """

    json_what: ClassVar[str] = "hessian-swap option"

    max_cycles: int = DEFAULT_MAX_CYCLES
    percdamp: float = DEFAULT_PERCDAMP

    def __post_init__(self):
        check_max_cycles(self.max_cycles)
        check_number("percdamp", self.percdamp, nonneg=True, hint=" (e.g. 0.03)")

    @property
    def needs_variance(self) -> bool:
        """False: the swaps never read ``ActivationStats.var``."""
        return False

    @property
    def needs_hessian(self) -> bool:
        """Always True: the swaps are scored with ``ActivationStats.hessian``."""
        return True


@dataclass
class HessianRefineInfo:
    """What :func:`hessian_refine` did: the (dampened) layer loss before and after, the swaps over
    all rows and the cycles run."""

    loss_before: float
    loss_after: float
    n_swaps: int
    cycles: int

    def summary(self) -> dict:
        """The fields as a dict."""
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "n_swaps": self.n_swaps,
            "cycles": self.cycles,
        }


@torch.no_grad()
def hessian_refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    reference: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern | str,
    *,
    max_cycles: int = DEFAULT_MAX_CYCLES,
    percdamp: float = DEFAULT_PERCDAMP,
) -> tuple[torch.Tensor, torch.Tensor, HessianRefineInfo]:
    """Swap pruned and kept weights row by row to lower the exact layer loss (module docstring).

    ``weight`` [out, in]: the sparse layer's current values (entries where ``keep`` is False are
    ignored, treated as 0); ``reference``: the dense weight the loss is measured against;
    ``hessian``: ``2/n X^T X`` [in, in]. Returns the new weight (``weight``'s dtype, exact zeros
    where pruned), the new keep mask, and what was done. Work happens in float32 on the weight's
    device; ``keep``'s per-row counts (and N:M groups) are preserved. ``percdamp``: the dampening
    fraction of ``hessian`` (:class:`HessianSwapConfig`). Raises ``ShapeError`` for mismatched
    shapes, ``UserInputError`` for a bad ``max_cycles``.
    """
    pattern = parse_pattern(pattern)
    R, C = weight.shape
    check_layer_shapes(weight, keep, reference, hessian)
    check_max_cycles(max_cycles)
    dev = weight.device
    H = dampened_hessian(hessian.to(dev), percdamp, dead="inf")
    Hd = torch.diagonal(H)
    w = torch.where(keep, weight.to(torch.float32), 0.0)
    ref = reference.to(device=dev, dtype=torch.float32)
    keep = keep.clone()
    Hfin = torch.where(torch.isfinite(H), H, 0.0)  # dead channels: gradient contribution 0
    loss_before, g = loss_and_gradient(ref - w, Hfin)
    if max_cycles == 0 or keep.all() or not keep.any():
        return w.to(weight.dtype), keep, HessianRefineInfo(loss_before, loss_before, 0, 0)
    if isinstance(pattern, NM):
        w, keep, swaps, cycles = _nm_swaps(w, keep, g, Hfin, Hd, pattern, max_cycles)
    else:
        w, keep, swaps, cycles = _unstructured_swaps(w, keep, g, Hfin, Hd, max_cycles)
    loss_after = quadratic_loss(ref - w, Hfin)
    out = w.to(weight.dtype).masked_fill_(~keep, 0)
    return out, keep, HessianRefineInfo(loss_before, loss_after, swaps, cycles)


def _apply(w, keep, g, Hfin, rows, i, j, v, ok):
    """Prune j (value u) and grow i (value v) in the rows where ``ok``; keep g = (ref - w) H exact."""
    u = torch.where(ok, w[rows, j], 0.0)
    v = torch.where(ok, v, 0.0)
    g.addcmul_(u[:, None], Hfin.index_select(0, j))
    g.addcmul_(v[:, None], Hfin.index_select(0, i), value=-1.0)
    w[rows, j] = torch.where(ok, 0.0, w[rows, j])
    w[rows, i] = torch.where(ok, v, w[rows, i])
    keep[rows, j] &= ~ok
    keep[rows, i] |= ok


def _nm_swaps(w, keep, g, Hfin, Hd, pattern: NM, max_cycles: int):
    """N:M: score every (grow, prune) pair of every group, apply each row's best one per cycle.

    Per (row, group) state that only a swap in that group changes is cached (kept values, their
    prune costs' constant part, the coupling ``u_j H_ij`` and ``1 / H_ii``); a cycle then costs a
    few passes over ``[rows, in]``. A row whose best pair does not lower its loss is final (its
    ``g`` no longer changes), so finished rows are dropped from the work set as they accumulate.
    """
    R, C = w.shape
    m, nk = pattern.m, pattern.n_keep
    npr = m - nk
    G = C // m
    dev = w.device
    idx = torch.arange(C, device=dev).reshape(G, m)
    Hb = Hfin[idx[:, :, None], idx[:, None, :]]  # [G, m, m] diagonal blocks
    Hdf = torch.diagonal(Hfin).reshape(G, m)  # prune costs (0 on dead channels)
    Hdi = Hd.reshape(G, m)  # grow denominators (inf on dead channels)
    gidx = torch.arange(G, device=dev)
    order = torch.argsort((~keep).reshape(R, G, m).to(torch.uint8), dim=-1, stable=True)
    ki, pi = order[..., :nk].contiguous(), order[..., nk:].contiguous()  # local slots

    def group_state(w_rg, ki_rg, pi_rg, grp):
        """Cached terms of the groups ``grp`` ([n] or [n, G]) of rows with values ``w_rg``."""
        u = w_rg.gather(-1, ki_rg)
        hjj = Hdf[grp].gather(-1, ki_rg)
        hb = Hb[grp]  # [..., m, m]
        hij = hb.gather(-2, pi_rg[..., :, None].expand(*pi_rg.shape, m))
        hij = hij.gather(-1, ki_rg[..., None, :].expand(*pi_rg.shape, nk))
        return u, u * u * hjj, hij * u[..., None, :], 1.0 / Hdi[grp].gather(-1, pi_rg)

    u, c2, uh, ihii = group_state(w.reshape(R, G, m), ki, pi, gidx.expand(R, G))
    out_w, out_keep = w, keep
    live = torch.arange(R, device=dev)  # rows of the work set, as indices into the outputs
    swaps = torch.zeros((), dtype=torch.int64, device=dev)
    sync_every = 1 if dev.type == "cpu" else 8
    cycles = 0
    for cycle in range(max_cycles):
        cycles = cycle + 1
        n = live.numel()
        gg = g.reshape(n, G, m)
        gnew = gg.gather(2, pi)[..., :, None] + uh  # [n, G, np, nk]: g_i after pruning j
        cost = torch.addcmul(c2, u, gg.gather(2, ki), value=2.0)  # loss added by pruning j
        dl = cost[..., None, :] - gnew.square_().mul_(ihii[..., :, None])
        best, arg = dl.reshape(n, -1).min(dim=1)
        del gnew, cost, dl
        ok = best < 0
        rows = torch.arange(n, device=dev)
        grp, a, b = arg // (npr * nk), (arg // nk) % npr, arg % nk
        i_loc, j_loc = pi[rows, grp, a], ki[rows, grp, b]
        i, j = grp * m + i_loc, grp * m + j_loc
        v = (gg[rows, grp, i_loc] + Hb[grp, i_loc, j_loc] * u[rows, grp, b]) / Hd[i]
        _apply(w, keep, g, Hfin, rows, i, j, v, ok)
        ki[rows, grp, b] = torch.where(ok, i_loc, j_loc)
        pi[rows, grp, a] = torch.where(ok, j_loc, i_loc)
        new = group_state(w.reshape(n, G, m)[rows, grp], ki[rows, grp], pi[rows, grp], grp)
        for cache, val in zip((u, c2, uh, ihii), new, strict=True):
            cache[rows, grp] = val
        swaps += ok.sum()
        if cycles % sync_every:
            continue
        n_ok = int(ok.sum())
        if n_ok < 0.75 * n:  # write the finished rows out, go on with the others only
            done, go = (~ok).nonzero().squeeze(1), ok.nonzero().squeeze(1)
            out_w[live[done]], out_keep[live[done]] = w[done], keep[done]
            if n_ok == 0:
                return out_w, out_keep, int(swaps), cycles
            live = live[go]
            w, keep, g, ki, pi = w[go], keep[go], g[go], ki[go], pi[go]
            u, c2, uh, ihii = u[go], c2[go], uh[go], ihii[go]
    if w is not out_w:  # the work set was compacted: write its rows back
        out_w[live], out_keep[live] = w, keep
    return out_w, out_keep, int(swaps), cycles


def _unstructured_swaps(w, keep, g, Hfin, Hd, max_cycles: int):
    R, _ = w.shape
    rows = torch.arange(R, device=w.device)
    swaps = torch.zeros((), dtype=torch.int64, device=w.device)
    sync_every = 1 if w.device.type == "cpu" else 8
    inf = float("inf")
    Hdf = torch.diagonal(Hfin)
    cycles = 0
    for cycle in range(max_cycles):
        cycles = cycle + 1
        gain = (g * g / Hd).masked_fill(keep, -inf)  # loss removed by growing i (alone)
        cost = (2 * w * g + w * w * Hdf).masked_fill(~keep, inf)  # loss added by pruning j (alone)
        i = gain.argmax(dim=1)
        j = cost.argmin(dim=1)
        u = w[rows, j]
        gi = g[rows, i] + u * Hfin[i, j]
        dl = cost[rows, j] - gi * gi / Hd[i]
        ok = dl < 0
        _apply(w, keep, g, Hfin, rows, i, j, gi / Hd[i], ok)
        swaps += ok.sum()
        if cycles % sync_every == 0 and not bool(ok.any()):
            break
    return w, keep, int(swaps), cycles


@register_refiner("hessian-swap", HessianSwapConfig, record_refine="hessian-swap")
def refine_layer(
    reference: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    stats: ActivationStats,
    pattern: Pattern | str,
    config: HessianSwapConfig,
    *,
    metric: torch.Tensor | None = None,
    name: str | None = None,
) -> RefineOutcome:
    """The ``hessian-swap`` refiner (signature: :mod:`dsnt_export.refine.registry`).

    Runs :func:`hessian_refine` with ``stats.hessian`` and reports, besides the exact (dampened)
    loss, DSnoT's mean-based per-row error estimate before and after (spec section 2) so that its
    records compare with DSnoT's. ``metric`` and ``name`` are not used (the pair is chosen by the
    loss). Raises ``EmptyStatisticsError`` when ``stats`` has no Hessian.
    """
    new_w, new_keep, info = hessian_refine(
        weight,
        keep,
        reference,
        stats.hessian,
        pattern,
        max_cycles=config.max_cycles,
        percdamp=config.percdamp,
    )
    return RefineOutcome(
        new_w,
        new_keep,
        RefineSummary(
            err_before=mean_error_estimate(reference, torch.where(keep, weight, 0), stats.sum),
            err_after=mean_error_estimate(reference, new_w, stats.sum),
            swaps=info.n_swaps,
            cycles=info.cycles,
            loss_before=info.loss_before,
            loss_after=info.loss_after,
        ),
    )
