"""Zero-shot accuracy through lm-evaluation-harness (``lm-eval`` 0.4.x), dense vs sparse.

The DSnoT paper (Zhang et al., ICLR 2024, Table 4), Wanda and SparseGPT report, beside perplexity,
the mean accuracy of seven lm-eval tasks: :data:`PAPER_TASKS`, selectable as the group
``dsnot-paper``. :func:`evaluate_dir` scores an HF checkpoint directory and the dense model its
``dsnt_manifest.json`` names (found as ``dsnt-export bench`` finds it) on the same tasks and returns
rows of the bench row schema (``bench: "zero_shot"``, one row per model variant, task and metric:
value with its standard error, the task version and the harness version). Their tables, figure and
files (``plot_rows``, ``format_table``, ``write_outputs``) live in :mod:`dsnt_export.report.zero_shot`
(re-exported here); the run report shows them.

The model runs through :class:`~dsnt_export.evaluation.scorer.LogLikelihoodScorer`, our own
implementation of lm-eval's model interface (``loglikelihood``, ``loglikelihood_rolling``) over
an engine of the runtime layer (:mod:`dsnt_export.runtimes`), rather than lm-eval's ``HFLM``: it
evaluates exactly the model object the runtime loaded (dtype, device, sparse weights as they
are), on the runtime the user deploys on (``runtime=``: ``torch``, ``onnxruntime`` or ``vllm``;
:mod:`dsnt_export.evaluation.engines` picks the engines as ``dsnt-export bench`` does), with one
tokenisation for all runtimes (lm-eval's HF conventions). (``HFLM`` handed the same model object
gives the same accuracies with transformers 5.24 and lm-eval 0.4.13:
tests/evaluation/test_zero_shot.py checks it.)

Hub tasks read their datasets with ``datasets``; without network access (or with
``HF_DATASETS_OFFLINE=1`` and nothing cached) :func:`load_tasks` raises
:class:`~dsnt_export.errors.UserInputError` naming the task, the dataset it could not fetch, and a
local task YAML to write instead (passed with ``task_dir``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnt_export.errors import UserInputError
from dsnt_export.evaluation.engines import engine_plan
from dsnt_export.evaluation.scorer import LogLikelihoodScorer, as_lm
from dsnt_export.report.zero_shot import (  # noqa: F401  (moved to report/; old import path)
    format_table,
    plot_rows,
    write_outputs,
)

log = logging.getLogger(__name__)

#: the seven zero-shot tasks of the DSnoT paper (and Wanda / SparseGPT), lm-eval task names
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: named task groups accepted by :func:`parse_tasks`
TASK_GROUPS = {"dsnot-paper": PAPER_TASKS}
#: metrics reported per task (those a task defines; others are ignored)
METRICS = ("acc", "acc_norm")
HARNESS = "lm-eval"
_INSTALL = 'pip install -e ".[lm-eval]"  (from a dsnt-export checkout; or: pip install "lm-eval>=0.4,<0.5")'


def _lm_eval():
    """The ``lm_eval`` package; a clear install hint if it is missing."""
    try:
        import lm_eval
    except ImportError as e:
        raise UserInputError(
            f"zero-shot evaluation needs lm-evaluation-harness, which is not installed ({e}). "
            f"Install the optional extra: {_INSTALL}"
        ) from e
    return lm_eval


def harness_version() -> str:
    """The installed lm-evaluation-harness version (raises UserInputError if absent)."""
    from importlib.metadata import version

    _lm_eval()
    return version("lm_eval")


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from ``"boolq,arc_easy"`` or a list; group names (``dsnot-paper``) expand.

    Order is kept, duplicates dropped. Raises UserInputError for an empty selection.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        for name in TASK_GROUPS.get(item, (item,) if item else ()):
            if name not in out:
                out.append(name)
    if not out:
        raise UserInputError(
            f"no task selected from {spec!r}; expected comma-separated lm-eval task names "
            f"(e.g. boolq,arc_easy) or a group: {sorted(TASK_GROUPS)}"
        )
    return out


# --------------------------------------------------------------------------- tasks


def task_manager(task_dir: str | Path | None = None, tasks: Sequence[str] = ()):
    """An ``lm_eval`` TaskManager over the built-in tasks plus the YAML files under ``task_dir``.

    When every name in ``tasks`` is defined under ``task_dir``, the built-in index (thousands of
    YAML files, tens of seconds to scan) is skipped. Raises UserInputError if ``task_dir`` is not a
    directory.
    """
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if task_dir is None:
        return TaskManager()
    if not Path(task_dir).is_dir():
        raise UserInputError(
            f"--task-dir {task_dir} is not a directory; expected a directory of lm-eval task YAML"
        )
    if tasks:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=str(task_dir))


def _offline_hint(name: str, entry: Any, err: BaseException) -> str:
    cfg = getattr(entry, "cfg", None) or {}
    src = cfg.get("dataset_path", "?")
    if cfg.get("dataset_name"):
        src += f" (config {cfg['dataset_name']})"
    yaml_path = getattr(entry, "yaml_path", None)
    split = cfg.get("test_split") or cfg.get("validation_split") or "validation"
    others = [
        f"  {k}: null\n"
        for k in ("training_split", "validation_split", "test_split")
        if cfg.get(k, k == "training_split") and cfg.get(k) != split
    ]
    return (
        f"lm-eval task {name!r} could not load its dataset {src}: {type(err).__name__}: {err}. "
        "Hub tasks fetch their dataset from the Hugging Face hub: if this machine cannot reach "
        "it (or HF_DATASETS_OFFLINE=1 and the datasets cache lacks it), either run once where "
        "the hub is reachable so the cache holds it, or point the task at local files: write "
        f"{name}.yaml into a directory passed with --task-dir:\n"
        f"  include: {yaml_path or '<the built-in task YAML>'}\n"
        f"  task: {name}\n"
        "  dataset_path: json\n"
        "  dataset_name: null\n"
        "  dataset_kwargs:\n"
        f"    data_files: {{{split}: /path/to/{name}-{split}.jsonl}}\n"
        + "".join(others)
        + "with one JSON object per line holding the fields the task's prompts read (as in the hub "
        "dataset) (only the evaluated split is needed; for --num-fewshot > 0 add the train split "
        "to data_files instead of `training_split: null`)."
    )


def load_tasks(names: Sequence[str], manager) -> dict[str, Any]:
    """Build the lm-eval tasks for ``names`` one by one (their datasets are loaded here).

    Returns ``TaskManager.load``'s dict (``tasks``: leaf name -> Task, ``groups``, ``group_map``)
    merged over the names. Raises UserInputError for an unknown task (listing close names) and
    for a dataset that cannot be fetched (naming the task and the dataset, with the local-files
    fix).
    """
    from dsnt_export.hf_io import hub_offline_unless_reachable

    hub_offline_unless_reachable()  # no DNS: cache and local files only, no ~25 s of retries
    known = set(manager.all_tasks)
    out: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, sorted(known), n=5)
            raise UserInputError(
                f"unknown lm-eval task {name!r}; close names: {close or 'none'}. Known groups of "
                f"ours: {sorted(TASK_GROUPS)}; add task YAML files with --task-dir"
            )
        try:
            loaded = manager.load([name])
        except OSError as e:  # datasets' hub/offline errors (ConnectionError, not found) are
            entry = getattr(manager, "_index", {}).get(name)
            raise UserInputError(_offline_hint(name, entry, e)) from e
        for key in out:
            out[key].update(loaded.get(key) or {})
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class TaskScore:
    """One task's metric: ``value`` (fraction correct, 0..1) with its standard error."""

    task: str
    metric: str
    value: float
    stderr: float | None
    task_version: Any
    n_samples: int | None
    num_fewshot: int | None = None


