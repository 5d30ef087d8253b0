"""The refiner registry: one entry per refinement algorithm, keyed by its recipe name and config type.

A refiner improves the keep-mask (and possibly the kept values) that an initial method
(:mod:`dsnt_export.methods`) produced for one linear layer. Every refiner has the same signature::

    refiner(reference, weight, keep, stats, pattern, config, *, metric=None, name=None)
        -> RefineOutcome(weight, keep, summary)

* ``reference`` [out, in]: the layer's original dense weight (what the loss is measured against);
* ``weight`` [out, in]: the values a grown weight takes (the initial method's weights where kept,
  SparseGPT's values at pruning time or the dense ones elsewhere); never modified in place;
* ``keep`` (bool [out, in], True = kept): the initial mask; never modified in place;
* ``stats``: the layer's :class:`~dsnt_export.stats.ActivationStats` (with the Hessian when
  ``config.needs_hessian``);
* ``metric`` (float32 [out, in] or None): the initial method's importance metric;
* the outcome's ``weight`` is dense: the layer becomes ``where(keep, weight, 0)``.

Adding a refiner = one module that defines its config dataclass (frozen, with ``needs_hessian``,
``to_json()`` and ``from_json()``) and its function, registered with :func:`register_refiner`, plus
its import in ``dsnt_export/refine/__init__.py``. The recipe and CLI choices come from
:func:`refiner_names`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Protocol

import torch

from dsnt_export.errors import UserInputError

__all__ = [
    "RefinerConfigBase",
    "RefineOutcome",
    "RefineSummary",
    "Refiner",
    "RefinerConfig",
    "check_max_cycles",
    "check_number",
    "config_from_json",
    "get_refiner",
    "refiner_for",
    "refiner_names",
    "register_refiner",
]


class RefinerConfig(Protocol):
    """What the driver needs from a refiner's config (a frozen dataclass)."""

    @property
    def needs_hessian(self) -> bool:
        """Whether the refiner reads ``ActivationStats.hessian`` (the driver then collects it)."""
        ...

    def to_json(self) -> dict:
        """The config as a JSON-able dict (recorded in the run report)."""
        ...


@dataclass(frozen=True)
class RefineSummary:
    """What one refiner run did on one layer (floats are Python floats, counts ints).

    ``err_before`` / ``err_after``: mean over rows of DSnoT's per-row reconstruction-error estimate
    ``|sum_j (W_ref - W')[r, j] * s_j|`` (docs/dsnot-spec.md section 2, ``s`` = ``ActivationStats.sum``), before
    and after the refinement. ``loss_before`` / ``loss_after``: the exact layer loss
    (:mod:`dsnt_export.refine.loss`) where the refiner computed it, else None. ``swaps``: prune-and-grow
    swaps applied over all rows; ``cycles``: cycles run (the longest row). ``loss_ridge``: set
    (float >= 0) only when ``loss_after`` is the quadratic loss ``sum_r D_r (H + loss_ridge * I)
    D_r^T`` of exactly the weights the refiner returns (``D = reference - weight``, float32, up to
    rounding): the driver then reads its per-layer ``rel_recon_loss`` numerator off it
    (``loss_after - loss_ridge * ||D||^2``) instead of another ``[out, in] @ [in, in]`` product.
    """

    err_before: float
    err_after: float
    swaps: int
    cycles: int
    loss_before: float | None = None
    loss_after: float | None = None
    loss_ridge: float | None = None


@dataclass(frozen=True)
class RefineOutcome:
    """A refiner's result: the dense values ``weight`` [out, in] (the layer's dtype), the new
    ``keep`` mask (bool [out, in]) and the :class:`RefineSummary`."""

    weight: torch.Tensor
    keep: torch.Tensor
    summary: RefineSummary


RefineFn = Callable[..., RefineOutcome]


