"""``dsnt-export check PATH``: the CI gate for sparse artifacts.

Re-derives the sparsity pattern from the stored tensors of PATH (a Hugging Face checkpoint
directory, a single .safetensors file, an ONNX file or export directory, a TensorRT report JSON or
engine directory), compares it with the artifact's manifest (pattern, per-tensor shape and
sparsity, file sha256) and checks the config against current vLLM's contract (no
sparsity_config, known architecture).

Exit codes: 0 every check holds; 1 a violation (pattern broken, tensor missing or transposed,
sparsity/hash differing from the manifest, config vLLM refuses); 2 unreadable or bad input
(path missing, not an artifact, truncated or corrupt file, bad --pattern).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``check``'s arguments (PATH, --pattern, --json, --junit, --require-sparse-tactics) to
    its sub-parser, whose description becomes this module's docstring."""
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "path",
        help="artifact: checkpoint dir, .safetensors, .onnx or ONNX dir, "
        "TensorRT report .json or engine dir",
    )
    parser.add_argument(
        "--pattern",
        default=None,
        help="expected pattern, e.g. 2:4 (default: the manifest's; 2:4 if none)",
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument(
        "--junit",
        metavar="FILE",
        default=None,
        help="also write a JUnit XML report (one testcase per tensor/subject)",
    )
    parser.add_argument(
        "--require-sparse-tactics",
        action="store_true",
        help="TensorRT: fail unless the engine picked sparse tactics for a layer",
    )


def run(args: argparse.Namespace) -> int:
    """Check the artifact at ``args.path`` (:func:`converters.checkers.check_path`); print the
    summary (stdout, also for violations; stderr when the artifact could not be read) or the
    JSON report, write the JUnit XML if asked. Returns the report's exit code: 0 every check
    holds, 1 a violation, 2 unreadable or bad input; a UserInputError raised on the way is exit
    code 2 in the CLI."""
    from converters.checkers import check_path

    report = check_path(
        args.path, pattern=args.pattern, require_sparse_tactics=args.require_sparse_tactics
    )
    if args.junit:
        report.write_junit(args.junit)
    if args.json:
        print(report.dumps())
    else:
        # a verdict is the command's output (stdout, also when it fails: `check X > log`);
        # an artifact it could not read at all is an input error (stderr, exit code 2)
        out = sys.stderr if report.unreadable else sys.stdout
        print("\n".join(report.summary_lines()), file=out)
    return report.exit_code
