"""DSnoT: training-free prune-and-grow refinement of a sparse layer's keep-mask (docs/dsnot-spec.md sections 2-4).

``refine(weight, keep, stats, pattern, config) -> keep`` swaps pruned and kept weights inside each
output row so that the row's expected reconstruction error ``err_r = sum_{j pruned} W[r,j] * s_j``
shrinks. Weights are never modified. All rows run in parallel as tensor ops on the weight's device.

Exactness: with ``DSnoTConfig.official()`` and the same statistics, the mask equals the reference
implementation's (zyxxmu/DSnoT @ 4c029df) bit for bit, wherever the reference is not defective:

* candidate orders are those of the reference's stable sorts, but only the ``max_cycles`` candidates
  that can ever be visited are selected (top-k over tie-free integer keys, no full sorts);
* ``err`` starts as ``torch.sum`` over the whole row of D with kept entries zeroed and is updated as
  ``(err + D[j]) - D[i]`` in float32, like the reference.

Where the reference is defective (spec section 5) we deliberately differ:

* a row stops when the candidate list it needs is exhausted (the reference walks into kept weights);
* N:M: a grow whose group has no unused kept weight left is skipped (no swap, the row stays active);
  the reference then re-grows an already pruned position and breaks the pattern.
So per-row kept counts and the N:M pattern hold after every swap, always.

Differences of the reference that depend on statistics being degenerate (``var == 0`` gives NaN grow
scores which the reference sorts past +inf) are resolved by ignoring NaN scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dsnt_export.errors import ShapeError, UserInputError
from dsnt_export.masks import check_mask
from dsnt_export.methods import _check_weight, keep_from_metric, wanda_metric
from dsnt_export.methods import initial_metric as _initial_metric
from dsnt_export.patterns import NM, Pattern, parse_pattern
from dsnt_export.refine.loss import loss_and_gradient
from dsnt_export.refine.registry import (
    RefineOutcome,
    RefinerConfigBase,
    RefineSummary,
    check_max_cycles,
    check_number,
    register_refiner,
)
from dsnt_export.selection import select_candidates
from dsnt_export.stats import ActivationStats

log = logging.getLogger(__name__)

_OVERRIDABLE = ("max_cycles", "update_threshold", "var_power", "sign_check", "loss_guard")


@dataclass(frozen=True)
class DSnoTConfig(RefinerConfigBase):
    """DSnoT hyper-parameters (spec section 4); the config of the refiner registered as ``dsnot``.

    max_cycles:        at most this many prune-and-grow cycles per row (reference: 50).
    update_threshold:  a row keeps swapping only while ``|err| > update_threshold``; err is a sum over
                       the T tokens of a calibration sample (reference: 0.1 at T = 2048).
    var_power:         grow score = D / var**var_power; 0 disables the variance term (reference: 1).
    sign_check:        refuse a swap that flips the sign of err. None = the reference's behaviour:
                       on for N:M, off for unstructured.
    loss_guard:        (ours, not in the paper) also require that the swap lowers the row's exact
                       second-order reconstruction loss (w_ref - w)^T H (w_ref - w), with H = 2/n X^T X
                       the SparseGPT Hessian, undampened (:mod:`dsnt_export.refine.loss`); a swap the
                       guard refuses is skipped (the row goes on with its next candidate). Needs
                       ActivationStats(hessian=True).
    preset:            the preset this config was made from ("official", "guarded", "+overrides"
                       when changed, "custom" otherwise); informative only, not compared.

    Every swap is chosen by DSnoT's mean-based error estimate and weights never change. The refiner
    that chooses swaps by the exact layer loss (formerly ``criterion: hessian`` here) is
    :class:`~dsnt_export.refine.hessian_swap.HessianSwapConfig` (``refine: hessian-swap``).
    Raises ``UserInputError`` for an invalid value.
    """

    json_what: ClassVar[str] = "DSnoT config"

    max_cycles: int = 50
    update_threshold: float = 0.1
    var_power: float = 1.0
    sign_check: bool | None = None
    loss_guard: bool = False
    preset: str = field(default="custom", compare=False)

    def __post_init__(self):
        check_max_cycles(self.max_cycles)
        check_number("update_threshold", self.update_threshold, nonneg=True)
        check_number("var_power", self.var_power)
        if not isinstance(self.loss_guard, bool):
            raise UserInputError(f"loss_guard must be true or false, got {self.loss_guard!r}")
        if self.sign_check is not None and not isinstance(self.sign_check, bool):
            raise UserInputError(f"sign_check must be true, false or null, got {self.sign_check!r}")

    @classmethod
    def _with(cls, preset: str, base: dict, overrides: dict) -> DSnoTConfig:
        unknown = sorted(set(overrides) - set(_OVERRIDABLE))
        if unknown:
            raise UserInputError(f"unknown DSnoT option(s) {unknown}; known: {list(_OVERRIDABLE)}")
        return cls(
            **{**base, **overrides}, preset=preset if not overrides else f"{preset}+overrides"
        )

    @classmethod
    def official(cls, **overrides) -> DSnoTConfig:
        """The reference code's defaults (spec section 4): 50 cycles, threshold 0.1, var_power 1,
        sign check for N:M only, no loss guard. Bit-exact with zyxxmu/DSnoT @ 4c029df."""
        return cls._with(
            "official",
            dict(
                max_cycles=50,
                update_threshold=0.1,
                var_power=1.0,
                sign_check=None,
                loss_guard=False,
            ),
            overrides,
        )

    @classmethod
    def guarded(cls, **overrides) -> DSnoTConfig:
        """DSnoT's mean criterion with the sign check on for every pattern and the loss guard, which
        keeps it from undoing SparseGPT's OBS compensation (formerly the ``default`` preset with
        ``criterion: mean``; README, "Quality")."""
        return cls._with(
            "guarded",
            dict(
                max_cycles=50,
                update_threshold=0.1,
                var_power=1.0,
                sign_check=True,
                loss_guard=True,
            ),
            overrides,
        )

    @property
    def needs_variance(self) -> bool:
        """True: DSnoT's grow score divides by ``ActivationStats.var`` (spec section 1)."""
        return True

    @property
    def needs_hessian(self) -> bool:
        """True when the loss guard is on (it reads ``ActivationStats.hessian``)."""
        return self.loss_guard

    def sign_check_for(self, pattern: Pattern) -> bool:
        """Whether swaps must keep err's sign for ``pattern`` (``sign_check=None``: N:M only)."""
        if self.sign_check is None:
            return isinstance(pattern, NM)
        return self.sign_check


