"""Exporters to the target runtimes, behind one small contract.

Each converter has a ``name``, the pip ``extras`` it needs, a parity ``tolerance`` and
``export(src_dir, out_dir, **opts) -> ExportResult``. ``export`` writes into a temporary directory
beside ``out_dir`` and then, before renaming it into place:

1. re-validates the sparsity pattern *in the written artifact* (the tensors as stored, read back),
2. runs a parity check of the artifact against eager PyTorch, collecting every mismatch and
   raising :class:`~dsnt_export.errors.ParityError` with the per-output maximum difference,
3. writes the artifact's ``dsnt_manifest.json`` (with file hashes), where each writer has
   recorded every option that shapes the artifact as requested vs written, read back from the
   written files (:mod:`converters.common.options`; a difference raises before this step).

Layout by role: ``writers/`` (one module per target, registered here), ``checkers/`` (the
``{kind: checker}`` registry and the dispatcher behind ``dsnt-export check``), ``common/`` (what
both read and write: safetensors and ONNX graph I/O, the bitmask layout, vLLM's contract),
``parity`` / ``reference`` (the eager-torch comparison). Imports go one way: writers -> checkers
-> common, never back.

Any failure leaves no artifact behind. Converters register themselves with :func:`register` in
their own module; :data:`MODULES` lists those modules (no package walking).
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from converters.parity import ParityCheck, Tolerance
from dsnt_export.artifacts import atomic_output_dir, read_manifest, write_manifest
from dsnt_export.errors import MaskViolationError, UserInputError

log = logging.getLogger(__name__)

__all__ = [
    "Converter",
    "ExportResult",
    "Tolerance",
    "register",
    "get_converter",
    "MODULES",
    "converter_names",
]

# converter name -> module that defines (and registers) it
MODULES: dict[str, str] = {
    "hf": "converters.writers.hf",
    "onnx": "converters.writers.onnx",
    "tensorrt": "converters.writers.tensorrt",
}
_REGISTRY: dict[str, type[Converter]] = {}


@dataclass
class ExportResult:
    """What an export wrote and what its checks measured."""

    converter: str
    out_dir: Path
    manifest: dict = field(default_factory=dict)
    parity: dict[str, dict] = field(default_factory=dict)
    mask_checks: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        """The written files (relative paths, sorted), from the manifest."""
        return sorted(self.manifest.get("files", {}))

    def summary(self) -> dict[str, Any]:
        """What ``export --json`` prints: files, mask checks, parity, options, warnings, timings."""
        bad = [k for k, r in self.mask_checks.items() if not r.get("ok")]
        return {
            "converter": self.converter,
            "out_dir": str(self.out_dir),
            "files": self.files,
            "mask_checks": {"tensors": len(self.mask_checks), "failed": bad},
            "parity": self.parity,
            "options": self.manifest.get("extra", {}).get("export", {}).get("options", {}),
            "warnings": self.warnings,
            "notes": self.notes,
            "timings": self.timings,
        }


class Converter(ABC):
    """One target runtime. Subclasses implement :meth:`write`, :meth:`check_masks`, :meth:`parity`."""

    name: ClassVar[str]
    extras: ClassVar[tuple[str, ...]] = ()
    tolerance: ClassVar[dict[str, Tolerance]]  # per dtype name ("float32", "float16")
    description: ClassVar[str] = ""

    def export(
        self,
        src_dir: str | Path,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        check_parity: bool = True,
        **opts: Any,
    ) -> ExportResult:
        """Write the artifact atomically; re-validate masks and parity before it appears.

        ``source_label`` (optional) replaces the source path recorded in the manifest
        (``extra.export.source.path``), e.g. ``"../hf"`` when the source sits beside the artifact
        in a directory that is renamed afterwards; a relative label is read against the artifact.
        """
        source_label = opts.pop("source_label", None)
        self.check_environment(src_dir, **opts)
        result = ExportResult(self.name, Path(out_dir))
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            t0 = time.perf_counter()
            manifest = self.write(Path(src_dir), tmp, result, **opts)
            if source_label is not None:
                export = manifest.setdefault("extra", {}).setdefault("export", {})
                export.setdefault("source", {})["path"] = str(source_label)
            result.timings["write_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            result.mask_checks = self.check_masks(tmp, manifest)
            result.timings["mask_check_s"] = time.perf_counter() - t0
            failed = {k: r for k, r in result.mask_checks.items() if not r.get("ok")}
            if failed:
                first = next(iter(failed.values()))
                raise MaskViolationError(
                    f"{self.name} export: the pattern does not hold in the written artifact for "
                    f"{len(failed)} tensor(s); first: {first.get('message', first)}",
                    failed,
                )
            if check_parity:
                t0 = time.perf_counter()
                check = ParityCheck(f"{self.name} export parity")
                self.parity(Path(src_dir), tmp, manifest, check, **opts)
                result.parity = check.rows
                result.timings["parity_s"] = time.perf_counter() - t0
                check.raise_if_failed()
            manifest.setdefault("extra", {})["parity"] = result.parity
            manifest["extra"]["warnings"] = result.warnings
            manifest.setdefault("timings", {}).update(result.timings)
            write_manifest(tmp, manifest)
            result.manifest = read_manifest(tmp)
        return result

    def check_environment(self, src_dir: str | Path, **opts: Any) -> None:
        """Raise MissingDependencyError early when a required runtime is absent."""
        return None

    @abstractmethod
    def write(self, src: Path, tmp: Path, result: ExportResult, **opts: Any) -> dict:
        """Write the artifact's files into ``tmp``; return its manifest (without file hashes)."""

    @abstractmethod
    def check_masks(self, tmp: Path, manifest: dict) -> dict[str, dict]:
        """Re-read the written tensors and validate the pattern; ``{name: MaskReport json}``."""

    @abstractmethod
    def parity(self, src: Path, tmp: Path, manifest: dict, check: ParityCheck, **opts: Any) -> None:
        """Compare the written artifact's outputs with eager torch, recording into ``check``."""


def register(cls: type[Converter]) -> type[Converter]:
    """Class decorator: make a converter available under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def converter_names() -> list[str]:
    """The export targets (``hf``, ``onnx``, ``tensorrt``), sorted."""
    return sorted(MODULES)


def get_converter(name: str) -> Converter:
    """A new converter instance by name; an unknown name lists the known ones."""
    if name not in MODULES:
        raise UserInputError(
            f"unknown export target {name!r}; known targets: {', '.join(converter_names())}"
        )
    importlib.import_module(MODULES[name])
    return _REGISTRY[name]()
