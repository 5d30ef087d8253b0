"""Initial (one-shot) masks: magnitude, Wanda, and SparseGPT (with its weight update).

The registry of initial methods (:func:`register_initial`, :func:`get_initial`,
:func:`initial_names`) is keyed by the recipe's ``init`` value; the recipe and CLI choices come
from :func:`initial_names`. Adding a method = a function ``(weight, stats, pattern, *, name,
options) -> InitialResult`` registered with :func:`register_initial`.

Pure tensor functions ``(weight, stats, pattern) -> keep`` (bool, True = kept, shape of ``weight``).
Per-row semantics of the DSnoT reference code (docs/dsnot-spec.md section 4):

* N:M: in every group of M consecutive input channels the ``M - N`` smallest metrics are pruned
  (ties: lower column pruned first).
* Unstructured(r): per row, the first ``int(in * r)`` of a stable ascending sort are pruned.

Metrics are computed in float32 from the (possibly fp16) weight: magnitude ``|W|``, Wanda
``|W| * sqrt(sq_sum)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsnt_export.errors import NonFiniteError, ShapeError, UserInputError
from dsnt_export.patterns import NM, Pattern, Unstructured, parse_pattern
from dsnt_export.selection import smallest_k_mask
from dsnt_export.stats import ActivationStats

MetricFn = Callable[[torch.Tensor, "ActivationStats | None"], torch.Tensor]
_METRICS: dict[str, MetricFn] = {}


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering a float32 importance metric ``(weight [out, in], stats) -> [out, in]``
    under ``name`` (higher = more important); :func:`initial_metric` looks it up."""

    def deco(fn: MetricFn) -> MetricFn:
        _METRICS[name] = fn
        return fn

    return deco


@register_metric("magnitude")
def magnitude_metric(weight: torch.Tensor, stats: ActivationStats | None = None) -> torch.Tensor:
    """``|W|`` in float32 [out, in] (``stats`` is not used)."""
    return torch.abs(weight).to(torch.float32)


