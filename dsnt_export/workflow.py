"""Run a :class:`~dsnt_export.recipe.Recipe` as a library: load, calibrate, sparsify, save, evaluate,
export, check, report. The CLI commands ``prune`` and ``run`` only parse flags, call these and print
what they return; nothing here reads an argparse Namespace or prints.

* :func:`load_model_for` -> :class:`LoadedModel` (the recipe's model, tokenizer, device and dtype);
* :func:`prune_recipe` -> :class:`PruneResult` (the sparse model in memory);
  :func:`write_checkpoint` writes it as an HF checkpoint with its manifest;
  :func:`prune_to_dir` does both, atomically (``dsnt-export prune``);
* out of core (``recipe.out_of_core``): :func:`load_skeleton_for` (config, tokenizer, the model
  on the meta device) and :func:`prune_streamed` (blocks read from the checkpoint, pruned and
  written one at a time, :mod:`dsnt_export.sparsify.streaming`); same files, same weights;
* :func:`run_recipe` -> :class:`RunSummary`: the whole ``dsnt-export run`` pipeline, the ordered,
  immutable stage list :data:`STAGES`:

  ======================  ==============================================================
  ``load``                resolve, check and load the model and tokenizer
  ``eval_data``           tokens of the evaluation data (only when evaluating)
  ``dense_ppl``           perplexity of the dense model (only when evaluating)
  ``prune``               calibration data + :func:`dsnt_export.sparsify.driver.sparsify`
  ``save``                OUT/hf: the sparse checkpoint and its manifest
  ``validate``            re-read OUT/hf's safetensors, check every pruned tensor's pattern
  ``reference_outputs``   eager float32 outputs in OUT/hf/dsnt_reference.npz
  ``sparse_ppl``          perplexity of the saved checkpoint (only when evaluating)
  ``export_onnx``         OUT/onnx through the ONNX converter (level ``fp32``/``full``/``none``)
  ``check``               ``dsnt-export check`` of every artifact written
  ``report``              OUT/report: summary.json/.md, report.json/.md, figures
  ======================  ==============================================================

  OUT is written in a temporary directory beside it and renamed at the end: a failed run leaves
  nothing behind. Each stage's wall time (seconds) is in ``RunSummary.timings`` under its name.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.errors import UserInputError
from dsnt_export.hf_io import (
    attach_generation_config,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
    save_checkpoint,
    save_config_files,
    source_dtype,
    write_checkpoint_manifest,
)
from dsnt_export.preflight import check_calibration, check_run
from dsnt_export.recipe import Recipe
from dsnt_export.sparsify.driver import SparsifyReport, sparsify
from dsnt_export.sparsify.plan import plan_targets

logger = logging.getLogger(__name__)

EMBEDDED_ID = "embedded:smollm2-135m"  # what a recipe without a model loads (hf_io's default)

# ``onnx=`` level of run_recipe -> the ONNX converter's dtypes / generation_dtypes
ONNX_LEVELS: dict[str, dict | None] = {
    "none": None,
    "fp32": {"dtypes": ("float32",), "generation_dtypes": ()},
    "full": {"dtypes": ("float32", "float16"), "generation_dtypes": ("float32",)},
}


# ------------------------------------------------------------------------------------- loading


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

    The config is read first, so an unsupported ``model_type`` fails before any weight is read.
    Raises :class:`~dsnt_export.errors.UserInputError` (or a subclass) for a missing, corrupt or
    unsupported checkpoint.
    """
    t0 = time.perf_counter()
    source = resolve_model_source(recipe.model)
    config = load_config(source)
    dev = resolve_device(recipe.device)
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
    from pathlib import Path as _Path

    from dsnt_export.hf_io import check_weight_files
    from dsnt_export.sparsify.streaming import empty_model

    t0 = time.perf_counter()
    source = resolve_model_source(recipe.model)
    config = load_config(source)
    if not _Path(source).is_dir():
        raise UserInputError(
            f"--out-of-core reads the checkpoint's safetensors files from a local directory, but "
            f"{source!r} is a hub id; download it first (e.g. `hf download {source} --local-dir "
            "DIR`) and pass --model DIR"
        )
    check_weight_files(_Path(source))
    dev = resolve_device(recipe.device)
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


