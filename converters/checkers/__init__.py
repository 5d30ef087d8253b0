"""``dsnt-export check``: re-validate an artifact from its stored tensors, against its manifest.

Artifact kinds: a Hugging Face checkpoint directory (``hf``), a single ``.safetensors`` file
(``safetensors``), an ONNX file or export directory (``onnx``), a TensorRT sparsity report (JSON) or
engine directory (``tensorrt``). For each the pattern is re-derived from the tensors themselves,
compared with the manifest (pattern, per-tensor shape and sparsity, file sha256) and, for
checkpoints, the config is checked against current vLLM's contract. See
:mod:`converters.checkers.report` for the findings and exit codes.

This package is the dispatcher: :data:`CHECKERS` maps each kind to its checker, :func:`detect_kind`
tells the kind of a path and :func:`check_path` runs the right checker. Imports go one way:
dispatcher -> a kind's module (:mod:`.hf`, :mod:`.onnx`, :mod:`.tensorrt`) -> shared helpers
(:mod:`.common`, :mod:`.report`); no kind imports this package's dispatcher back. Adding a kind
is one module with a ``check_<kind>(path, *, pattern, **opts) -> CheckReport`` and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from converters.checkers.hf import check_hf_dir, check_safetensors_file
from converters.checkers.onnx import check_onnx
from converters.checkers.report import UNREADABLE, CheckReport
from converters.checkers.tensorrt import check_tensorrt
from converters.common.source import CONFIG_NAME, INDEX_NAME
from dsnt_export.artifacts import onnx_graphs_in, read_manifest
from dsnt_export.errors import ArtifactError, UserInputError
from dsnt_export.patterns import parse_pattern

__all__ = ["CHECKERS", "Checker", "check_path", "detect_kind", "get_checker"]

#: a checker: ``(path, *, pattern=None, **kind-specific options) -> CheckReport``
Checker = Callable[..., CheckReport]

#: artifact kind -> its checker (the kinds :func:`detect_kind` can return, ``"unknown"`` aside)
CHECKERS: dict[str, Checker] = {
    "hf": check_hf_dir,
    "safetensors": check_safetensors_file,
    "onnx": check_onnx,
    "tensorrt": check_tensorrt,
}

#: kinds a manifest's ``kind`` may name for a directory
_MANIFEST_KINDS = ("hf", "onnx", "tensorrt")


def get_checker(kind: str) -> Checker:
    """The checker of an artifact kind.

    Raises:
        UserInputError: ``kind`` is not in :data:`CHECKERS`; the message lists the known kinds.
    """
    try:
        return CHECKERS[kind]
    except KeyError:
        raise UserInputError(
            f"no checker for artifact kind {kind!r}; known kinds: {', '.join(sorted(CHECKERS))}"
        ) from None


def detect_kind(path: Path) -> str:
    """The artifact kind of ``path`` (a key of :data:`CHECKERS`), or ``"unknown"``.

    A directory is the kind its manifest records; without a readable manifest, ``hf`` if it holds
    config.json, a safetensors index or ``*.safetensors``, ``onnx`` if it holds ``*.onnx`` graphs
    directly or one level below (:func:`dsnt_export.artifacts.onnx_graphs_in`).
    A file is told by its suffix (``.safetensors``, ``.onnx``, ``.json`` for a TensorRT report).
    """
    if path.is_dir():
        man = None
        try:
            man = read_manifest(path, required=False)
        except ArtifactError:
            pass
        if man is not None and man.get("kind") in _MANIFEST_KINDS:
            return man["kind"]
        if (
            (path / CONFIG_NAME).exists()
            or (path / INDEX_NAME).exists()
            or any(path.glob("*.safetensors"))
        ):
            return "hf"
        if onnx_graphs_in(path):
            return "onnx"
        return "unknown"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".json":
        return "tensorrt"
    return "unknown"


def check_path(
    path: str | Path, *, pattern: str | None = None, require_sparse_tactics: bool = False
) -> CheckReport:
    """Detect the artifact kind of ``path`` and check it with that kind's checker.

    ``pattern``: the expected pattern (default: the manifest's, else 2:4);
    ``require_sparse_tactics``: TensorRT only, fail unless a sparse tactic was picked.
    A missing path or an unknown kind is an ``unreadable`` finding (exit 2), not an exception.

    Raises:
        PatternError: ``pattern`` is not a valid pattern string.
    """
    p = Path(path)
    if not p.exists():
        r = CheckReport(str(p), "unknown")
        r.add(UNREADABLE, "not-found", str(p), "no such file or directory")
        return r
    if pattern is not None:
        parse_pattern(pattern)  # bad pattern strings fail fast (exit 2)
    kind = detect_kind(p)
    if kind not in CHECKERS:
        r = CheckReport(str(p), "unknown")
        r.add(
            UNREADABLE,
            "unknown-kind",
            str(p),
            "not an artifact this tool knows: expected a checkpoint dir (config.json + "
            "safetensors), a .safetensors file, an ONNX file/dir, or a TensorRT report .json",
        )
        return r
    opts = {"require_sparse_tactics": require_sparse_tactics} if kind == "tensorrt" else {}
    return get_checker(kind)(p, pattern=pattern, **opts)
