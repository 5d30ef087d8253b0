"""The run report: JSON + Markdown + PNG figures, built from a list of rows.

    from dsnt_export.report import collect_rows, write_report
    write_report(collect_rows("out"), "out/report")      # or: dsnt-export report out

Input: plain dicts, so the report does not depend on which stage produced them:

- benchmark rows (:mod:`dsnt_export.bench.schema`): ``perplexity``, ``latency``, ``conversion``,
  ``skip`` and the GPU check's rows, read from every ``*.jsonl`` file of a run directory;
- ``layer`` rows, one per pruned linear, taken from the run report that ``dsnt-export prune``
  stores in an HF artifact's manifest (``extra.run_report.layers``: DSnoT error before/after).

Output (written atomically: a temporary directory beside ``report/`` renamed into place):
``report.json`` (the tables below + summary), ``report.md`` (the same as Markdown, figures
linked), ``perplexity.png`` (bar per method/pattern, dense as a reference line),
``latency.png`` (prefill and decode latency vs prompt length per runtime, dense vs sparse),
``layer_error.png`` (per-layer DSnoT error before/after), and a manifest of kind "report".
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST_NAME, atomic_output_dir, new_manifest, write_manifest
from .errors import UserInputError

log = logging.getLogger(__name__)

REPORT_SCHEMA = "dsnt-export/report"
REPORT_DIRNAME = "report"
FIGURES = {
    "perplexity": "perplexity.png",
    "latency": "latency.png",
    "layer_error": "layer_error.png",
}
_NOISE = {
    "schema",
    "schema_version",
    "run_id",
    "time",
    "env",
    "options",
    "status",
    "bench",
    "timing",
    "samples_s",
    "layers",
    "dataset",
    "model",
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
    """Every row under ``run_dir``: ``*.jsonl`` benchmark rows and manifests' layer rows."""
    from .bench.timing import read_rows

    root = Path(run_dir)
    if not root.is_dir():
        raise UserInputError(f"{root} is not a directory; expected a run directory")
    rows: list[dict] = []
    for p in sorted(root.rglob("*.jsonl")):
        if REPORT_DIRNAME in p.relative_to(root).parts[:1]:
            continue
        rows += [
            dict(r, source=str(p)) for r in read_rows(p) if isinstance(r, dict) and "bench" in r
        ]
    for p in sorted(root.rglob(MANIFEST_NAME)):
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping unreadable manifest %s: %s", p, e)
            continue
        if isinstance(m, dict) and m.get("kind") == "hf":
            rows += rows_from_manifest(m, p.parent)
    return rows


# ------------------------------------------------------------------------------------- tables


def _latest(rows: Iterable[dict], key) -> list[dict]:
    best: dict[Any, dict] = {}
    for r in rows:
        k = key(r)
        if k not in best or str(r.get("time", "")) >= str(best[k].get("time", "")):
            best[k] = r
    return list(best.values())


def _ds(r: dict) -> str:
    d = r.get("dataset") or {}
    return d.get("source", "?") if isinstance(d, dict) else str(d)


def perplexity_table(rows: list[dict]) -> list[dict]:
    ppl = [r for r in rows if r.get("bench") == "perplexity" and r.get("status") == "ok"]
    out = []
    for r in ppl:
        m = r.get("model") or {}
        rt = r.get("runtime", "torch")
        variant = r.get("variant", "sparse")
        label = (
            "dense" if variant == "dense" else f"{m.get('method') or '?'} {m.get('pattern') or ''}"
        )
        if variant not in ("dense", "sparse"):
            label += f" ({variant})"
        out.append(
            {
                "label": f"{label.strip()} [{rt}]",
                "runtime": rt,
                "variant": variant,
                "backend": r.get("backend"),
                "method": m.get("method"),
                "pattern": m.get("pattern"),
                "model": m.get("id"),
                "ppl": r["ppl"],
                "nll": r.get("nll"),
                "n_windows": r.get("n_windows"),
                "seqlen": r.get("seqlen"),
                "dataset": _ds(r),
                "dataset_hash": (r.get("dataset") or {}).get("hash"),
                "time": r.get("time"),
            }
        )
    out = _latest(out, lambda t: (t["label"], t["dataset_hash"], t["seqlen"], t["model"]))
    for t in out:
        same = [
            d
            for d in out
            if d["variant"] == "dense"
            and d["dataset_hash"] == t["dataset_hash"]
            and d["seqlen"] == t["seqlen"]
            and d["n_windows"] == t["n_windows"]
        ]
        same.sort(key=lambda d: d["runtime"] != t["runtime"])  # same runtime first
        if same and t["variant"] != "dense":
            t["dense_ppl"], t["dense_runtime"] = same[0]["ppl"], same[0]["runtime"]
            t["increase_vs_dense_pct"] = 100.0 * (t["ppl"] / same[0]["ppl"] - 1.0)
    out.sort(key=lambda t: (t["variant"] != "dense", t["runtime"], t["label"]))
    return out


