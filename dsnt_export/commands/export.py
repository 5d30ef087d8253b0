"""``dsnt-export export {hf,onnx,tensorrt} SRC --out DIR``: write a runtime artifact.

Every export re-validates the sparsity pattern in the written files and checks parity against
eager PyTorch before the output directory appears; on any failure nothing is left behind.

Targets:
  hf        plain Hugging Face checkpoint for current vLLM (no sparsity_config; sidecar manifest),
            or --format sparse-24-bitmask for vLLM <= 0.18 on Hopper
  onnx      float32/ (ONNX Runtime) and float16/ (TensorRT) graphs: model.onnx (logits) and
            prefill.onnx + decode.onnx (KV cache)
  tensorrt  sparse (SPARSE_WEIGHTS) and dense engines from the FP16 ONNX, with the report of
            which layers TensorRT made sparse (needs tensorrt + a CUDA GPU)

SRC is a sparse checkpoint directory (dsnt-export prune) or, for tensorrt, an ONNX export.
Every option that shapes the artifact (ONNX --opset and --dtypes, HF --format, --dtype and
--max-shard-size) is read back from the written files and recorded in dsnt_manifest.json as
extra.export.options {option: {requested, written}}; an --opset the graph cannot be converted to
is refused with the reason.
Exit codes: 0 written; 1 parity/mask failure, an option not honoured, or missing runtime;
2 bad input (including an --opset that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import sys


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v for v in (s.strip() for s in value.split(",")) if v and v != "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one sub-parser per registered converter (``hf``, ``onnx``, ``tensorrt``, ...) with the
    common arguments (SRC, --out, --overwrite, --no-parity, --json) and that target's own options
    (``_add_<target>``)."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    from converters import converter_names

    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name in converter_names():  # the targets are the converter registry's
        p = sub.add_parser(name, help=_HELP.get(name, f"{name} artifact"))
        p.add_argument("src", help="sparse checkpoint dir (or an ONNX export for tensorrt)")
        p.add_argument("--out", required=True, help="output directory (must not exist)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument(
            "--no-parity",
            action="store_true",
            help="skip the parity run against eager torch (masks are still checked)",
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        add_options = getattr(sys.modules[__name__], f"_add_{name}", None)
        if add_options is not None:
            add_options(p)


_HELP = {
    "hf": "HF checkpoint for vLLM",
    "onnx": "ONNX graphs",
    "tensorrt": "TensorRT engines + sparse-layer report",
}


def _add_hf(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default="plain",
        choices=("plain", "sparse-24-bitmask"),
        help="plain (default, current vLLM) or the legacy compressed-tensors layout",
    )
    p.add_argument("--max-shard-size", default="5GB", help="shard above this size (default 5GB)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="cast floating weights (default: keep the stored dtype)",
    )
    p.add_argument(
        "--allow-unknown-architecture",
        action="store_true",
        help="export even if vLLM does not know config.architectures",
    )


def _add_onnx(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtypes",
        type=_csv,
        default=("float32", "float16"),
        help="comma list of graph dtypes (default float32,float16)",
    )
    p.add_argument(
        "--generation-dtypes",
        type=_csv,
        default=("float32",),
        help="dtypes that also get prefill/decode KV-cache graphs (default float32; "
        "'none' for no KV-cache graphs)",
    )
    p.add_argument(
        "--exporter",
        default="torch",
        choices=("torch", "transformers"),
        help="exporter of the logits graph (default: torch.onnx dynamo)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset of every graph (default: the exporter's, 18 with torch 2.x); converted "
        "with onnx's version converter and re-checked, or refused when it cannot be",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (one step per traced graph)",
    )
    p.add_argument(
        "--external-data-threshold",
        type=int,
        default=None,
        help="bytes of weights above which they go to <graph>.onnx.data",
    )


def _add_tensorrt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-seq", type=int, default=512)
    p.add_argument("--opt-seq", type=int, default=128)
    p.add_argument("--workspace-gib", type=float, default=8.0)
    p.add_argument("--device", default="cuda", help="device for the parity run (default cuda)")


_OPTS = {
    "hf": ("format", "max_shard_size", "dtype", "allow_unknown_architecture"),
    "onnx": (
        "dtypes",
        "generation_dtypes",
        "exporter",
        "opset",
        "external_data_threshold",
        "progress",
    ),
    "tensorrt": ("max_batch", "max_seq", "opt_seq", "workspace_gib", "device"),
}


def run(args: argparse.Namespace) -> int:
    """Export ``args.src`` to ``args.out`` with the converter of ``args.target`` and print what was
    written (mask re-checks, parity rows, options verified, warnings) or its JSON summary.

    Returns 0 once the artifact is written and checked. The converter raises instead: a mask or
    parity violation, an option not honoured or a missing runtime is exit code 1; bad input
    (missing SRC, existing --out without --overwrite, an --opset that cannot be written) exit code
    2.
    """
    from converters import get_converter

    opts = {k: getattr(args, k) for k in _OPTS.get(args.target, ()) if getattr(args, k) is not None}
    result = get_converter(args.target).export(
        args.src, args.out, overwrite=args.overwrite, check_parity=not args.no_parity, **opts
    )
    if args.json:
        print(json.dumps(result.summary(), indent=2, default=str))
        return 0
    print(f"wrote {args.target} artifact {result.out_dir} ({len(result.files)} files)")
    bad = [k for k, r in result.mask_checks.items() if not r.get("ok")]
    print(
        f"  pattern re-checked in the written files: {len(result.mask_checks)} tensors, "
        f"{len(bad)} failed"
    )
    for name, row in result.parity.items():
        if "rel_diff" in row:
            print(
                f"  parity {name}: ppl {row['ppl_runtime']:.4f} vs torch {row['ppl_torch']:.4f} "
                f"(rel diff {row['rel_diff']:.2e}, bound {row['bound']:.0e})"
            )
        else:
            print(
                f"  parity {name}: max |diff| {row['max_abs_diff']:.3e} (bound {row['bound']:.2e})"
            )
    options = result.manifest.get("extra", {}).get("export", {}).get("options", {})
    asked = [f"{k} {r['requested']}" for k, r in options.items() if r["requested"] is not None]
    if asked:
        print(f"  options verified in the written files: {', '.join(asked)}")
    for w in result.warnings:
        print(f"  warning: {w}")
    for n in result.notes:
        print(f"  note: {n}")
    return 0