def evaluate_model(
    scorer: LogLikelihoodScorer,
    tasks: Sequence[str] | dict[str, Any],
    *,
    manager=None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    fewshot_seed: int = 1234,
) -> tuple[list[TaskScore], dict]:
    """Evaluate ``scorer`` on lm-eval tasks; returns (scores, lm-eval's raw result dict).

    ``tasks``: task names (loaded with :func:`load_tasks` through ``manager``, default: the
    built-in tasks) or the dict :func:`load_tasks` returned (tasks are stateful: load them once per
    model). ``limit``: first N documents per task (a fraction if < 1). ``num_fewshot``: examples
    per prompt (default: the task's own, else 0, as ``lm_eval.simple_evaluate`` does; the paper's
    tasks are zero-shot). This is ``simple_evaluate`` minus its model loading and its environment
    probe (``torch.utils.collect_env`` runs external commands; rows carry our own environment).
    Raises UserInputError for unknown tasks or unreachable datasets.
    """
    _lm_eval()
    from lm_eval.evaluator import evaluate

    if not isinstance(tasks, dict):
        tasks = load_tasks(tasks, manager if manager is not None else task_manager())
    for task in tasks["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=fewshot_seed)
    res = evaluate(
        lm=as_lm(scorer), task_dict=tasks, limit=limit, bootstrap_iters=1000, log_samples=False
    )
    return scores_of(res, list(tasks["tasks"])), res


def scores_of(res: dict, tasks: Sequence[str]) -> list[TaskScore]:
    """The :data:`METRICS` of each task in an lm-eval result dict (``results[task]["acc,none"]``)."""
    out = []
    for task in tasks:
        r = res["results"].get(task, {})
        n = (res.get("n-samples") or {}).get(task, {}).get("effective")
        for metric in METRICS:
            key = f"{metric},none"
            if key not in r:
                continue
            se = r.get(f"{metric}_stderr,none")
            se = float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None
            shots = (res.get("n-shot") or {}).get(task)
            out.append(
                TaskScore(task, metric, float(r[key]), se, res["versions"].get(task), n, shots)
            )
    return out


def evaluate_dir(
    path: str | Path,
    tasks: str | Sequence[str],
    *,
    runtime: str = "torch",
    dense: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    task_dir: str | Path | None = None,
    run_id: str | None = None,
    progress: bool = False,
) -> list[dict]:
    """Zero-shot rows for the artifact at ``path`` and its dense source, on ``tasks``, evaluated
    on ``runtime`` (a registered runtime that scores: torch, onnxruntime, vllm).

    ``path``: what ``dsnt-export bench --runtime RUNTIME`` reads: for torch and vLLM a sparse HF
    checkpoint, a run directory holding one, a plain HF checkpoint (evaluated alone, as "dense")
    or ``embedded:smollm2-135m``; for ONNX Runtime an ONNX export (or a run directory with one).
    The dense reference is ``dense`` or the one the manifests name, run on the same runtime
    (ONNX Runtime: exported to a temporary ONNX graph like the bench does, unless ``dense`` is an
    ONNX export); a missing one gives a "skipped" row with the reason, an engine that cannot
    load a "failed" row. Returns one bench row per variant, task and metric (see
    :mod:`dsnt_export.bench.schema`) recording the runtime, its version, the backend, device and
    dtype the engine really used, and ``max_length``. Raises UserInputError / ArtifactError for
    bad inputs and MissingDependencyError for a runtime that cannot run here, before any model
    is loaded.
    """
    from dsnt_export.bench.env import environment
    from dsnt_export.bench.runner import RECOVERABLE
    from dsnt_export.bench.schema import make_row, new_run_id
    from dsnt_export.hf_io import load_tokenizer, resolve_device

    names = parse_tasks(tasks)
    version = harness_version()
    dev = resolve_device(device)
    plan = engine_plan(path, runtime, dense=dense, device=dev, dtype=dtype, batch_size=batch_size)
    manager = task_manager(task_dir, names)
    loaded = load_tasks(names, manager)  # unknown tasks, unreachable datasets: before any model
    run_id = run_id or new_run_id()
    common = {
        "runtime": runtime,
        "harness": {"name": HARNESS, "version": version},
        "limit": limit,
        "batch_size": batch_size,
        "env": environment(dev),
    }
    rows: list[dict] = []
    for p in plan:
        base = {"variant": p.variant, "model": p.model, **common}
        if isinstance(p.factory, str) or p.factory is None:
            rows.append(
                make_row(
                    "zero_shot",
                    run_id,
                    status="skipped",
                    reason=p.factory or "no engine",
                    device=str(dev),
                    tasks=names,
                    num_fewshot=num_fewshot,
                    **base,
                )
            )
            continue
        t0 = time.perf_counter()
        try:
            engine = p.factory()
        except (MemoryError, *RECOVERABLE) as e:
            log.warning("%s/%s could not be loaded: %s", runtime, p.variant, e)
            reason = f"loading failed: {type(e).__name__}: {e}"
            rows.append(
                make_row(
                    "zero_shot",
                    run_id,
                    status="failed",
                    reason=reason,
                    device=str(dev),
                    tasks=names,
                    num_fewshot=num_fewshot,
                    **base,
                )
            )
            continue
        try:
            loaded = loaded or load_tasks(names, manager)
            tok = load_tokenizer(str(p.tokenizer))
            scorer = LogLikelihoodScorer(engine, tok, batch_size, p.max_length, progress=progress)
            scores, _ = evaluate_model(scorer, loaded, limit=limit, num_fewshot=num_fewshot)
            loaded = None  # tasks keep per-run state: fresh ones for the next model
            seen = {
                "backend": engine.backend,
                "device": str(engine.device),
                "runtime_version": engine.runtime_version,
                "max_length": scorer.max_length,
            }
            model = {**p.model, "dtype": engine.dtype_name}
        finally:
            engine.close()
        seconds = round(time.perf_counter() - t0, 3)
        for s in scores:
            rows.append(
                make_row(
                    "zero_shot",
                    run_id,
                    **{**base, "model": model},
                    **seen,
                    task=s.task,
                    task_version=s.task_version,
                    metric=s.metric,
                    value=s.value,
                    stderr=s.stderr,
                    n_samples=s.n_samples,
                    num_fewshot=s.num_fewshot,
                    seconds=seconds,
                )
            )
    return rows


# --------------------------------------------------------------------------- outputs


def default_out_dir(spec: str | Path) -> Path:
    """Where rows and figures go by default: ``RUN/eval/`` beside an artifact or checkpoint
    (never inside it), inside a run directory that holds artifacts, ``./eval`` for embedded."""
    from dsnt_export.artifacts import MANIFEST_NAME

    if str(spec).strip().lower().startswith("embedded"):
        return Path("eval")
    p = Path(spec).expanduser()
    inside = (p / MANIFEST_NAME).is_file() or (p / "config.json").is_file()
    return (p.parent if inside else p) / "eval"