@register_metric("wanda")
def wanda_metric(weight: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """Wanda's ``|W| * sqrt(a)`` [out, in] with ``a = stats.sq_sum`` (spec section 1; float32 for
    float32 or fp16 weights by type promotion). Raises ``UserInputError`` when ``stats`` is None."""
    if stats is None:
        raise UserInputError("the Wanda metric needs activation statistics (stats=None was given)")
    return torch.abs(weight) * torch.sqrt(stats.sq_sum.reshape((1, -1)))


def _check_weight(weight: torch.Tensor, stats: ActivationStats | None, name: str | None) -> None:
    where = f"layer {name!r}: " if name else ""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ShapeError(f"{where}weight must be a 2-D tensor [out, in], got {shape}")
    if not weight.is_floating_point():
        raise ShapeError(f"{where}weight must be floating point, got {weight.dtype}")
    if stats is not None and stats.in_features != weight.shape[1]:
        raise ShapeError(
            f"{where}statistics cover {stats.in_features} input channels but the weight has "
            f"in_features={weight.shape[1]}; collect the stats on this layer's input"
        )
    # one cheap reduction; the exact elementwise check only when the sum is not finite
    if not bool(torch.isfinite(weight.sum(dtype=torch.float32))) and not bool(
        torch.isfinite(weight).all()
    ):
        raise NonFiniteError(f"{where}weight {tuple(weight.shape)} contains NaN or Inf")


def initial_metric(
    method: str, weight: torch.Tensor, stats: ActivationStats | None, *, name: str | None = None
) -> torch.Tensor:
    """Float32 importance metric ``[out, in]`` of ``method`` (higher = more important)."""
    if method not in _METRICS:
        raise UserInputError(
            f"unknown metric {method!r}; known: {sorted(_METRICS)}"
            + (
                " (sparsegpt has no standalone metric: use prune_initial)"
                if method == "sparsegpt"
                else ""
            )
        )
    _check_weight(weight, stats, name)
    return _METRICS[method](weight, stats)


def nm_keep_from_metric(metric: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Keep the ``n_keep`` largest of every group of ``m`` (stable: ties prune lower column first)."""
    rows, cols = metric.shape
    if cols % pattern.m:
        raise ShapeError(
            f"in_features={cols} is not divisible by M={pattern.m} of pattern {pattern}; "
            "exclude this layer or choose a pattern whose M divides it"
        )
    if pattern.m <= 16:
        # Rank of every element in a stable ascending sort of its group, from one comparison per
        # pair on contiguous [rows, groups] planes (no sort, no int64 temporaries).
        planes = metric.reshape(rows, cols // pattern.m, pattern.m).permute(2, 0, 1).contiguous()
        rank = torch.zeros(planes.shape, dtype=torch.uint8, device=metric.device)
        for a in range(pattern.m):
            for b in range(a + 1, pattern.m):
                a_first = planes[a] <= planes[b]  # stable: the lower column wins a tie
                rank[b] += a_first
                rank[a] += ~a_first
        return (rank >= pattern.n_prune).permute(1, 2, 0).reshape(rows, cols)
    g = metric.reshape(rows, cols // pattern.m, pattern.m)
    order = torch.sort(g, dim=-1, stable=True).indices
    keep = torch.ones_like(g, dtype=torch.bool)
    keep.scatter_(-1, order[..., : pattern.n_prune], False)
    return keep.reshape(rows, cols)


def unstructured_keep_from_metric(metric: torch.Tensor, pattern: Unstructured) -> torch.Tensor:
    """Prune the first ``int(in * ratio)`` of a stable ascending sort of each row."""
    k = pattern.n_prune_per_row(metric.shape[1])
    if k == 0:
        return torch.ones_like(metric, dtype=torch.bool)
    return ~smallest_k_mask(metric, k)


def keep_from_metric(metric: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask (bool, shape of ``metric``) of the largest metrics per ``pattern`` (N:M per group,
    unstructured per row; ties prune the lower column first)."""
    pattern = parse_pattern(pattern)
    if isinstance(pattern, NM):
        return nm_keep_from_metric(metric, pattern)
    return unstructured_keep_from_metric(metric, pattern)


def initial_mask(
    method: str,
    weight: torch.Tensor,
    stats: ActivationStats | None,
    pattern: Pattern | str,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Keep-mask (bool, True = kept) of ``method`` ("magnitude" or "wanda") for ``pattern``."""
    if method == "sparsegpt":
        raise UserInputError(
            "sparsegpt updates the remaining weights, so a mask alone would throw that update away; "
            "call dsnt_export.methods.prune_initial('sparsegpt', ...) which returns weight and mask"
        )
    return keep_from_metric(
        initial_metric(method, weight, stats, name=name), parse_pattern(pattern)
    )


@dataclass
class InitialResult:
    """Output of an initial pruner (the hand-off contract to DSnoT and the exporters).

    ``weight`` is dense: the sparse layer is ``weight * keep``. For SparseGPT, kept entries carry
    the OBS update and each pruned entry holds the value it had when SparseGPT pruned it, which
    is what a DSnoT grow restores. ``metric`` (float32) is what DSnoT's N:M prune choice ranks:
    the initial method's own metric, Wanda's on the updated weight for SparseGPT."""

    weight: torch.Tensor
    keep: torch.Tensor
    metric: torch.Tensor
    method: str


InitialFn = Callable[..., InitialResult]


def _rows_not_stacked(pattern: Pattern) -> bool:
    """``InitialMethod.stacks_rows`` default: False (each linear is pruned on its own)."""
    return False


@dataclass(frozen=True)
class InitialMethod:
    """One registered initial method: ``name`` (the recipe's ``init``), ``prune`` (the function,
    ``(weight, stats, pattern, *, name, options) -> InitialResult``), ``needs_hessian`` (the driver
    then collects ``ActivationStats.hessian``), ``stacks_rows`` (``pattern -> bool``: True when
    every output row is pruned on its own, from the statistics and that row only, so that linears
    reading the same input may be pruned as one stacked weight with the same result,
    :func:`prune_initial_group`)."""

    name: str
    prune: InitialFn
    needs_hessian: bool
    stacks_rows: Callable[[Pattern], bool] = _rows_not_stacked


_INITIAL: dict[str, InitialMethod] = {}


def register_initial(
    name: str,
    *,
    needs_hessian: bool = False,
    stacks_rows: Callable[[Pattern], bool] = _rows_not_stacked,
) -> Callable[[InitialFn], InitialFn]:
    """Decorator registering an initial method (fields: :class:`InitialMethod`); raises
    ``ValueError`` if ``name`` is taken."""

    def deco(fn: InitialFn) -> InitialFn:
        if name in _INITIAL:
            raise ValueError(f"initial method {name!r} is registered already")
        _INITIAL[name] = InitialMethod(name, fn, needs_hessian, stacks_rows)
        return fn

    return deco


def initial_names() -> tuple[str, ...]:
    """The registered initial methods, in registration order (recipe ``init`` values)."""
    return tuple(_INITIAL)


def get_initial(method: str) -> InitialMethod:
    """The initial method ``method``; raises ``UserInputError`` listing the known ones."""
    try:
        return _INITIAL[method]
    except (KeyError, TypeError):
        raise UserInputError(
            f"unknown initial method {method!r}; known: {list(_INITIAL)}"
        ) from None


def _metric_pruner(metric_name: str) -> InitialFn:
    def prune(weight, stats, pattern, *, name=None, options=None) -> InitialResult:
        metric = initial_metric(metric_name, weight, stats, name=name)
        return InitialResult(weight, keep_from_metric(metric, pattern), metric, metric_name)

    prune.__doc__ = f"Initial mask of the {metric_name} metric (weights unchanged)."
    return prune


register_initial("magnitude")(_metric_pruner("magnitude"))
register_initial("wanda")(_metric_pruner("wanda"))


# N:M: each row's mask choice and OBS update read that row and the shared H^-1 factor only (the
# unstructured selection ranks a whole [out, block] tile at once, so its rows are not separable)
@register_initial("sparsegpt", needs_hessian=True, stacks_rows=lambda p: isinstance(p, NM))
def _sparsegpt(weight, stats, pattern, *, name=None, options=None) -> InitialResult:
    """SparseGPT's mask and OBS update; ``options``: a ``SparseGPTConfig`` (None = defaults)."""
    from dsnt_export.methods.sparsegpt import SparseGPTConfig, sparsegpt_factor, sparsegpt_prune

    opts = options if options is not None else SparseGPTConfig()
    _check_weight(weight, stats, name)
    if stats is None or not stats.has_hessian:
        raise UserInputError(f"layer {name!r}: sparsegpt needs ActivationStats(..., hessian=True)")
    new_w, keep, pruned_vals = sparsegpt_prune(
        weight,
        stats.hessian,
        pattern,
        blocksize=opts.blocksize,
        percdamp=opts.percdamp,
        return_pruned_values=True,
        factor=stats.memo(
            ("sparsegpt_factor", opts.percdamp, weight.device),
            lambda: sparsegpt_factor(stats.hessian, opts.percdamp, device=weight.device),
        ),
    )
    dense = torch.where(keep, new_w, pruned_vals)
    return InitialResult(dense, keep, wanda_metric(dense, stats), "sparsegpt")


def prune_initial(
    method: str,
    weight: torch.Tensor,
    stats: ActivationStats | None,
    pattern: Pattern | str,
    *,
    name: str | None = None,
    sparsegpt_blocksize: int = 128,
    sparsegpt_percdamp: float = 0.01,
) -> InitialResult:
    """Run the registered initial method ``method`` on ``weight`` [out, in].

    For SparseGPT the returned weight carries the OBS update (``sparsegpt_blocksize``,
    ``sparsegpt_percdamp``: its :class:`~dsnt_export.methods.sparsegpt.SparseGPTConfig`) and the
    metric is Wanda's on the updated weight (what DSnoT then refines). Raises ``UserInputError``
    for an unknown method or missing statistics, ``ShapeError`` / ``NonFiniteError`` for a bad
    weight.
    """
    from dsnt_export.methods.sparsegpt import SparseGPTConfig

    entry = get_initial(method)
    options = (
        SparseGPTConfig(blocksize=sparsegpt_blocksize, percdamp=sparsegpt_percdamp)
        if method == "sparsegpt"
        else None
    )
    return entry.prune(weight, stats, parse_pattern(pattern), name=name, options=options)


def prune_initial_group(
    method: str,
    weights: list[torch.Tensor],
    stats: ActivationStats | None,
    pattern: Pattern | str,
    *,
    names: list[str] | None = None,
    sparsegpt_blocksize: int = 128,
    sparsegpt_percdamp: float = 0.01,
) -> list[InitialResult]:
    """:func:`prune_initial` for several linears that read the same input (one ``stats``), e.g. a
    block's q/k/v or gate/up projections: one result per weight ([out_i, in] each, same ``in``).

    When the method prunes every row on its own for ``pattern`` (``InitialMethod.stacks_rows``:
    SparseGPT with N:M), the weights' rows are stacked into one [sum(out_i), in] weight and pruned
    in one call, then split: the same masks and updates as pruning them one by one (row ``r``'s
    result depends on row ``r`` and the shared Hessian factor only), in one column sweep instead of
    one per linear. Otherwise the weights are pruned one by one. Each weight is checked first
    (``ShapeError`` / ``NonFiniteError`` naming it, ``names[i]``); raises what
    :func:`prune_initial` raises.
    """
    pattern = parse_pattern(pattern)
    names = list(names) if names is not None else [None] * len(weights)
    if len(names) != len(weights):
        raise UserInputError(f"{len(weights)} weights but {len(names)} names")
    kwargs = dict(sparsegpt_blocksize=sparsegpt_blocksize, sparsegpt_percdamp=sparsegpt_percdamp)
    entry = get_initial(method)
    if len(weights) < 2 or not entry.stacks_rows(pattern):
        return [
            prune_initial(method, w, stats, pattern, name=n, **kwargs)
            for w, n in zip(weights, names, strict=True)
        ]
    for w, n in zip(weights, names, strict=True):
        _check_weight(w, stats, n)
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
        raise ShapeError(
            "prune_initial_group needs weights of one in_features, dtype and device, got "
            + ", ".join(
                f"{n}: {tuple(w.shape)} {w.dtype} {w.device}"
                for w, n in zip(weights, names, strict=True)
            )
        )
    label = "+".join(str(n) for n in names)
    res = prune_initial(method, torch.cat(weights), stats, pattern, name=label, **kwargs)
    rows = [w.shape[0] for w in weights]
    return [
        InitialResult(w_i, k_i, m_i, res.method)
        for w_i, k_i, m_i in zip(
            res.weight.split(rows), res.keep.split(rows), res.metric.split(rows), strict=True
        )
    ]