def _group(r: dict) -> str:
    return r.get("backend", "") if r.get("runtime") == "onnxruntime" else ""


def _iqr_ms(r: dict) -> tuple[float, float]:
    """Quartiles in the row's latency unit (ms per forward / ms per decode step)."""
    t = r.get("timing") or {}
    if "q1_s" not in t or r.get("method"):  # vLLM decode: a difference of medians, no quartiles
        return r["latency_ms"], r["latency_ms"]
    per = r["decode_tokens"] if r["phase"] == "decode" and r.get("decode_tokens") else 1
    return t["q1_s"] * 1e3 / per, t["q3_s"] * 1e3 / per


def latency_table(rows: list[dict]) -> list[dict]:
    """One entry per (runtime, device, phase, batch, prompt) with every variant side by side.

    Variants are compared only within one run (one ``run_id``): for each configuration the run
    with the most variants (the latest on a tie) is shown, so a speedup is never a ratio of two
    numbers measured at different times."""
    lat = [r for r in rows if r.get("bench") == "latency" and r.get("status") == "ok"]
    runs: dict[tuple, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in lat:
        k = (
            r["runtime"],
            r["device"],
            _group(r),
            r["phase"],
            r["batch_size"],
            r["prompt_len"],
            r.get("decode_tokens"),
        )
        prev = runs[k][r.get("run_id", "")].get(r["variant"])
        if prev is None or str(r.get("time", "")) >= str(prev.get("time", "")):
            runs[k][r.get("run_id", "")][r["variant"]] = r
    out = []
    for k, by_run in runs.items():
        run_id, chosen = max(
            by_run.items(),
            key=lambda kv: (len(kv[1]), max(str(r.get("time", "")) for r in kv[1].values())),
        )
        c = {
            "runtime": k[0],
            "device": k[1],
            "backend_group": k[2],
            "phase": k[3],
            "batch_size": k[4],
            "prompt_len": k[5],
            "decode_tokens": k[6],
            "run_id": run_id,
            "variants": {},
        }
        for name, r in chosen.items():
            q1, q3 = _iqr_ms(r)
            c["variants"][name] = {
                "backend": r.get("backend"),
                "latency_ms": r["latency_ms"],
                "tokens_per_s": r.get("tokens_per_s"),
                "peak_mem_bytes": r.get("peak_mem_bytes"),
                "q1_ms": q1,
                "q3_ms": q3,
                "repeats": (r.get("timing") or {}).get("repeats"),
            }
        d = c["variants"].get("dense")
        for name, v in c["variants"].items():
            if d and name != "dense" and v["latency_ms"]:
                v["speedup_vs_dense"] = d["latency_ms"] / v["latency_ms"]
        out.append(c)
    out.sort(
        key=lambda c: (
            c["runtime"],
            c["device"],
            c["backend_group"],
            c["phase"] != "prefill",
            c["batch_size"],
            c["prompt_len"],
        )
    )
    return out


def _flat_latency(table: list[dict]) -> list[dict]:
    return [
        {**{k: v for k, v in c.items() if k != "variants"}, "variant": name, **v}
        for c in table
        for name, v in c["variants"].items()
    ]


def layers_table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("bench") != "layer":
            continue
        short = r.get("name") or "?"
        if r.get("block") is not None and r.get("linear"):
            short = f"{r['block']}.{r['linear'].split('.')[-1]}"
        out.append({**{k: v for k, v in r.items() if k not in ("bench", "status")}, "short": short})
    return out


def skipped_table(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if r.get("status") in ("skipped", "failed"):
            k = (
                r.get("runtime"),
                r.get("variant"),
                r.get("bench"),
                r.get("status"),
                r.get("reason"),
            )
            if k not in seen:
                seen.add(k)
                out.append(
                    {
                        "runtime": k[0],
                        "variant": k[1],
                        "bench": k[2],
                        "status": k[3],
                        "reason": k[4],
                        "batch_size": r.get("batch_size"),
                        "prompt_len": r.get("prompt_len"),
                        "section": r.get("section"),
                    }
                )
    return out


def other_tables(rows: list[dict]) -> dict[str, list[dict]]:
    """GPU check and other benchmark rows, by ``bench``, scalar columns only."""
    known = {"perplexity", "latency", "layer", "skip"}
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("bench") in known or r.get("status", "ok") != "ok":
            continue
        flat = {
            k: v
            for k, v in r.items()
            if k not in _NOISE
            and k != "source"
            and (
                isinstance(v, (str, int, float, bool))
                or v is None
                or (isinstance(v, list) and len(v) <= 4 and all(isinstance(x, int) for x in v))
            )
        }
        out[r["bench"]].append(flat)
    return dict(out)


def environments(rows: list[dict]) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for r in rows:
        e = r.get("env")
        if not isinstance(e, dict):
            continue
        k = (e.get("hostname_hash"), e.get("gpu"), e.get("cpu"), e.get("torch"))
        seen.setdefault(
            k,
            {
                k2: e.get(k2)
                for k2 in (
                    "cpu",
                    "cpu_count",
                    "cpu_affinity",
                    "gpu",
                    "capability",
                    "driver",
                    "cuda_runtime",
                    "cusparselt",
                    "torch",
                    "python",
                    "platform",
                    "versions",
                    "hostname_hash",
                )
                if e.get(k2) is not None
            },
        )
    return list(seen.values())


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


def write_report(
    rows: list[dict],
    out_dir: str | Path,
    *,
    title: str = "dsnt-export run report",
    sources: list[str] | None = None,
) -> dict:
    """Write report.json, report.md and the figures into ``out_dir`` atomically; returns the
    report dict (with ``figures``: the PNG files written)."""
    from .bench import figures
    from .bench.markdown import render_markdown

    rep = build_report(rows)
    rep["title"] = title
    rep["sources"] = sorted(set(sources or [r.get("source") for r in rows if r.get("source")]))
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        drawn = {
            "perplexity": figures.perplexity_figure(rep["perplexity"], tmp / FIGURES["perplexity"]),
            "latency": figures.latency_figure(
                _flat_latency(rep["latency"]), tmp / FIGURES["latency"]
            ),
            "layer_error": figures.layer_error_figure(rep["layers"], tmp / FIGURES["layer_error"]),
        }
        rep["figures"] = {k: p.name for k, p in drawn.items() if p is not None}
        (tmp / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(rep))
        write_manifest(
            tmp,
            new_manifest("report", extra={"summary": rep["summary"], "sources": rep["sources"]}),
        )
    return rep


def report_run_dir(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Collect a run directory's rows and write its report (default ``run_dir/report``)."""
    rows = collect_rows(run_dir)
    if not rows:
        raise UserInputError(
            f"{run_dir} holds no benchmark rows (*.jsonl) and no pruning run report (an HF "
            f"artifact's {MANIFEST_NAME}); run `dsnt-export prune`/`bench` into it first"
        )
    return write_report(
        rows,
        Path(out_dir) if out_dir else Path(run_dir) / REPORT_DIRNAME,
        title=f"dsnt-export run report: {Path(run_dir).name}",
    )