# ------------------------------------------------------------------------------------- pruning


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


# ------------------------------------------------------------------------------------- run


@dataclass
class RunSummary:
    """What ``dsnt-export run`` did; :meth:`to_json` is OUT/report/summary.json.

    ``perplexity`` is None without evaluation, else ``{dense, sparse, dataset, seqlen, n_windows,
    n_tokens_scored, data}``; ``exports`` holds ``onnx`` (the converter's summary, ``skipped`` or
    ``error``) and ``check`` (per artifact: ``ok``, ``exit_code``, ``n_tensors``, ``findings``);
    ``timings``: seconds per stage and ``total``. ``out`` (the final directory) and ``warnings``
    (non-fatal problems, e.g. a failed ONNX export) are not part of the JSON.
    """

    source_model: dict
    recipe: dict
    recipe_hash: str
    pattern: dict
    calibration: dict
    sparsify: dict
    validation: dict
    perplexity: dict | None
    exports: dict
    timings: dict
    layers: list
    skipped: list
    out: Path | None = None
    warnings: tuple[str, ...] = ()

    JSON_KEYS = (
        "source_model",
        "recipe",
        "recipe_hash",
        "pattern",
        "calibration",
        "sparsify",
        "validation",
        "perplexity",
        "exports",
        "timings",
        "layers",
        "skipped",
    )

    def to_json(self) -> dict:
        """The summary as a JSON-able dict (the keys of :data:`JSON_KEYS`, in that order)."""
        return {k: getattr(self, k) for k in self.JSON_KEYS}

    @property
    def ok(self) -> bool:
        """The saved masks validate and every ``dsnt-export check`` of the artifacts passed."""
        checks = self.exports.get("check", {}).values()
        return bool(self.validation["ok"]) and all(c.get("ok", True) for c in checks)


@dataclass
class RunState:
    """What the stages of :func:`run_recipe` share (mutable; one per run).

    ``dir`` is the output directory being written (a temporary one, renamed to ``out`` at the end);
    ``onnx``, ``evaluate`` and ``progress`` are :func:`run_recipe`'s options.
    """

    recipe: Recipe
    dir: Path
    out: Path
    onnx: str = "fp32"
    evaluate: bool = True
    progress: bool = True
    t0: float = field(default_factory=time.perf_counter)
    loaded: LoadedModel | None = None
    result: PruneResult | None = None
    eval_tokens: tuple[torch.Tensor, dict] | None = None
    dense_ppl: Any = None
    sparse_ppl: Any = None
    manifest: dict | None = None
    validation: dict | None = None
    exports: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    summary: RunSummary | None = None

    @property
    def evaluating(self) -> bool:
        """Perplexity is measured: requested and the recipe names evaluation data."""
        return self.evaluate and self.recipe.eval is not None


def _always(st: RunState) -> bool:
    """Whether a stage applies to ``st``: the default, always (True)."""
    return True


@dataclass(frozen=True)
class Stage:
    """One named step of :func:`run_recipe`: ``run(state)`` when ``applies(state)``; its wall
    time goes to ``state.timings[name]`` unless ``timed`` is False."""

    name: str
    run: Callable[[RunState], None]
    applies: Callable[[RunState], bool] = _always
    timed: bool = True


