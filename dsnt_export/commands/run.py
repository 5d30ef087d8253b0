"""``dsnt-export run``: the whole pipeline. With no arguments: the embedded SmolLM2-135M model, 2:4,
the default recipe.

    dsnt-export run [--model M] [--recipe R.yaml] [--out DIR] [any prune flag]

Flag parsing and printing only: the stages (load -> dense perplexity -> prune -> save OUT/hf ->
re-validate -> eager reference outputs -> sparse perplexity -> ONNX export -> check -> OUT/report)
are :data:`dsnt_export.workflow.STAGES`, run by :func:`dsnt_export.workflow.run_recipe`.
``--out-of-core`` (a recipe flag shared with ``prune``) streams the prune block by block from the
checkpoint; the later stages load the saved checkpoint as usual (docs/architecture.md).
"""

from __future__ import annotations

import argparse

from dsnt_export.commands.prune import add_recipe_arguments, recipe_default, recipe_from_args
from dsnt_export.recipe import method_label
from dsnt_export.workflow import ONNX_LEVELS, RunSummary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``run``'s flags: the recipe flags plus output, evaluation and ONNX export options."""
    add_recipe_arguments(p)
    p.add_argument("--out", help="output directory (default: runs/run-<UTC timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    d = recipe_default
    p.add_argument(
        "--eval",
        help="perplexity data: stdlib-docs, stdlib-code, wikitext2, file:PATH" + d("eval"),
    )
    p.add_argument(
        "--eval-seqlen", type=int, help="perplexity window length (tokens)" + d("eval_seqlen")
    )
    p.add_argument(
        "--eval-max-windows",
        type=int,
        help="score only the first N windows" + d("eval_max_windows"),
    )
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument(
        "--onnx",
        choices=tuple(ONNX_LEVELS),
        default=None,
        help="ONNX export of OUT/hf into OUT/onnx, with ONNX Runtime parity: fp32 (default) = the "
        "float32 logits graph (~2 min for the embedded model on 2 CPU cores); full = also the fp16 "
        "logits graph for TensorRT and the prefill/decode KV-cache graphs (~7 min); none",
    )
    p.add_argument("--export-onnx", action="store_true", help="same as --onnx full")
    p.add_argument(
        "--tasks",
        help="also zero-shot accuracy through lm-eval, dense vs sparse, into OUT/eval: "
        "comma-separated lm-eval tasks or dsnot-paper (needs the lm-eval extra)",
    )
    p.add_argument("--tasks-limit", type=float, help="zero-shot: first N documents per task")
    p.add_argument("--task-dir", help="zero-shot: directory of extra (local) lm-eval task YAML")
    p.add_argument("--no-export", action="store_true", help="same as --onnx none")


def onnx_level(args: argparse.Namespace) -> str:
    """The ONNX level of the flags: ``--no-export`` > ``--export-onnx`` > ``--onnx`` > ``fp32``."""
    if args.no_export:
        return "none"
    if args.export_onnx:
        return "full"
    return args.onnx or "fp32"


def run(args: argparse.Namespace) -> int:
    """``dsnt-export run``: :func:`~dsnt_export.workflow.run_recipe` with the flags, then the
    summary lines; exit code 1 when a saved mask or a ``check`` of an artifact failed."""
    from dsnt_export.embedded import EMBEDDED_MODEL_ID
    from dsnt_export.workflow import default_run_dir, run_recipe

    recipe = recipe_from_args(args)
    out = args.out or default_run_dir()
    # one line before the first progress bar: what is about to run, on what, and where it goes
    print(
        f"dsnt-export run: {recipe.model or EMBEDDED_MODEL_ID}, {recipe.pattern} "
        f"{method_label(recipe.init, recipe.refine)} (recipe {recipe.name}), calibration "
        f"{recipe.calib} -> {out}",
        flush=True,
    )
    summary = run_recipe(
        recipe,
        out,
        onnx=onnx_level(args),
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    for w in summary.warnings:
        print(f"warning: {w}")
    for line in summary_lines(summary):
        print(line)
    if args.tasks:
        from pathlib import Path

        from dsnt_export.evaluation import zero_shot

        lim = args.tasks_limit
        rows = zero_shot.evaluate_dir(
            summary.out,
            args.tasks,
            device=args.device or "auto",
            limit=lim if lim is None or lim < 1 else int(lim),
            task_dir=args.task_dir,
        )
        path, _ = zero_shot.write_outputs(rows, Path(summary.out) / "eval")
        print(zero_shot.format_table(rows) + f"\n  zero-shot rows and figures in {path.parent}")
        from dsnt_export.report import write_run_report

        write_run_report(summary.out)  # the report, written before, now with the zero-shot table
    return 0 if summary.ok else 1


def summary_lines(summary: RunSummary) -> list[str]:
    """The lines ``dsnt-export run`` prints: model and recipe, pruning and mask check, perplexity,
    ONNX export, ``check`` verdicts, total time and where the output is."""
    r, sp, ppl = summary.recipe, summary.sparsify, summary.perplexity
    ex = summary.exports
    prune_s = summary.timings.get("prune")
    lines = [
        f"dsnt-export run: {summary.source_model['id']} -> {r['pattern']} "
        f"({method_label(r['init'], r['refine'])}, recipe {r['name']})",
        f"  pruned {sp['n_linears']} linears, sparsity {sp['sparsity']:.4f}, "
        f"mask check {'OK' if summary.validation['ok'] else 'FAILED'}"
        + (f", prune {prune_s:.0f} s" if prune_s is not None else ""),
    ]
    if ppl:
        lines.append(
            f"  perplexity on {ppl['dataset']} ({ppl['n_windows']} x {ppl['seqlen']} tokens): "
            f"dense {ppl['dense']:.2f} -> sparse {ppl['sparse']:.2f}"
        )
    onnx = ex.get("onnx", {})
    if "error" in onnx:
        lines.append(f"  ONNX export FAILED: {onnx['error']}")
    elif "skipped" not in onnx and onnx:
        rows = onnx.get("parity", {}).values()
        worst = max((p.get("rel_diff", 0.0) for p in rows if "rel_diff" in p), default=None)
        within = f", perplexity within {worst:.1e} of torch" if worst is not None else ""
        lines.append(
            f"  ONNX ({onnx.get('level')}): {len(onnx.get('files', []))} files, parity OK{within}"
        )
    checks = ex.get("check", {})
    verdict = ", ".join(f"{k} {'OK' if c['ok'] else 'FAILED'}" for k, c in checks.items())
    written = "".join(f"{k}/, " for k in checks)
    lines.append(f"  dsnt-export check: {verdict}")
    lines.append(
        f"  total {summary.timings['total']:.0f} s; output in {summary.out} "
        f"({written}report/summary.md)"
    )
    return lines
