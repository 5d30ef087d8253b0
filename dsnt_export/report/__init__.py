"""The run report: one place for summary JSON, Markdown and figures.

* :mod:`~dsnt_export.report.collect`: the rows a report is built from (benchmark ``*.jsonl``
  rows, HF manifests' per-layer records, ``dsnt-export run``'s summary);
* :mod:`~dsnt_export.report.tables`: the tables, from rows (pure functions);
* :mod:`~dsnt_export.report.markdown` and :mod:`~dsnt_export.report.figures`: rendering;
* :mod:`~dsnt_export.report.writer`: the only code that writes ``report/``
  (:func:`write_run_report` for a run directory, :func:`write_report` for given rows).
"""

from dsnt_export.report.collect import collect_rows, rows_from_manifest, rows_from_run_summary
from dsnt_export.report.tables import build_report
from dsnt_export.report.writer import write_report, write_run_report

__all__ = [
    "build_report",
    "collect_rows",
    "rows_from_manifest",
    "rows_from_run_summary",
    "write_report",
    "write_run_report",
]
