"""Zero-shot accuracy (lm-eval) in reports: the rows' table, plain text and Markdown, and figure.

The rows are those of :func:`dsnt_export.evaluation.zero_shot.evaluate_dir` (``bench:
"zero_shot"``, one per model variant, task and metric: ``value`` with ``stderr``, fractions 0..1),
which ``dsnt-export run --tasks`` / ``dsnt-export eval RUN --tasks`` append to
``RUN/eval/zero_shot.jsonl`` (:func:`write_outputs`, with one figure per metric beside it). The run
report (:mod:`dsnt_export.report.writer`) reads them back with every other ``*.jsonl`` row:
:func:`zero_shot_table` is its per-task table (dense vs sparse), :func:`plot_rows` its figure.
When a file holds several evaluations of the same runtime, variant, task and metric, the last row
wins; evaluations on different runtimes (``eval --runtime torch`` then ``--runtime vllm``) are kept
side by side, one table block and one group of bars per runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["format_table", "plot_rows", "write_outputs", "zero_shot_table", "ZS_COLS"]

METRICS = ("acc", "acc_norm")  # the metrics drawn (dsnt_export.evaluation.zero_shot.METRICS)


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("bench") == "zero_shot" and r.get("status") == "ok"]


def _rt(r: dict) -> str:
    """The runtime a zero-shot row was scored on (rows written before runtimes: torch)."""
    return r.get("runtime") or "torch"


def _label(r: dict, runtimes: Sequence[str]) -> str:
    """The row's variant, with its runtime when the rows hold more than one runtime."""
    return r["variant"] if len(runtimes) < 2 else f"{r['variant']} [{_rt(r)}]"


def zero_shot_table(rows: Sequence[dict]) -> list[dict]:
    """One entry per runtime, task, metric and ``limit`` of the ok ``zero_shot`` rows:
    ``runtime``, ``task``, ``metric``, ``dense`` / ``sparse`` (value, %), ``dense_stderr`` /
    ``sparse_stderr`` (%), ``delta`` (sparse - dense, points), ``n_samples``, ``limit``,
    ``harness`` (lm-eval version); then one ``mean`` entry per runtime, metric and limit (mean over
    the tasks each variant has). Values of a missing variant are None. Dense and sparse are paired
    only when scored on the same documents (same ``limit``: a ``--limit 30`` run never meets a
    full one); for a repeated evaluation of the same runtime and limit the later row wins."""
    ok = _ok(rows)
    cell = {(_rt(r), r["task"], r["metric"], r.get("limit"), r.get("variant")): r for r in ok}
    keys = list(dict.fromkeys((_rt(r), r["task"], r["metric"], r.get("limit")) for r in ok))
    out = []
    for rt, task, metric, limit in keys:
        e: dict = {"runtime": rt, "task": task, "metric": metric}
        for v in ("dense", "sparse"):
            r = cell.get((rt, task, metric, limit, v))
            e[v] = None if r is None else 100 * r["value"]
            se = None if r is None else r.get("stderr")
            e[f"{v}_stderr"] = None if se is None else 100 * se
        any_r = (
            cell.get((rt, task, metric, limit, "sparse"))
            or cell.get((rt, task, metric, limit, "dense"))
            or {}
        )
        e["delta"] = None if None in (e["dense"], e["sparse"]) else e["sparse"] - e["dense"]
        e["n_samples"] = any_r.get("n_samples")
        e["limit"] = limit
        e["harness"] = (any_r.get("harness") or {}).get("version")
        out.append(e)
    for rt, metric, limit in dict.fromkeys((rt, m, lim) for rt, _, m, lim in keys):
        e = {"runtime": rt, "task": "mean", "metric": metric}
        for v in ("dense", "sparse"):
            xs = [
                x[v]
                for x in out
                if (x["runtime"], x["metric"], x["limit"]) == (rt, metric, limit)
                and x[v] is not None
            ]
            e[v] = sum(xs) / len(xs) if xs else None
            e[f"{v}_stderr"] = None
        e["delta"] = None if None in (e["dense"], e["sparse"]) else e["sparse"] - e["dense"]
        e["limit"] = limit
        out.append(e)
    return out


def _pm(x, se) -> str:
    if x is None:
        return "-"
    return f"{x:.1f} ± {se:.1f}" if se is not None else f"{x:.2f}"


def markdown_rows(table: Sequence[dict]) -> list[dict]:
    """:func:`zero_shot_table` entries as Markdown cells: ``dense`` / ``sparse`` as
    "value ± stderr" (%), ``delta`` in points (for :data:`ZS_COLS`); when the entries hold more
    than one ``limit``, each task names its own ("boolq (first 30 docs)", "boolq (all docs)")."""
    several = len({e.get("limit") for e in table}) > 1

    def task(e: dict) -> str:
        if not several:
            return e["task"]
        lim = e.get("limit")
        return f"{e['task']} ({f'first {lim} docs' if lim else 'all docs'})"

    return [
        {
            "runtime": e.get("runtime", "torch"),
            "task": task(e),
            "metric": e["metric"],
            "dense": _pm(e["dense"], e["dense_stderr"]),
            "sparse": _pm(e["sparse"], e["sparse_stderr"]),
            "delta": "-" if e["delta"] is None else f"{e['delta']:+.1f}",
            "n_samples": e.get("n_samples"),
        }
        for e in table
    ]


