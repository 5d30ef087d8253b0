"""Recipes: a saved, validated configuration of a sparsification run (equivalent to the CLI flags).

A :class:`Recipe` is a frozen dataclass validated at construction; unknown keys raise
:class:`~dsnt_export.errors.UserInputError` listing the known ones. It loads from and saves to YAML
and converts to the driver's :class:`~dsnt_export.sparsify.driver.SparsifyConfig`.

Built-in presets (``Recipe.preset(name)``, also shipped as ``recipes/<name>.yaml`` examples):

* ``default``: our recipe: SparseGPT initial mask (with its OBS weight update) refined by DSnoT on
  every linear of the decoder blocks, DSnoT's ``default`` config, 32 x 256 tokens of the offline
  stdlib-docs corpus.
* ``official``: the reference DSnoT code (zyxxmu/DSnoT @ 4c029df): Wanda initial mask, DSnoT's
  ``official`` config (max_cycles 50, threshold 0.1, var_power 1, sign check only for N:M), refining
  attention projections only (MLP keeps its initial mask), 128 x 2048 tokens of C4, seed 0.

YAML layout (every key optional; the preset named by ``base`` fills the rest, default ``default``)::

    base: default
    model: embedded:smollm2-135m
    pattern: "2:4"
    init: sparsegpt            # magnitude | wanda | sparsegpt
    refine: dsnot              # dsnot | none
    dsnot: {preset: default, criterion: hessian, max_cycles: 50}   # + any DSnoTConfig field
    exclude: []                # never pruned, e.g. ["mlp.down_proj", "0:attention"]
    refine_exclude: []         # pruned but not refined, e.g. ["mlp"] (the reference's attention only)
    calib: stdlib-docs:64x256
    eval: stdlib-docs          # perplexity data (evaluation split), null = no evaluation
    eval_seqlen: 256           # window length of the WikiText-2 protocol
    eval_max_windows: 64       # only the first N windows (default preset: 64); null = all
    device: auto               # auto | cpu | cuda | cuda:1 ...
    dtype: auto                # auto | float32 | float16 | bfloat16 (compute dtype)
    save_dtype: source         # source | float32 | float16 | bfloat16 (checkpoint dtype)
    seed: 0
    sequential: false
    batch_size: 1
    offload_activations: false
    sparsegpt: {blocksize: 128, percdamp: 0.01}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dsnt_export.artifacts import config_hash
from dsnt_export.errors import UserInputError
from dsnt_export.patterns import parse_pattern

INITS = ("magnitude", "wanda", "sparsegpt")
REFINES = ("dsnot", "none")
DSNOT_PRESETS = ("default", "official")
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
    refine: str = "dsnot"
    dsnot: dict = field(default_factory=lambda: {"preset": "default"})
    exclude: tuple[str, ...] = ()
    refine_exclude: tuple[str, ...] = ()
    calib: str = "stdlib-docs:64x256"
    eval: str | None = "stdlib-docs"
    eval_seqlen: int = 256
    eval_max_windows: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    save_dtype: str = "source"
    seed: int = 0
    sequential: bool = False
    batch_size: int = 1
    offload_activations: bool = False
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
        _check_choice(self, "init", INITS)
        _check_choice(self, "refine", REFINES)
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "save_dtype", SAVE_DTYPES)
        _check_str(self, "calib")
        _check_str(self, "device")
        if self.eval is not None:
            _check_str(self, "eval")
        for key in ("exclude", "refine_exclude"):
            v = getattr(self, key)
            if isinstance(v, str) or not all(isinstance(s, str) and s for s in v):
                raise UserInputError(
                    f"recipe {key!r} must be a list of selector strings, got {v!r}"
                )
            object.__setattr__(self, key, tuple(v))
        for key in ("sequential", "offload_activations"):
            if not isinstance(getattr(self, key), bool):
                raise UserInputError(
                    f"recipe {key!r} must be true or false, got {getattr(self, key)!r}"
                )
        if self.eval_max_windows is not None:
            _check_int(self, "eval_max_windows", 1)
        for key, lo in (("seed", 0), ("batch_size", 1), ("eval_seqlen", 2)):
            _check_int(self, key, lo)
        object.__setattr__(self, "dsnot", _check_dsnot(self.dsnot))

        object.__setattr__(self, "sparsegpt", _check_sparsegpt(self.sparsegpt))

    # ------------------------------------------------------------------ presets and overrides
    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in PRESETS:
            raise UserInputError(f"unknown recipe preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied; ``None`` values are ignored (unset CLI flags)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        _reject_unknown(changes, "recipe override")
        if "dsnot" in changes:
            new = changes["dsnot"]
            if not isinstance(new, dict):
                raise UserInputError(f"recipe 'dsnot' must be a mapping, got {new!r}")
            switch = "preset" in new and new["preset"] != self.dsnot["preset"]
            changes["dsnot"] = dict(new) if switch else {**self.dsnot, **new}
        if isinstance(changes.get("sparsegpt"), dict):
            changes["sparsegpt"] = {**self.sparsegpt, **changes["sparsegpt"]}
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["exclude"], d["refine_exclude"] = list(self.exclude), list(self.refine_exclude)
        d["dsnot"], d["sparsegpt"] = dict(self.dsnot), dict(self.sparsegpt)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        if not isinstance(d, dict):
            raise UserInputError(
                f"a recipe must be a mapping of keys to values, got {type(d).__name__}"
            )
        d = dict(d)
        base = d.pop("base", "default")
        _reject_unknown(d, "recipe")
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
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise UserInputError(
                f"recipe file {p} does not exist; pass a YAML file or a preset name "
                f"({', '.join(sorted(PRESETS))})"
            )
        return cls.from_yaml_text(p.read_text(), source=str(p))

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "recipe text") -> Recipe:
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
        return config_hash(self.to_dict())

    # ------------------------------------------------------------------ to the driver
    def dsnot_config(self):
        """The DSnoTConfig: the named preset plus the values that differ from it."""
        return _dsnot_config(self.dsnot)

    def sparsify_config(self):
        from dsnt_export.sparsify.driver import SparsifyConfig

        return SparsifyConfig(
            pattern=parse_pattern(self.pattern),
            init=self.init,
            refine=self.refine,
            dsnot=self.dsnot_config(),
            exclude=self.exclude,
            refine_exclude=self.refine_exclude,
            sequential=self.sequential,
            batch_size=self.batch_size,
            offload_activations=self.offload_activations,
            sparsegpt_blocksize=self.sparsegpt["blocksize"],
            sparsegpt_percdamp=self.sparsegpt["percdamp"],
        )


KNOWN_KEYS = tuple(f.name for f in fields(Recipe))


def method_label(init: str, refine: str) -> str:
    """Short name of an initial method and its refinement for reports and printed lines, e.g.
    ``sparsegpt+dsnot`` or ``wanda`` (``refine: none``)."""
    return init if refine in (None, "none") else f"{init}+{refine}"


def _reject_unknown(d: dict, what: str) -> None:
    unknown = sorted(set(d) - set(KNOWN_KEYS))
    if unknown:
        raise UserInputError(
            f"unknown {what} key(s) {unknown}; known keys: {', '.join(KNOWN_KEYS)} (and 'base')"
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


def dsnot_keys() -> tuple[str, ...]:
    """The DSnoTConfig fields a recipe may set (besides ``preset``)."""
    from dsnt_export.refine.dsnot import DSnoTConfig

    return tuple(f.name for f in fields(DSnoTConfig) if f.name != "preset")


def _check_dsnot(d: Any) -> dict:
    if not isinstance(d, dict):
        raise UserInputError(f"recipe 'dsnot' must be a mapping, got {d!r}")
    d = {"preset": "default", **d}
    unknown = sorted(set(d) - {"preset", *dsnot_keys()})
    if unknown:
        raise UserInputError(
            f"unknown 'dsnot' key(s) {unknown}; known: preset, {', '.join(dsnot_keys())}"
        )
    if d["preset"] not in DSNOT_PRESETS:
        raise UserInputError(
            f"dsnot preset must be one of {list(DSNOT_PRESETS)}, got {d['preset']!r}"
        )
    cfg = _dsnot_config(d)  # validates the values
    return {"preset": d["preset"], **{k: getattr(cfg, k) for k in dsnot_keys()}}


def _dsnot_config(d: dict):
    from dsnt_export.refine.dsnot import DSnoTConfig

    maker = DSnoTConfig.official if d["preset"] == "official" else DSnoTConfig.default
    base = maker()
    overrides = {k: d[k] for k in dsnot_keys() if k in d and d[k] != getattr(base, k)}
    return maker(**overrides)


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
    "default": {"name": "default", "eval_max_windows": 64},
    "official": {
        "name": "official",
        "init": "wanda",
        "refine": "dsnot",
        "dsnot": {"preset": "official"},
        "refine_exclude": ("mlp",),
        "calib": "c4:128x2048",
        "eval": "wikitext2",
        "eval_seqlen": 2048,
        "seed": 0,
    },
}
