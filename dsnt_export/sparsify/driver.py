"""The block-by-block sparsification driver (DSnoT spec section 6).

    plan (pre-flight: adapter, targets, shapes, finite weights)
    catch the inputs of block 0 for every calibration sample (+ the kwargs each block is called with)
    for each block:
        move it to the device
        hook the targeted linears, run the DENSE block over all samples -> ActivationStats
        (``sequential``: one stage at a time, each stage's stats from the already pruned stages)
        per targeted linear: initial mask (magnitude | wanda | sparsegpt with its OBS update),
            DSnoT refinement (error before/after logged), weight * keep written back, mask checked
        re-run the PRUNED block over all samples -> the next block's inputs
        move it back

Thin driver: the algorithms are the pure functions of ``dsnt_export.methods`` and
``dsnt_export.refine.dsnot``; the model plumbing lives in ``pipeline_capture`` and ``pipeline_plan``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dsnt_export.errors import UserInputError
from dsnt_export.masks import check_mask
from dsnt_export.methods import INITIAL_METHODS, prune_initial
from dsnt_export.patterns import Pattern, parse_pattern
from dsnt_export.refine.dsnot import DSnoTConfig, refine_with_info
from dsnt_export.sparsify.capture import (
    StatsCollector,
    batches,
    capture_block_inputs,
    normalize_samples,
    run_block,
)
from dsnt_export.sparsify.plan import LinearTarget, Plan, plan_targets
from dsnt_export.stats import ActivationStats

logger = logging.getLogger(__name__)

REFINE_METHODS = ("dsnot", "none")


@dataclass(frozen=True)
class SparsifyConfig:
    """Everything the driver needs besides the model, the data and the device."""

    pattern: Pattern
    init: str = "wanda"
    refine: str = "dsnot"
    dsnot: DSnoTConfig = field(default_factory=DSnoTConfig.default)
    exclude: tuple[str, ...] = ()
    refine_exclude: tuple[str, ...] = ()
    sequential: bool = False
    batch_size: int = 1
    offload_activations: bool = False
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "refine_exclude", tuple(self.refine_exclude))
        if self.init not in INITIAL_METHODS:
            raise UserInputError(
                f"unknown init method {self.init!r}; known: {list(INITIAL_METHODS)}"
            )
        if self.refine not in REFINE_METHODS:
            raise UserInputError(
                f"unknown refine method {self.refine!r}; known: {list(REFINE_METHODS)}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserInputError(f"batch_size must be a positive int, got {self.batch_size!r}")

    @property
    def needs_hessian(self) -> bool:
        """SparseGPT, DSnoT's loss guard and its hessian criterion need H = 2/n X^T X per input."""
        return self.init == "sparsegpt" or (
            self.refine == "dsnot" and (self.dsnot.loss_guard or self.dsnot.criterion == "hessian")
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["pattern"] = str(self.pattern)
        d["dsnot"] = self.dsnot.to_json()
        return d


@dataclass
class SparsifyReport:
    """JSON-able run report: one entry per targeted linear, skipped modules with reasons."""

    model_type: str
    pattern: str
    config: dict
    calibration: dict
    layers: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.layers)
        refined = [r for r in self.layers if r.get("refine")]
        numel = sum(r["numel"] for r in self.layers) or 1
        return {
            "n_linears": n,
            "n_refined": len(refined),
            "n_skipped": len(self.skipped),
            "sparsity": sum(r["sparsity"] * r["numel"] for r in self.layers) / numel,
            "all_checks_ok": all(r["check_ok"] for r in self.layers),
            "swaps": sum(r.get("swaps", 0) for r in refined),
            "mean_abs_err_before": _mean(r["err_before"] for r in refined),
            "mean_abs_err_after": _mean(r["err_after"] for r in refined),
            "seconds": self.timings.get("total_s"),
        }

    def to_json(self) -> dict:
        return {
            "model_type": self.model_type,
            "pattern": self.pattern,
            "config": self.config,
            "calibration": self.calibration,
            "summary": self.summary(),
            "layers": self.layers,
            "skipped": self.skipped,
            "timings": self.timings,
        }


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``None`` keeps modules where they are (e.g. dispatched by accelerate)."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UserInputError(
            f"unknown device {device!r} ({e}); use e.g. 'cpu', 'cuda', 'cuda:1'"
        ) from e


