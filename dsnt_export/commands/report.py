"""``dsnt-export report``: (re)write the run report of a run directory.

    dsnt-export report DIR [--out DIR/report] [--rows extra.jsonl ...]

Reads every benchmark row (``*.jsonl``), pruning run report (HF artifact manifests) and run summary
under DIR and writes ``report.json``, ``report.md`` and PNG figures into ``--out`` (default
``DIR/report``), atomically (:mod:`dsnt_export.report.writer`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``report``'s flags: DIR, ``--out`` and repeatable ``--rows FILE``."""
    p.add_argument("dir", metavar="DIR", help="run directory")
    p.add_argument("--out", default=None, help="report directory (default DIR/report)")
    p.add_argument(
        "--rows",
        action="append",
        default=[],
        metavar="FILE",
        help="extra JSON-lines row files to include (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    """``dsnt-export report``: :func:`~dsnt_export.report.write_run_report` of DIR (plus the
    ``--rows`` files), then one printed line."""
    from dsnt_export.bench.timing import read_rows
    from dsnt_export.errors import UserInputError
    from dsnt_export.report import write_run_report

    extra = []
    for f in args.rows:
        if not Path(f).is_file():
            raise UserInputError(f"--rows {f} does not exist; expected a JSON-lines file")
        extra += [dict(r, source=f) for r in read_rows(f)]
    out = Path(args.out) if args.out else Path(args.dir) / "report"
    rep = write_run_report(args.dir, out, extra_rows=extra)
    s = rep["summary"]
    print(
        f"report written to {out}: {s['rows']} rows, {s['perplexity_points']} perplexity "
        f"points, {s['latency_points']} latency points, {s['layers']} layers; figures: "
        f"{', '.join(rep['figures'].values()) or 'none'}"
    )
    return 0
