"""``dsnt-export run``: the whole pipeline. With no arguments: the embedded SmolLM2-135M model, 2:4,
the default recipe.

    dsnt-export run [--model M] [--recipe R.yaml] [--out DIR] [any prune flag]

Stages: load -> dense perplexity -> prune (calibrate + sparsify) -> save OUT/hf -> re-validate the
saved tensors -> eager reference outputs (hf/dsnt_reference.npz) -> sparse perplexity of the saved
checkpoint -> OUT/report (summary.json, summary.md).
Later stages (exports, benchmarks) register in ``EXTRA_STAGES``. OUT is written atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnt_export import workflow_exports as _run_exports
from dsnt_export.commands.prune import add_recipe_arguments, check_out_dir, recipe_from_args


@dataclass
class RunContext:
    """What the stages share; ``tmp`` is the (not yet renamed) output directory."""

    args: argparse.Namespace
    recipe: Any
    tmp: Path
    out: Path
    summary: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    loaded: Any = None
    result: Any = None
    eval_tokens: Any = None


# (name, stage) pairs run after the checkpoint is saved and evaluated, before the report is written.
# A stage reads ctx (ctx.tmp / "hf" is the checkpoint) and adds its results to ctx.summary.
EXTRA_STAGES: list[tuple[str, Callable[[RunContext], None]]] = []
_run_exports.register(EXTRA_STAGES)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--out", help="output directory (default: runs/run-<UTC timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--eval", help="perplexity data: stdlib-docs, stdlib-code, wikitext2, file:PATH")
    p.add_argument("--eval-seqlen", type=int, help="perplexity window length (tokens)")
    p.add_argument("--eval-max-windows", type=int, help="score only the first N windows")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument(
        "--onnx",
        choices=tuple(_run_exports.ONNX_LEVELS),
        default=None,
        help="ONNX export of OUT/hf into OUT/onnx, with ONNX Runtime parity: fp32 (default) = the "
        "float32 logits graph (~2 min for the embedded model on 2 CPU cores); full = also the fp16 "
        "logits graph for TensorRT and the prefill/decode KV-cache graphs (~7 min); none",
    )
    p.add_argument("--export-onnx", action="store_true", help="same as --onnx full")
    p.add_argument("--no-export", action="store_true", help="same as --onnx none")


def _timed(ctx: RunContext, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    ctx.timings[name] = round(time.perf_counter() - t0, 3)
    return out


def _perplexity(ctx: RunContext, model) -> Any:
    from dsnt_export.evaluation.perplexity import perplexity

    tokens, desc = ctx.eval_tokens
    dev = ctx.loaded[4]
    home = next(model.parameters()).device
    model.to(dev)
    try:
        return perplexity(
            model,
            tokens,
            ctx.recipe.eval_seqlen,
            device=dev,
            max_windows=ctx.recipe.eval_max_windows,
            batch_size=max(1, 2048 // ctx.recipe.eval_seqlen),
            progress=not ctx.args.no_progress,
            dataset=desc,
        )
    finally:
        model.to(home)


def stage_dense(ctx: RunContext) -> None:
    from dsnt_export.data import get_eval_tokens
    from dsnt_export.workflow import load_for_recipe

    ctx.loaded = _timed(ctx, "load", lambda: load_for_recipe(ctx.recipe))
    if ctx.recipe.eval is None or ctx.args.no_eval:
        return
    tok = ctx.loaded[3]
    ctx.eval_tokens = _timed(ctx, "eval_data", lambda: get_eval_tokens(ctx.recipe.eval, tok))
    ctx.summary["dense_ppl"] = _timed(ctx, "dense_ppl", lambda: _perplexity(ctx, ctx.loaded[2]))


def stage_prune_and_save(ctx: RunContext) -> None:
    from dsnt_export.report.run_summary import validate_checkpoint
    from dsnt_export.workflow import prune_recipe, write_checkpoint

    progress = not ctx.args.no_progress
    ctx.result = _timed(
        ctx, "prune", lambda: prune_recipe(ctx.recipe, progress=progress, loaded=ctx.loaded)
    )
    hf = ctx.tmp / "hf"
    hf.mkdir()
    ctx.summary["manifest"] = _timed(ctx, "save", lambda: write_checkpoint(ctx.result, hf))
    ctx.summary["validation"] = _timed(ctx, "validate", lambda: validate_checkpoint(hf))
    _timed(ctx, "reference_outputs", lambda: _save_reference_outputs(hf))


def _save_reference_outputs(hf: Path) -> None:
    """Eager float32 outputs of the saved checkpoint in ``hf/dsnt_reference.npz`` (as ``dsnt-export
    export hf`` writes), so ``pytest runtime_tests --artifact OUT/hf`` can check logits parity and
    perplexity of any runtime against them."""
    from converters.common.source import read_source
    from converters.reference import compute_reference, save_reference

    model = read_source(hf).load_model().float().eval()
    save_reference(hf, compute_reference(model))


def stage_sparse_eval(ctx: RunContext) -> None:
    if ctx.eval_tokens is None:
        return
    from dsnt_export.hf_io import load_model, resolve_dtype, source_dtype

    def run():
        cfg_dtype = resolve_dtype(ctx.recipe.dtype, ctx.loaded[4], source_dtype(ctx.loaded[1]))
        saved = load_model(str(ctx.tmp / "hf"), cfg_dtype)
        return _perplexity(ctx, saved)

    ctx.summary["sparse_ppl"] = _timed(ctx, "sparse_ppl", run)


def build_summary(ctx: RunContext) -> dict:
    res, rep = ctx.result, ctx.result.report
    dense, sparse = ctx.summary.get("dense_ppl"), ctx.summary.get("sparse_ppl")
    ppl = None
    if dense is not None and sparse is not None:
        ppl = {
            "dense": dense.ppl,
            "sparse": sparse.ppl,
            "dataset": dense.dataset.get("source"),
            "seqlen": dense.seqlen,
            "n_windows": dense.n_windows,
            "n_tokens_scored": dense.n_tokens_scored,
            "data": dense.dataset,
        }
    m = ctx.summary["manifest"]
    return {
        "source_model": res.source_model(),
        "recipe": res.recipe.to_dict(),
        "recipe_hash": m["recipe_hash"],
        "pattern": m["pattern"],
        "calibration": res.calibration,
        "sparsify": rep.summary(),
        "validation": ctx.summary["validation"],
        "perplexity": ppl,
        "exports": ctx.summary.get("exports", {}),
        "timings": ctx.timings,
        "layers": rep.layers,
        "skipped": rep.skipped,
    }


def run(args: argparse.Namespace) -> int:
    from dsnt_export.artifacts import atomic_output_dir
    from dsnt_export.report.run_summary import write_report

    recipe = recipe_from_args(args)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = check_out_dir(args.out or f"runs/run-{stamp}", args.overwrite)
    t0 = time.perf_counter()
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        ctx = RunContext(args=args, recipe=recipe, tmp=tmp, out=out)
        stage_dense(ctx)
        stage_prune_and_save(ctx)
        stage_sparse_eval(ctx)
        for name, stage in EXTRA_STAGES:
            _timed(ctx, name, lambda stage=stage: stage(ctx))
        ctx.timings["total"] = round(time.perf_counter() - t0, 3)
        summary = build_summary(ctx)
        write_report(tmp / "report", summary)
        from dsnt_export.report.collect import report_run_dir

        report_run_dir(tmp, name=out.name)  # report.json/.md + figures from every stage's rows
    _print_summary(summary, out)
    checks_ok = all(c.get("ok", True) for c in summary["exports"].get("check", {}).values())
    return 0 if summary["validation"]["ok"] and checks_ok else 1


def _print_summary(s: dict, out: Path) -> None:
    r, sp, ppl = s["recipe"], s["sparsify"], s["perplexity"]
    method = r["init"] + ("+dsnot" if r["refine"] == "dsnot" else "")
    print(
        f"dsnt-export run: {s['source_model']['id']} -> {r['pattern']} ({method}, recipe {r['name']})"
    )
    print(
        f"  pruned {sp['n_linears']} linears, sparsity {sp['sparsity']:.4f}, "
        f"mask check {'OK' if s['validation']['ok'] else 'FAILED'}"
    )
    if ppl:
        print(
            f"  perplexity on {ppl['dataset']} ({ppl['n_windows']} x {ppl['seqlen']} tokens): "
            f"dense {ppl['dense']:.2f} -> sparse {ppl['sparse']:.2f}"
        )
    onnx = s["exports"].get("onnx", {})
    if "error" in onnx:
        print(f"  ONNX export FAILED: {onnx['error']}")
    elif "skipped" not in onnx and onnx:
        rows = onnx.get("parity", {}).values()
        worst = max((r.get("rel_diff", 0.0) for r in rows if "rel_diff" in r), default=None)
        ppl = f", perplexity within {worst:.1e} of torch" if worst is not None else ""
        print(f"  ONNX ({onnx.get('level')}): {len(onnx.get('files', []))} files, parity OK{ppl}")
    checks = s["exports"].get("check", {})
    verdict = ", ".join(f"{k} {'OK' if c['ok'] else 'FAILED'}" for k, c in checks.items())
    written = "".join(f"{k}/, " for k in checks)
    print(f"  dsnt-export check: {verdict}")
    print(f"  total {s['timings']['total']:.0f} s; output in {out} ({written}report/summary.md)")
