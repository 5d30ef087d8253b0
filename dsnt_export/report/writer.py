"""The one writer of a run directory's ``report/``: summary JSON + Markdown, report JSON + Markdown,
figures and the report manifest.

    from dsnt_export.report import write_run_report
    write_run_report("out")                          # or: dsnt-export report out

Files (each written in a temporary directory beside ``report/``, then renamed into place,
``report.json`` last, so a reader that finds report.json finds the complete set):

* ``summary.json`` and ``summary.md``: ``dsnt-export run``'s summary (only when a run summary is
  given, or was written here earlier by this module), with the run's library ``versions`` (from
  its artifact manifests) added where it has none;
* ``report.json`` (the tables of :func:`~dsnt_export.report.tables.build_report`), ``report.md`` (the
  same as Markdown, figures linked), ``perplexity.png`` (bar per method/pattern, dense as a
  reference line), ``latency.png`` (prefill and decode latency vs prompt length per runtime, dense
  vs sparse), ``layer_error.png`` (per-layer refinement error before/after), ``zero_shot.png``
  (lm-eval accuracy per task, dense vs sparse, +-1 stderr; from ``eval/zero_shot.jsonl`` rows);
* ``dsnt_manifest.json`` of kind ``report`` listing those files' digests (and the run's
  ``source_model``, ``recipe``, ``pattern``, ``calibration`` and ``timings`` with a run summary).

Other files already in ``report/`` are kept, and so is a manifest another tool wrote there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dsnt_export.artifacts import MANIFEST_NAME, file_digest, new_manifest, write_manifest
from dsnt_export.errors import UserInputError
from dsnt_export.report.collect import REPORT_DIRNAME, SUMMARY_NAME, collect_rows, run_versions
from dsnt_export.report.tables import build_report, flat_latency

FIGURES = {
    "perplexity": "perplexity.png",
    "latency": "latency.png",
    "layer_error": "layer_error.png",
    "zero_shot": "zero_shot.png",
}
SUMMARY_FILES = (SUMMARY_NAME, "summary.md")
# every file this module may write, in the order they are moved into place: report.json last
MY_FILES = (*FIGURES.values(), *SUMMARY_FILES, "report.md", MANIFEST_NAME, "report.json")
WRITER = "dsnt_export.report.writer"
_OLD_WRITERS = (WRITER, "dsnt_export.report.collect")  # manifests this module may replace
_RUN_FIELDS = ("source_model", "recipe", "pattern", "calibration", "timings")


def write_report(
    rows: list[dict],
    out_dir: str | Path,
    *,
    title: str = "dsnt-export run report",
    sources: list[str] | None = None,
    summary: dict | None = None,
    versions: dict | None = None,
) -> dict:
    """Write the report of ``rows`` into ``out_dir``; returns the report dict (with ``figures``:
    the PNG files written, by name).

    ``versions``: the run's library versions (``{distribution: version or None}``, e.g.
    :func:`~dsnt_export.report.collect.run_versions`), stored as the report's and the summary's
    ``versions`` (a summary's own are kept) and printed as their "Environment" line.

    ``summary``: ``dsnt-export run``'s summary dict, written as summary.json and summary.md; without
    it, a summary this module wrote into ``out_dir`` earlier is rewritten as it was. The manifest is
    written unless another tool's manifest is in ``out_dir``. Figures of an earlier report that no
    longer apply are removed; other files are left alone.
    """
    from dsnt_export.report import figures
    from dsnt_export.report.markdown import render_markdown, render_run_summary
    from dsnt_export.report.zero_shot import plot_rows

    out = Path(out_dir)
    own_manifest = _own_manifest(out)
    if summary is None and own_manifest is not None and SUMMARY_NAME in own_manifest["files"]:
        summary = json.loads((out / SUMMARY_NAME).read_text())  # ours: carried over unchanged
    if summary is not None and versions and not summary.get("versions"):
        summary = {**summary, "versions": versions}
    rep = build_report(rows)
    rep["title"] = title
    rep["versions"] = versions or (summary or {}).get("versions")
    rep["sources"] = sorted(set(sources or [r.get("source") for r in rows if r.get("source")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if summary is not None:
            (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
            (tmp / "summary.md").write_text(render_run_summary(summary))
        drawn = {
            "perplexity": figures.perplexity_figure(rep["perplexity"], tmp / FIGURES["perplexity"]),
            "latency": figures.latency_figure(
                flat_latency(rep["latency"]), tmp / FIGURES["latency"]
            ),
            "layer_error": figures.layer_error_figure(rep["layers"], tmp / FIGURES["layer_error"]),
            "zero_shot": plot_rows(rows, tmp / FIGURES["zero_shot"]),
        }
        rep["figures"] = {k: p.name for k, p in drawn.items() if p is not None}
        (tmp / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(rep))
        if own_manifest is not None or not (out / MANIFEST_NAME).exists():
            run = {k: summary[k] for k in _RUN_FIELDS if k in summary} if summary else {}
            man = new_manifest(
                "report",
                **run,
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


def _own_manifest(out: Path) -> dict | None:
    """The manifest in ``out`` if this module wrote it (None if absent, foreign or unreadable)."""
    m = out / MANIFEST_NAME
    if not m.is_file():
        return None
    try:
        man = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or (man.get("extra") or {}).get("writer") not in _OLD_WRITERS:
        return None
    return man if isinstance(man.get("files"), dict) else None


def write_run_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    summary: dict | None = None,
    name: str | None = None,
    extra_rows: list[dict] | None = None,
) -> dict:
    """Collect a run directory's rows and write its report (default ``run_dir/report``).

    ``summary``: ``dsnt-export run``'s summary dict (written as summary.json/.md; its perplexity
    rows are used instead of reading report/summary.json). ``name`` titles the report (default:
    the directory's name; ``dsnt-export run`` passes the final name, as it writes into a
    temporary directory first). ``extra_rows``: more rows to include (e.g. ``--rows`` files).
    Raises :class:`~dsnt_export.errors.UserInputError` when there is nothing to report.
    """
    rows = collect_rows(run_dir, run_summary=summary) + list(extra_rows or [])
    if not rows:
        raise UserInputError(
            f"{run_dir} holds no benchmark rows (*.jsonl) and no pruning run report (an HF "
            f"artifact's {MANIFEST_NAME}); run `dsnt-export prune` / `dsnt-export bench` into it "
            "first, or give more row files (dsnt-export report --rows FILE)"
        )
    return write_report(
        rows,
        Path(out_dir) if out_dir else Path(run_dir) / REPORT_DIRNAME,
        title=f"dsnt-export run report: {name or Path(run_dir).name}",
        summary=summary,
        versions=run_versions(run_dir),
    )