def _perplexity(st: RunState, model: nn.Module) -> Any:
    """Perplexity of ``model`` on the run's evaluation tokens, on the run's device."""
    from dsnt_export.evaluation.perplexity import perplexity

    tokens, desc = st.eval_tokens
    dev = st.loaded.device
    home = next(model.parameters()).device
    model.to(dev)
    try:
        return perplexity(
            model,
            tokens,
            st.recipe.eval_seqlen,
            device=dev,
            max_windows=st.recipe.eval_max_windows,
            batch_size=max(1, 2048 // st.recipe.eval_seqlen),
            progress=st.progress,
            dataset=desc,
        )
    finally:
        model.to(home)


def _stage_load(st: RunState) -> None:
    st.loaded = (load_skeleton_for if st.recipe.out_of_core else load_model_for)(st.recipe)


def _stage_eval_data(st: RunState) -> None:
    from dsnt_export.data import get_eval_tokens

    st.eval_tokens = get_eval_tokens(st.recipe.eval, st.loaded.tokenizer)
    check_run(st.loaded.model, st.recipe, st.eval_tokens[0])  # limits, before any forward


def _stage_dense_ppl(st: RunState) -> None:
    if not st.loaded.streamed:
        st.dense_ppl = _perplexity(st, st.loaded.model)
        return
    # out of core: the dense model is loaded for its perplexity only, then released
    dense = load_model(st.loaded.source, st.loaded.dtype, st.loaded.config)
    try:
        st.dense_ppl = _perplexity(st, dense)
    finally:
        del dense


def _stage_prune(st: RunState) -> None:
    if st.loaded.streamed:  # out of core: pruned straight into OUT/hf, block by block
        hf = st.dir / "hf"
        hf.mkdir()
        st.result, st.manifest = prune_streamed(
            st.recipe, hf, progress=st.progress, loaded=st.loaded
        )
        return
    st.result = prune_recipe(st.recipe, progress=st.progress, loaded=st.loaded)


def _stage_save(st: RunState) -> None:
    if st.manifest is not None:  # written by the streamed prune
        return
    hf = st.dir / "hf"
    hf.mkdir()
    st.manifest = write_checkpoint(st.result, hf)


def _stage_validate(st: RunState) -> None:
    st.validation = validate_checkpoint(st.dir / "hf")


def _stage_reference_outputs(st: RunState) -> None:
    """Eager float32 outputs of the saved checkpoint in ``hf/dsnt_reference.npz`` (as ``dsnt-export
    export hf`` writes), so ``pytest runtime_tests --artifact OUT/hf`` can check logits parity and
    perplexity of any runtime against them."""
    from converters.common.source import read_source
    from converters.reference import compute_reference, save_reference
    from dsnt_export.artifacts import read_manifest, write_manifest

    hf = st.dir / "hf"
    model = read_source(hf).load_model().float().eval()
    save_reference(hf, compute_reference(model))
    # the manifest lists (and hashes) every file of the artifact: re-list them with the new one
    write_manifest(hf, read_manifest(hf))


def _stage_sparse_ppl(st: RunState) -> None:
    saved = load_model(str(st.dir / "hf"), st.loaded.dtype)
    st.sparse_ppl = _perplexity(st, saved)


def _stage_export_onnx(st: RunState) -> None:
    """OUT/hf through the ONNX converter into OUT/onnx (its own mask re-validation and ONNX Runtime
    parity against eager torch). A failed export is recorded and warned about; the checkpoint stays
    valid and no onnx/ is left behind."""
    if st.onnx == "none":
        st.exports["onnx"] = {
            "skipped": "not requested (--onnx none); later: dsnt-export export onnx OUT/hf"
        }
        return
    from converters import get_converter
    from dsnt_export.errors import DsntError

    try:
        res = get_converter("onnx").export(
            st.dir / "hf",
            st.dir / "onnx",
            progress=st.progress,
            source_label="../hf",  # OUT/hf: st.dir is renamed to OUT at the end
            **ONNX_LEVELS[st.onnx],
        )
    except DsntError as e:
        logger.warning("ONNX export failed: %s", e)
        st.warnings.append(f"ONNX export failed (no onnx/ written): {e}")
        st.exports["onnx"] = {"error": f"{type(e).__name__}: {e}"}
        return
    s = res.summary()
    s["out_dir"] = "onnx"
    s["level"] = st.onnx
    st.exports["onnx"] = s


def _stage_check(st: RunState) -> None:
    """``dsnt-export check`` of every artifact directory written (hf, onnx): the CI gate."""
    from converters.checkers import check_path

    checks = {}
    for name in ("hf", "onnx"):
        path = st.dir / name
        if path.exists():
            rep = check_path(path)
            checks[name] = {
                "ok": rep.ok,
                "exit_code": rep.exit_code,
                "n_tensors": len(rep.tensors),
                "findings": [f.to_json() for f in rep.findings],
            }
    st.exports["check"] = checks


def _summary(st: RunState) -> RunSummary:
    res, rep = st.result, st.result.report.to_json()
    dense, sparse = st.dense_ppl, st.sparse_ppl
    ppl = None
    if dense is not None and sparse is not None:
        ppl = {
            "dense": dense.ppl,
            "sparse": sparse.ppl,
            "dataset": dense.dataset.get("source"),
            "seqlen": dense.seqlen,
            "n_windows": dense.n_windows,
            "n_tokens_scored": dense.n_tokens_scored,
            "data": dense.dataset,
        }
    return RunSummary(
        source_model=res.source_model(),
        recipe=res.recipe.to_dict(),
        recipe_hash=st.manifest["recipe_hash"],
        pattern=st.manifest["pattern"],
        calibration=res.calibration,
        sparsify=rep["summary"],
        validation=st.validation,
        perplexity=ppl,
        exports=st.exports,
        timings=st.timings,
        layers=rep["layers"],
        skipped=rep["skipped"],
        out=st.out,
        warnings=tuple(st.warnings),
    )


def _stage_report(st: RunState) -> None:
    """Close the timings (``total``), build the :class:`RunSummary` and write OUT/report."""
    from dsnt_export.report import write_run_report

    st.timings["total"] = round(time.perf_counter() - st.t0, 3)
    st.summary = _summary(st)
    write_run_report(st.dir, summary=st.summary.to_json(), name=st.out.name)


def _evaluating(st: RunState) -> bool:
    return st.evaluating


STAGES: tuple[Stage, ...] = (
    Stage("load", _stage_load),
    Stage("eval_data", _stage_eval_data, _evaluating),
    Stage("dense_ppl", _stage_dense_ppl, _evaluating),
    Stage("prune", _stage_prune),
    Stage("save", _stage_save),
    Stage("validate", _stage_validate),
    Stage("reference_outputs", _stage_reference_outputs),
    Stage("sparse_ppl", _stage_sparse_ppl, _evaluating),
    Stage("export_onnx", _stage_export_onnx),
    Stage("check", _stage_check),
    Stage("report", _stage_report, timed=False),
)


def default_run_dir(root: str | Path = "runs") -> Path:
    """``root/run-<UTC timestamp>``: where ``dsnt-export run`` writes without ``--out``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"run-{stamp}"


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    onnx: str = "fp32",
    evaluate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> RunSummary:
    """Run every stage of :data:`STAGES` for ``recipe`` into the directory ``out``.

    ``onnx``: ``fp32`` (the float32 logits graph, ~2 min for the embedded model on 2 CPU cores),
    ``full`` (also the fp16 logits graph for TensorRT and the float32 prefill/decode KV-cache
    graphs, ~7 min) or ``none``. ``evaluate``: measure dense and sparse perplexity on the recipe's
    ``eval`` data (skipped anyway when it is None). ``progress``: tqdm bars. ``overwrite``: replace
    an existing ``out``.

    ``out`` is checked before any work and written atomically. Raises
    :class:`~dsnt_export.errors.UserInputError` (bad option, existing ``out``, bad model or data);
    a failed ONNX export is not fatal (recorded in ``exports.onnx.error`` and ``warnings``). A mask
    violation or a failed check is not raised either: see :attr:`RunSummary.ok`.
    """
    from dsnt_export.artifacts import atomic_output_dir

    if onnx not in ONNX_LEVELS:
        raise UserInputError(f"onnx level must be one of {list(ONNX_LEVELS)}, got {onnx!r}")
    t_start = time.perf_counter()
    out = check_out_dir(out, overwrite)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        st = RunState(recipe, tmp, out, onnx=onnx, evaluate=evaluate, progress=progress)
        st.t0 = t_start
        for stage in STAGES:
            if not stage.applies(st):
                continue
            t0 = time.perf_counter()
            stage.run(st)
            if stage.timed:
                st.timings[stage.name] = round(time.perf_counter() - t0, 3)
    return st.summary
