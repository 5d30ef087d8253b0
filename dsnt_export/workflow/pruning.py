"""Pruning a recipe: :func:`prune_recipe` (in memory) and :func:`write_checkpoint`,
:func:`prune_streamed` (out of core), :func:`prune_to_dir` (``dsnt-export prune``: atomically into
a directory) and :func:`validate_checkpoint` (every saved pruned tensor re-checked from disk).
Part of :mod:`dsnt_export.workflow`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.errors import UserInputError
from dsnt_export.hf_io import (
    save_checkpoint,
    save_config_files,
    source_dtype,
    write_checkpoint_manifest,
)
from dsnt_export.preflight import check_calibration
from dsnt_export.recipe import Recipe
from dsnt_export.sparsify.driver import SparsifyReport, sparsify
from dsnt_export.sparsify.plan import plan_targets
from dsnt_export.workflow.loading import (
    EMBEDDED_ID,
    LoadedModel,
    calibration_ids,
    load_model_for,
    load_skeleton_for,
)


@dataclass
class PruneResult:
    """The sparse model in memory with what produced it.

    ``model`` holds the pruned (masked, possibly updated) weights; ``report`` the driver's per-layer
    records; ``calibration`` the calibration data's description; ``source_dtype`` the checkpoint's
    own dtype (what ``save_dtype: source`` writes); ``timings`` seconds per step
    (``load_s``, ``calibration_data_s``, ``sparsify_s``).
    """

    recipe: Recipe
    source: str
    model: nn.Module
    tokenizer: Any
    report: SparsifyReport
    calibration: dict
    source_dtype: torch.dtype | None
    timings: dict = field(default_factory=dict)

    def source_model(self) -> dict:
        """The ``source_model`` record of manifests and summaries (id, path, architecture, dtype)."""
        cfg = self.model.config
        return {
            "id": self.recipe.model or EMBEDDED_ID,
            "path": self.source,
            "model_type": cfg.model_type,
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "dtype": str(self.source_dtype).removeprefix("torch.") if self.source_dtype else None,
        }


def _plan_and_calibrate(recipe: Recipe, lm: Any) -> tuple[dict, Any, Any, torch.Tensor, dict]:
    """What both prunes do before the first block: the sparsify config, the plan (shapes and
    NaN/Inf checked before any data is read), the seeded calibration ids and their check (context,
    vocab: before any forward). Returns ``(timings, config, plan, ids, calibration info)``."""
    t = dict(lm.timings)
    cfg = recipe.sparsify_config()
    plan = plan_targets(
        lm.model, cfg.pattern, exclude=cfg.exclude, refine_exclude=cfg.refine_exclude
    )
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    ids, calib = calibration_ids(recipe, lm.tokenizer)
    check_calibration(lm.model, ids, recipe.calib)
    t["calibration_data_s"] = time.perf_counter() - t0
    return t, cfg, plan, ids, calib


def prune_recipe(
    recipe: Recipe, *, progress: bool = True, loaded: LoadedModel | None = None
) -> PruneResult:
    """Load the model of ``recipe`` (unless ``loaded`` is given), check it, calibrate, sparsify.

    Shapes and NaN/Inf are checked (``plan_targets``) before the calibration data is read. The
    model is sparsified in place. ``progress``: tqdm bars. Raises
    :class:`~dsnt_export.errors.UserInputError` subclasses for bad models, shapes or data.
    """
    lm = loaded if loaded is not None else load_model_for(recipe)
    t, cfg, plan, ids, calib = _plan_and_calibrate(recipe, lm)
    report = sparsify(
        lm.model,
        ids,
        cfg,
        device=lm.device,
        progress=progress,
        plan=plan,
        device_map=recipe.device_map,
    )
    t["sparsify_s"] = report.timings["total_s"]
    return PruneResult(
        recipe=recipe,
        source=lm.source,
        model=lm.model,
        tokenizer=lm.tokenizer,
        report=report,
        calibration=calib,
        source_dtype=source_dtype(lm.config),
        timings=t,
    )


def save_dtype_of(result: PruneResult) -> torch.dtype | None:
    """The checkpoint dtype of ``result.recipe.save_dtype`` (``source``: the checkpoint's own)."""
    return resolve_save_dtype(result.recipe.save_dtype, result.source_dtype)


def resolve_save_dtype(name: str, source: torch.dtype | None) -> torch.dtype | None:
    """The dtype a recipe's ``save_dtype`` (``source``/``float32``/``float16``/``bfloat16``)
    writes; ``source`` is the checkpoint's own (None when it declares none: the compute dtype is
    written). Raises ``KeyError`` for another name (the recipe validates it)."""
    if name == "source":
        return source
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def write_checkpoint(result: PruneResult, out_dir: str | Path) -> dict:
    """Write ``result`` into the (existing, empty) directory ``out_dir``; returns the manifest
    (``mask_check_ok``: every saved pruned tensor re-checked against the pattern)."""
    t0 = time.perf_counter()
    return save_checkpoint(
        result.model,
        result.tokenizer,
        out_dir,
        pattern=result.recipe.pattern,
        report=result.report.to_json(),
        save_dtype=save_dtype_of(result),
        manifest={
            "source_model": result.source_model(),
            "recipe": result.recipe.to_dict(),
            "calibration": result.calibration,
            "timings": {**result.timings, "save_s": time.perf_counter() - t0},
        },
    )


def prune_streamed(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    progress: bool = True,
    loaded: LoadedModel | None = None,
) -> tuple[PruneResult, dict]:
    """Prune ``recipe`` out of core straight into the (existing, empty) directory ``out_dir``.

    The files and tensors are those of :func:`prune_recipe` + :func:`write_checkpoint` (same
    config, tokenizer, manifest records; shards + index), but the model is never loaded: blocks
    are read from the checkpoint, pruned and written one at a time
    (:func:`dsnt_export.sparsify.streaming.sparsify_streamed`). ``loaded``: a
    :func:`load_skeleton_for` result (default: made here). Returns ``(result, manifest)``;
    ``result.model`` is the weightless skeleton. Raises what :func:`prune_recipe` raises; on an
    error ``out_dir`` is half written (callers write into a temporary directory).
    """
    from dsnt_export.sparsify.streaming import sparsify_streamed

    lm = loaded if loaded is not None else load_skeleton_for(recipe)
    t, cfg, plan, ids, calib = _plan_and_calibrate(recipe, lm)
    src_dtype = source_dtype(lm.config)
    res = sparsify_streamed(
        lm.model,
        lm.source,
        ids,
        cfg,
        out_dir,
        device=lm.device,
        dtype=lm.dtype,
        save_dtype=resolve_save_dtype(recipe.save_dtype, src_dtype),
        plan=plan,
        progress=progress,
        device_map=recipe.device_map,
    )
    t["sparsify_s"] = res.report.timings["total_s"]
    result = PruneResult(
        recipe=recipe,
        source=lm.source,
        model=lm.model,
        tokenizer=lm.tokenizer,
        report=res.report,
        calibration=calib,
        source_dtype=src_dtype,
        timings=t,
    )
    t0 = time.perf_counter()
    save_config_files(lm.model, out_dir, res.save_dtype)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(out_dir)
    manifest = write_checkpoint_manifest(
        out_dir,
        pattern=recipe.pattern,
        report=res.report.to_json(),
        tensors=res.tensors,
        manifest={
            "source_model": result.source_model(),
            "recipe": recipe.to_dict(),
            "calibration": calib,
            "timings": {**t, "save_s": time.perf_counter() - t0},
        },
    )
    return result, manifest


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` exists, is not an empty directory and may not be
    replaced (:class:`~dsnt_export.errors.UserInputError`); returns ``out`` as a Path."""
    p = Path(out)
    if p.exists() and not overwrite and not (p.is_dir() and not any(p.iterdir())):
        raise UserInputError(
            f"output path {p} already exists; choose another --out or pass --overwrite"
        )
    return p


@dataclass
class SavedCheckpoint:
    """What :func:`prune_to_dir` wrote: the in-memory result, the manifest and the directory."""

    result: PruneResult
    manifest: dict
    out: Path

    @property
    def ok(self) -> bool:
        """Every saved pruned tensor satisfies the pattern."""
        return bool(self.manifest["mask_check_ok"])


def prune_to_dir(
    recipe: Recipe, out: str | Path, *, progress: bool = True, overwrite: bool = False
) -> SavedCheckpoint:
    """Prune ``recipe`` and write the checkpoint into ``out`` atomically (``dsnt-export prune``).

    ``out`` is checked before any work; on any error nothing is left behind. With
    ``recipe.out_of_core`` the model is streamed block by block (:func:`prune_streamed`) into the
    temporary directory, renamed at the end.
    """
    from dsnt_export.artifacts import atomic_output_dir

    out = check_out_dir(out, overwrite)
    if recipe.out_of_core:
        loaded = load_skeleton_for(recipe)  # config, data and weight files checked before `out`
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            result, manifest = prune_streamed(recipe, tmp, progress=progress, loaded=loaded)
        return SavedCheckpoint(result=result, manifest=manifest, out=out)
    result = prune_recipe(recipe, progress=progress)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        manifest = write_checkpoint(result, tmp)
    return SavedCheckpoint(result=result, manifest=manifest, out=out)


def validate_checkpoint(hf_dir: str | Path) -> dict:
    """Re-validate every pruned tensor of a saved checkpoint from its safetensors files.

    Reads the tensors listed in the manifest one at a time (not the model in memory) and checks
    the manifest's pattern. Returns ``{pattern, n_tensors, missing, ok, violations, sparsity}``
    (``sparsity``: the unweighted mean over tensors, a fraction of zeros).
    """
    from safetensors import safe_open

    from dsnt_export.artifacts import read_manifest
    from dsnt_export.masks import validate_mask

    d = Path(hf_dir)
    m = read_manifest(d)
    pattern = m["pattern"]["string"]
    wanted = set(m["tensors"])
    found: dict[str, dict] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key in wanted:
                    rep = validate_mask(sf.get_tensor(key), pattern, name=key)
                    found[key] = {"ok": rep.ok, "sparsity": rep.sparsity, "message": rep.message}
    missing = sorted(wanted - set(found))
    return {
        "pattern": pattern,
        "n_tensors": len(found),
        "missing": missing,
        "ok": not missing and all(v["ok"] for v in found.values()),
        "violations": {k: v["message"] for k, v in found.items() if not v["ok"]},
        "sparsity": sum(v["sparsity"] for v in found.values()) / max(1, len(found)),
    }
