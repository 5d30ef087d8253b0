"""Typed results of a sparsification run: one :class:`LayerRecord` per targeted linear, gathered in
a :class:`SparsifyReport`.

``to_json()`` writes exactly the keys run reports and HF manifests (``extra.run_report``) have
always held, so the report writers and manifest readers are unchanged: per layer ::

    name, block, linear, kind, shape, numel, init, pattern, refine,
    [criterion, loss_before, loss_after, err_before, err_after, swaps, cycles]   (refined layers)
    [refine_skipped]                                          (refinement configured, layer excluded)
    [rel_recon_loss]                                          (a Hessian was collected)
    method, sparsity, zeros, check_ok, time_s

Bracketed keys are absent (not null) when they do not apply; ``loss_before``/``loss_after`` also
when the refiner computed no loss (DSnoT without its loss guard), ``criterion`` when the refiner
has no choice of criterion (hessian-swap). ``refine`` is null for a layer that was not refined.

Labels: ``refine`` is the refiner's name (``hessian-swap``, ``dsnot``), ``method`` is
``init+refine`` (e.g. ``sparsegpt+hessian-swap``), ``criterion`` is DSnoT's (``mean``). Records
written before the hessian-swap refiner had its own name say ``refine: dsnot``, ``criterion:
hessian``, ``method: sparsegpt+dsnot`` for its layers; they load and render unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerRecord", "SparsifyReport"]

_OPTIONAL = (
    "criterion",
    "loss_before",
    "loss_after",
    "err_before",
    "err_after",
    "swaps",
    "cycles",
    "refine_skipped",
    "rel_recon_loss",
)


@dataclass
class LayerRecord:
    """What the driver did to one targeted linear.

    Identity: ``name`` (module path in the model), ``block`` (decoder block index), ``linear`` (path
    inside the block), ``kind`` (its adapter group kind, e.g. "attention"), ``shape`` [out, in],
    ``numel``. Configuration: ``init`` (initial method), ``pattern`` (e.g. "2:4"), ``refine`` /
    ``criterion`` (the refiner's record labels, :class:`~dsnt_export.refine.registry.Refiner`;
    None when not refined, ``criterion`` also for a refiner without one), ``method`` (``init`` or ``init+refine``). Refinement (None when not
    refined): ``err_before`` / ``err_after`` (mean |per-row error estimate|, docs/dsnot-spec.md section 2),
    ``loss_before`` / ``loss_after`` (exact layer loss where computed), ``swaps``, ``cycles``;
    ``refine_skipped`` (why a layer was not refined although refinement was configured).
    Result: ``rel_recon_loss`` (``||X W^T - X W'^T||^2 / ||X W^T||^2``, when the Hessian was
    collected), ``sparsity`` (fraction of pruned mask entries), ``zeros`` (fraction of exact zeros
    in the written weight), ``check_ok`` (the mask check), ``time_s`` (seconds: init, refine, total).
    """

    name: str
    block: int
    linear: str
    kind: str
    shape: list[int]
    numel: int
    init: str
    pattern: str
    refine: str | None = None
    criterion: str | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    err_before: float | None = None
    err_after: float | None = None
    swaps: int | None = None
    cycles: int | None = None
    refine_skipped: str | None = None
    rel_recon_loss: float | None = None
    method: str = ""
    sparsity: float = 0.0
    zeros: float = 0.0
    check_ok: bool = True
    time_s: dict[str, float] = field(default_factory=dict)

    @property
    def refined(self) -> bool:
        """Whether a refiner ran on this layer."""
        return self.refine is not None

    def to_json(self) -> dict[str, Any]:
        """The record as the run report's per-layer dict (module docstring for the keys)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if v is None and k in _OPTIONAL:
                continue
            out[k] = list(v) if k == "shape" else dict(v) if k == "time_s" else v
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerRecord:
        """Inverse of :meth:`to_json` (e.g. from a manifest's ``run_report``); raises
        ``TypeError`` for unknown keys."""
        return cls(**d)


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


@dataclass
class SparsifyReport:
    """A sparsification run's report: the driver's config and calibration, one
    :class:`LayerRecord` per targeted linear (``layers``), the modules left alone with the reason
    (``skipped``: ``{"name", "reason"}`` dicts) and wall-clock ``timings`` (seconds): stage totals
    ``capture_s`` (block-0 inputs), ``stats_s`` (dense statistics forwards incl. the Hessian),
    ``init_s`` (initial masks incl. SparseGPT), ``refine_s``, ``rerun_s`` (pruned re-run),
    ``total_s``, and one ``block_{i}_s`` per decoder block."""

    model_type: str
    pattern: str
    config: dict
    calibration: dict
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Totals: linears, refined, skipped, numel-weighted sparsity, all checks ok, swaps, mean
        error estimate before/after over refined layers (None if none), total seconds."""
        refined = [r for r in self.layers if r.refined]
        numel = sum(r.numel for r in self.layers) or 1
        return {
            "n_linears": len(self.layers),
            "n_refined": len(refined),
            "n_skipped": len(self.skipped),
            "sparsity": sum(r.sparsity * r.numel for r in self.layers) / numel,
            "all_checks_ok": all(r.check_ok for r in self.layers),
            "swaps": sum(r.swaps or 0 for r in refined),
            "mean_abs_err_before": _mean(r.err_before for r in refined),
            "mean_abs_err_after": _mean(r.err_after for r in refined),
            "seconds": self.timings.get("total_s"),
        }

    def layer_dicts(self) -> list[dict[str, Any]]:
        """``[r.to_json() for r in layers]``: the JSON form of the per-layer records."""
        return [r.to_json() for r in self.layers]

    def to_json(self) -> dict:
        """The JSON-able report (``layers`` as :meth:`LayerRecord.to_json` dicts)."""
        return {
            "model_type": self.model_type,
            "pattern": self.pattern,
            "config": self.config,
            "calibration": self.calibration,
            "summary": self.summary(),
            "layers": self.layer_dicts(),
            "skipped": self.skipped,
            "timings": self.timings,
        }
