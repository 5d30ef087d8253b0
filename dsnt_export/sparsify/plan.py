"""What the block-by-block driver will prune: the pre-flight plan.

:func:`plan_targets` resolves the adapter of ``config.model_type`` (unsupported types fail here),
turns the include/exclude selectors into a list of linears per block, and checks everything that
can be checked before any calibration work: every targeted module is an ``nn.Linear``, its
``in_features`` is divisible by M for an N:M pattern, and no parameter of the model holds NaN/Inf.

Selectors (exact names, never substrings), valid for every block:
    a kind             "attention" | "mlp"
    a stage group      e.g. "attn_in", "attn_out", "mlp_in", "mlp_out"
    a linear           its name relative to the block, e.g. "self_attn.o_proj", "mlp.down_proj"
optionally prefixed by block indices "3:mlp", "0-1:attention" (inclusive range).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsnt_export.adapters import KINDS, Adapter, get_adapter, resolve
from dsnt_export.errors import NonFiniteError, ShapeError, UnsupportedModelError, UserInputError
from dsnt_export.patterns import NM, Pattern


@dataclass(frozen=True)
class LinearTarget:
    """One linear the driver prunes: its ``block`` index, ``linear`` path inside the block, full
    module ``name``, adapter group ``kind`` and ``group`` (linears of one group share an input and
    one set of statistics), and whether it is refined (``refine``; else ``refine_skip_reason``)."""

    block: int
    linear: str  # relative to the block
    name: str  # full module name in the model
    kind: str
    group: str
    refine: bool
    refine_skip_reason: str | None = None


@dataclass
class Plan:
    """The pre-flight result (DSnoT spec section 6): the model's ``adapter``, every target in
    block order, and the modules left alone (``skipped``: ``{"name", "reason"}`` dicts)."""

    adapter: Adapter
    targets: list[LinearTarget]
    skipped: list[dict] = field(default_factory=list)

    def for_block(self, i: int) -> list[LinearTarget]:
        """The targets of decoder block ``i`` (in plan order)."""
        return [t for t in self.targets if t.block == i]


def selector_vocabulary(adapter: Adapter) -> list[str]:
    """Every word a module selector may use for ``adapter``'s models: the kinds, group names and
    linear names (sorted), for error messages and docs."""
    return sorted(set(KINDS) | {g.name for g in adapter.groups} | set(adapter.linear_names))


def _parse_selector(sel: str, adapter: Adapter, n_blocks: int) -> tuple[range, str]:
    if not isinstance(sel, str) or not sel.strip():
        raise UserInputError(f"a module selector must be a non-empty string, got {sel!r}")
    blocks: range = range(n_blocks)
    body = sel.strip()
    if ":" in body:
        idx, body = body.split(":", 1)
        try:
            lo, _, hi = idx.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise UserInputError(
                f"bad block range in selector {sel!r}; write 'I:sel' or 'I-J:sel' with block indices"
            ) from None
        if not (0 <= lo_i <= hi_i < n_blocks):
            raise UserInputError(
                f"block range in selector {sel!r} is outside 0..{n_blocks - 1} (the model has "
                f"{n_blocks} blocks)"
            )
        blocks = range(lo_i, hi_i + 1)
    if body not in selector_vocabulary(adapter):
        raise UserInputError(
            f"unknown module selector {sel!r} for model_type {adapter.model_type!r}; known: "
            f"{', '.join(selector_vocabulary(adapter))} (optionally prefixed by 'I:' or 'I-J:')"
        )
    return blocks, body


def _matches(body: str, adapter: Adapter, linear: str) -> bool:
    g = adapter.group_of(linear)
    return body in (linear, g.name, g.kind)


def _first_match(selectors, adapter, n_blocks, block: int, linear: str) -> str | None:
    for sel in selectors:
        blocks, body = _parse_selector(sel, adapter, n_blocks)
        if block in blocks and _matches(body, adapter, linear):
            return sel
    return None


def plan_targets(
    model: nn.Module,
    pattern: Pattern,
    *,
    exclude: tuple[str, ...] = (),
    refine_exclude: tuple[str, ...] = (),
    check_finite: bool = True,
) -> Plan:
    """Resolve and check every target before any work (see module docstring)."""
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    n = len(blocks)
    for sel in (*exclude, *refine_exclude):  # validate selectors even if nothing matches
        _parse_selector(sel, adapter, n)
    targets: list[LinearTarget] = []
    skipped: list[dict] = []
    bad_shape: list[str] = []
    for i, block in enumerate(blocks):
        for lin in adapter.linear_names:
            name = f"{adapter.blocks}.{i}.{lin}"
            mod = resolve(block, lin, optional=True)
            if not isinstance(mod, nn.Linear):
                raise UnsupportedModelError(
                    f"{name}: expected an nn.Linear for model_type {adapter.model_type!r}, found "
                    f"{type(mod).__name__}; the checkpoint does not match its adapter"
                )
            ex = _first_match(exclude, adapter, n, i, lin)
            if ex is not None:
                skipped.append({"name": name, "reason": f"excluded by selector {ex!r}"})
                continue
            if isinstance(pattern, NM) and mod.in_features % pattern.m:
                bad_shape.append(f"{name} (in_features={mod.in_features})")
            rex = _first_match(refine_exclude, adapter, n, i, lin)
            g = adapter.group_of(lin)
            targets.append(
                LinearTarget(
                    block=i,
                    linear=lin,
                    name=name,
                    kind=g.kind,
                    group=g.name,
                    refine=rex is None,
                    refine_skip_reason=None if rex is None else f"refine excluded by {rex!r}",
                )
            )
    if bad_shape:
        raise ShapeError(
            f"pattern {pattern} needs in_features divisible by M={pattern.m}, but "
            f"{len(bad_shape)} targeted linear(s) are not: {', '.join(bad_shape[:8])}"
            f"{' ...' if len(bad_shape) > 8 else ''}; exclude them (e.g. --exclude "
            "'mlp.down_proj') or choose a pattern whose M divides every in_features"
        )
    if check_finite:
        check_finite_parameters(model)
    return Plan(adapter=adapter, targets=targets, skipped=skipped)


@torch.no_grad()
def check_finite_parameters(model: nn.Module) -> None:
    """Raise NonFiniteError naming the first parameter holding NaN/Inf."""
    for pname, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise NonFiniteError(
                f"parameter {pname} {tuple(p.shape)} holds {bad} NaN/Inf value(s); the checkpoint is "
                "corrupt or was saved after a diverged run. Use an intact checkpoint."
            )