# the Markdown columns of the report's zero-shot table (key, header)
ZS_COLS = [
    ("runtime", "runtime"),
    ("task", "task"),
    ("metric", "metric"),
    ("dense", "dense (%)"),
    ("sparse", "sparse (%)"),
    ("delta", "sparse - dense (points)"),
    ("n_samples", "docs"),
]


# --------------------------------------------------------------------------- figure


def plot_rows(rows: Sequence[dict], path: str | Path, *, metric: str = "acc") -> Path | None:
    """Bar chart of ``metric`` per task, one bar per variant, with ±1 stderr bars, as PNG.

    Returns ``path``, or None when no "ok" row of ``metric`` exists. Uses matplotlib's Agg backend.
    """
    ok = [r for r in _ok(rows) if r.get("metric") == metric]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in ok))
    runtimes = list(dict.fromkeys(_rt(r) for r in ok))
    variants = list(dict.fromkeys(_label(r, runtimes) for r in ok))
    cell = {(_label(r, runtimes), r["task"]): r for r in ok}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 2), 3.6))
    for k, v in enumerate(variants):
        xs, ys, es = [], [], []
        for j, t in enumerate(tasks):
            r = cell.get((v, t))
            if r is None:
                continue
            xs.append(j + (k - (len(variants) - 1) / 2) * width)
            ys.append(100 * r["value"])
            es.append(100 * (r["stderr"] or 0.0))
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=v)
        for x, y, e in zip(xs, ys, es, strict=True):
            ax.text(x, y + e + 1, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    model = (ok[-1].get("model") or {}).get("pattern")
    limit = ok[0].get("limit")
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel(f"{metric} (%), ±1 stderr")
    ax.set_ylim(0, 110)
    ax.set_title(
        f"zero-shot {metric} per task (lm-eval {ok[0]['harness']['version']}"
        + (f", pattern {model}" if model else "")
        + (f", first {limit} docs" if limit else "")
        + ")",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- outputs


def write_outputs(rows: Sequence[dict], out_dir: str | Path) -> tuple[Path, list[Path]]:
    """Append ``rows`` to ``out_dir/zero_shot.jsonl`` and draw ``zero_shot_<metric>.png`` per
    metric present; returns (rows file, figures)."""
    from dsnt_export.bench.timing import append_rows

    out = Path(out_dir)
    path = append_rows(out / "zero_shot.jsonl", rows)
    figs = [plot_rows(rows, out / f"zero_shot_{m}.png", metric=m) for m in METRICS]
    return path, [f for f in figs if f is not None]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table: one line per task and metric, a column per variant (value ± stderr, %),
    then the mean over tasks per metric and variant, and skipped rows with their reasons."""
    ok = _ok(rows)
    runtimes = list(dict.fromkeys(_rt(r) for r in ok))
    variants = list(dict.fromkeys(_label(r, runtimes) for r in ok))
    cell = {(r["task"], r["metric"], _label(r, runtimes)): r for r in ok}
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in ok))
    width = max([16] + [len(v) for v in variants])
    lines = [f"{'task':<16} {'metric':<9}" + "".join(f" {v:>{width}}" for v in variants)]
    for task, metric in keys:
        vals = []
        for v in variants:
            r = cell.get((task, metric, v))
            se = f" ± {100 * r['stderr']:.1f}" if r and r.get("stderr") is not None else ""
            vals.append(f"{100 * r['value']:.1f}{se}" if r else "-")
        lines.append(f"{task:<16} {metric:<9}" + "".join(f" {x:>{width}}" for x in vals))
    for metric in dict.fromkeys(m for _, m in keys):
        means = []
        for v in variants:
            xs = [cell[(t, m, v)]["value"] for t, m in keys if m == metric and (t, m, v) in cell]
            means.append(f"{100 * sum(xs) / len(xs):.2f}" if xs else "-")
        lines.append(f"{'mean':<16} {metric:<9}" + "".join(f" {x:>{width}}" for x in means))
    if ok:
        r = ok[0]
        lines.append(
            f"lm-eval {r['harness']['version']}, num_fewshot {r.get('num_fewshot')}, "
            f"limit {r.get('limit')}, {r['runtime']} on {r['device']}"
        )
    lines += [
        f"{r.get('variant', '-')}: {r['status']}: {r['reason']}" for r in rows if r.get("reason")
    ]
    return "\n".join(lines)
