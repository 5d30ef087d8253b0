"""PNG figures of a run report, drawn from rows with matplotlib's Agg backend (no display).

Each function takes the tables :mod:`dsnt_export.report.collect` builds and a path, draws one figure with
a title, labelled axes and units, and returns the path (or None when there is nothing to draw).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

VARIANT_COLORS = {"dense": "#4c72b0", "sparse": "#dd8452", "sparse-kernels": "#55a868"}
BATCH_STYLES = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _log_axes(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    ax.yaxis.set_minor_formatter(plain)


def perplexity_figure(ppl: list[dict], path: Path) -> Path | None:
    """Bars: perplexity per method/pattern (and runtime); dense as a dashed reference line."""
    sparse = [r for r in ppl if r["variant"] != "dense"]
    dense = [r for r in ppl if r["variant"] == "dense"]
    if not sparse and not dense:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(sparse) + 3), 4.5))
    labels = [r["label"] for r in sparse]
    vals = [r["ppl"] for r in sparse]
    bars = ax.bar(range(len(vals)), vals, color="#dd8452")
    for b, v in zip(bars, vals, strict=True):
        ax.annotate(
            f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8
        )
    seen = set()
    for r in dense:
        key = round(r["ppl"], 4)
        if key in seen:
            continue
        seen.add(key)
        ax.axhline(
            r["ppl"],
            color="#4c72b0",
            linestyle="--",
            linewidth=1.5,
            label=f"dense {r['runtime']}: {r['ppl']:.2f}",
            zorder=3,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_xlabel("method / pattern / runtime")
    ds = (ppl[0].get("dataset") or "?") if ppl else "?"
    ax.set_title(f"Perplexity per method and pattern ({ds}, seqlen {ppl[0].get('seqlen')})")
    if dense:
        ax.legend(loc="lower right", fontsize=8)
    top = max(vals + [r["ppl"] for r in dense])
    ax.set_ylim(0, top * 1.15)
    return _save(fig, path)


def latency_figure(lat: list[dict], path: Path) -> Path | None:
    """One row of panels per runtime/device: prefill (ms) and decode (ms/token) vs prompt length,
    a line per variant (colour) and batch size (line style), bars = interquartile range."""
    ok = [r for r in lat if r.get("latency_ms") is not None]
    if not ok:
        return None
    groups = defaultdict(list)
    for r in ok:
        groups[(r["runtime"], r["device"], r.get("backend_group", ""))].append(r)
    plt = _plt()
    n = len(groups)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.6 * n), squeeze=False)
    batches = sorted({r["batch_size"] for r in ok})
    for i, ((rt, dev, _), rows) in enumerate(sorted(groups.items())):
        for j, phase in enumerate(("prefill", "decode")):
            ax = axes[i][j]
            sel = [r for r in rows if r["phase"] == phase]
            lines = defaultdict(list)
            for r in sel:
                lines[(r["variant"], r["batch_size"])].append(r)
            for (variant, b), pts in sorted(lines.items()):
                pts.sort(key=lambda r: r["prompt_len"])
                x = [p["prompt_len"] for p in pts]
                y = [p["latency_ms"] for p in pts]
                lo = [max(p["latency_ms"] - p["q1_ms"], 0) for p in pts]
                hi = [max(p["q3_ms"] - p["latency_ms"], 0) for p in pts]
                ax.errorbar(
                    x,
                    y,
                    yerr=[lo, hi],
                    marker="o",
                    capsize=3,
                    color=VARIANT_COLORS.get(variant, "gray"),
                    linestyle=BATCH_STYLES[batches.index(b) % len(BATCH_STYLES)],
                    label=f"{variant}, batch {b}",
                )
            if sel:
                _log_axes(ax)
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            unit = (
                "median latency per forward (ms)"
                if phase == "prefill"
                else "median latency per decode step (ms/token)"
            )
            ax.set_ylabel(unit, fontsize=8)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_title(
                f"{rt} on {dev}: {phase}"
                + (
                    f" ({sel[0]['decode_tokens']} tokens after the prompt)"
                    if phase == "decode" and sel
                    else ""
                ),
                fontsize=10,
            )
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Latency, dense vs sparse (lower is better; bars: interquartile range)")
    return _save(fig, path)


def layer_error_figure(layers: list[dict], path: Path) -> Path | None:
    """Per-layer refinement objective before vs after refinement (hessian-swap, DSnoT, ...) and
    their ratio; the title names the methods (e.g. ``sparsegpt+hessian-swap``). The objective is
    the exact layer loss dᵀHd where every refined layer records it, else DSnoT's mean
    |reconstruction error| estimate (:func:`~dsnt_export.report.tables.refinement_outcome`)."""
    from dsnt_export.report.tables import refinement_outcome

    rows = [r for r in layers if refinement_outcome(r) is not None]
    if not rows:
        return None
    exact = all(r.get("loss_before") is not None for r in rows)
    if exact:
        before = [float(r["loss_before"]) for r in rows]
        after = [float(r["loss_after"]) for r in rows]
        ylabel = "exact layer loss dᵀHd\n(calibration inputs)"
    else:
        before = [float(r["err_before"]) for r in rows]
        after = [float(r["err_after"]) for r in rows]
        ylabel = "mean |reconstruction error|\nper output row (sum over tokens)"
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    x = list(range(len(rows)))
    ax.plot(x, before, marker=".", color="#c44e52", label="before refinement (initial mask)")
    ax.plot(x, after, marker=".", color="#55a868", label="after refinement")
    if min(before + after) > 0:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ratio = [a / b if b else float("nan") for a, b in zip(after, before, strict=True)]
    ax2.bar(x, ratio, color=["#55a868" if v <= 1 else "#c44e52" for v in ratio])
    ax2.axhline(1.0, color="black", linewidth=0.8)
    finite = [v for v in ratio if v == v]
    ax2.set_ylim(0, max([1.1] + [v * 1.1 for v in finite]))
    ax2.set_ylabel("after / before", fontsize=8)
    ax2.set_xlabel("pruned linear layer (model order)")
    step = max(1, len(rows) // 16)
    ax2.set_xticks(
        x[::step], [rows[i]["short"] for i in x[::step]], rotation=45, ha="right", fontsize=7
    )
    meth = sorted({r.get("method") or "?" for r in rows})
    ax.set_title(
        f"per-layer {'loss' if exact else 'error'} before/after refinement ({', '.join(meth)}, pattern {rows[0].get('pattern')})"
    )
    return _save(fig, path)
