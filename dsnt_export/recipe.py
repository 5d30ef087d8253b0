"""Recipes: a saved, validated configuration of a sparsification run (equivalent to the CLI flags).

A :class:`Recipe` is a frozen dataclass validated at construction; unknown keys raise
:class:`~dsnt_export.errors.UserInputError` listing the known ones. It loads from and saves to YAML
and converts to the driver's :class:`~dsnt_export.sparsify.driver.SparsifyConfig`.

Built-in presets (``Recipe.preset(name)``, also shipped as ``recipes/<name>.yaml`` examples):

* ``default``: our recipe: SparseGPT initial mask (with its OBS weight update) refined by
  ``refit`` (the kept weights of every decoder linear re-fitted by least squares on the layer's
  Hessian for SparseGPT's mask, ridge 0.1, 8 preconditioned CG steps;
  :mod:`dsnt_export.refine.refit`), 64 x 256 tokens of the offline stdlib-docs corpus. Until
  2026-12 the default refiner was ``hessian-swap`` (exact-loss prune-and-grow swaps): ``refit``
  lowers perplexity far more (14-16 % below SparseGPT alone on three held-out texts over five
  calibration draws, vs 4-6 %) in less than half the refinement time (11 s vs 27 s measured side
  by side; 7 s since its products run at the matmul precision "auto" picks; README, "Quality"
  and "Speed").
* ``official``: the reference DSnoT code (zyxxmu/DSnoT @ 4c029df): Wanda initial mask, ``refine:
  dsnot`` with DSnoT's ``official`` config (max_cycles 50, threshold 0.1, var_power 1, sign check
  only for N:M), refining attention projections only (MLP keeps its initial mask), 128 x 2048
  tokens of C4, seed 0.

The allowed ``init`` and ``refine`` values come from the registries
(:func:`dsnt_export.methods.initial_names`, :func:`dsnt_export.refine.refine_choices`);
``refine_options`` are the chosen refiner's config fields (its ``to_json()``; a ``preset`` naming
one of the config's preset constructors, e.g. DSnoT's ``official`` / ``guarded``, starts from it).

YAML layout (every key optional; the preset named by ``base`` fills the rest, default ``default``)::

    base: default
    model: embedded:smollm2-135m
    pattern: "2:4"
    init: sparsegpt            # magnitude | wanda | sparsegpt
    refine: refit              # refit | hessian-swap | dsnot | none
    refine_options: {percdamp: 0.1, steps: 8, solver: cg}   # the refiner's config fields
    exclude: []                # never pruned, e.g. ["mlp.down_proj", "0:attention"]
    refine_exclude: []         # pruned but not refined, e.g. ["mlp"] (the reference's attention only)
    calib: stdlib-docs:64x256
    eval: stdlib-docs          # perplexity data (evaluation split), null = no evaluation
    eval_seqlen: 256           # window length of the WikiText-2 protocol
    eval_max_windows: 64       # only the first N windows (default preset: 64); null = all
    device: auto               # auto | cpu | cuda | cuda:1 ...
    device_map: null           # several devices: balanced | {"model.layers": 0, "model.layers.15": 1}
    dtype: auto                # auto | float32 | float16 | bfloat16 (compute dtype)
    save_dtype: source         # source | float32 | float16 | bfloat16 (checkpoint dtype)
    seed: 0
    sequential: false
    batch_size: 8              # calibration windows per block forward (official preset: 1)
    offload_activations: false
    out_of_core: false         # stream blocks from the checkpoint's safetensors (models > RAM)
    matmul_precision: auto     # auto | highest | high | medium (Hessian and solver products)
    sparsegpt: {blocksize: 128, percdamp: 0.01}

``out_of_core: true`` prunes without loading the model: the skeleton on the meta device, one block
at a time read from the checkpoint's safetensors, pruned and written
(:mod:`dsnt_export.sparsify.streaming`); same weights as in memory. It changes how the run is
done, not its result: :meth:`Recipe.to_dict` (and so the recipe hash) lists it only when true.
``device_map`` spreads the blocks over several devices (:mod:`dsnt_export.sparsify.devices`:
``balanced`` or accelerate's ``{module name: device}`` format; ``device`` still runs the embeddings
and picks the compute dtype); listed only when set.
``matmul_precision`` (:mod:`dsnt_export.precision`): "auto" runs the float32 products of the
statistics and solvers on torch's faster "medium" precision only where a probe shows it as accurate
as float32 (else "highest"); listed by :meth:`Recipe.to_dict` only when not "auto".

Old form (still read, with a :class:`~dsnt_export.refine.LegacyConfigWarning`): ``refine: dsnot``
with a ``dsnot:`` mapping (``preset: default | official``, ``criterion: hessian | mean``,
``percdamp``, DSnoT's options), translated by :func:`dsnt_export.refine.config_from_legacy`:
``criterion: hessian`` (the old default) is ``refine: hessian-swap``, ``criterion: mean`` is
``refine: dsnot``; the masks and weights are bit-identical.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dsnt_export.artifacts import config_hash
from dsnt_export.errors import UserInputError
from dsnt_export.patterns import parse_pattern
from dsnt_export.precision import check_matmul_precision

DTYPES = ("auto", "float32", "float16", "bfloat16")
SAVE_DTYPES = ("source", "float32", "float16", "bfloat16")
SPARSEGPT_KEYS = ("blocksize", "percdamp")


@dataclass(frozen=True)
class Recipe:
    """One sparsification run's configuration (see module docstring for the fields)."""

    name: str = "default"
    model: str | None = None
    pattern: str = "2:4"
    init: str = "sparsegpt"
    refine: str = "refit"
    refine_options: dict = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    refine_exclude: tuple[str, ...] = ()
    calib: str = "stdlib-docs:64x256"
    eval: str | None = "stdlib-docs"
    eval_seqlen: int = 256
    eval_max_windows: int | None = None
    device: str = "auto"
    device_map: str | dict | None = None
    dtype: str = "auto"
    save_dtype: str = "source"
    seed: int = 0
    sequential: bool = False
    batch_size: int = 1
    offload_activations: bool = False
    out_of_core: bool = False
    matmul_precision: str = "auto"
    sparsegpt: dict = field(default_factory=lambda: {"blocksize": 128, "percdamp": 0.01})

    def __post_init__(self):
        _check_str(self, "name")
        if self.model is not None:
            _check_str(self, "model")
        pat = parse_pattern(self.pattern) if isinstance(self.pattern, str) else None
        if pat is None:
            raise UserInputError(
                f"recipe 'pattern' must be a string like '2:4', got {self.pattern!r}"
            )
        object.__setattr__(self, "pattern", str(pat))
        _check_choice(self, "init", init_choices())
        _check_choice(self, "refine", refine_choices())
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "save_dtype", SAVE_DTYPES)
        _check_str(self, "calib")
        _check_str(self, "device")
        object.__setattr__(self, "device_map", _check_device_map(self.device_map))
        if self.eval is not None:
            _check_str(self, "eval")
        for key in ("exclude", "refine_exclude"):
            v = getattr(self, key)
            if isinstance(v, str) or not all(isinstance(s, str) and s for s in v):
                raise UserInputError(
                    f"recipe {key!r} must be a list of selector strings, got {v!r}"
                )
            object.__setattr__(self, key, tuple(v))
        for key in ("sequential", "offload_activations", "out_of_core"):
            if not isinstance(getattr(self, key), bool):
                raise UserInputError(
                    f"recipe {key!r} must be true or false, got {getattr(self, key)!r}"
                )
        if self.eval_max_windows is not None:
            _check_int(self, "eval_max_windows", 1)
        for key, lo in (("seed", 0), ("batch_size", 1), ("eval_seqlen", 2)):
            _check_int(self, key, lo)
        check_matmul_precision(self.matmul_precision)
        object.__setattr__(self, "refine_options", _check_refine_options(self))

        object.__setattr__(self, "sparsegpt", _check_sparsegpt(self.sparsegpt))

    # ------------------------------------------------------------------ presets and overrides
    @classmethod
    def preset(cls, name: str) -> Recipe:
        """The built-in preset ``name`` (``default``, ``official``); raises ``UserInputError``."""
        if name not in PRESETS:
            raise UserInputError(f"unknown recipe preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied; ``None`` values are ignored (unset CLI flags).

        ``refine_options`` are merged onto the current options when the refiner stays the same
        (onto the new refiner's defaults when ``refine`` changes). The old key ``dsnot`` (a mapping)
        is translated by :func:`dsnt_export.refine.config_from_legacy` with a deprecation warning;
        a mapping without ``preset`` is merged onto this recipe's refiner settings first.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        legacy = changes.pop(LEGACY_KEY, None)
        _reject_unknown(changes, "recipe override")
        refine = changes.get("refine", self.refine)
        if legacy is not None and refine != NO_REFINE:
            refine, opts = self._from_legacy(legacy)
            changes["refine"], changes["refine_options"] = refine, opts
        elif refine == NO_REFINE:
            changes.setdefault("refine_options", {})
        elif refine == self.refine and isinstance(changes.get("refine_options"), dict):
            changes["refine_options"] = {**self.refine_options, **changes["refine_options"]}
        elif refine != self.refine:
            changes.setdefault("refine_options", {})
        if isinstance(changes.get("sparsegpt"), dict):
            changes["sparsegpt"] = {**self.sparsegpt, **changes["sparsegpt"]}
        return dataclasses.replace(self, **changes)

    def _from_legacy(self, legacy: Any) -> tuple[str, dict]:
        """(refine, refine_options) of an old ``dsnot:`` mapping (merged onto this recipe's
        settings when it names no preset)."""
        from dsnt_export.refine import config_from_legacy

        if not isinstance(legacy, dict):
            raise UserInputError(f"recipe 'dsnot' must be a mapping, got {legacy!r}")
        merged = dict(legacy) if "preset" in legacy else {**self._legacy_view(), **legacy}
        name, cfg = config_from_legacy(merged)
        return name, cfg.to_json()

    def _legacy_view(self) -> dict:
        """This recipe's refiner settings in the old ``dsnot:`` form (full, explicit values)."""
        o = {k: v for k, v in self.refine_options.items() if k != "preset"}
        if self.refine == "hessian-swap":
            return {"preset": "default", "criterion": "hessian", **o}
        if self.refine == "dsnot":
            old = (
                "default" if str(self.refine_options.get("preset")).startswith("guarded") else None
            )
            return {"preset": old or "official", "criterion": "mean", **o}
        return {"preset": "default"}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain YAML/JSON values (lists, dicts); what manifests record.
        ``out_of_core`` only when true (it does not change the result), ``device_map`` only when
        set, ``matmul_precision``
        only when not "auto", so recipes and hashes written before they existed stay the same."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.out_of_core:
            del d["out_of_core"]
        if self.device_map is None:
            del d["device_map"]
        elif isinstance(self.device_map, dict):
            d["device_map"] = dict(self.device_map)
        if self.matmul_precision == "auto":
            del d["matmul_precision"]
        d["exclude"], d["refine_exclude"] = list(self.exclude), list(self.refine_exclude)
        d["refine_options"], d["sparsegpt"] = dict(self.refine_options), dict(self.sparsegpt)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """A recipe from a mapping: the preset ``base`` (default ``default``) with the other keys
        applied (:meth:`replace`); explicit nulls of ``model``/``eval``/``eval_max_windows`` mean
        none. Raises ``UserInputError`` for unknown keys or bad values."""
        if not isinstance(d, dict):
            raise UserInputError(
                f"a recipe must be a mapping of keys to values, got {type(d).__name__}"
            )
        d = dict(d)
        base = d.pop("base", "default")
        _reject_unknown({k: v for k, v in d.items() if k != LEGACY_KEY}, "recipe")
        if not isinstance(base, str):
            raise UserInputError(f"recipe 'base' must be a preset name, got {base!r}")
        if d and "name" not in d:
            d["name"] = f"{base}+custom"
        return cls.preset(base).replace(**d)._with_nulls(d)

    def _with_nulls(self, d: dict[str, Any]) -> Recipe:
        # explicit nulls in a file mean "none" for the nullable fields
        nulls = {k: None for k in ("model", "eval", "eval_max_windows") if k in d and d[k] is None}
        return dataclasses.replace(self, **nulls) if nulls else self

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The recipe as YAML text (every key); also written to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """A recipe from a YAML file (:meth:`from_dict`); raises ``UserInputError`` when missing."""
        p = Path(path)
        if not p.is_file():
            raise UserInputError(
                f"recipe file {p} does not exist; pass a YAML file or a preset name "
                f"({', '.join(sorted(PRESETS))})"
            )
        return cls.from_yaml_text(p.read_text(), source=str(p))

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "recipe text") -> Recipe:
        """A recipe from YAML text; raises ``UserInputError`` naming ``source`` when invalid."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserInputError(f"{source} is not valid YAML: {e}") from e
        return cls.from_dict(data if data is not None else {})

    @classmethod
    def load(cls, ref: str | Path) -> Recipe:
        """A preset name (``default``, ``official``) or a YAML file path."""
        if isinstance(ref, str) and ref in PRESETS:
            return cls.preset(ref)
        return cls.from_yaml(ref)

    def hash(self) -> str:
        """Hash of :meth:`to_dict` (canonical JSON); the ``recipe_hash`` of manifests."""
        return config_hash(self.to_dict())

    # ------------------------------------------------------------------ to the driver
    def refiner_config(self):
        """The refiner's config object (e.g. ``HessianSwapConfig``, ``DSnoTConfig``); None for
        ``refine: none``."""
        return (
            None if self.refine == NO_REFINE else _refiner_config(self.refine, self.refine_options)
        )

    def sparsify_config(self):
        """The driver's :class:`~dsnt_export.sparsify.driver.SparsifyConfig` of this recipe."""
        from dsnt_export.sparsify.driver import SparsifyConfig

        return SparsifyConfig(
            pattern=parse_pattern(self.pattern),
            init=self.init,
            refine=self.refine,
            refine_config=self.refiner_config(),
            exclude=self.exclude,
            refine_exclude=self.refine_exclude,
            sequential=self.sequential,
            batch_size=self.batch_size,
            offload_activations=self.offload_activations,
            sparsegpt_blocksize=self.sparsegpt["blocksize"],
            sparsegpt_percdamp=self.sparsegpt["percdamp"],
            matmul_precision=self.matmul_precision,
        )


KNOWN_KEYS = tuple(f.name for f in fields(Recipe))
LEGACY_KEY = "dsnot"  # the old refiner mapping, read through refine.config_from_legacy
NO_REFINE = "none"


def method_label(init: str, refine: str) -> str:
    """Short name of an initial method and its refinement for reports and printed lines, e.g.
    ``sparsegpt+dsnot`` or ``wanda`` (``refine: none``)."""
    return init if refine in (None, "none") else f"{init}+{refine}"


def _reject_unknown(d: dict, what: str) -> None:
    unknown = sorted(set(d) - set(KNOWN_KEYS))
    if unknown:
        raise UserInputError(
            f"unknown {what} key(s) {unknown}; known keys: {', '.join(KNOWN_KEYS)} (and 'base'; "
            f"the old '{LEGACY_KEY}' mapping is still read)"
        )


def _check_str(r: Recipe, key: str) -> None:
    v = getattr(r, key)
    if not isinstance(v, str) or not v.strip():
        raise UserInputError(f"recipe {key!r} must be a non-empty string, got {v!r}")


def _check_int(r: Recipe, key: str, lo: int) -> None:
    v = getattr(r, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UserInputError(f"recipe {key!r} must be an integer >= {lo}, got {v!r}")


def _check_choice(r: Recipe, key: str, choices: tuple[str, ...]) -> None:
    v = getattr(r, key)
    if v not in choices:
        raise UserInputError(f"recipe {key!r} must be one of {list(choices)}, got {v!r}")


def init_choices() -> tuple[str, ...]:
    """Allowed ``init`` values: the registered initial methods."""
    from dsnt_export.methods import initial_names

    return initial_names()


def refine_choices() -> tuple[str, ...]:
    """Allowed ``refine`` values: the registered refiners, then ``none``."""
    from dsnt_export.refine import refine_choices as choices

    return choices()


def _refiner_config(refine: str, options: dict):
    """The config of refiner ``refine`` from ``options`` (its fields; ``preset`` may name one of
    the config type's preset constructors, which then supplies the fields not given)."""
    from dsnt_export.refine import get_refiner

    ctype = get_refiner(refine).config_type
    opts = dict(options)
    names = {f.name for f in fields(ctype)}
    unknown = sorted(set(opts) - names)
    if unknown:
        raise UserInputError(
            f"unknown refine_options key(s) {unknown} for refine {refine!r}; "
            f"known: {', '.join(sorted(names))}"
        )
    preset = opts.get("preset")
    if not isinstance(preset, str) or preset == "custom":
        return ctype(**opts)
    base = preset.split("+")[0]
    maker = None if base in names or base.startswith("_") else getattr(ctype, base, None)
    if not (callable(maker) and isinstance(inspect.getattr_static(ctype, base), classmethod)):
        raise UserInputError(
            f"refine_options preset {preset!r} is not a preset of {ctype.__name__}; give the "
            "fields themselves or a preset constructor's name (e.g. official)"
        )
    del opts["preset"]
    ref = maker()
    return maker(**{k: v for k, v in opts.items() if getattr(ref, k) != v})


def _check_refine_options(r: Recipe) -> dict:
    if not isinstance(r.refine_options, dict):
        raise UserInputError(f"recipe 'refine_options' must be a mapping, got {r.refine_options!r}")
    if r.refine == NO_REFINE:
        if r.refine_options:
            raise UserInputError(
                f"recipe 'refine_options' {r.refine_options} given with refine: none; "
                "drop them or name a refiner"
            )
        return {}
    return _refiner_config(r.refine, r.refine_options).to_json()


def _check_device_map(v: Any) -> str | dict | None:
    """The recipe's ``device_map`` checked for its form (None, "balanced", a mapping of module
    names to device indices or names); the devices themselves are checked when the run resolves
    them (:func:`dsnt_export.sparsify.devices.resolve_block_devices`)."""
    if v is None or v == "balanced":
        return v
    if isinstance(v, dict) and v and all(isinstance(k, str) for k in v):
        bad = {k: x for k, x in v.items() if isinstance(x, bool) or not isinstance(x, (int, str))}
        if not bad:
            return dict(v)
        raise UserInputError(
            f"recipe 'device_map' values must be accelerator indices or device names, got {bad}"
        )
    raise UserInputError(
        f"recipe 'device_map' must be null, 'balanced' or a mapping of module names to devices "
        f"(e.g. {{'model.layers': 0, 'model.layers.20': 1}}), got {v!r}"
    )


def _check_sparsegpt(d: Any) -> dict:
    if not isinstance(d, dict):
        raise UserInputError(f"recipe 'sparsegpt' must be a mapping, got {d!r}")
    d = {"blocksize": 128, "percdamp": 0.01, **d}
    unknown = sorted(set(d) - set(SPARSEGPT_KEYS))
    if unknown:
        raise UserInputError(
            f"unknown 'sparsegpt' key(s) {unknown}; known: {', '.join(SPARSEGPT_KEYS)}"
        )
    bs, pd = d["blocksize"], d["percdamp"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise UserInputError(f"sparsegpt blocksize must be a positive integer, got {bs!r}")
    if isinstance(pd, bool) or not isinstance(pd, (int, float)) or not 0 <= pd < 1:
        raise UserInputError(f"sparsegpt percdamp must be a number in [0, 1), got {pd!r}")
    return d


PRESETS: dict[str, dict[str, Any]] = {
    # 64 x 256-token windows of held-out docstrings: the README quality table's evaluation, well under
    # a minute per model on 2 CPU cores (all 205 windows: ~3x longer; `eval_max_windows: null`)
    "default": {
        "name": "default",
        "refine": "refit",
        "refine_options": {"percdamp": 0.1, "steps": 8, "solver": "cg"},
        "eval_max_windows": 64,
        # 8 windows per block forward: a 256-token sample alone leaves the matmuls small (two
        # block passes of the embedded model: 41.6 s at 8 vs 48.1 s at 1 on 2 CPU cores)
        "batch_size": 8,
    },
    "official": {
        "name": "official",
        "init": "wanda",
        "refine": "dsnot",
        "refine_options": {"preset": "official"},
        "refine_exclude": ("mlp",),
        "calib": "c4:128x2048",
        "eval": "wikitext2",
        "eval_seqlen": 2048,
        "seed": 0,
    },
}
