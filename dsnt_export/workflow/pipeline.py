"""``dsnt-export run`` as a library: :func:`run_recipe` runs the ordered stage list
:data:`STAGES` (see :mod:`dsnt_export.workflow`) and returns a :class:`RunSummary`.
Part of :mod:`dsnt_export.workflow`."""

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
from dsnt_export.hf_io import load_model
from dsnt_export.preflight import check_run
from dsnt_export.recipe import Recipe
from dsnt_export.workflow.loading import LoadedModel, load_model_for, load_skeleton_for
from dsnt_export.workflow.pruning import (
    PruneResult,
    check_out_dir,
    prune_recipe,
    prune_streamed,
    validate_checkpoint,
    write_checkpoint,
)

logger = logging.getLogger(__name__)

# ``onnx=`` level of run_recipe -> the ONNX converter's dtypes / generation_dtypes
ONNX_LEVELS: dict[str, dict | None] = {
    "none": None,
    "fp32": {"dtypes": ("float32",), "generation_dtypes": ()},
    "full": {"dtypes": ("float32", "float16"), "generation_dtypes": ("float32",)},
}


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
