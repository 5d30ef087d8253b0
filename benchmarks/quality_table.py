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
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from dsnt_export.evaluation.perplexity import perplexity
from dsnt_export.refine import DSnoTConfig, HessianSwapConfig
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
PRESETS = {
    "official": DSnoTConfig.official,
    "default": HessianSwapConfig,
    # DSnoT's own (mean-based) criterion with our sign check and loss guard
    "mean": DSnoTConfig.guarded,
}
# the hessian-swap refiner's dampening (HessianSwapConfig.percdamp), swept to choose the default
DAMPS = (0.01, 0.03, 0.1, 0.3)
for _damp in DAMPS:
    PRESETS[f"default percdamp={_damp}"] = lambda d=_damp: HessianSwapConfig(percdamp=d)
for _init in ("magnitude", "wanda", "sparsegpt"):
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


STANDARD = [c for c in CONFIGS if "percdamp" not in c and "(mean)" not in c]
PATTERN_ORDER = ("2:4", "4:8", "0.5", "0.6", "0.7")


def canonical(rows: list[dict], calib: str, nsamples: int = 32) -> dict[tuple[str, str], dict]:
    """``{(config, pattern): row}`` of the standard configurations calibrated on ``calib``.

    A sweep row whose dampening is the default's counts as ``+dsnot(default)``; a later row
    replaces an earlier one of the same cell.
    """
    damp = HessianSwapConfig().percdamp
    out = {}
    for r in rows:
        if r.get("calib") != calib or (r.get("calibration") or {}).get("nsamples") != nsamples:
            continue
        name = r["config"]
        if name.endswith(f"+dsnot(default percdamp={damp})"):
            name = name.split("+", 1)[0] + "+dsnot(default)"
        if name in STANDARD:
            out[(name, r["pattern"])] = r
    return out


DOMAIN_LABEL = {"stdlib-docs": "docstrings", "stdlib-code": "code"}


def _label(name: str) -> str:
    init, _, rest = name.partition("+")
    if not rest:
        return init
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--patterns", default="2:4")
    ap.add_argument("--calib", default="stdlib-docs", help="comma list of calibration domains")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/quality.jsonl")
    ap.add_argument(
        "--markdown", metavar="ROWS", help="only print the Markdown table of a rows file"
    )
    ap.add_argument(
        "--figure",
        metavar="PNG",
        help="only draw perplexity vs pattern from the rows in --out (no pruning)",
    )
    args = ap.parse_args(argv)
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
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from dsnt_export.data import get_calibration, get_eval_tokens

    dense_model, tok = load_embedded()
    evals = {
        d: get_eval_tokens(d, tok, max_tokens=args.eval_windows * args.seqlen) for d in DOMAINS
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
            json.dumps({k: row[k] for k in ("config", "pattern", "calib")}),
            {d: round(v["ppl"], 2) for d, v in row["eval"].items()},
            f"{row['prune_s']:.0f}s",
            flush=True,
        )

    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    if "dense" in names:
        emit(
            dict(
                config="dense", pattern="dense", calib=None, prune_s=0.0, eval=evaluate(dense_model)
            )
        )
    for calib in args.calib.split(","):
        ids, cdesc = get_calibration(calib, tok, args.nsamples, args.seqlen, seed=0)
        for pattern in args.patterns.split(","):
            for name in names:
                if CONFIGS.get(name) is None:
                    continue
                init, _, preset, refine_exclude = CONFIGS[name]
                refiner = PRESETS[preset]() if preset else None
                cfg = SparsifyConfig(
                    pattern=pattern,
                    init=init,
                    refine=refiner if refiner is not None else "none",
                    refine_exclude=refine_exclude,
                )
                model = copy.deepcopy(dense_model)
                t0 = time.perf_counter()
                rep = sparsify(model, ids, cfg, device="cpu", progress=False)
                prune_s = time.perf_counter() - t0
                emit(
                    dict(
                        config=name,
                        pattern=pattern,
                        calib=calib,
                        prune_s=prune_s,
                        calibration=cdesc,
                        sparsify=rep.summary(),
                        refine=cfg.refine,
                        refine_config=cfg.to_json()["refine_config"],
                        refine_exclude=list(refine_exclude),
                        eval=evaluate(model),
                        torch=torch.__version__,
                        threads=torch.get_num_threads(),
                    )
                )
                del model
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
