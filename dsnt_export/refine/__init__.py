"""Refiners: improve an initial sparse mask layer by layer (the "refine" stage of the data path).

* :mod:`~dsnt_export.refine.registry`: the registry and the one refiner signature;
* :mod:`~dsnt_export.refine.dsnot`: DSnoT (docs/dsnot-spec.md sections 2-4), ``refine: dsnot``;
* :mod:`~dsnt_export.refine.refit`: least-squares re-fit of the kept weights, ``refine: refit`` (the default);
* :mod:`~dsnt_export.refine.hessian_swap`: exact-loss prune-and-grow swaps, ``refine: hessian-swap``;
* :mod:`~dsnt_export.refine.loss`: the layer loss and the Hessian dampening shared by all;
* :mod:`~dsnt_export.refine.legacy`: old recipe keys (``refine: dsnot`` + ``dsnot.criterion``).

Adding a refiner: a module that registers itself with
:func:`~dsnt_export.refine.registry.register_refiner`, imported below.
"""

from dsnt_export.refine import dsnot, hessian_swap, refit  # noqa: F401  (registers the built-ins)
from dsnt_export.refine.dsnot import DSnoTConfig
from dsnt_export.refine.hessian_swap import HessianSwapConfig
from dsnt_export.refine.legacy import LegacyConfigWarning, config_from_legacy
from dsnt_export.refine.refit import RefitConfig
from dsnt_export.refine.registry import (
    RefineOutcome,
    Refiner,
    RefineSummary,
    get_refiner,
    refiner_for,
    refiner_names,
    register_refiner,
)

#: the recipe value that turns refinement off
NO_REFINE = "none"
#: default refiner of the driver (and of the default recipe)
DEFAULT_REFINER = "refit"


def refine_choices() -> tuple[str, ...]:
    """Every allowed recipe / CLI ``refine`` value: the registered refiners, then ``"none"``."""
    return (*refiner_names(), NO_REFINE)


__all__ = [
    "DEFAULT_REFINER",
    "NO_REFINE",
    "DSnoTConfig",
    "HessianSwapConfig",
    "RefitConfig",
    "LegacyConfigWarning",
    "RefineOutcome",
    "RefineSummary",
    "Refiner",
    "config_from_legacy",
    "get_refiner",
    "refine_choices",
    "refiner_for",
    "refiner_names",
    "register_refiner",
]
