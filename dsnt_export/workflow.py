"""Run a :class:`~dsnt_export.recipe.Recipe`: load, calibrate, sparsify, save (library API).

``prune_recipe(recipe)`` returns a :class:`PruneResult` holding the sparse model in memory;
``write_checkpoint(result, out_dir)`` writes it as an HF checkpoint with its manifest. The CLI
commands ``prune`` and ``run`` are thin wrappers around these.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.errors import UserInputError
from dsnt_export.hf_io import (
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
    save_checkpoint,
    source_dtype,
)
from dsnt_export.preflight import check_calibration
from dsnt_export.recipe import Recipe
from dsnt_export.sparsify.driver import SparsifyReport, sparsify
from dsnt_export.sparsify.plan import plan_targets

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    recipe: Recipe
    source: str
    model: nn.Module
    tokenizer: Any
    report: SparsifyReport
    calibration: dict
    source_dtype: torch.dtype | None
    timings: dict = field(default_factory=dict)

    def source_model(self) -> dict:
        cfg = self.model.config
        return {
            "id": self.recipe.model or "embedded:smollm2-135m",
            "path": self.source,
            "model_type": cfg.model_type,
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "dtype": str(self.source_dtype).removeprefix("torch.") if self.source_dtype else None,
        }


def load_for_recipe(recipe: Recipe) -> tuple[str, Any, nn.Module, Any, torch.device, dict]:
    """Resolve, check and load the recipe's model; returns (source, config, model, tok, dev, t)."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    source = resolve_model_source(recipe.model)
    config = load_config(source)  # unsupported model_type fails here, before any weight is read
    dev = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.dtype, dev, source_dtype(config))
    model = load_model(source, dtype, config)
    tok = load_tokenizer(source)
    t["load_s"] = time.perf_counter() - t0
    return source, config, model, tok, dev, t


def calibration_ids(recipe: Recipe, tokenizer: Any) -> tuple[torch.Tensor, dict]:
    """Token ids ``[N, T]`` of the recipe's calibration source and their description."""
    from dsnt_export.data import get_calibration, parse_data_spec

    spec = parse_data_spec(recipe.calib)
    if spec.nsamples is None:
        raise UserInputError(
            f"calibration source {recipe.calib!r} needs a size: write it as SOURCE:NxT, e.g. "
            f"'{spec.source}:32x256' (32 windows of 256 tokens) or '{spec.source}:128x2048'"
        )
    return get_calibration(spec.source, tokenizer, spec.nsamples, spec.seqlen, seed=recipe.seed)


def prune_recipe(recipe: Recipe, *, progress: bool = True, loaded=None) -> PruneResult:
    """Load the model of ``recipe``, check it, calibrate and sparsify it in memory."""
    source, config, model, tok, dev, t = loaded if loaded is not None else load_for_recipe(recipe)
    cfg = recipe.sparsify_config()
    plan = plan_targets(
        model, cfg.pattern, exclude=cfg.exclude, refine_exclude=cfg.refine_exclude
    )  # shapes and NaN/Inf checked before the calibration data is read
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    ids, calib = calibration_ids(recipe, tok)
    check_calibration(model, ids, recipe.calib)  # context, vocab: before any forward
    t["calibration_data_s"] = time.perf_counter() - t0
    report = sparsify(model, ids, cfg, device=dev, progress=progress, plan=plan)
    t["sparsify_s"] = report.timings["total_s"]
    return PruneResult(
        recipe=recipe,
        source=source,
        model=model,
        tokenizer=tok,
        report=report,
        calibration=calib,
        source_dtype=source_dtype(config),
        timings=t,
    )


def save_dtype_of(result: PruneResult) -> torch.dtype | None:
    name = result.recipe.save_dtype
    if name == "source":
        return result.source_dtype
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def write_checkpoint(result: PruneResult, out_dir: str | Path) -> dict:
    """Write ``result`` into the (existing, empty) directory ``out_dir``; returns the manifest."""
    t0 = time.perf_counter()
    rep = result.report.to_json()
    manifest = save_checkpoint(
        result.model,
        result.tokenizer,
        out_dir,
        pattern=result.recipe.pattern,
        report=rep,
        save_dtype=save_dtype_of(result),
        manifest={
            "source_model": result.source_model(),
            "recipe": result.recipe.to_dict(),
            "calibration": result.calibration,
            "timings": {**result.timings, "save_s": time.perf_counter() - t0},
        },
    )
    return manifest
