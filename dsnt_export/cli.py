"""The ``dsnt-export`` command line. Each subcommand lives in ``dsnt_export/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used.

Exit codes (all subcommands): 0 success, 1 check failed / violation found, 2 bad input or unreadable
artifact (the message says what was received, what was expected and how to fix it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dsnt_export import __version__
from dsnt_export.errors import DsntError, UserInputError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "run",
        "whole pipeline: prune, validate, evaluate, export, report (no args = embedded default)",
    ),
    "prune": ("prune", "sparsify a Hugging Face causal LM block by block (initial mask + DSnoT)"),
    "eval": ("eval", "perplexity of a checkpoint directory"),
    "check": ("check", "CI gate: re-validate an artifact's sparsity pattern and metadata"),
    "export": ("export", "export a sparse checkpoint to hf/vllm, onnx or tensorrt"),
    "bench": ("bench", "latency and perplexity of an artifact on a runtime"),
    "report": ("report", "(re)write the run report (JSON, Markdown, figures) of a run directory"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    try:
        return importlib.import_module(f"dsnt_export.commands.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"dsnt_export.commands.{module}":
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsnt-export",
        description="DSnoT N:M sparsification of LLMs, mask checks, runtime export and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"dsnt-export {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if only is None or only == name:
            mod = _load(name)
            if mod is not None:
                mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        args = parser.parse_args(["run", *argv])
    mod = _load(args.command)
    if mod is None:
        print(f"dsnt-export {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(mod.run(args) or 0)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DsntError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
