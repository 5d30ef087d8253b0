"""Old recipe keys for the refiners: ``refine: dsnot`` with a ``dsnot:`` mapping that mixed two
algorithms' options (before the ``hessian-swap`` refiner got its own name and config).

The old mapping::

    dsnot: {preset: default | official, criterion: hessian | mean, percdamp: 0.03,
            max_cycles: 50, update_threshold: 0.1, var_power: 1.0, sign_check: null, loss_guard: false}

``criterion: hessian`` (the old ``default`` preset's) meant the exact-loss swap refiner, now
``refine: hessian-swap`` with :class:`~dsnt_export.refine.hessian_swap.HessianSwapConfig`
(``max_cycles``, ``percdamp``); ``criterion: mean`` meant DSnoT itself,
:class:`~dsnt_export.refine.dsnot.DSnoTConfig` (the old ``default`` preset then = ``guarded``).
Options of the other algorithm were ignored then and are ignored now, so a translated recipe
produces bit-identical masks and weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from dsnt_export.errors import UserInputError
from dsnt_export.refine.dsnot import DSnoTConfig
from dsnt_export.refine.hessian_swap import HessianSwapConfig
from dsnt_export.refine.registry import check_number

__all__ = [
    "LEGACY_DSNOT_KEYS",
    "LegacyConfigWarning",
    "LegacyDSnoTOptions",
    "config_from_legacy",
]

#: the keys the old ``dsnot:`` mapping accepted (besides ``preset``)
LEGACY_DSNOT_KEYS = (
    "max_cycles",
    "update_threshold",
    "var_power",
    "sign_check",
    "loss_guard",
    "criterion",
    "percdamp",
)
_CRITERIA = ("mean", "hessian")
_PRESETS = {
    "official": dict(
        max_cycles=50,
        update_threshold=0.1,
        var_power=1.0,
        sign_check=None,
        loss_guard=False,
        criterion="mean",
        percdamp=0.01,
    ),
    "default": dict(
        max_cycles=50,
        update_threshold=0.1,
        var_power=1.0,
        sign_check=True,
        loss_guard=True,
        criterion="hessian",
        percdamp=0.03,
    ),
}


class LegacyConfigWarning(FutureWarning):
    """An old recipe key was translated to its new form.

    A ``FutureWarning`` (not a ``DeprecationWarning``) so that Python shows it to people running
    the CLI, not only to developers running tests (PEP 565).
    """


@dataclass(frozen=True)
class LegacyDSnoTOptions:
    """The old ``dsnot:`` recipe mapping, validated (module docstring); :meth:`to_refiner` turns it
    into the refiner name and config it always meant. Raises ``UserInputError`` for bad values."""

    max_cycles: int = 50
    update_threshold: float = 0.1
    var_power: float = 1.0
    sign_check: bool | None = None
    loss_guard: bool = False
    criterion: str = "mean"
    percdamp: float = 0.01
    preset: str = field(default="custom", compare=False)

    def __post_init__(self):
        if self.criterion not in _CRITERIA:
            raise UserInputError(
                f"criterion must be one of {list(_CRITERIA)}, got {self.criterion!r}"
            )
        check_number("percdamp", self.percdamp, nonneg=True)
        self._dsnot()  # validates DSnoT's own options

    @classmethod
    def _with(cls, preset: str, overrides: dict) -> LegacyDSnoTOptions:
        unknown = sorted(set(overrides) - set(LEGACY_DSNOT_KEYS))
        if unknown:
            raise UserInputError(
                f"unknown DSnoT option(s) {unknown}; known: {list(LEGACY_DSNOT_KEYS)}"
            )
        name = preset if not overrides else f"{preset}+overrides"
        return cls(**{**_PRESETS[preset], **overrides}, preset=name)

    @classmethod
    def official(cls, **overrides) -> LegacyDSnoTOptions:
        """The old ``official`` preset (DSnoT's reference defaults, criterion mean)."""
        return cls._with("official", overrides)

    @classmethod
    def default(cls, **overrides) -> LegacyDSnoTOptions:
        """The old ``default`` preset (criterion hessian = the hessian-swap refiner, percdamp 0.03)."""
        return cls._with("default", overrides)

    @classmethod
    def from_mapping(cls, d: Mapping) -> LegacyDSnoTOptions:
        """From the old mapping: ``preset`` (default "default") plus overrides of its values."""
        if not isinstance(d, Mapping):
            raise UserInputError(f"recipe 'dsnot' must be a mapping, got {d!r}")
        d = dict(d)
        preset = d.pop("preset", "default")
        if preset not in _PRESETS:
            raise UserInputError(f"dsnot preset must be one of {list(_PRESETS)}, got {preset!r}")
        base = _PRESETS[preset]
        return cls._with(preset, {k: v for k, v in d.items() if k not in base or base[k] != v})

    def _dsnot(self) -> DSnoTConfig:
        base = "guarded" if self.preset.startswith("default") else "official"
        knobs = {k: getattr(self, k) for k in ("max_cycles", "update_threshold", "var_power")}
        knobs.update(sign_check=self.sign_check, loss_guard=self.loss_guard)
        ref = getattr(DSnoTConfig, base)()
        changed = {k: v for k, v in knobs.items() if getattr(ref, k) != v}
        if self.preset.split("+")[0] in _PRESETS:
            return getattr(DSnoTConfig, base)(**changed)
        return DSnoTConfig(**knobs)

    def to_refiner(self) -> tuple[str, DSnoTConfig | HessianSwapConfig]:
        """``("hessian-swap", HessianSwapConfig)`` for criterion hessian, else ``("dsnot",
        DSnoTConfig)``, with the option values this mapping gave the driver before the split."""
        if self.criterion == "hessian":
            return "hessian-swap", HessianSwapConfig(
                max_cycles=self.max_cycles, percdamp=self.percdamp
            )
        return "dsnot", self._dsnot()

    def sign_check_for(self, pattern) -> bool:
        """DSnoT's sign-check rule for ``pattern`` (:meth:`DSnoTConfig.sign_check_for`)."""
        return self._dsnot().sign_check_for(pattern)

    def to_json(self) -> dict:
        """The fields as a dict (``preset`` included)."""
        return asdict(self)


def config_from_legacy(
    d: Mapping, *, warn: bool = True
) -> tuple[str, DSnoTConfig | HessianSwapConfig]:
    """Translate an old ``dsnot:`` recipe mapping (module docstring) to ``(refiner name, config)``.

    With ``warn`` a :class:`LegacyConfigWarning` says what the recipe should say instead, when the
    mapping uses an old key (``criterion``, ``percdamp``) or the old ``default`` preset (a mapping of
    DSnoT's own options with ``preset: official`` is current and translates silently).
    Raises ``UserInputError`` for unknown keys or bad values (the message lists the known ones).
    """
    opts = LegacyDSnoTOptions.from_mapping(d)
    name, cfg = opts.to_refiner()
    old = "criterion" in d or "percdamp" in d or d.get("preset", "default") == "default"
    if warn and old:
        opts_txt = ", ".join(f"{k}={v!r}" for k, v in cfg.to_json().items() if k != "preset")
        preset = f"preset {cfg.preset.split('+')[0]}, " if name == "dsnot" else ""
        warnings.warn(
            f"recipe keys 'refine: dsnot' + 'dsnot: {dict(d)}' are the old form (dsnot.criterion, "
            f"dsnot.percdamp and the dsnot preset 'default' are gone); read as 'refine: {name}' "
            f"({preset}{opts_txt}). Update the recipe.",
            LegacyConfigWarning,
            stacklevel=2,
        )
    return name, cfg
