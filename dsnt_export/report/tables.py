"""Tables of the run report, computed from benchmark and layer rows (pure functions; no files).

:func:`build_report` assembles them all into the report dict that report.json holds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from dsnt_export.report.zero_shot import zero_shot_table

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
    """One entry per ok ``perplexity`` row: label (method, pattern, runtime), perplexity and, where a
    dense row of the same data and windows exists (same runtime first, else another), the increase
    against it in percent (``increase_vs_dense_pct``)."""
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


LAT_KEY = (
    "runtime",
    "device",
    "backend_group",
    "phase",
    "batch_size",
    "prompt_len",
    "decode_tokens",
)


def _lat_key(r: dict) -> tuple:
    return (
        r["runtime"],
        r["device"],
        _group(r),
        r["phase"],
        r["batch_size"],
        r["prompt_len"],
        r.get("decode_tokens"),
    )


def _cell(key: tuple, run_id: str, chosen: dict[str, dict]) -> dict:
    c = {**dict(zip(LAT_KEY, key, strict=True)), "run_id": run_id, "variants": {}}
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
    return c


def latency_table(rows: list[dict]) -> list[dict]:
    """One entry per (runtime, device, phase, batch, prompt) with every variant side by side.

    Variants are compared only within one run (one ``run_id``): for each configuration the run
    with the most variants (the latest on a tie) is shown, so a speedup is never a ratio of two
    numbers measured at different times."""
    runs: dict[tuple, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("bench") != "latency" or r.get("status") != "ok":
            continue
        slot = runs[_lat_key(r)][r.get("run_id", "")]
        prev = slot.get(r["variant"])
        if prev is None or str(r.get("time", "")) >= str(prev.get("time", "")):
            slot[r["variant"]] = r
    out = []
    for key, by_run in runs.items():
        run_id, chosen = max(
            by_run.items(),
            key=lambda kv: (len(kv[1]), max(str(r.get("time", "")) for r in kv[1].values())),
        )
        out.append(_cell(key, run_id, chosen))
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


def flat_latency(table: list[dict]) -> list[dict]:
    """The latency table with one entry per (cell, variant), as the latency figure plots it."""
    return [
        {**{k: v for k, v in c.items() if k != "variants"}, "variant": name, **v}
        for c in table
        for name, v in c["variants"].items()
    ]


def layers_table(rows: list[dict]) -> list[dict]:
    """The ``layer`` rows (one per pruned linear) with a ``short`` name ``<block>.<linear>``."""
    out = []
    for r in rows:
        if r.get("bench") != "layer":
            continue
        short = r.get("name") or "?"
        if r.get("block") is not None and r.get("linear"):
            short = f"{r['block']}.{r['linear'].split('.')[-1]}"
        row = {**{k: v for k, v in r.items() if k not in ("bench", "status")}, "short": short}
        lb, la = r.get("loss_before"), r.get("loss_after")
        if isinstance(lb, (int, float)) and isinstance(la, (int, float)) and lb > 0:
            row["loss_ratio"] = la / lb
        out.append(row)
    return out


def refinement_outcome(layer: dict) -> tuple[float, float] | None:
    """``(before, after)`` of one refined layer in the refiner's own objective: the exact layer
    loss dᵀHd (``loss_before`` / ``loss_after``, what hessian-swap and DSnoT's guard minimise) when
    recorded, else DSnoT's mean |reconstruction error| estimate (``err_before`` / ``err_after``,
    manifests of older runs and unguarded DSnoT). None for a layer without refinement."""
    for b, a in (("loss_before", "loss_after"), ("err_before", "err_after")):
        if isinstance(layer.get(b), (int, float)) and isinstance(layer.get(a), (int, float)):
            return float(layer[b]), float(layer[a])
    return None


def skipped_table(rows: list[dict]) -> list[dict]:
    """Skipped and failed rows, one per distinct (runtime, variant, bench, status, reason)."""
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
    known = {"perplexity", "latency", "layer", "skip", "zero_shot"}
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
    """The distinct ``env`` records of the rows (machine, library versions), once each."""
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


REPORT_SCHEMA = "dsnt-export/report"


def build_report(rows: list[dict]) -> dict:
    """All tables of the report from ``rows`` (pure: no files).

    Returns ``{schema, schema_version, summary, environments, perplexity, latency, layers,
    zero_shot, skipped, other}`` (``zero_shot``: :func:`~dsnt_export.report.zero_shot.zero_shot_table`); ``summary`` counts rows and points and gives the ranges of the perplexity
    increase (percent) and of the speedup against the dense model.
    """
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
    outcomes = [o for o in map(refinement_outcome, layers) if o is not None]
    zs = zero_shot_table(rows)
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": 1,
        "summary": {
            "rows": len(rows),
            "perplexity_points": len(ppl),
            "latency_points": len(lat),
            "layers": len(layers),
            "zero_shot_points": sum(e["task"] != "mean" for e in zs),
            "ppl_increase_vs_dense_pct": [min(inc), max(inc)] if inc else None,
            "speedup_vs_dense": [min(sp), max(sp)] if sp else None,
            "layers_error_reduced": sum(a <= b for b, a in outcomes),
            "layers_refined": len(outcomes),
            "layers_loss_recorded": sum(
                isinstance(r.get("loss_before"), (int, float)) for r in layers
            ),
            "skipped_or_failed": sum(r.get("status") in ("skipped", "failed") for r in rows),
        },
        "environments": environments(rows),
        "perplexity": ppl,
        "latency": lat,
        "layers": layers,
        "zero_shot": zs,
        "skipped": skipped_table(rows),
        "other": other_tables(rows),
    }
