"""Perplexity of every initial mask with and without DSnoT on the embedded SmolLM2-135M model.

    python benchmarks/quality_table.py                       # 2:4, calibrate on docstrings
    python benchmarks/quality_table.py --patterns 2:4,4:8,0.5,0.6,0.7 --calib stdlib-docs,stdlib-code
    python benchmarks/quality_table.py --markdown benchmarks/results/quality.jsonl   # table only
    python benchmarks/quality_table.py --figure benchmarks/results/quality.png       # figure only

Each configuration is pruned from the same dense fp32 model with the same calibration windows
(``--nsamples`` x ``--seqlen`` tokens of the calibration domain, seed 0), then evaluated with the
WikiText-2 protocol (``--seqlen``-token windows, first ``--eval-windows`` windows) on the held-out
text of BOTH domains: docstrings ("stdlib-docs") and source code ("stdlib-code"). Rows are appended
to ``--out`` (JSONL) as they finish, so an interrupted run keeps what it measured.

Configurations: dense; for each of magnitude / wanda / sparsegpt: alone, + DSnoT with the official
preset (reference defaults: attention projections only, mean criterion), + our default refiner
(every linear, ``hessian-swap``: exact-loss swaps with 3 % dampening, ``HessianSwapConfig()``).
The row labels ``+dsnot(default)`` / ``+dsnot(mean)`` predate the refiner's own name and stay
(they key the README's tables): ``(default)`` is hessian-swap, ``(mean)`` is DSnoT's ``guarded``.
``--figure`` draws perplexity against the pattern for every configuration, one panel per evaluation
domain.

Calibration draws (issue 16): ``--draws K`` (default 5) prunes every configuration once per draw
``d`` = 0..K-1, on the windows the sampler gives with seed ``d`` (the same windows for every
configuration of that draw), and evaluates each model on THREE held-out texts: docstrings, source
code, and ``stdlib-topics`` (the reference-manual prose of ``pydoc_data``, used for no calibration and
no hyper-parameter choice). Each row carries its ``draw``. ``--markdown`` then also prints, per
(calibration domain, pattern, windows), each configuration's perplexity as mean ± std over draws
(sample standard deviation, n-1) with min..max, and its change against SparseGPT alone as
mean ± std (min..max) of the per-draw PAIRED relative differences (same windows). A change is
marked a gain (bold, "gain") only when every draw improved (max < 0) and the mean improvement is
larger than the std of the differences. The README's older single-draw tables read draw 0 only.

The peers (``llmcompressor-sparsegpt`` / ``llmcompressor-wanda``: llm-compressor's ``oneshot`` +
``SparseGPTModifier`` / ``WandaPruningModifier`` on the same windows,
``shuffle_calibration_samples=False``) run through ``benchmarks/bench_pipeline.py``'s
peer child in ``--peer-python`` (default: this interpreter, when it can import llmcompressor); their
pruned weights are evaluated here by the same float32 evaluation as every other row.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsnt_export.evaluation.perplexity import perplexity
from dsnt_export.refine import DSnoTConfig, HessianSwapConfig, RefitConfig
from dsnt_export.sparsify.driver import SparsifyConfig, sparsify

CONFIGS = {
    "dense": None,
    "magnitude": ("magnitude", "none", None, ()),
    "magnitude+dsnot(official)": ("magnitude", "dsnot", "official", ("mlp",)),
    "magnitude+dsnot(default)": ("magnitude", "dsnot", "default", ()),
    "wanda": ("wanda", "none", None, ()),
    "wanda+dsnot(official)": ("wanda", "dsnot", "official", ("mlp",)),
    "wanda+dsnot(default)": ("wanda", "dsnot", "default", ()),
    "sparsegpt": ("sparsegpt", "none", None, ()),
    "sparsegpt+dsnot(official)": ("sparsegpt", "dsnot", "official", ("mlp",)),
    "sparsegpt+dsnot(default)": ("sparsegpt", "dsnot", "default", ()),
}
DOMAINS = ("stdlib-docs", "stdlib-code")
#: every model is evaluated on these (the third is used for no calibration and no choice)
EVAL_TEXTS = (*DOMAINS, "stdlib-topics")
#: peer configurations (llm-compressor, run in --peer-python through bench_pipeline's peer child)
PEERS = {"llmcompressor-sparsegpt": "sparsegpt", "llmcompressor-wanda": "wanda"}
PRESETS = {
    "official": DSnoTConfig.official,
    "default": HessianSwapConfig,
    # DSnoT's own (mean-based) criterion with our sign check and loss guard
    "mean": DSnoTConfig.guarded,
    # the least-squares re-fit of the kept weights (dsnt_export/refine/refit.py), the default
    "refit": RefitConfig,
}
# the hessian-swap refiner's dampening (HessianSwapConfig.percdamp), swept to choose the default
DAMPS = (0.01, 0.03, 0.1, 0.3)
for _damp in DAMPS:
    PRESETS[f"default percdamp={_damp}"] = lambda d=_damp: HessianSwapConfig(percdamp=d)
for _init in ("magnitude", "wanda", "sparsegpt"):
    CONFIGS[f"{_init}+refit"] = (_init, "refit", "refit", ())
    CONFIGS[f"{_init}+dsnot(mean)"] = (_init, "dsnot", "mean", ())
    for _damp in DAMPS:
        CONFIGS[f"{_init}+dsnot(default percdamp={_damp})"] = (
            _init,
            "dsnot",
            f"default percdamp={_damp}",
            (),
        )


def load_embedded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsnt_export.embedded import embedded_model_dir

    d = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(d)


#: the single-draw tables' configurations (the README's older per-pattern tables); the refit rows
#: are reported by the draws table (draws_markdown), which takes any configuration
STANDARD = [
    c for c in CONFIGS if "percdamp" not in c and "(mean)" not in c and not c.endswith("+refit")
]
PATTERN_ORDER = ("2:4", "4:8", "0.5", "0.6", "0.7")


def canonical(rows: list[dict], calib: str, nsamples: int = 32) -> dict[tuple[str, str], dict]:
    """``{(config, pattern): row}`` of the standard configurations calibrated on ``calib``.

    A sweep row whose dampening is the default's counts as ``+dsnot(default)``; a later row
    replaces an earlier one of the same cell. Only draw 0 (or rows without a draw) counts.
    """
    damp = HessianSwapConfig().percdamp
    out = {}
    for r in rows:
        if r.get("draw") not in (None, 0):
            continue
        if r.get("calib") != calib or (r.get("calibration") or {}).get("nsamples") != nsamples:
            continue
        name = r["config"]
        if name.endswith(f"+dsnot(default percdamp={damp})"):
            name = name.split("+", 1)[0] + "+dsnot(default)"
        if name in STANDARD:
            out[(name, r["pattern"])] = r
    return out


DOMAIN_LABEL = {"stdlib-docs": "docstrings", "stdlib-code": "code", "stdlib-topics": "manual"}


def _label(name: str) -> str:
    init, _, rest = name.partition("+")
    if not rest:
        return init
    if not rest.startswith("dsnot("):
        return f"{init} + {rest}"
    preset = rest[len("dsnot(") : -1]
    return f"{init} + DSnoT {preset}"


def _short(p: str) -> str:
    """``2:4`` stays, ``0.6`` becomes ``60 %``."""
    return p if ":" in p else f"{float(p):.0%}".replace("%", " %")


def _pattern_label(p: str) -> str:
    return p if ":" in p else f"{_short(p)} unstructured"


def _changes(cells: dict, name: str, pattern: str) -> list[float] | None:
    r, base = cells.get((name, pattern)), cells.get((name.split("+")[0], pattern))
    if r is None or base is None:
        return None
    return [(r["eval"][d]["ppl"] / base["eval"][d]["ppl"] - 1) * 100 for d in DOMAINS]


def summary_markdown(rows: list[dict]) -> str:
    """One line per (pattern, calibration domain): each DSnoT configuration's change against its
    initial mask alone, docstrings / code, in percent (negative = better)."""
    cols = [n for n in STANDARD if "+" in n]
    out = [
        "| pattern | calibrated on | " + " | ".join(_label(n) for n in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for calib in DOMAINS:
        cells = canonical(rows, calib)
        for pattern in PATTERN_ORDER:
            ch = [_changes(cells, n, pattern) for n in cols]
            if not any(ch):
                continue
            texts = []
            for n, c in zip(cols, ch, strict=True):
                if c is None:
                    texts.append("—")
                    continue
                t = " / ".join(f"{v:+.1f}" for v in c)
                texts.append(f"**{t}**" if n.endswith("(default)") else t)
            out.append(f"| {_short(pattern)} | {DOMAIN_LABEL[calib]} | " + " | ".join(texts) + " |")
    return "\n".join(out) + "\n"


def markdown(rows: list[dict]) -> str:
    """The README's tables: one per (calibration domain, pattern) with cells, rows = standard
    configurations, columns = evaluation domains; each refined cell also gives its change against
    the same initial mask alone (``worse`` where it went up). Our default config is in bold."""
    out = []
    dense = next((r for r in rows if r["config"] == "dense"), None)
    for calib in DOMAINS:
        cells = canonical(rows, calib)
        for pattern in PATTERN_ORDER:
            names = [n for n in STANDARD if (n, pattern) in cells]
            if not names:
                continue
            where = {d: "in-domain" if d == calib else "other domain" for d in DOMAINS}
            out.append(
                f"\n**{_pattern_label(pattern)}, calibrated on {DOMAIN_LABEL[calib]}** "
                "(32 x 256 windows)\n"
            )
            out.append(
                "| configuration | "
                + " | ".join(f"ppl {DOMAIN_LABEL[d]} ({where[d]})" for d in DOMAINS)
                + " | prune s |"
            )
            out.append("|---|---|---|---|")
            if dense is not None:
                vals = " | ".join(f"{dense['eval'][d]['ppl']:.2f}" for d in DOMAINS)
                out.append(f"| dense | {vals} | |")
            for name in names:
                r = cells[(name, pattern)]
                changes = _changes(cells, name, pattern) if "+" in name else None
                texts = []
                for i, d in enumerate(DOMAINS):
                    t = f"{r['eval'][d]['ppl']:.2f}"
                    if changes is not None:
                        ch = changes[i]
                        t += f" ({ch:+.1f} %{', worse' if ch > 0 else ''})"
                    texts.append(f"**{t}**" if name.endswith("(default)") else t)
                out.append(f"| {_label(name)} | {' | '.join(texts)} | {r['prune_s']:.0f} |")
    return "\n".join(out) + "\n"


def figure(rows: list[dict], path: Path, calib: str = "stdlib-docs") -> Path:
    """Perplexity vs pattern for every standard configuration, one panel per evaluation domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = canonical(rows, calib)
    dense = next((r for r in rows if r["config"] == "dense"), None)
    patterns = [p for p in PATTERN_ORDER if any(k[1] == p for k in cells)]
    if not patterns:
        raise SystemExit(f"no rows calibrated on {calib} in the rows file")
    colors = {"magnitude": "tab:gray", "wanda": "tab:blue", "sparsegpt": "tab:red"}
    styles = {"none": (":", "o"), "official": ("--", "s"), "default": ("-", "D")}
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(13, 4.8), sharey=True)
    for ax, dom in zip(axes, DOMAINS, strict=True):
        for name in STANDARD[1:]:
            init, _, preset, _ = CONFIGS[name]
            xs, ys = [], []
            for x, p in enumerate(patterns):
                r = cells.get((name, p))
                if r is not None:
                    xs.append(x)
                    ys.append(r["eval"][dom]["ppl"])
            if not xs:
                continue
            ls, mk = styles[preset or "none"]
            ax.plot(
                xs,
                ys,
                ls=ls,
                marker=mk,
                color=colors[init],
                label=_label(name),
                lw=2 if preset == "default" else 1,
            )
        if dense is not None:
            ax.axhline(dense["eval"][dom]["ppl"], color="black", lw=1, label="dense")
        ax.set_xticks(range(len(patterns)))
        ax.set_xticklabels([_short(p) for p in patterns])
        ax.set_yscale("log")
        ax.set_xlabel("sparsity pattern")
        where = "in-domain" if dom == calib else "other domain"
        ax.set_title(f"held-out {dom} ({where})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale, lower is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(f"SmolLM2-135M, calibrated on {calib} (32 x 256 tokens)")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ calibration draws (issue 16)


def spread(values: list[float]) -> dict:
    """``{"n", "mean", "std", "min", "max"}`` of ``values`` (floats); ``std`` is the sample
    standard deviation (divisor n-1), None for fewer than two values. Raises ``ValueError`` for
    an empty list."""
    if not values:
        raise ValueError("spread of no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def is_gain(st: dict) -> bool:
    """A change (in %, negative = better) counts as a gain only when measured on at least two
    draws, every draw improved (``max < 0``) and ``-mean > std``."""
    return st["n"] >= 2 and st["max"] < 0 and -st["mean"] > st["std"]


def draw_groups(rows: list[dict]) -> dict[tuple, dict[str, dict[int, dict]]]:
    """``{(calib, pattern, nsamples): {config: {draw: row}}}`` of the rows that carry a draw and
    evaluated successfully; a later row replaces an earlier one of the same cell."""
    out: dict = {}
    for r in rows:
        if r.get("draw") is None or r.get("status", "ok") != "ok" or not r.get("eval"):
            continue
        key = (r["calib"], r["pattern"], (r.get("calibration") or {}).get("nsamples"))
        out.setdefault(key, {}).setdefault(r["config"], {})[int(r["draw"])] = r
    return out


def paired_changes(by_draw: dict[int, dict], base: dict[int, dict], text: str) -> list[float]:
    """Per-draw change of perplexity on ``text`` against ``base`` of the SAME draw, in percent
    (``(ppl / ppl_base - 1) * 100``), for the draws both have, in draw order."""
    out = []
    for d in sorted(set(by_draw) & set(base)):
        a, b = by_draw[d]["eval"].get(text), base[d]["eval"].get(text)
        if a is not None and b is not None:
            out.append((a["ppl"] / b["ppl"] - 1) * 100)
    return out


def _ppl_cell(st: dict) -> str:
    if st["n"] == 1:
        return f"{st['mean']:.2f} (1 draw)"
    return f"{st['mean']:.2f} ± {st['std']:.2f} ({st['min']:.2f}..{st['max']:.2f})"


def _change_cell(st: dict) -> str:
    if st["n"] == 1:
        return f"{st['mean']:+.1f} % (1 draw)"
    t = f"{st['mean']:+.1f} ± {st['std']:.1f} % ({st['min']:+.1f}..{st['max']:+.1f})"
    return f"**{t} gain**" if is_gain(st) else t


def draws_markdown(rows: list[dict], base: str = "sparsegpt") -> str:
    """One table per (calibration domain, pattern, windows) with draws: rows = configurations,
    per evaluation text the perplexity mean ± std (min..max) over draws and the change against
    ``base`` (SparseGPT alone) as mean ± std (min..max) of the per-draw paired differences."""
    dense = next((r for r in rows if r["config"] == "dense"), None)
    out = []
    for (calib, pattern, nsamples), cells in draw_groups(rows).items():
        texts = [
            t for t in EVAL_TEXTS if any(t in r["eval"] for c in cells.values() for r in c.values())
        ]
        seqlen = next(iter(next(iter(cells.values())).values()))["calibration"].get("seqlen")
        draws = sorted({d for c in cells.values() for d in c})
        out.append(
            f"\n**{_pattern_label(pattern)}, calibrated on {DOMAIN_LABEL.get(calib, calib)} "
            f"({nsamples} x {seqlen} windows), draws {draws}**: perplexity mean ± std over draws "
            f"(min..max); change vs SparseGPT alone = mean ± std (min..max) of the per-draw paired "
            "differences; **gain** only if every draw improved and the mean exceeds the std.\n"
        )
        head = [f"ppl {DOMAIN_LABEL.get(t, t)}" for t in texts]
        head += [f"vs SparseGPT {DOMAIN_LABEL.get(t, t)}" for t in texts]
        out.append("| configuration | draws | " + " | ".join(head) + " |")
        out.append("|---|---|" + "---|" * len(head))
        if dense is not None:
            vals = [f"{dense['eval'][t]['ppl']:.2f}" if t in dense["eval"] else "—" for t in texts]
            out.append("| dense | — | " + " | ".join(vals + [""] * len(texts)) + " |")
        for name, by_draw in cells.items():
            ppl = []
            for t in texts:
                v = [r["eval"][t]["ppl"] for _, r in sorted(by_draw.items()) if t in r["eval"]]
                ppl.append(_ppl_cell(spread(v)) if v else "—")
            ch = []
            for t in texts:
                if name == base or base not in cells:
                    ch.append("")
                    continue
                v = paired_changes(by_draw, cells[base], t)
                ch.append(_change_cell(spread(v)) if v else "—")
            out.append(f"| {name} | {len(by_draw)} | " + " | ".join(ppl + ch) + " |")
    return "\n".join(out) + "\n"


@functools.cache
def _bench_pipeline():
    """benchmarks/bench_pipeline.py as a module, loaded once (its peer child is the one
    llm-compressor call)."""
    path = Path(__file__).resolve().with_name("bench_pipeline.py")
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peer_available(peer_python: str | None) -> tuple[bool, str]:
    """Whether the peer can run: ``peer_python`` given (checked when it runs), or llmcompressor
    importable in this interpreter; and the reason when not."""
    if peer_python:
        return True, ""
    if importlib.util.find_spec("llmcompressor") is not None:
        return True, ""
    return False, "llmcompressor is not importable here and no --peer-python was given"


def run_peer(
    method: str, ids: torch.Tensor, pattern: str, *, peer_python: str | None, threads, tmp: Path
) -> tuple[dict | None, dict]:
    """llm-compressor's ``method`` ("sparsegpt" or "wanda") on the windows ``ids`` [n, seqlen].

    Returns (the pruned state dict or None, info with ``status`` ok/skipped/failed, ``reason``,
    ``seconds`` and the peer's versions). The call itself is bench_pipeline's peer child.
    """
    from dsnt_export.embedded import embedded_model_dir
    from dsnt_export.patterns import parse_pattern

    try:
        bp = _bench_pipeline()
    except (OSError, ImportError) as e:
        return None, {"status": "skipped", "reason": f"benchmarks/bench_pipeline.py: {e}"}
    if method not in bp.PEER_MODIFIERS:
        return None, {"status": "skipped", "reason": f"no peer call for {method}"}
    torch.save(ids, tmp / "ids.pt")
    job = bp.peer_job(
        ids=str(tmp / "ids.pt"),
        model_path=str(embedded_model_dir()),
        pattern=parse_pattern(pattern),
        blocksize=SparsifyConfig.sparsegpt_blocksize,
        percdamp=SparsifyConfig.sparsegpt_percdamp,
        state_out=str(tmp / "peer_state.pt"),
        threads=threads,
        method=method,
    )
    job["config"] = f"llmcompressor-{method}"
    res = bp.run_child(peer_python or sys.executable, job, tmp, verbose=False, timeout=None)
    if res.get("status", "ok") != "ok":
        return None, res
    state = torch.load(job["state_out"], weights_only=True)
    return state, {"status": "ok", **{k: res.get(k) for k in ("seconds", "method", "peer")}}


def main(argv=None) -> int:
    """Prune and evaluate every requested configuration per draw, or print/draw from a rows file."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    known = [*CONFIGS, *PEERS]
    ap.add_argument("--patterns", default="2:4")
    ap.add_argument("--calib", default="stdlib-docs", help="comma list of calibration domains")
    ap.add_argument(
        "--configs",
        default=None,
        help=f"comma list of {known} (default: every configuration of CONFIGS, plus the peer "
        "when it can run)",
    )
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="calibration windows per block forward of our prunes (default: the default recipe's, 8)",
    )
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--draws", type=int, default=5, help="calibration draws: sampler seeds 0..K-1")
    ap.add_argument(
        "--first-draw", type=int, default=0, help="start at this seed (resume a run; default 0)"
    )
    ap.add_argument("--peer-python", default=None, help="interpreter with llmcompressor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/quality.jsonl")
    ap.add_argument(
        "--markdown", metavar="ROWS", help="only print the Markdown tables of a rows file"
    )
    ap.add_argument(
        "--figure",
        metavar="PNG",
        help="only draw perplexity vs pattern from the rows in --out (no pruning)",
    )
    args = ap.parse_args(argv)
    if args.batch_size is None:
        from dsnt_export.recipe import Recipe

        args.batch_size = Recipe.preset("default").batch_size
    batch_size = args.batch_size
    if batch_size < 1:
        ap.error(f"--batch-size must be a positive int, got {batch_size}")
    if args.figure:
        rows = [json.loads(x) for x in Path(args.out).read_text().splitlines() if x.strip()]
        print(f"wrote {figure(rows, Path(args.figure))}")
        return 0
    if args.markdown:
        rows = [
            json.loads(line)
            for line in Path(args.markdown).read_text().splitlines()
            if line.strip()
        ]
        print(summary_markdown(rows))
        print(markdown(rows))
        if any(r.get("draw") is not None for r in rows):
            print(draws_markdown(rows))
        return 0
    if args.draws < 1 or args.first_draw < 0:
        ap.error(f"--draws must be >= 1 and --first-draw >= 0, got {args.draws}, {args.first_draw}")
    peer_ok, peer_why = peer_available(args.peer_python)
    if args.configs is None:
        names = list(CONFIGS) + (list(PEERS) if peer_ok else [])
        if not peer_ok:
            print(f"peer skipped: {peer_why}", flush=True)
    else:
        names = args.configs.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {known}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from dsnt_export.data import get_calibration, get_eval_tokens

    dense_model, tok = load_embedded()
    evals = {
        d: get_eval_tokens(d, tok, max_tokens=args.eval_windows * args.seqlen) for d in EVAL_TEXTS
    }

    def evaluate(model) -> dict:
        res = {}
        for d, (ids, desc) in evals.items():
            r = perplexity(model, ids, args.seqlen, batch_size=8, progress=False, dataset=desc)
            res[d] = {"domain": d, "ppl": r.ppl, "n_tokens_scored": r.n_tokens_scored}
        return res

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(row):
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            json.dumps({k: row.get(k) for k in ("config", "pattern", "calib", "draw")}),
            {d: round(v["ppl"], 2) for d, v in (row.get("eval") or {}).items()},
            f"{row['prune_s']:.0f}s",
            row.get("reason") or "",
            flush=True,
        )

    if "dense" in names:
        emit(
            dict(
                config="dense", pattern="dense", calib=None, prune_s=0.0, eval=evaluate(dense_model)
            )
        )
    for calib in args.calib.split(","):
        for draw in range(args.first_draw, args.first_draw + args.draws):
            ids, cdesc = get_calibration(calib, tok, args.nsamples, args.seqlen, seed=draw)
            for pattern in args.patterns.split(","):
                for name in names:
                    common = dict(
                        config=name,
                        pattern=pattern,
                        calib=calib,
                        draw=draw,
                        calibration=cdesc,
                        torch=torch.__version__,
                        threads=torch.get_num_threads(),
                        batch_size=None if name in PEERS else batch_size,
                    )
                    if name in PEERS:
                        t0 = time.perf_counter()
                        with tempfile.TemporaryDirectory(prefix="quality-peer-") as tmp:
                            state, info = run_peer(
                                PEERS[name],
                                ids,
                                pattern,
                                peer_python=args.peer_python,
                                threads=args.threads,
                                tmp=Path(tmp),
                            )
                        prune_s = time.perf_counter() - t0
                        row = dict(common, prune_s=info.get("seconds") or prune_s, peer=info)
                        row["status"], row["reason"] = info.get("status"), info.get("reason")
                        if state is not None:
                            model = copy.deepcopy(dense_model)
                            model.load_state_dict(state, strict=False)
                            row["eval"] = evaluate(model)
                            del model
                        emit(row)
                        continue
                    if CONFIGS.get(name, ()) is None:
                        continue
                    init, _, preset, refine_exclude = CONFIGS[name]
                    refiner = PRESETS[preset]() if preset else None
                    cfg = SparsifyConfig(
                        pattern=pattern,
                        init=init,
                        refine=refiner if refiner is not None else "none",
                        refine_exclude=refine_exclude,
                        batch_size=batch_size,
                    )
                    model = copy.deepcopy(dense_model)
                    t0 = time.perf_counter()
                    rep = sparsify(model, ids, cfg, device="cpu", progress=False)
                    prune_s = time.perf_counter() - t0
                    emit(
                        dict(
                            common,
                            prune_s=prune_s,
                            sparsify=rep.summary(),
                            refine=cfg.refine,
                            refine_config=cfg.to_json()["refine_config"],
                            refine_exclude=list(refine_exclude),
                            eval=evaluate(model),
                        )
                    )
                    del model
    print(markdown(rows))
    print(draws_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