@dataclass(frozen=True)
class Refiner:
    """One registered refiner.

    ``name``: the recipe / CLI key. ``config_type``: its config dataclass (``config_type()`` is its
    default config). ``refine``: the function (module docstring for the signature).
    ``record_refine`` / ``record_criterion``: the values the per-layer record
    (:class:`~dsnt_export.sparsify.record.LayerRecord`) stores in its ``refine`` / ``criterion``
    keys: the refiner's own name, and the swap criterion where the refiner has a choice of one
    (DSnoT: ``mean``); None writes no ``criterion`` key. Manifests written before the
    hessian-swap refiner had its own name label its layers ``refine: dsnot``, ``criterion:
    hessian``; readers show them as they are.
    """

    name: str
    config_type: type
    refine: RefineFn
    record_refine: str
    record_criterion: str | None = None

    def default_config(self) -> Any:
        """The refiner's default config (``config_type()``)."""
        return self.config_type()


_REFINERS: dict[str, Refiner] = {}


def check_max_cycles(v: object) -> None:
    """Raise ``UserInputError`` unless ``v`` is an int >= 0 (a refiner's cap on cycles per row)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise UserInputError(f"max_cycles must be an int >= 0, got {v!r}")


def check_number(name: str, v: object, *, nonneg: bool = False, hint: str = "") -> None:
    """Raise ``UserInputError`` unless ``v`` is a finite int/float (and >= 0 with ``nonneg``);
    ``hint`` is appended to the message, e.g. "(e.g. 0.03)"."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserInputError(f"{name} must be a finite number{hint}, got {v!r}")
    if nonneg and v < 0:
        raise UserInputError(f"{name} must be >= 0{hint}, got {v!r}")


def config_from_json(cls: type, d: Mapping, what: str):
    """``cls(**d)`` for a config dataclass, after rejecting keys that are not its fields
    (``UserInputError`` naming ``what`` and listing the known keys)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserInputError(f"unknown {what} key(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


class RefinerConfigBase:
    """What every refiner's config dataclass shares: JSON round trip and validated copies.

    A subclass is a frozen dataclass whose ``__post_init__`` validates its fields and which sets
    ``json_what`` (how unknown-key errors name it, e.g. ``"refit option"``).
    """

    json_what: ClassVar[str] = "refiner option"

    def to_json(self) -> dict:
        """The fields as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping):
        """Inverse of :meth:`to_json`; raises ``UserInputError`` for unknown keys."""
        return config_from_json(cls, d, cls.json_what)

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated by ``__post_init__``)."""
        return dataclasses.replace(self, **changes)


def register_refiner(
    name: str, config_type: type, *, record_refine: str, record_criterion: str | None = None
) -> Callable[[RefineFn], RefineFn]:
    """Decorator registering ``fn`` as the refiner ``name`` configured by ``config_type``.

    Raises ``ValueError`` when ``name`` or ``config_type`` is registered already (two plug-ins
    must not silently shadow each other).
    """

    def deco(fn: RefineFn) -> RefineFn:
        if name in _REFINERS:
            raise ValueError(f"refiner {name!r} is registered already")
        if any(r.config_type is config_type for r in _REFINERS.values()):
            raise ValueError(f"config type {config_type.__name__} is registered already")
        _REFINERS[name] = Refiner(name, config_type, fn, record_refine, record_criterion)
        return fn

    return deco


def refiner_names() -> tuple[str, ...]:
    """The registered refiner names, in registration order (recipe ``refine:`` values)."""
    return tuple(_REFINERS)


def get_refiner(name: str) -> Refiner:
    """The refiner registered as ``name``; raises ``UserInputError`` listing the known names."""
    try:
        return _REFINERS[name]
    except (KeyError, TypeError):
        raise UserInputError(
            f"unknown refiner {name!r}; known: {list(_REFINERS)} (or 'none' for no refinement)"
        ) from None


def refiner_for(config: object) -> Refiner:
    """The refiner whose config type is ``type(config)``; raises ``UserInputError`` otherwise."""
    for r in _REFINERS.values():
        if type(config) is r.config_type:
            return r
    known = [r.config_type.__name__ for r in _REFINERS.values()]
    raise UserInputError(
        f"no refiner takes a config of type {type(config).__name__}; known config types: {known}"
    )
