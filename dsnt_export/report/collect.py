"""Collecting the rows a run report is built from (plain dicts, whichever stage produced them).

- benchmark rows (:mod:`dsnt_export.bench.schema`): ``perplexity``, ``latency``, ``conversion``,
  ``skip`` and the GPU check's rows, read from every ``*.jsonl`` file of a run directory;
- ``layer`` rows, one per pruned linear, taken from the run report that ``dsnt-export prune``
  stores in an HF artifact's manifest (``extra.run_report.layers``: error before/after
  refinement; old labels of the hessian-swap refiner read as its own name, :func:`layer_method`);
- ``perplexity`` rows (dense and sparse) from ``dsnt-export run``'s summary (``report/summary.json``).

The tables are built by :mod:`dsnt_export.report.tables`, the files written by
:mod:`dsnt_export.report.writer`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dsnt_export.artifacts import MANIFEST_NAME
from dsnt_export.errors import UserInputError

log = logging.getLogger(__name__)

REPORT_DIRNAME = "report"  # a run directory's report/, never read back as input
SUMMARY_NAME = "summary.json"  # dsnt-export run's summary in report/


# ------------------------------------------------------------------------------ collecting rows


def layer_method(e: dict) -> str | None:
    """A per-layer record's ``method``, with the hessian-swap refiner's old labels (``refine:
    dsnot`` + ``criterion: hessian``, ``method: <init>+dsnot``, written before it had its own name)
    read as ``<init>+hessian-swap``; other records' ``method`` as stored."""
    m = e.get("method")
    if e.get("refine") == "dsnot" and e.get("criterion") == "hessian" and isinstance(m, str):
        return m.removesuffix("+dsnot") + "+hessian-swap"
    return m


def recipe_refiner(r: dict) -> str | None:
    """The refiner a recipe dict names: ``refine``, except that an old summary's ``refine: dsnot``
    with a ``dsnot:`` mapping (no ``refine_options``) is read as the refiner that mapping meant
    (``criterion: hessian`` / preset ``default``: ``hessian-swap``)."""
    name = r.get("refine")
    if name == "dsnot" and isinstance(r.get("dsnot"), dict) and "refine_options" not in r:
        from dsnt_export.refine.legacy import config_from_legacy

        try:
            name, _ = config_from_legacy(r["dsnot"], warn=False)
        except UserInputError:
            pass
    return name


def rows_from_manifest(manifest: dict, path: str | Path = "") -> list[dict]:
    """``layer`` rows from an HF artifact manifest's stored run report (empty if none)."""
    rep = (manifest.get("extra") or {}).get("run_report") or {}
    sm = manifest.get("source_model") or {}
    out = []
    for e in rep.get("layers") or []:
        out.append(
            {
                "bench": "layer",
                "status": "ok",
                "source": str(path),
                "model": {"id": sm.get("id"), "model_type": sm.get("model_type")},
                **{
                    k: e.get(k)
                    for k in (
                        "name",
                        "block",
                        "linear",
                        "kind",
                        "pattern",
                        "sparsity",
                        "err_before",
                        "err_after",
                        "loss_before",
                        "loss_after",
                        "swaps",
                        "cycles",
                        "rel_recon_loss",
                    )
                },
                "method": layer_method(e),
                "time_s": (e.get("time_s") or {}).get("total"),
            }
        )
    return out


def collect_rows(run_dir: str | Path, *, run_summary: dict | None = None) -> list[dict]:
    """Every row under ``run_dir``: ``*.jsonl`` benchmark rows, HF manifests' layer rows and the
    perplexity rows of the run summary (``run_summary`` if given, else ``report/summary.json``).

    Each row's ``source`` is its file's path relative to ``run_dir``, so a report stays true when
    the directory is moved (``dsnt-export run`` writes into a temporary directory, then renames it).
    Raises :class:`~dsnt_export.errors.UserInputError` if ``run_dir`` is not a directory.
    """
    from dsnt_export.bench.timing import read_rows

    root = Path(run_dir)
    if not root.is_dir():
        raise UserInputError(f"{root} is not a directory; expected a run directory")
    rows: list[dict] = []
    for p in sorted(root.rglob("*.jsonl")):
        if REPORT_DIRNAME in p.relative_to(root).parts[:1]:
            continue
        rows += [
            dict(r, source=p.relative_to(root).as_posix())
            for r in read_rows(p)
            if isinstance(r, dict) and "bench" in r
        ]
    for p in sorted(root.rglob(MANIFEST_NAME)):
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping unreadable manifest %s: %s", p, e)
            continue
        if isinstance(m, dict) and m.get("kind") == "hf":
            rows += rows_from_manifest(m, p.parent.relative_to(root).as_posix() or ".")
    summary = root / REPORT_DIRNAME / SUMMARY_NAME  # written by `dsnt-export run`
    if run_summary is not None:
        rows += rows_from_run_summary(run_summary, summary.relative_to(root).as_posix())
    elif summary.is_file():
        try:
            rows += rows_from_run_summary(
                json.loads(summary.read_text()), summary.relative_to(root).as_posix()
            )
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable run summary %s: %s", summary, e)
    return rows


def rows_from_run_summary(summary: dict, source: str = "") -> list[dict]:
    """Perplexity rows (dense and sparse, torch) from ``dsnt-export run``'s summary.json."""
    from dsnt_export.bench.schema import make_row
    from dsnt_export.recipe import method_label

    ppl = summary.get("perplexity") or {}
    if not ppl or ppl.get("dense") is None:
        return []
    r = summary.get("recipe") or {}
    method = method_label(r.get("init") or "?", recipe_refiner(r))
    sm = summary.get("source_model") or {}
    common = {
        "runtime": "torch",
        "backend": "eager",
        "device": (r.get("device") or "?"),
        "seqlen": ppl.get("seqlen"),
        "n_windows": ppl.get("n_windows"),
        "n_tokens_scored": ppl.get("n_tokens_scored"),
        "dataset": ppl.get("data") or {},
        "source": source,
        "nll": None,
    }
    rows = []
    for variant in ("dense", "sparse"):
        if ppl.get(variant) is None:
            continue
        model = {
            "id": sm.get("id"),
            "model_type": sm.get("model_type"),
            "pattern": None if variant == "dense" else r.get("pattern"),
            "method": None if variant == "dense" else method,
        }
        rows.append(
            make_row(
                "perplexity",
                "run-summary",
                variant=variant,
                model=model,
                ppl=ppl[variant],
                **common,
            )
        )
    return rows


def run_versions(run_dir: str | Path) -> dict | None:
    """The library versions a run was made with: the ``versions`` of its HF artifact's manifest
    (else of any other artifact manifest under ``run_dir``, report/ excluded), with
    ``dsnt-export`` filled from the manifest's ``tool`` where the distribution was not installed.
    None when no manifest under ``run_dir`` records versions (manifests older than the field)."""
    root = Path(run_dir)
    found = []
    for p in sorted(root.rglob(MANIFEST_NAME)):
        if REPORT_DIRNAME in p.relative_to(root).parts[:1]:
            continue
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and isinstance(m.get("versions"), dict):
            found.append(m)
    if not found:
        return None
    m = next((m for m in found if m.get("kind") == "hf"), found[0])
    vers = dict(m["versions"])
    if not vers.get("dsnt-export"):
        vers["dsnt-export"] = (m.get("tool") or {}).get("version")
    return vers