@dataclass
class RefineInfo:
    """What a DSnoT refinement did.

    ``err_before`` / ``err_after``: float32 [out] per-row reconstruction-error estimates
    ``sum_{j pruned} W[r, j] * s_j`` (spec section 2; a sum over the tokens of a sample).
    ``n_swaps``: swaps over all rows; ``cycles``: cycles run; ``initial_metric``: the metric the N:M
    prune choice ranked ("wanda", "magnitude" or "given"); ``loss_*``: the loss guard's exact layer
    loss (None without the guard).
    """

    err_before: torch.Tensor
    err_after: torch.Tensor
    n_swaps: int
    cycles: int
    initial_metric: str
    loss_before: float | None = None
    loss_after: float | None = None

    def summary(self) -> dict:
        """Scalars only: the losses, mean |err| before and after, swaps, cycles, metric name."""
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "mean_abs_err_before": float(self.err_before.abs().mean()),
            "mean_abs_err_after": float(self.err_after.abs().mean()),
            "n_swaps": self.n_swaps,
            "cycles": self.cycles,
            "initial_metric": self.initial_metric,
        }


class _LossGuard:
    """Exact change of the rows' second-order loss L = d^T H d, d = w_ref - w_sparse, per swap.

    Keeps g = d H (one matmul up front); a swap grows i (w_i: 0 -> v_i) and prunes j (w_j: u_j -> 0):
    dL = -2 v_i g_i + v_i^2 H_ii + 2 u_j g_j + u_j^2 H_jj - 2 v_i u_j H_ij, g += -v_i H_i + u_j H_j.
    """

    def __init__(self, weight, keep, stats, reference_weight, name):
        if not stats.has_hessian:
            raise UserInputError(
                f"layer {name!r}: DSnoT's loss_guard needs the Hessian; collect statistics with "
                "ActivationStats(..., hessian=True)"
            )
        self.H = stats.hessian
        self.Hd = torch.diagonal(self.H)
        self.w = weight.to(torch.float32)
        ref = self.w if reference_weight is None else reference_weight.to(self.w)
        if ref.shape != self.w.shape:
            raise ShapeError(
                f"reference_weight has shape {tuple(ref.shape)}, expected {tuple(self.w.shape)}"
            )
        self.delta = ref - self.w * keep
        self.loss_before, self.g = loss_and_gradient(self.delta, self.H)

    def loss(self) -> float:
        """The current loss from the maintained ``delta`` and ``g = delta H``."""
        return float((self.delta * self.g).sum())

    def lowers_loss(self, gi, pj) -> torch.Tensor:
        v, u = self.w.gather(1, gi), self.w.gather(1, pj)
        dl = (
            -2 * v * self.g.gather(1, gi)
            + v * v * self.Hd[gi]
            + 2 * u * self.g.gather(1, pj)
            + u * u * self.Hd[pj]
            - 2 * v * u * self.H[gi, pj]
        )
        return dl < 0

    def apply(self, gi, pj, ok) -> None:
        v = torch.where(ok, self.w.gather(1, gi), 0.0)
        u = torch.where(ok, self.w.gather(1, pj), 0.0)
        self.g.addcmul_(v, self.H.index_select(0, gi[:, 0]), value=-1.0)
        self.g.addcmul_(u, self.H.index_select(0, pj[:, 0]))
        self.delta.scatter_add_(1, gi, -v)
        self.delta.scatter_add_(1, pj, u)


