"""``dsnt-export bench``: perplexity and latency of an artifact on a runtime, dense vs sparse.

    dsnt-export bench DIR --runtime torch|onnxruntime|tensorrt|vllm [--device cpu|cuda]
        [--ppl] [--latency] [--dense DIR2] [--prompt-lengths 128,256] [--batch-sizes 1,4]
        [--decode-tokens 32] [--repeats 5] [--warmup 1] [--max-windows 64|all] [--out rows.jsonl]

DIR is an artifact directory (HF checkpoint for torch/vllm, ONNX export for onnxruntime, TensorRT
engines for tensorrt) or a run directory holding them. Rows are appended to ``--out`` as they
are measured (default ``RUN/bench/rows.jsonl``: the run directory DIR, or the directory holding
the artifact DIR, so an artifact's own files never change); a runtime or device that is absent gives rows with
status "skipped" and the reason. Exit code 0 if every row is ok or skipped, 1 if any failed.

Defaults depend on the device (:func:`dsnt_export.bench.default_grid`). On the CPU: perplexity on
the first 64 windows x 256 tokens (the windows ``dsnt-export run`` evaluates), latency at batch
1 and 4 x prompt 128 and 256, 32 decode steps, median of 5 after 1 warm-up: a few minutes on 2
cores for the embedded SmolLM2-135M run. On an accelerator: every window, batch 1,4,16 x prompt
128,512,2048, 64 decode steps, median of 10 after 2 warm-ups. The flags select bigger grids.
The work is printed before anything runs; progress bars follow (``--no-progress`` hides them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` flags (``--runtime`` choices come from the runtime registry)."""
    p.add_argument("dir", metavar="DIR", help="artifact or run directory")
    from dsnt_export.bench import ACCELERATOR_GRID, CPU_GRID
    from dsnt_export.runtimes import runtime_names

    p.add_argument(
        "--runtime", required=True, choices=runtime_names(), help="runtime (registered ones)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="compute dtype (auto: float32 on CPU, the checkpoint's 16-bit dtype on an "
        "accelerator; ORT: the graphs of that dtype; rows record the dtype used)",
    )
    p.add_argument("--ppl", action="store_true", help="measure perplexity")
    p.add_argument(
        "--latency",
        action="store_true",
        help="measure prefill/decode latency (default when --ppl is not given)",
    )
    p.add_argument(
        "--dense",
        metavar="DIR2",
        help="dense reference (default: the source model named in the manifest)",
    )
    cpu, acc = CPU_GRID, ACCELERATOR_GRID
    p.add_argument(
        "--prompt-lengths",
        default=None,
        help=f"comma list (default: {_csv(cpu['prompt_lengths'])} on CPU, "
        f"{_csv(acc['prompt_lengths'])} on an accelerator; e.g. 32,128,512 for a bigger grid)",
    )
    p.add_argument(
        "--batch-sizes",
        default=None,
        help=f"comma list (default: {_csv(cpu['batch_sizes'])} on CPU, "
        f"{_csv(acc['batch_sizes'])} on an accelerator)",
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help=f"decode steps timed (default: {cpu['decode_tokens']} on CPU, "
        f"{acc['decode_tokens']} on an accelerator)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per point, median reported (default: {cpu['repeats']} on CPU, "
        f"{acc['repeats']} on an accelerator)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed warm-up runs per point (default: {cpu['warmup']} on CPU, "
        f"{acc['warmup']} on an accelerator)",
    )
    p.add_argument("--data", default="stdlib-docs", help="perplexity text (default stdlib-docs)")
    p.add_argument("--seqlen", type=int, default=256, help="perplexity window (default 256)")
    p.add_argument(
        "--max-windows",
        type=_windows,
        default="auto",
        metavar="N|all",
        help=f"score only the first N perplexity windows, or 'all' (default: {cpu['max_windows']} "
        "on CPU, the windows `dsnt-export run` evaluates; all on an accelerator)",
    )
    p.add_argument(
        "--no-sparse-kernels",
        action="store_true",
        help="torch on CUDA: do not try the 2:4 semi-structured kernels",
    )
    p.add_argument(
        "--semi-backend",
        default="auto",
        choices=("auto", "cusparselt", "cutlass"),
        help="2:4 kernel backend for torch on CUDA (default: cuSPARSELt if present)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch, ONNX Runtime and vLLM's CPU engine; default: the runtime's own)",
    )
    p.add_argument("--out", default=None, help="JSON-lines file the rows are appended to")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _csv(xs) -> str:
    return ",".join(str(x) for x in xs)


def _windows(v: str) -> int | str | None:
    """``--max-windows``: N, ``all`` (None) or ``auto`` (the device's default)."""
    if v.strip().lower() in ("all", "auto"):
        return None if v.strip().lower() == "all" else "auto"
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'all', got {v!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {v!r}")
    return n


def default_rows_path(d: str) -> Path:
    """``RUN/bench/rows.jsonl``: beside an artifact (never inside it: that would change the
    artifact's files), or inside a run directory that holds artifacts."""
    from dsnt_export.artifacts import MANIFEST_NAME

    p = Path(d)
    base = p.parent if (p / MANIFEST_NAME).is_file() else p
    return base / "bench" / "rows.jsonl"


def _fmt(row: dict) -> str:
    v = row.get("variant", "-")
    head = f"{row['runtime']:<11} {v:<14} {row.get('backend', ''):<24}"
    if row["status"] != "ok":
        what = " ".join(str(row[k]) for k in ("bench", "phase") if row.get(k))
        return f"{head} {what}: {row['status']}: {row.get('reason')}"
    if row["bench"] == "perplexity":
        return f"{head} perplexity {row['ppl']:.4f} ({row['n_windows']} x {row['seqlen']} tok)"
    if row["bench"] == "latency":
        what = "prefill" if row["phase"] == "prefill" else f"decode x{row['decode_tokens']}"
        if row.get("prefill_note"):
            what += "*"  # not a KV-cache prefill: the row's prefill_note says how it was timed
        unit = "ms" if row["phase"] == "prefill" else "ms/tok"
        mem = row.get("peak_mem_bytes")
        mem_s = f", peak {mem / 2**20:.0f} MiB" if mem else ""
        return (
            f"{head} b={row['batch_size']:<3} L={row['prompt_len']:<5} {what:<11} "
            f"{row['latency_ms']:9.2f} {unit:<6} {row['tokens_per_s'] or 0:10.1f} tok/s"
            f"{mem_s}"
        )
    if row["bench"] == "conversion":
        return (
            f"{head} 2:4 kernels on {row['n_converted']} linears, {row['n_fallback']} kept "
            f"dense; logits max |diff| {row['logits_max_abs_diff']:.3g}"
        )
    return f"{head} {row['bench']}"


def run(args: argparse.Namespace) -> int:
    """Run the bench the flags describe; exit code 1 if any row failed, else 0."""
    from dsnt_export.bench import BenchOptions, run_bench
    from dsnt_export.bench.timing import append_rows

    opts = BenchOptions(
        runtime=args.runtime,
        device=args.device,
        dtype=args.dtype,
        ppl=args.ppl,
        latency=args.latency or not args.ppl,
        dense=args.dense,
        prompt_lengths=args.prompt_lengths,
        batch_sizes=args.batch_sizes,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        ppl_data=args.data,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        sparse_kernels=not args.no_sparse_kernels,
        semi_backend=args.semi_backend,
        threads=args.threads,
        progress=not args.no_progress,
    )
    out = Path(args.out) if args.out else default_rows_path(args.dir)

    def sink(row: dict) -> None:
        append_rows(out, [row])
        print(_fmt(row), flush=True)

    rows = run_bench(args.dir, opts, sink=sink)
    failed = sum(r["status"] == "failed" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    print(
        f"{len(rows)} rows appended to {out} ({failed} failed, {skipped} skipped)", file=sys.stderr
    )
    return 1 if failed else 0
