"""The run report: JSON + Markdown + PNG figures, built from a list of rows.

    from dsnt_export.report.collect import collect_rows, write_report
    write_report(collect_rows("out"), "out/report")      # or: dsnt-export report out

Input: plain dicts, so the report does not depend on which stage produced them:

- benchmark rows (:mod:`dsnt_export.bench.schema`): ``perplexity``, ``latency``, ``conversion``,
  ``skip`` and the GPU check's rows, read from every ``*.jsonl`` file of a run directory;
- ``layer`` rows, one per pruned linear, taken from the run report that ``dsnt-export prune``
  stores in an HF artifact's manifest (``extra.run_report.layers``: DSnoT error before/after);
- ``perplexity`` rows (dense and sparse) from ``report/summary.json`` of ``dsnt-export run``.

Output (every file written in a temporary directory beside ``report/``, then renamed into place,
``report.json`` last; other files already in ``report/`` are kept):
``report.json`` (the tables below + summary), ``report.md`` (the same as Markdown, figures
linked), ``perplexity.png`` (bar per method/pattern, dense as a reference line),
``latency.png`` (prefill and decode latency vs prompt length per runtime, dense vs sparse),
``layer_error.png`` (per-layer DSnoT error before/after), and a manifest of kind "report"
(unless the directory already holds the run summary's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from dsnt_export.artifacts import MANIFEST_NAME, file_digest, new_manifest, write_manifest
from dsnt_export.errors import UserInputError
from dsnt_export.report.tables import (
    environments,
    flat_latency,
    latency_table,
    layers_table,
    other_tables,
    perplexity_table,
    skipped_table,
)

log = logging.getLogger(__name__)

REPORT_SCHEMA = "dsnt-export/report"
REPORT_DIRNAME = "report"
FIGURES = {
    "perplexity": "perplexity.png",
    "latency": "latency.png",
    "layer_error": "layer_error.png",
}


# ------------------------------------------------------------------------------ collecting rows


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
                        "method",
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
                "time_s": (e.get("time_s") or {}).get("total"),
            }
        )
    return out


def collect_rows(run_dir: str | Path) -> list[dict]:
    """Every row under ``run_dir``: ``*.jsonl`` benchmark rows and manifests' layer rows.

    Each row's ``source`` is its file's path relative to ``run_dir``, so a report stays true when
    the directory is moved (``dsnt-export run`` writes into a temporary directory, then renames it).
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
    summary = root / REPORT_DIRNAME / "summary.json"  # written by `dsnt-export run`
    if summary.is_file():
        try:
            rows += rows_from_run_summary(
                json.loads(summary.read_text()), summary.relative_to(root).as_posix()
            )
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable run summary %s: %s", summary, e)
    return rows


# ------------------------------------------------------------------------------------- tables


def build_report(rows: list[dict]) -> dict:
    """All tables of the report from ``rows`` (pure: no files)."""
    rows = [r for r in rows if isinstance(r, dict)]
    ppl = perplexity_table(rows)
    lat = latency_table(rows)
    layers = layers_table(rows)
    inc = [t["increase_vs_dense_pct"] for t in ppl if "increase_vs_dense_pct" in t]
    sp = [
        v["speedup_vs_dense"]
        for c in lat
        for v in c["variants"].values()
        if "speedup_vs_dense" in v
    ]
    refined = [r for r in layers if r.get("err_before") is not None]
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": 1,
        "summary": {
            "rows": len(rows),
            "perplexity_points": len(ppl),
            "latency_points": len(lat),
            "layers": len(layers),
            "ppl_increase_vs_dense_pct": [min(inc), max(inc)] if inc else None,
            "speedup_vs_dense": [min(sp), max(sp)] if sp else None,
            "layers_error_reduced": sum(r["err_after"] <= r["err_before"] for r in refined),
            "layers_refined": len(refined),
            "skipped_or_failed": sum(r.get("status") in ("skipped", "failed") for r in rows),
        },
        "environments": environments(rows),
        "perplexity": ppl,
        "latency": lat,
        "layers": layers,
        "skipped": skipped_table(rows),
        "other": other_tables(rows),
    }