def _grow_scores(Dz: torch.Tensor, var: torch.Tensor, power: float) -> torch.Tensor:
    """Grow score D / var**p of pruned weights, 0 for kept ones (spec section 2; no epsilon)."""
    if not power:
        return Dz
    denom = torch.pow(var.reshape((1, -1)), power)
    grow = Dz / denom
    if not bool(((denom > 0) & torch.isfinite(denom)).all()):
        grow = torch.nan_to_num(grow, nan=0.0)  # 0/0 of degenerate channels: never a candidate
    return grow


def _resolve_metric(
    initial_metric, weight: torch.Tensor, keep: torch.Tensor, stats: ActivationStats, pattern
) -> tuple[torch.Tensor, str]:
    """The metric whose lowest kept value DSnoT prunes inside an N:M group."""
    if isinstance(initial_metric, torch.Tensor):
        if initial_metric.shape != weight.shape:
            raise ShapeError(
                f"initial_metric has shape {tuple(initial_metric.shape)}, expected {tuple(weight.shape)}"
            )
        return initial_metric.to(device=weight.device, dtype=torch.float32), "given"
    if initial_metric in ("wanda", "magnitude"):
        return _initial_metric(initial_metric, weight, stats), initial_metric
    if initial_metric != "auto":
        raise UserInputError(
            f"initial_metric must be 'auto', 'wanda', 'magnitude' or a tensor, got {initial_metric!r}"
        )
    # 'auto': the metric whose N:M selection reproduces `keep` (wanda if both or neither do).
    wanda = wanda_metric(weight, stats)
    if isinstance(pattern, NM) and not torch.equal(keep_from_metric(wanda, pattern), keep):
        mag = _initial_metric("magnitude", weight, stats)
        if torch.equal(keep_from_metric(mag, pattern), keep):
            return mag, "magnitude"
    return wanda, "wanda"


def _validate(weight, keep, stats, pattern, name):
    where = f"layer {name!r}: " if name else ""
    _check_weight(weight, stats, name)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise UserInputError(
            f"{where}keep must be a bool tensor (True = kept), got {getattr(keep, 'dtype', type(keep))}"
        )
    if keep.shape != weight.shape:
        raise ShapeError(
            f"{where}keep has shape {tuple(keep.shape)} but weight has {tuple(weight.shape)}"
        )
    if isinstance(pattern, NM):
        check_mask(keep, pattern, name=name)


