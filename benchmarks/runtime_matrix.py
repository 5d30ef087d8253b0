"""The README's runtime table, generated from bench rows: runtime x (loads, perplexity parity with
torch, perplexity, latency, sparse kernels used), each cell saying where it was verified.

    python benchmarks/runtime_matrix.py ci-cpu=.ci-out/bench-*.jsonl gpu=rows-gpu.jsonl > table.md

Each argument is ``WHERE=FILE[,FILE...]`` (WHERE: a short label such as ``CI (CPU)`` or ``H200``;
a FILE may be a glob); rows are :mod:`dsnt_export.bench.schema` rows. A cell is:

- ``yes (WHERE)`` where an ok row shows it, ``no (WHERE: reason)`` where a row shows it fails or
  is absent for a reason, ``not yet`` where no row speaks to it;
- loads: an ok row of the ``sparse`` variant (a failed load gives the reason);
- perplexity parity: the runtime's sparse perplexity within ``--rtol`` (relative; default 1e-5,
  the float32 bound CI checks) of torch's on the same windows (same ``n_windows``, ``seqlen``,
  dataset hash), in rows of the same WHERE;
- perplexity / latency: an ok ``perplexity`` / ``latency`` row of the sparse variant;
- sparse kernels used: a ``sparse-kernels`` variant with an ok row (torch's ``conversion`` row
  must convert at least one linear); ``no`` with the skip reason otherwise.

Nothing is typed by hand: rerun it on new rows to refresh the table.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections import defaultdict

from dsnt_export.bench.timing import read_rows

RUNTIMES = ("torch", "onnxruntime", "tensorrt", "vllm")
COLUMNS = ("loads", "perplexity parity with torch", "perplexity", "latency", "sparse kernels used")


def _short(reason: str | None, n: int = 60) -> str:
    r = (reason or "").replace("|", "/").replace("\n", " ").strip()
    return r if len(r) <= n else r[: n - 1] + "…"


def _ppl_key(r: dict) -> tuple:
    return (r.get("n_windows"), r.get("seqlen"), (r.get("dataset") or {}).get("sha256"))


def cells(rows_by_where: dict[str, list[dict]], rtol: float = 1e-5) -> dict[str, dict[str, str]]:
    """``{runtime: {column: cell text}}`` from rows grouped by where they were measured."""
    out: dict[str, dict[str, list[str]]] = {rt: defaultdict(list) for rt in RUNTIMES}
    for where, rows in rows_by_where.items():
        by_rt: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_rt[r.get("runtime")].append(r)
        torch_ppl = {
            _ppl_key(r): r["ppl"]
            for r in by_rt.get("torch", [])
            if r.get("bench") == "perplexity" and r.get("status") == "ok"
            and r.get("variant") == "sparse"
        }  # fmt: skip
        for rt in RUNTIMES:
            rs = by_rt.get(rt, [])
            if not rs:
                continue
            c = out[rt]
            sparse = [r for r in rs if r.get("variant") == "sparse"]
            ok = [r for r in sparse if r.get("status") == "ok"]
            if ok:
                c["loads"].append(f"yes ({where})")
            elif sparse or any(r.get("bench") == "skip" for r in rs):
                why = next((r.get("reason") for r in sparse or rs if r.get("reason")), "")
                c["loads"].append(f"no ({where}: {_short(why)})")
            for col, bench in (("perplexity", "perplexity"), ("latency", "latency")):
                if any(r.get("bench") == bench for r in ok):
                    c[col].append(f"yes ({where})")
                elif any(r.get("bench") == bench for r in sparse):
                    why = next(r.get("reason") for r in sparse if r.get("bench") == bench)
                    c[col].append(f"no ({where}: {_short(why)})")
            for r in ok:
                if r.get("bench") != "perplexity":
                    continue
                ref = torch_ppl.get(_ppl_key(r))
                if rt == "torch" or ref is None:
                    continue
                rel = abs(r["ppl"] - ref) / ref
                verdict = "yes" if rel <= rtol else "no"
                c["perplexity parity with torch"].append(f"{verdict} ({where}: rel {rel:.1e})")
            kern = [r for r in rs if r.get("variant") == "sparse-kernels"]
            conv = [r for r in kern if r.get("bench") == "conversion" and r.get("status") == "ok"]
            if any(r.get("n_converted", 0) > 0 for r in conv) or (
                rt != "torch" and any(r.get("status") == "ok" for r in kern)
            ):
                c["sparse kernels used"].append(f"yes ({where})")
            elif kern:
                why = next((r.get("reason") for r in kern if r.get("reason")), "none converted")
                c["sparse kernels used"].append(f"no ({where}: {_short(why)})")
            elif rt == "vllm":
                c["sparse kernels used"].append(f"no ({where}: vLLM has no 2:4 kernels)")
    out["torch"]["perplexity parity with torch"] = ["the reference"]
    return {
        rt: {col: "; ".join(dict.fromkeys(out[rt][col])) or "not yet" for col in COLUMNS}
        for rt in RUNTIMES
    }


def markdown(table: dict[str, dict[str, str]]) -> str:
    """The table as GitHub Markdown (one row per runtime)."""
    lines = ["| runtime | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for rt, c in table.items():
        lines.append(f"| {rt} | " + " | ".join(c[col] for col in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", metavar="WHERE=FILE[,FILE...]")
    p.add_argument("--rtol", type=float, default=1e-5, help="perplexity parity bound (relative)")
    a = p.parse_args(argv)
    rows: dict[str, list[dict]] = defaultdict(list)
    for src in a.sources:
        where, sep, files = src.partition("=")
        if not sep or not files:
            p.error(f"{src!r}: expected WHERE=FILE[,FILE...]")
        for pat in files.split(","):
            paths = sorted(glob.glob(pat)) or p.error(f"{pat!r}: no such file")
            for f in paths:
                rows[where].extend(read_rows(f))
    print(markdown(cells(rows, a.rtol)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