MY_FILES = (*FIGURES.values(), "report.md", MANIFEST_NAME, "report.json")  # report.json last
WRITER = "dsnt_export.report.collect"


def write_report(
    rows: list[dict],
    out_dir: str | Path,
    *,
    title: str = "dsnt-export run report",
    sources: list[str] | None = None,
) -> dict:
    """Write report.json, report.md and the figures into ``out_dir``; returns the report dict
    (with ``figures``: the PNG files written).

    Everything is first written into a temporary directory beside ``out_dir``, then each file is
    moved in with an atomic rename, ``report.json`` last: a reader that finds report.json finds
    the complete set. Other files in ``out_dir`` (e.g. the pipeline's summary.json/summary.md and
    its manifest) are left alone; figures of an earlier report that no longer apply are removed.
    """
    from dsnt_export.report import figures
    from dsnt_export.report.markdown import render_markdown

    rep = build_report(rows)
    rep["title"] = title
    rep["sources"] = sorted(set(sources or [r.get("source") for r in rows if r.get("source")]))
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        drawn = {
            "perplexity": figures.perplexity_figure(rep["perplexity"], tmp / FIGURES["perplexity"]),
            "latency": figures.latency_figure(
                flat_latency(rep["latency"]), tmp / FIGURES["latency"]
            ),
            "layer_error": figures.layer_error_figure(rep["layers"], tmp / FIGURES["layer_error"]),
        }
        rep["figures"] = {k: p.name for k, p in drawn.items() if p is not None}
        (tmp / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(rep))
        if _may_write_manifest(out):
            man = new_manifest(
                "report",
                extra={"writer": WRITER, "summary": rep["summary"], "sources": rep["sources"]},
            )
            man["files"] = {n: file_digest(tmp / n) for n in MY_FILES if (tmp / n).is_file()}
            write_manifest(tmp, man, with_file_hashes=False)
        out.mkdir(exist_ok=True)
        for name in MY_FILES:
            if (tmp / name).is_file():
                os.replace(tmp / name, out / name)
            elif name in FIGURES.values() and (out / name).is_file():
                (out / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rep


def _may_write_manifest(out: Path) -> bool:
    """Only where no other stage (the pipeline's run summary) owns the directory's manifest."""
    m = out / MANIFEST_NAME
    if not m.is_file():
        return True
    try:
        return (json.loads(m.read_text()).get("extra") or {}).get("writer") == WRITER
    except (OSError, ValueError):
        return False


def rows_from_run_summary(summary: dict, source: str = "") -> list[dict]:
    """Perplexity rows (dense and sparse, torch) from ``dsnt-export run``'s summary.json."""
    from dsnt_export.bench.schema import make_row

    ppl = summary.get("perplexity") or {}
    if not ppl or ppl.get("dense") is None:
        return []
    r = summary.get("recipe") or {}
    method = (r.get("init") or "?") + ("+dsnot" if r.get("refine") == "dsnot" else "")
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


def report_run_dir(
    run_dir: str | Path, out_dir: str | Path | None = None, *, name: str | None = None
) -> dict:
    """Collect a run directory's rows and write its report (default ``run_dir/report``).

    ``name`` titles the report (default: the directory's name; ``dsnt-export run`` passes the final
    name, as it writes into a temporary directory first)."""
    rows = collect_rows(run_dir)
    if not rows:
        raise UserInputError(
            f"{run_dir} holds no benchmark rows (*.jsonl) and no pruning run report (an HF "
            f"artifact's {MANIFEST_NAME}); run `dsnt-export prune`/`bench` into it first"
        )
    return write_report(
        rows,
        Path(out_dir) if out_dir else Path(run_dir) / REPORT_DIRNAME,
        title=f"dsnt-export run report: {name or Path(run_dir).name}",
    )
