"""The block-by-block sparsification driver (docs/dsnot-spec.md section 6).

    plan (pre-flight: adapter, targets, shapes, finite weights)
    catch the inputs of block 0 for every calibration sample (+ the kwargs each block is called with)
    for each block:
        move it to the device
        hook the targeted linears, run the DENSE block over all samples -> ActivationStats
        (``sequential``: one stage at a time, each stage's stats from the already pruned stages)
        per targeted linear: initial mask (a registered initial method, ``dsnt_export.methods``),
            refinement (a registered refiner, ``dsnt_export.refine``; error before/after logged),
            weight * keep written back, mask checked -> one LayerRecord
        re-run the PRUNED block over all samples -> the next block's inputs
        move it back

Thin driver: the algorithms are the pure functions behind the two registries
(:func:`dsnt_export.methods.get_initial`, :func:`dsnt_export.refine.get_refiner`); the model
plumbing lives in :mod:`~dsnt_export.sparsify.capture` and :mod:`~dsnt_export.sparsify.plan`, the
typed results in :mod:`~dsnt_export.sparsify.record`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from dsnt_export.errors import UserInputError
from dsnt_export.masks import check_mask
from dsnt_export.methods import InitialResult, get_initial, prune_initial_group
from dsnt_export.patterns import Pattern, parse_pattern
from dsnt_export.precision import (
    check_matmul_precision,
    matmul_precision,
    resolve_matmul_precision,
)
from dsnt_export.refine import DEFAULT_REFINER, NO_REFINE, Refiner, get_refiner, refiner_for
from dsnt_export.refine.loss import relative_loss
from dsnt_export.sparsify.capture import (
    StatsCollector,
    batches,
    canonical_order,
    capture_block_inputs,
    normalize_samples,
    run_block,
)
from dsnt_export.sparsify.devices import DeviceMap, KwargsByDevice, resolve_block_devices
from dsnt_export.sparsify.heap import hold_freed_memory
from dsnt_export.sparsify.plan import LinearTarget, Plan, plan_targets
from dsnt_export.sparsify.record import LayerRecord, SparsifyReport
from dsnt_export.stats import ACCUMULATE, ActivationStats

logger = logging.getLogger(__name__)

__all__ = ["LayerRecord", "SparsifyConfig", "SparsifyReport", "sparsify", "sparsify_block"]

#: ``SparsifyConfig.calibration_order`` values
CALIBRATION_ORDERS = ("canonical", "given")


@dataclass(frozen=True)
class SparsifyConfig:
    """Everything the driver needs besides the model, the data and the device.

    pattern:        the sparsity pattern (a :class:`~dsnt_export.patterns.Pattern` or its string,
                    e.g. "2:4", "0.5").
    init:           a registered initial method (:func:`dsnt_export.methods.initial_names`).
    refine:         a registered refiner name (:func:`dsnt_export.refine.refiner_names`), "none"
                    (or None) for no refinement, or a refiner config object, whose type selects the
                    refiner (e.g. ``HessianSwapConfig(percdamp=0.05)``). Normalised to the name.
    refine_config:  the refiner's config; None = the refiner's default. Must be of the refiner's
                    config type. None when ``refine`` is "none".
    exclude / refine_exclude: selectors of linears never pruned / pruned but not refined.
    sequential:     statistics of later stages of a block from the already pruned earlier ones.
    batch_size:     calibration samples per block forward (positive int).
    offload_activations: keep calibration activations on the CPU between blocks.
    sparsegpt_blocksize / sparsegpt_percdamp: SparseGPT's options (its own dampening, 0.01).
    statistics:     how activation statistics accumulate (:class:`~dsnt_export.stats.ActivationStats`):
                    "sum" (one ``X^T X`` per batch, scaled once; fast) or "reference" (the
                    reference code's per-sample running means, bit for bit). None = "reference"
                    for ``refine="dsnot"`` (DSnoT's reference-parity path), else "sum".
    calibration_order: "canonical" (the windows sorted by their token ids first, so any
                    permutation of the same windows gives bit-identical statistics, masks and
                    weights) or "given" (as passed). None = "given" with reference statistics,
                    else "canonical".
    matmul_precision: internal precision of the float32 products of the statistics (the Hessian)
                    and of the per-linear work (initial method, refiner, loss records;
                    :mod:`dsnt_export.precision`): "auto"
                    (default: torch's "medium" only where a probe shows it as accurate as float32,
                    else "highest"; always "highest" with reference statistics), "highest",
                    "high" or "medium". The model's forwards are never affected.

    Raises ``UserInputError`` for an unknown method or refiner (listing the known ones), a config
    of the wrong type, a bad ``batch_size``, ``statistics``, ``calibration_order`` or
    ``matmul_precision``.
    """

    pattern: Pattern
    init: str = "wanda"
    refine: str = DEFAULT_REFINER
    refine_config: Any = None
    exclude: tuple[str, ...] = ()
    refine_exclude: tuple[str, ...] = ()
    sequential: bool = False
    batch_size: int = 1
    offload_activations: bool = False
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    statistics: str | None = None
    calibration_order: str | None = None
    matmul_precision: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "refine_exclude", tuple(self.refine_exclude))
        get_initial(self.init)  # raises for an unknown method
        refine, cfg = self.refine, self.refine_config
        if refine is None or refine == NO_REFINE:
            if cfg is not None:
                raise UserInputError(
                    f"refine is 'none' but a refine_config was given ({type(cfg).__name__}); "
                    "drop refine_config or name its refiner"
                )
            refine = NO_REFINE
        elif not isinstance(refine, str):  # a config object: its type selects the refiner
            if cfg is not None:
                raise UserInputError(
                    "pass the refiner config as refine= or refine_config=, not both"
                )
            refine, cfg = refiner_for(refine).name, refine
        else:
            r = get_refiner(refine)
            if cfg is None:
                cfg = r.default_config()
            elif type(cfg) is not r.config_type:
                raise UserInputError(
                    f"refiner {refine!r} takes a {r.config_type.__name__}, got {type(cfg).__name__}"
                )
        object.__setattr__(self, "refine", refine)
        object.__setattr__(self, "refine_config", cfg)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserInputError(f"batch_size must be a positive int, got {self.batch_size!r}")
        stats = self.statistics
        if stats is None:
            stats = "reference" if refine == "dsnot" else "sum"
        elif stats not in ACCUMULATE:
            raise UserInputError(
                f"statistics must be one of {list(ACCUMULATE)} (or None: automatic), got {stats!r}"
            )
        order = self.calibration_order
        if order is None:
            order = "given" if stats == "reference" else "canonical"
        elif order not in CALIBRATION_ORDERS:
            raise UserInputError(
                f"calibration_order must be one of {list(CALIBRATION_ORDERS)} (or None: "
                f"automatic), got {order!r}"
            )
        object.__setattr__(self, "statistics", stats)
        object.__setattr__(self, "calibration_order", order)
        check_matmul_precision(self.matmul_precision)

    def resolved_matmul_precision(self, device: torch.device | str | None) -> str:
        """The concrete precision ``matmul_precision`` means on ``device`` (None: CPU): "auto"
        is "highest" with reference statistics (the bit-for-bit path), else
        :func:`~dsnt_export.precision.resolve_matmul_precision`."""
        if self.matmul_precision == "auto" and self.statistics == "reference":
            return "highest"
        return resolve_matmul_precision(self.matmul_precision, device)

    @property
    def refiner(self) -> Refiner | None:
        """The registered refiner, or None for ``refine="none"``."""
        return None if self.refine == NO_REFINE else get_refiner(self.refine)

    @property
    def needs_variance(self) -> bool:
        """Whether ``ActivationStats.var`` is read (DSnoT's grow score): the refiner config's
        ``needs_variance`` (True for a config without that attribute)."""
        cfg = self.refine_config
        return bool(cfg is not None and getattr(cfg, "needs_variance", True))

    @property
    def needs_hessian(self) -> bool:
        """Whether H = 2/n X^T X is collected per input: the initial method or the refiner reads it
        (SparseGPT; hessian-swap; DSnoT's loss guard)."""
        cfg = self.refine_config
        return get_initial(self.init).needs_hessian or bool(cfg is not None and cfg.needs_hessian)

    def to_json(self) -> dict:
        """JSON-able dict: every field, ``pattern`` as its string, ``refine_config`` as its dict
        (null without refinement)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pattern"] = str(self.pattern)
        d["exclude"], d["refine_exclude"] = list(self.exclude), list(self.refine_exclude)
        cfg = self.refine_config
        d["refine_config"] = cfg.to_json() if cfg is not None else None
        return d


def _device(device: str | torch.device | None, move_blocks: bool) -> torch.device | None:
    """The device blocks move to (None: blocks stay where they are)."""
    if not move_blocks:
        if device is not None:
            raise UserInputError(
                f"move_blocks=False keeps every block where it is, so device={device!r} cannot "
                "apply; pass device=None"
            )
        return None
    if isinstance(device, torch.device):
        return device
    from dsnt_export.hf_io import resolve_device

    return resolve_device(device)


@torch.no_grad()
def sparsify(
    model: nn.Module,
    calibration: torch.Tensor | Sequence[torch.Tensor],
    config: SparsifyConfig,
    *,
    device: str | torch.device | None = "cpu",
    move_blocks: bool = True,
    progress: bool = True,
    plan: Plan | None = None,
    device_map: DeviceMap = None,
) -> SparsifyReport:
    """Prune ``model`` in place, block by block; returns the run report.

    ``calibration``: token ids ``[N, T]`` (int64) or a list of ``[T]``/``[1, T]`` tensors. The model
    may stay on CPU: each block moves to ``device`` while it is calibrated and pruned, then back.
    ``device``: as :func:`dsnt_export.hf_io.resolve_device` (None or "auto": the accelerator if
    one is available, else the CPU; "cpu", "cuda:1", a ``torch.device``). ``move_blocks=False``
    (with ``device=None``): blocks stay where they are (e.g. a model dispatched over devices by
    accelerate) and each linear's statistics live on its weight's device. ``plan``: a precomputed
    :func:`~dsnt_export.sparsify.plan.plan_targets` (default: computed here). ``progress``: a tqdm
    bar over blocks. ``device_map``: spread the blocks over several devices
    (:func:`~dsnt_export.sparsify.devices.resolve_block_devices`: ``"balanced"`` or accelerate's
    ``{module name: device}`` format): block ``i`` moves to its mapped device, the activations
    follow it; the pre-block modules run on ``device``; the report's config lists the devices
    (``block_devices``).

    On glibc, the process keeps freed host memory for reuse from here on
    (:func:`dsnt_export.sparsify.heap.hold_freed_memory`: the blocks' working tensors are not
    returned to the OS and faulted back in block after block).

    Raises ``UserInputError`` for a bad device or device map (or a map with
    ``move_blocks=False``), ``ShapeError`` / ``NonFiniteError`` from the plan
    (pattern vs. shapes, non-finite weights) and from the methods.
    """
    t_start = time.perf_counter()
    dev = _device(device, move_blocks)
    hold_freed_memory()
    plan = plan or plan_targets(
        model, config.pattern, exclude=config.exclude, refine_exclude=config.refine_exclude
    )
    blocks = plan.adapter.get_blocks(model)
    if device_map is not None and not move_blocks:
        raise UserInputError(
            "device_map places each block on a device, move_blocks=False keeps every block "
            "where it is; pass one of them"
        )
    block_devs = resolve_block_devices(device_map, plan.adapter.blocks, len(blocks), dev)
    samples = calibration_samples(calibration, config)
    store = torch.device("cpu") if config.offload_activations else None
    t0 = time.perf_counter()
    cap = capture_block_inputs(model, plan.adapter, samples, device=dev, store_device=store)
    report = new_report(plan, config, samples, dev, block_devs if device_map is not None else None)
    report.timings["capture_s"] = time.perf_counter() - t0
    start_stage_timings(report.timings)
    inputs = cap.inputs
    kwargs = KwargsByDevice(dev)
    bar = _progress(len(blocks), progress)
    try:
        for i, block in enumerate(blocks):
            tb = time.perf_counter()
            targets = plan.for_block(i)
            entries, inputs = sparsify_block(
                block,
                inputs,
                kwargs.on(cap.block_kwargs[i], block_devs[i]),
                plan,
                targets,
                config,
                device=block_devs[i],
                store=store,
                timings=report.timings,
                outputs=i + 1 < len(blocks),
            )
            report.layers.extend(entries)
            report.timings[f"block_{i}_s"] = time.perf_counter() - tb
            _log_block(i, entries, report.timings)
            bar.update(1)
            bar.set_postfix_str(f"block {i}: {len(targets)} linears")
    finally:
        bar.close()
    report.timings["total_s"] = time.perf_counter() - t_start
    logger.info("sparsify done: %s", report.summary())
    return report


def sparsify_block(
    block: nn.Module,
    inputs: list[torch.Tensor],
    block_kwargs: dict[int, dict[str, Any]],
    plan: Plan,
    targets: list[LinearTarget],
    config: SparsifyConfig,
    *,
    device: torch.device | None,
    store: torch.device | None = None,
    timings: dict[str, float] | None = None,
    outputs: bool = True,
) -> tuple[list[LayerRecord], list[torch.Tensor]]:
    """Calibrate, prune and refine one decoder block in place; return its records and outputs.

    The unit of work of :func:`sparsify` (and of any driver that brings blocks in one at a time,
    e.g. from disk). ``inputs``: the block's inputs, one ``[1, T, H]`` tensor per calibration
    sample; ``block_kwargs``: ``{seq_len: kwargs}`` the model calls this block with
    (:class:`~dsnt_export.sparsify.capture.Captured`); ``targets``: ``plan.for_block(i)``.
    The block moves to ``device`` for the duration (None: stays where it is) and back. Returns
    ``(records, outputs)``: one :class:`LayerRecord` per target and the PRUNED block's outputs,
    the next block's inputs (on ``store`` when given, else on the compute device).
    ``timings``: when given, the block's stage times (seconds) are ADDED to its keys
    ``stats_s`` (dense statistics forwards incl. Hessian accumulation), ``init_s`` (initial
    masks incl. SparseGPT), ``refine_s`` and ``rerun_s`` (pruned re-run), created at 0 if absent.
    """
    tm = timings if timings is not None else {}
    groups = batches(inputs, config.batch_size)
    runner = _BlockRunner(block, inputs, block_kwargs, groups, device, store)
    with _on_device(block, device):
        entries = _sparsify_block(runner, plan, targets, config, tm)
        if not outputs:
            return entries, []
        t0 = _now(device)
        outs = runner.run_outputs()
        _add(tm, "rerun_s", _now(device) - t0)
    return entries, outs


#: the stage totals :func:`sparsify` puts in ``report.timings`` (seconds), besides ``capture_s``,
#: ``total_s`` and the per-block ``block_{i}_s``
_STAGE_KEYS = ("stats_s", "init_s", "refine_s", "rerun_s")


def start_stage_timings(timings: dict[str, float]) -> None:
    """Set every stage total that :func:`sparsify_block` adds to (``stats_s``, ``init_s``,
    ``refine_s``, ``rerun_s``; seconds) to 0 in ``timings``, as a driver does before block 0."""
    for k in _STAGE_KEYS:
        timings[k] = 0.0


def new_report(
    plan: Plan,
    config: SparsifyConfig,
    samples: list[torch.Tensor],
    device: torch.device | None,
    block_devices: Sequence[torch.device] | None = None,
) -> SparsifyReport:
    """An empty :class:`SparsifyReport` of a run: the config (with ``matmul_precision_used``, what
    "auto" resolved to on ``device``, and ``block_devices``, each block's device, when a device map
    spread them), the calibration's shape and the plan's skipped modules."""
    extra = {} if block_devices is None else {"block_devices": [str(d) for d in block_devices]}
    return SparsifyReport(
        model_type=plan.adapter.model_type,
        pattern=str(config.pattern),
        config={
            **config.to_json(),
            "matmul_precision_used": config.resolved_matmul_precision(device),
            **extra,
        },
        calibration={
            "nsamples": len(samples),
            "seq_lens": sorted({int(s.shape[-1]) for s in samples}),
            "tokens": int(sum(s.numel() for s in samples)),
        },
        skipped=list(plan.skipped),
    )


def calibration_samples(calibration: Any, config: SparsifyConfig) -> list[torch.Tensor]:
    """The calibration samples in the order every driver feeds them: ``calibration`` as
    :func:`~dsnt_export.sparsify.capture.normalize_samples` takes it (``[N, T]`` ids or a list of
    ``[1, T]``/``[T]``), sorted by :func:`~dsnt_export.sparsify.capture.canonical_order` when
    ``config.calibration_order`` is "canonical" (any permutation then gives the same result)."""
    samples = normalize_samples(calibration)
    if config.calibration_order == "canonical":
        samples = [samples[i] for i in canonical_order(samples)]
    return samples


def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def _now(device: torch.device | None) -> float:
    """perf_counter after the device's queued work (one sync per stage, not per step)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def _on_device(block: nn.Module, dev: torch.device | None) -> Iterator[None]:
    """Move ``block`` to ``dev`` for the duration (and back, also on errors)."""
    if dev is None:
        yield
        return
    home = next(block.parameters()).device
    block.to(dev)
    try:
        yield
    finally:
        block.to(home)


def _sparsify_block(
    runner: _BlockRunner,
    plan: Plan,
    targets: list[LinearTarget],
    config: SparsifyConfig,
    timings: dict[str, float],
) -> list[LayerRecord]:
    """Statistics, then prune + refine, stage by stage (one stage unless ``sequential``)."""
    records = []
    precision = config.resolved_matmul_precision(runner.device)
    for stage in _stages(plan, targets, config.sequential):
        t0 = _now(runner.device)
        stats = runner.collect(stage, plan, config, precision)
        _add(timings, "stats_s", _now(runner.device) - t0)
        # one precision for the whole per-linear phase (SparseGPT's lazy block updates, the
        # refiner, the loss records); torch's setting is process-wide, restored afterwards
        with matmul_precision(precision):
            for group in _by_group(stage):
                st = stats[group[0].group]
                for t, init in zip(
                    group, _initial_group(runner.block, group, st, config), strict=True
                ):
                    rec = _prune_one(runner.block, t, st, config, init)
                    _add(timings, "init_s", rec.time_s["init"])
                    _add(timings, "refine_s", rec.time_s["refine"])
                    records.append(rec)
        for st in stats.values():
            st.free_hessian()
    return records


def _log_block(i: int, records: list[LayerRecord], timings: dict) -> None:
    refined = [r for r in records if r.refined]
    if refined:
        before = sum(r.err_before for r in refined) / len(refined)
        after = sum(r.err_after for r in refined) / len(refined)
        swaps = sum(r.swaps for r in refined)
        logger.info(
            "block %d: %d linears pruned, %s on %d: mean|err| %.4g -> %.4g, %d swaps, %.1f s",
            i,
            len(records),
            refined[0].refine,
            len(refined),
            before,
            after,
            swaps,
            timings[f"block_{i}_s"],
        )
    else:
        logger.info("block %d: %d linears pruned, %.1f s", i, len(records), timings[f"block_{i}_s"])


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sparsify blocks", unit="block", disable=not enabled)


def _stages(plan: Plan, targets: list[LinearTarget], sequential: bool) -> list[list[LinearTarget]]:
    if not targets:
        return []
    if not sequential:
        return [targets]
    out = []
    for g in plan.adapter.groups:
        st = [t for t in targets if t.group == g.name]
        if st:
            out.append(st)
    return out


class _BlockRunner:
    """Runs one block over the calibration batches, for statistics or for outputs."""

    def __init__(self, block, inputs, kwargs_by_len, groups, device, store):
        self.block, self.inputs, self.kw, self.groups = block, inputs, kwargs_by_len, groups
        self.device, self.store = device, store

    def collect(
        self, stage: list[LinearTarget], plan: Plan, config: SparsifyConfig, precision: str
    ) -> dict[str, Any]:
        stats: dict[str, ActivationStats] = {}
        hooks: dict[str, tuple[nn.Module, ActivationStats]] = {}
        for t in stage:
            if t.group in stats:
                continue  # linears of one group read the same input: one set of statistics
            mod = self.block.get_submodule(t.linear)
            dev = self.device if self.device is not None else mod.weight.device
            st = ActivationStats(
                mod.in_features,
                dev,
                hessian=config.needs_hessian,
                name=t.name,
                accumulate=config.statistics,
                variance=config.needs_variance,
                matmul_precision=precision,
            )
            stats[t.group] = st
            hooks[t.group] = (mod, st)
        with StatsCollector(hooks, stop_early=True) as col:
            run_block(
                self.block,
                self.inputs,
                self.kw,
                self.groups,
                device=self.device,
                collect_outputs=False,
                collector=col,
            )
        return stats

    def run_outputs(self) -> list[torch.Tensor]:
        out = run_block(
            self.block,
            self.inputs,
            self.kw,
            self.groups,
            device=self.device,
            collect_outputs=True,
            store_device=self.store,
        )
        assert out is not None
        return out


def _by_group(stage: list[LinearTarget]) -> list[list[LinearTarget]]:
    """The stage's targets by input group (first-seen order; a group's linears share statistics)."""
    out: dict[str, list[LinearTarget]] = {}
    for t in stage:
        out.setdefault(t.group, []).append(t)
    return list(out.values())


def _initial_group(
    block: nn.Module, group: list[LinearTarget], stats: ActivationStats, cfg: SparsifyConfig
) -> list[tuple[InitialResult, float]]:
    """Initial masks (+ SparseGPT update) of one input group's linears, in one call where the
    method stacks rows (:func:`~dsnt_export.methods.prune_initial_group`); with each linear's
    share of the time (seconds, split by output rows). The weights are not modified."""
    weights = [block.get_submodule(t.linear).weight.data for t in group]
    t0 = time.perf_counter()
    results = prune_initial_group(
        cfg.init,
        weights,
        stats,
        cfg.pattern,
        names=[t.name for t in group],
        sparsegpt_blocksize=cfg.sparsegpt_blocksize,
        sparsegpt_percdamp=cfg.sparsegpt_percdamp,
    )
    seconds = time.perf_counter() - t0
    rows = sum(w.shape[0] for w in weights)
    return [(r, seconds * w.shape[0] / rows) for r, w in zip(results, weights, strict=True)]


def _prune_one(
    block: nn.Module,
    t: LinearTarget,
    stats: ActivationStats,
    cfg: SparsifyConfig,
    initial: tuple[InitialResult, float],
) -> LayerRecord:
    """Refinement, write-back and mask check of one linear, from its ``initial`` result (mask +
    SparseGPT update; :func:`_initial_group`) and the seconds that took."""
    lin = block.get_submodule(t.linear)
    w = lin.weight.data
    w_dense = w.clone() if stats.has_hessian else None
    res, init_s = initial
    t1 = time.perf_counter()
    keep = res.keep
    # weights a swap may regrow: SparseGPT's updated weights where kept, dense ones elsewhere
    base = torch.where(res.keep, res.weight, w) if cfg.init == "sparsegpt" else res.weight
    rec = LayerRecord(
        name=t.name,
        block=t.block,
        linear=t.linear,
        kind=t.kind,
        shape=list(w.shape),
        numel=w.numel(),
        init=cfg.init,
        pattern=str(cfg.pattern),
    )
    refiner = cfg.refiner
    do_refine = refiner is not None and t.refine
    known_loss = None  # (dampened loss, ridge) of the written weights, when the refiner knows it
    if do_refine:
        out = refiner.refine(
            w, base, keep, stats, cfg.pattern, cfg.refine_config, metric=res.metric, name=t.name
        )
        base, keep, s = out.weight, out.keep, out.summary
        rec.refine, rec.criterion = refiner.record_refine, refiner.record_criterion
        rec.loss_before, rec.loss_after = s.loss_before, s.loss_after
        rec.err_before, rec.err_after = s.err_before, s.err_after
        rec.swaps, rec.cycles = s.swaps, s.cycles
        if s.loss_ridge is not None and s.loss_after is not None and w.dtype == torch.float32:
            known_loss = (s.loss_after, s.loss_ridge)  # its weights are written unrounded
        logger.debug(
            "%s: %s mean|err| %.4g -> %.4g, %d swaps",
            t.name,
            refiner.name,
            rec.err_before,
            rec.err_after,
            rec.swaps,
        )
    elif refiner is not None:
        rec.refine_skipped = t.refine_skip_reason
    t2 = time.perf_counter()
    lin.weight.data.copy_(torch.where(keep, base, torch.zeros((), dtype=w.dtype, device=w.device)))
    mask_report = check_mask(lin.weight.data, cfg.pattern, name=t.name)
    if stats.has_hessian:  # one or two [out, in] @ [in, in] products (the phase's precision)
        rec.rel_recon_loss = relative_loss(
            w_dense, lin.weight.data, stats.hessian, dampened_loss=known_loss
        )
    rec.method = cfg.init + (f"+{refiner.record_refine}" if do_refine else "")
    rec.sparsity = 1.0 - float(keep.float().mean())
    rec.zeros = float((lin.weight.data == 0).float().mean())
    rec.check_ok = bool(getattr(mask_report, "ok", True))
    rec.time_s = {"init": init_s, "refine": t2 - t1, "total": init_s + time.perf_counter() - t1}
    return rec
