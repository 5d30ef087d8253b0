"""Loading a recipe's model: :func:`load_model_for` (in memory), :func:`load_skeleton_for` (out of
core: the model on the meta device), and :func:`calibration_ids` (the recipe's calibration windows).
Part of :mod:`dsnt_export.workflow`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.data import check_data_backend
from dsnt_export.errors import UserInputError
from dsnt_export.hf_io import (
    attach_generation_config,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
    source_dtype,
)
from dsnt_export.recipe import Recipe

EMBEDDED_ID = "embedded:smollm2-135m"  # what a recipe without a model loads (hf_io's default)


@dataclass
class LoadedModel:
    """A recipe's model, loaded and placed.

    ``source``: the resolved checkpoint directory (or hub id); ``config``: its HF config;
    ``model``: the causal LM in ``dtype``, on the CPU (the driver moves one block at a time to
    ``device``); ``tokenizer``: its tokenizer; ``device``: where blocks and evaluation run
    (resolved from the recipe's ``device``); ``dtype``: the compute dtype (resolved from the
    recipe's ``dtype``: ``auto`` = float32 on CPU, the checkpoint's 16-bit dtype on an
    accelerator); ``timings``: seconds per step (``load_s``). From :func:`load_skeleton_for`
    (out of core) ``model`` has every parameter on the meta device (:attr:`streamed`).
    """

    source: str
    config: Any
    model: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        """The model is a weightless skeleton (out of core): its weights stay on disk."""
        return any(p.device.type == "meta" for p in self.model.parameters())


def load_model_for(recipe: Recipe) -> LoadedModel:
    """Resolve, check and load ``recipe.model`` in the recipe's compute dtype.

    The calibration source's package (``datasets`` for c4 / wikitext2,
    :func:`~dsnt_export.data.check_data_backend`) and then the config are checked first, so a
    missing extra or an unsupported ``model_type`` fails before any weight is read.
    Raises :class:`~dsnt_export.errors.UserInputError` (or a subclass) for a missing, corrupt or
    unsupported checkpoint and :class:`~dsnt_export.errors.DataSourceError` for a missing extra.
    """
    t0 = time.perf_counter()
    check_data_backend(recipe.calib)  # a missing 'datasets' fails before any weight is read
    source = resolve_model_source(recipe.model)
    config = load_config(source)
    dev = resolve_device(recipe.device)
    check_device_map(recipe, config, dev)
    dtype = resolve_dtype(recipe.dtype, dev, source_dtype(config))
    model = load_model(source, dtype, config)
    tok = load_tokenizer(source)
    return LoadedModel(
        source=source,
        config=config,
        model=model,
        tokenizer=tok,
        device=dev,
        dtype=dtype,
        timings={"load_s": time.perf_counter() - t0},
    )


def load_skeleton_for(recipe: Recipe) -> LoadedModel:
    """What :func:`load_model_for` gives without reading any weight: config, tokenizer, device,
    dtype and the model built on the meta device (:func:`dsnt_export.sparsify.streaming.empty_model`)
    with the checkpoint's generation config, for :func:`prune_streamed`.

    The checkpoint must be a local directory of safetensors files. Raises
    :class:`~dsnt_export.errors.UserInputError` for a hub id (download it first) and what
    :func:`load_model_for` raises for a missing, corrupt or unsupported checkpoint.
    """
    from dsnt_export.hf_io import check_weight_files
    from dsnt_export.sparsify.streaming import empty_model

    t0 = time.perf_counter()
    check_data_backend(recipe.calib)
    source = resolve_model_source(recipe.model)
    config = load_config(source)
    if not Path(source).is_dir():
        raise UserInputError(
            f"--out-of-core reads the checkpoint's safetensors files from a local directory, but "
            f"{source!r} is a hub id; download it first (e.g. `hf download {source} --local-dir "
            "DIR`) and pass --model DIR"
        )
    check_weight_files(Path(source))
    dev = resolve_device(recipe.device)
    check_device_map(recipe, config, dev)
    dtype = resolve_dtype(recipe.dtype, dev, source_dtype(config))
    model = empty_model(config, dtype)
    attach_generation_config(model, source)
    return LoadedModel(
        source=source,
        config=config,
        model=model,
        tokenizer=load_tokenizer(source),
        device=dev,
        dtype=dtype,
        timings={"load_s": time.perf_counter() - t0},
    )


def check_device_map(recipe: Recipe, config: Any, device: torch.device) -> None:
    """Resolve ``recipe.device_map`` against ``config`` (its ``model_type``'s block path and
    ``num_hidden_layers``) before any weight is read, so a map that cannot apply (no accelerator
    for ``balanced``, an uncovered block, a bad device) fails in seconds, not after the load. Raises
    what :func:`~dsnt_export.sparsify.devices.resolve_block_devices` raises, and
    ``UnsupportedModelError`` for a model_type without an adapter."""
    if recipe.device_map is None:
        return
    from dsnt_export.adapters import get_adapter
    from dsnt_export.sparsify.devices import resolve_block_devices

    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int):
        resolve_block_devices(recipe.device_map, get_adapter(config).blocks, n, device)


def calibration_ids(recipe: Recipe, tokenizer: Any) -> tuple[torch.Tensor, dict]:
    """Token ids ``[N, T]`` (int64) of the recipe's calibration source and their description.

    Raises :class:`~dsnt_export.errors.UserInputError` when ``recipe.calib`` has no ``:NxT`` size.
    """
    from dsnt_export.data import get_calibration, parse_data_spec

    spec = parse_data_spec(recipe.calib)
    if spec.nsamples is None:
        raise UserInputError(
            f"calibration source {recipe.calib!r} needs a size: write it as SOURCE:NxT, e.g. "
            f"'{spec.source}:32x256' (32 windows of 256 tokens) or '{spec.source}:128x2048'"
        )
    return get_calibration(spec.source, tokenizer, spec.nsamples, spec.seqlen, seed=recipe.seed)