@torch.no_grad()
def refine_with_info(
    weight: torch.Tensor,
    keep: torch.Tensor,
    stats: ActivationStats,
    pattern: Pattern | str,
    config: DSnoTConfig | None = None,
    *,
    initial_metric: str | torch.Tensor = "auto",
    name: str | None = None,
    reference_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RefineInfo]:
    """Refine ``keep`` (bool [out, in], True = kept) with DSnoT; returns the new mask and what it did.

    ``initial_metric`` (N:M only) is the metric whose lowest kept weight of the grown weight's group
    gets pruned: "wanda", "magnitude", a float tensor (e.g. SparseGPT's), or "auto" = whichever of
    wanda/magnitude reproduces ``keep`` (wanda if undecidable). "auto" is ambiguous when both
    metrics select the same mask (tiny layers): then the prune choice inside a group can still
    differ, so pass the metric explicitly whenever you know it (the pipeline always does).
    ``reference_weight`` (loss guard only): the original dense weight the loss is measured against
    (default ``weight``; pass the pre-SparseGPT weight when ``weight`` carries an OBS update).
    """
    pattern = parse_pattern(pattern)
    config = config if config is not None else DSnoTConfig.official()
    if not isinstance(config, DSnoTConfig):
        raise UserInputError(
            f"refine_with_info takes a DSnoTConfig, got {type(config).__name__}; the exact-loss "
            "swap refiner is dsnt_export.refine.hessian_swap.hessian_refine"
        )
    _validate(weight, keep, stats, pattern, name)
    metric_t, metric_name = (None, "wanda")
    if isinstance(pattern, NM):
        metric_t, metric_name = _resolve_metric(initial_metric, weight, keep, stats, pattern)
    elif not (
        isinstance(initial_metric, torch.Tensor) or initial_metric in ("auto", "wanda", "magnitude")
    ):
        raise UserInputError(
            f"initial_metric must be 'auto', 'wanda', 'magnitude' or a tensor, got {initial_metric!r}"
        )

    D = weight * stats.sum.reshape((1, -1))  # float32 (type promotion from fp16 is exact)
    D = D.to(torch.float32)
    Dz = D.masked_fill(keep, 0)  # the reference's metric_for_regrowing
    err = torch.sum(Dz, dim=1, keepdim=True)
    err_before = err.clone()
    keep = keep.clone()
    if config.max_cycles == 0 or keep.all() or not keep.any():
        return keep, RefineInfo(err_before[:, 0], err[:, 0], 0, 0, metric_name)

    sign0 = torch.sign(err)
    K = min(config.max_cycles, D.shape[1])
    grow = _grow_scores(Dz, stats.var, config.var_power)
    gp_idx, gp_n = select_candidates(grow, K, descending=True, valid_fn=lambda v: v > 0)
    gn_idx, gn_n = select_candidates(grow, K, descending=False, valid_fn=lambda v: v < 0)
    del grow
    unstructured = not isinstance(pattern, NM)
    if unstructured:
        wanda = wanda_metric(weight, stats)
        inf = float("inf")
        pp_idx, pp_n = select_candidates(
            wanda.masked_fill(~keep | (D <= 0), inf), K, descending=False, valid_fn=torch.isfinite
        )
        pn_idx, pn_n = select_candidates(
            wanda.masked_fill(~keep | (D >= 0), inf), K, descending=False, valid_fn=torch.isfinite
        )
        del wanda
    else:
        avail = metric_t.masked_fill(~keep, float("inf"))
        m_range = torch.arange(pattern.m, device=D.device)

    guard = _LossGuard(weight, keep, stats, reference_weight, name) if config.loss_guard else None
    R = D.shape[0]
    zero = torch.zeros((R, 1), dtype=torch.int64, device=D.device)
    ptr_gp, ptr_gn, ptr_pp, ptr_pn = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    active = torch.ones((R, 1), dtype=torch.bool, device=D.device)
    swaps = torch.zeros((), dtype=torch.int64, device=D.device)
    sign_check = config.sign_check_for(pattern)
    thr = config.update_threshold
    sync_every = 1 if D.device.type == "cpu" else 8
    cycles = 0
    for cycle in range(config.max_cycles):
        cycles = cycle + 1
        pos = err > 0
        gi = torch.where(
            pos,
            gp_idx.gather(1, ptr_gp.clamp(max=K - 1)),
            gn_idx.gather(1, ptr_gn.clamp(max=K - 1)),
        )
        g_ok = torch.where(pos, ptr_gp < gp_n[:, None], ptr_gn < gn_n[:, None])
        ptr_gp += pos
        ptr_gn += ~pos
        d_grow = D.gather(1, gi)
        if unstructured:
            neg = err < 0
            pj = torch.where(
                neg,
                pp_idx.gather(1, ptr_pp.clamp(max=K - 1)),
                pn_idx.gather(1, ptr_pn.clamp(max=K - 1)),
            )
            p_ok = torch.where(neg, ptr_pp < pp_n[:, None], ptr_pn < pn_n[:, None])
            ptr_pp += neg
            ptr_pn += ~neg
            stay = None
        else:
            start = gi - gi % pattern.m
            block = avail.gather(1, start + m_range)
            low, loc = torch.topk(block, 1, dim=1, largest=False)
            pj = start + loc
            p_ok = low < float("inf")
            stay = active & g_ok & ~p_ok  # defect 3 fix: skip this grow, row stays active
        d_prune = D.gather(1, pj)
        err_after = err + d_prune - d_grow
        ok = active & g_ok & p_ok & (abs(err) > thr)
        if sign_check:
            ok &= sign0 == torch.sign(err_after)
        if guard is not None:
            lowers = guard.lowers_loss(gi, pj)
            skip = ok & ~lowers  # refused by the guard only: try the next candidate
            ok &= lowers
            stay = skip if stay is None else stay | skip
            guard.apply(gi, pj, ok)
        if not unstructured:
            # j is used up (the reference marks it even when the swap is refused), except when only
            # the loss guard refused: then j stays available for the row's next candidates
            mark = torch.full_like(low, float("inf"))
            avail.scatter_(1, pj, mark if guard is None else torch.where(skip, low, mark))
        keep.scatter_(1, pj, keep.gather(1, pj) & ~ok)
        keep.scatter_(1, gi, keep.gather(1, gi) | ok)
        err = torch.where(ok, err_after, err)
        swaps += ok.sum()
        active = ok if stay is None else ok | stay
        if cycles % sync_every == 0 and not bool(active.any()):
            break
    info = RefineInfo(err_before[:, 0], err[:, 0], int(swaps), cycles, metric_name)
    if guard is not None:
        info.loss_before, info.loss_after = guard.loss_before, guard.loss()
    if log.isEnabledFor(logging.DEBUG):
        log.debug("DSnoT %s: %s", name or "", info.summary())
    return keep, info


def refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    stats: ActivationStats,
    pattern: Pattern | str,
    config: DSnoTConfig | None = None,
    *,
    initial_metric: str | torch.Tensor = "auto",
    name: str | None = None,
) -> torch.Tensor:
    """DSnoT-refined keep-mask (see :func:`refine_with_info`)."""
    return refine_with_info(
        weight, keep, stats, pattern, config, initial_metric=initial_metric, name=name
    )[0]


@register_refiner("dsnot", DSnoTConfig, record_refine="dsnot", record_criterion="mean")
def refine_layer(
    reference: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    stats: ActivationStats,
    pattern: Pattern | str,
    config: DSnoTConfig,
    *,
    metric: torch.Tensor | None = None,
    name: str | None = None,
) -> RefineOutcome:
    """DSnoT as a registered refiner (signature: :mod:`dsnt_export.refine.registry`).

    The mask comes from :func:`refine_with_info` on ``weight`` (``metric``: the initial method's,
    "auto" when None); the values are ``weight`` unchanged (DSnoT never changes weights);
    ``reference`` is what the loss guard measures against.
    """
    new_keep, info = refine_with_info(
        weight,
        keep,
        stats,
        pattern,
        config,
        initial_metric="auto" if metric is None else metric,
        name=name,
        reference_weight=reference,
    )
    s = info.summary()
    return RefineOutcome(
        weight,
        new_keep,
        RefineSummary(
            err_before=s["mean_abs_err_before"],
            err_after=s["mean_abs_err_after"],
            swaps=s["n_swaps"],
            cycles=s["cycles"],
            loss_before=s["loss_before"],
            loss_after=s["loss_after"],
        ),
    )