@torch.no_grad()
def sparsify(
    model: nn.Module,
    calibration: torch.Tensor | Sequence[torch.Tensor],
    config: SparsifyConfig,
    *,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    plan: Plan | None = None,
) -> SparsifyReport:
    """Prune ``model`` in place, block by block; returns the run report.

    ``calibration``: token ids ``[N, T]`` or a list of ``[T]``/``[1, T]`` tensors. The model may
    stay on CPU: each block moves to ``device`` while it is calibrated and pruned, then back.
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    plan = plan or plan_targets(
        model, config.pattern, exclude=config.exclude, refine_exclude=config.refine_exclude
    )
    samples = normalize_samples(calibration)
    store = torch.device("cpu") if config.offload_activations else None
    t0 = time.perf_counter()
    cap = capture_block_inputs(model, plan.adapter, samples, device=dev, store_device=store)
    lens = sorted({int(s.shape[-1]) for s in samples})
    report = SparsifyReport(
        model_type=plan.adapter.model_type,
        pattern=str(config.pattern),
        config=config.to_json(),
        calibration={
            "nsamples": len(samples),
            "seq_lens": lens,
            "tokens": int(sum(s.numel() for s in samples)),
        },
        skipped=list(plan.skipped),
    )
    report.timings["capture_s"] = time.perf_counter() - t0
    inputs = cap.inputs
    groups = batches(inputs, config.batch_size)
    blocks = plan.adapter.get_blocks(model)
    bar = _progress(len(blocks), progress)
    try:
        for i, block in enumerate(blocks):
            tb = time.perf_counter()
            runner = _BlockRunner(block, inputs, cap.block_kwargs[i], groups, dev, store)
            targets = plan.for_block(i)
            with _on_device(block, dev):
                entries = _sparsify_block(runner, plan, targets, config)
                inputs = runner.run_outputs()
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
    runner: _BlockRunner, plan: Plan, targets: list[LinearTarget], config: SparsifyConfig
) -> list[dict]:
    """Statistics, then prune + refine, stage by stage (one stage unless ``sequential``)."""
    entries = []
    for stage in _stages(plan, targets, config.sequential):
        stats = runner.collect(stage, plan, hessian=config.needs_hessian)
        for t in stage:
            entries.append(_prune_one(runner.block, t, stats[t.group], config))
        for st in stats.values():
            st.free_hessian()
    return entries


def _log_block(i: int, entries: list[dict], timings: dict) -> None:
    refined = [e for e in entries if e.get("refine")]
    if refined:
        before = sum(e["err_before"] for e in refined) / len(refined)
        after = sum(e["err_after"] for e in refined) / len(refined)
        swaps = sum(e["swaps"] for e in refined)
        logger.info(
            "block %d: %d linears pruned, DSnoT on %d: mean|err| %.4g -> %.4g, %d swaps, %.1f s",
            i,
            len(entries),
            len(refined),
            before,
            after,
            swaps,
            timings[f"block_{i}_s"],
        )
    else:
        logger.info("block %d: %d linears pruned, %.1f s", i, len(entries), timings[f"block_{i}_s"])


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

    def collect(self, stage: list[LinearTarget], plan: Plan, *, hessian: bool) -> dict[str, Any]:
        stats: dict[str, ActivationStats] = {}
        hooks: dict[str, tuple[nn.Module, ActivationStats]] = {}
        for t in stage:
            if t.group in stats:
                continue  # linears of one group read the same input: one set of statistics
            mod = self.block.get_submodule(t.linear)
            dev = self.device if self.device is not None else mod.weight.device
            st = ActivationStats(mod.in_features, dev, hessian=hessian, name=t.name)
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


def _prune_one(
    block: nn.Module, t: LinearTarget, stats: ActivationStats, cfg: SparsifyConfig
) -> dict:
    """Initial mask (+ SparseGPT update), DSnoT refinement, write-back and mask check of one linear."""
    lin = block.get_submodule(t.linear)
    w = lin.weight.data
    w_dense = w.clone() if stats.has_hessian else None
    t0 = time.perf_counter()
    res = prune_initial(
        cfg.init,
        w,
        stats,
        cfg.pattern,
        name=t.name,
        sparsegpt_blocksize=cfg.sparsegpt_blocksize,
        sparsegpt_percdamp=cfg.sparsegpt_percdamp,
    )
    t1 = time.perf_counter()
    keep = res.keep
    # weights a DSnoT swap may regrow: SparseGPT's updated weights where kept, dense ones elsewhere
    base = torch.where(res.keep, res.weight, w) if cfg.init == "sparsegpt" else res.weight
    entry: dict[str, Any] = {
        "name": t.name,
        "block": t.block,
        "linear": t.linear,
        "kind": t.kind,
        "shape": list(w.shape),
        "numel": w.numel(),
        "init": cfg.init,
        "pattern": str(cfg.pattern),
        "refine": None,
    }
    do_refine = cfg.refine == "dsnot" and t.refine
    if do_refine and cfg.dsnot.criterion == "hessian":
        base, keep, entry_info = _hessian_refine(base, keep, w, stats, cfg)
        entry.update(entry_info)
    elif do_refine:
        keep, info = refine_with_info(
            base,
            keep,
            stats,
            cfg.pattern,
            cfg.dsnot,
            initial_metric=res.metric,
            name=t.name,
            reference_weight=w,
        )
        s = info.summary()
        if s.get("loss_before") is not None:
            entry.update(loss_before=s["loss_before"], loss_after=s["loss_after"])
        entry.update(
            refine="dsnot",
            criterion="mean",
            err_before=s["mean_abs_err_before"],
            err_after=s["mean_abs_err_after"],
            swaps=s["n_swaps"],
            cycles=s["cycles"],
        )
        logger.debug(
            "%s: DSnoT mean|err| %.4g -> %.4g, %d swaps",
            t.name,
            entry["err_before"],
            entry["err_after"],
            entry["swaps"],
        )
    elif cfg.refine == "dsnot":
        entry["refine_skipped"] = t.refine_skip_reason
    t2 = time.perf_counter()
    lin.weight.data.copy_(torch.where(keep, base, torch.zeros((), dtype=w.dtype, device=w.device)))
    mask_report = check_mask(lin.weight.data, cfg.pattern, name=t.name)
    if stats.has_hessian:
        entry["rel_recon_loss"] = _relative_loss(w_dense, lin.weight.data, stats.hessian)
    entry.update(
        method=cfg.init + ("+dsnot" if do_refine else ""),
        sparsity=1.0 - float(keep.float().mean()),
        zeros=float((lin.weight.data == 0).float().mean()),
        check_ok=bool(getattr(mask_report, "ok", True)),
        time_s={"init": t1 - t0, "refine": t2 - t1, "total": time.perf_counter() - t0},
    )
    return entry


def _hessian_refine(base, keep, w, stats: ActivationStats, cfg: SparsifyConfig):
    """DSnoT cycles chosen by the exact layer loss (criterion "hessian"); returns weight, keep, log."""
    from dsnt_export.refine.hessian_swap import hessian_refine

    new_w, new_keep, info = hessian_refine(
        base,
        keep,
        w,
        stats.hessian,
        cfg.pattern,
        max_cycles=cfg.dsnot.max_cycles,
        percdamp=cfg.dsnot.percdamp,
    )
    s = stats.sum.reshape(1, -1)
    ref = w.float()
    err_before = ((ref - torch.where(keep, base.float(), 0.0)) * s).sum(1)
    err_after = ((ref - new_w.float()) * s).sum(1)
    return (
        new_w,
        new_keep,
        dict(
            refine="dsnot",
            criterion="hessian",
            loss_before=info.loss_before,
            loss_after=info.loss_after,
            err_before=float(err_before.abs().mean()),
            err_after=float(err_after.abs().mean()),
            swaps=info.n_swaps,
            cycles=info.cycles,
        ),
    )


def _relative_loss(dense: torch.Tensor, sparse: torch.Tensor, H: torch.Tensor) -> float:
    """||X W^T - X W'^T||^2 / ||X W^T||^2 from the Hessian H = 2/n X^T X (per layer)."""
    d = dense.float() - sparse.float()
    num = float(((d @ H) * d).sum())
    den = float(((dense.float() @ H) * dense.float()).sum())
    return num / den if den > 0 else float("nan")
