"""``dsnt-export check`` for Hugging Face checkpoints: a directory, or one .safetensors file.

Every targeted weight is read back from the stored files (legacy sparse-24-bitmask triples are
unpacked first) and validated along its input axis; shapes and sparsities are compared with the
manifest, file hashes with its ``files``, and config.json with current vLLM's contract.
"""

from __future__ import annotations

from pathlib import Path

import torch

from converters.checkers.common import (
    check_files,
    check_tensor,
    looks_sparse,
    resolve_pattern,
    weakest,
)
from converters.checkers.report import UNREADABLE, VIOLATION, WARNING, CheckReport
from converters.common import bitmask, vllm_compat
from converters.common.source import (
    CONFIG_NAME,
    INDEX_NAME,
    CorruptFileError,
    read_json,
    sparsity_config_of,
    weight_files,
)
from dsnt_export.artifacts import MANIFEST_NAME, read_manifest
from dsnt_export.errors import ArtifactError, DsntError
from dsnt_export.patterns import Pattern


class StoredTensors:
    """The tensors of a checkpoint's safetensors files, read one at a time on request.

    Only the headers are read up front (names, and whether each file opens: a truncated or
    corrupt file is an ``unreadable`` finding, as a full read would give). :meth:`get` reads one
    tensor (a legacy ``sparse-24-bitmask`` module: its ``.compressed/.bitmask/.shape`` triple,
    unpacked into ``<module>.weight``), so checking a checkpoint holds one weight in memory at a
    time instead of the whole state dict. A name stored in several files is read from the last,
    as a ``dict.update`` over the files would keep.
    """

    def __init__(self, report: CheckReport, files: list[Path]):
        self.report = report
        self.bad_files: set[str] = set()
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                names = _keys(f)
            except ArtifactError as e:
                report.add(UNREADABLE, "unreadable", f.name, str(e))
                self.bad_files.add(f.name)
                continue
            self._where.update(dict.fromkeys(names, f))
        #: modules stored as packed sparse-24-bitmask triples
        self.packed: list[str] = bitmask.packed_modules(self._where)
        self._packed = set(self.packed)
        self._failed: set[str] = set()  # packed modules whose triple does not unpack
        self._unpacked: set[str] = set()  # packed modules unpacked without error

    @property
    def stored_names(self) -> set[str]:
        """Names as stored (packed triples as their three tensors)."""
        return set(self._where)

    def names(self) -> list[str]:
        """Logical tensor names: stored names with each packed triple as ``<module>.weight``."""
        triples = {f"{m}.{s}" for m in self.packed for s in bitmask.SUFFIXES}
        out = [k for k in self._where if k not in triples]
        return out + [f"{m}.weight" for m in self.packed if m not in self._failed]

    def get(self, name: str) -> torch.Tensor | None:
        """One tensor by logical name; None if absent, in an unreadable file, or a packed triple
        that does not unpack (then a ``bitmask`` violation is recorded once)."""
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if mod in self._packed:
            if mod in self._failed:
                return None
            parts = [self._read(f"{mod}.{s}") for s in bitmask.SUFFIXES]
            if any(p is None for p in parts):
                return None
            try:
                weight = bitmask.unpack_24(*parts, name=mod)
                self._unpacked.add(mod)
                return weight
            except DsntError as e:
                self.report.add(VIOLATION, "bitmask", mod, str(e))
                self._failed.add(mod)
                return None
        return self._read(name) if name in self._where else None

    def validate_packed(self) -> None:
        """Unpack every packed module not read yet, one at a time (a corrupt triple is a
        ``bitmask`` violation even when its weight is no check target)."""
        for m in self.packed:
            if m not in self._failed and m not in self._unpacked:
                self.get(f"{m}.weight")

    def _read(self, name: str) -> torch.Tensor | None:
        f = self._where[name]
        if f.name in self.bad_files:
            return None
        try:
            with _open(f) as fh:
                return fh.get_tensor(name)
        except ArtifactError as e:
            self.report.add(UNREADABLE, "unreadable", f.name, str(e))
            self.bad_files.add(f.name)
            return None


def _open(f: Path):
    """``safe_open(f)``; a missing, truncated or corrupt file raises ArtifactError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(f), framework="pt")
    except FileNotFoundError as e:
        raise ArtifactError(f"weight file missing: {f}") from e
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ArtifactError(
            f"cannot read {f} ({e}); the file is truncated or corrupt. Re-export or re-download it"
        ) from e


def _keys(f: Path) -> list[str]:
    with _open(f) as fh:
        return list(fh.keys())


def check_hf_dir(
    path: str | Path,
    *,
    pattern: str | None = None,
    manifest: dict | None = None,
    hashes: bool = True,
) -> CheckReport:
    """Check a Hugging Face checkpoint directory (``manifest``: use this one, not the file's)."""
    root = Path(path)
    report = CheckReport(str(root), "hf")
    try:
        man = manifest if manifest is not None else read_manifest(root, required=False)
    except ArtifactError as e:
        report.add(UNREADABLE, "manifest", MANIFEST_NAME, str(e))
        man = None
    if man is not None and man.get("kind") != "hf":
        report.add(
            VIOLATION,
            "kind",
            MANIFEST_NAME,
            f"manifest kind {man.get('kind')!r}, expected 'hf' for a checkpoint directory",
        )
    if hashes:
        check_files(report, root, man)
    config: dict = {}
    try:
        config = read_json(root / CONFIG_NAME, "config.json")
    except ArtifactError as e:
        report.add(UNREADABLE, "config", CONFIG_NAME, str(e))
    p = resolve_pattern(report, pattern, man, config)
    try:
        files, index = weight_files(root)
    except CorruptFileError as e:
        report.add(UNREADABLE, "weights", "weights", str(e))
        return report
    except ArtifactError as e:
        report.add(VIOLATION, "weights", "weights", str(e))
        return report
    store = StoredTensors(report, [f for f in files if f.exists()])
    for f in files:
        if not f.exists() and f.name not in (man or {}).get("files", {}):
            report.add(
                VIOLATION, "missing-file", f.name, "weight shard named by the index is absent"
            )
    if index is not None:
        stored = store.stored_names
        for k, fname in index["weight_map"].items():
            if fname not in store.bad_files and (root / fname).exists() and k not in stored:
                report.add(
                    VIOLATION,
                    "missing-tensor",
                    k,
                    f"the index maps it to {fname}, which does not hold it",
                )
    _check_vllm(report, config, man, legacy=bool(store.packed))
    _check_targets(report, store, man, p, skip_unreadable=bool(store.bad_files))
    return report


def _check_vllm(report: CheckReport, config: dict, man: dict | None, *, legacy: bool) -> None:
    if not config:
        return
    declared = ((man or {}).get("extra", {}).get("export", {}) or {}).get("format")
    if declared == bitmask.FORMAT and not legacy:
        report.add(
            VIOLATION,
            "layout",
            "weights",
            "the manifest declares sparse-24-bitmask but no "
            "packed tensors (.compressed/.bitmask/.shape) were found",
        )
    sc = sparsity_config_of(config)
    if legacy:
        if not sc or sc.get("format") != bitmask.FORMAT:
            report.add(
                VIOLATION,
                "layout",
                CONFIG_NAME,
                "weights are packed as sparse-24-bitmask but "
                "config.json lacks the matching sparsity_config: no runtime can load this",
            )
        else:
            report.add(WARNING, "vllm-legacy", CONFIG_NAME, vllm_compat.LEGACY_CAVEAT)
    for problem in vllm_compat.config_problems(config, legacy_layout=legacy):
        report.add(VIOLATION, "vllm-config", CONFIG_NAME, problem)
    for note in vllm_compat.config_warnings(config, legacy_layout=legacy):
        report.add(WARNING, "vllm-config", CONFIG_NAME, note)
    report.info["architectures"] = config.get("architectures")
    report.info["vllm_layout"] = "sparse-24-bitmask (vLLM <= 0.18)" if legacy else "plain"


def _check_targets(
    report: CheckReport,
    store: StoredTensors,
    man: dict | None,
    p: Pattern,
    *,
    skip_unreadable: bool,
) -> None:
    """Check each target weight, read one at a time from ``store``: the manifest's tensors, or
    without one every stored 2-D tensor that :func:`looks_sparse`."""
    if man is not None and man.get("tensors"):
        for name, meta in sorted(man["tensors"].items()):
            t = store.get(name)
            if t is None:
                if not skip_unreadable:
                    report.add(
                        VIOLATION,
                        "missing-tensor",
                        name,
                        "listed in the manifest, absent from the weights",
                    )
                continue
            axis = -1 if meta.get("layout", "out_in") == "out_in" else 0
            check_tensor(
                report,
                name,
                t,
                p,
                axis=axis,
                expected_shape=meta.get("shape"),
                expected_sparsity=meta.get("sparsity"),
            )
            del t  # one stored weight alive at a time
    else:
        report.info["targets"] = "inferred: 2-D tensors with at least half the pattern's zeros"
        found = 0
        for name in sorted(store.names()):
            t = store.get(name)
            if t is not None and looks_sparse(t, p):
                check_tensor(report, name, t, p, axis=-1)
                found += 1
            del t
        if not found:
            report.add(
                VIOLATION,
                "no-sparse-tensors",
                "weights",
                f"no tensor has even half the zeros of {p}; not a sparse checkpoint?",
            )
    store.validate_packed()
    report.derived_pattern = weakest([e.get("derived") for e in report.tensors.values()])


def check_safetensors_file(path: str | Path, *, pattern: str | None = None) -> CheckReport:
    """A single .safetensors file; the manifest of its directory is used if it lists the file."""
    f = Path(path)
    report = CheckReport(str(f), "safetensors")
    man = None
    try:
        man = read_manifest(f.parent, required=False)
    except ArtifactError as e:
        report.add(WARNING, "manifest", MANIFEST_NAME, f"ignored: {e}")
    if man is not None and f.name not in man.get("files", {}):
        man = None
    p = resolve_pattern(report, pattern, man)
    if man is not None:
        check_files(report, f.parent, man, only={f.name})
    store = StoredTensors(report, [f])
    if store.bad_files:
        return report
    store.validate_packed()  # a triple that does not unpack is no tensor of this file
    if man is not None:
        mine = _names_in_file(f)
        here = set(store.names())
        sub = dict(
            man,
            tensors={
                k: v
                for k, v in man.get("tensors", {}).items()
                if k in here or mine is None or k in mine
            },
        )
        _check_targets(report, store, sub, p, skip_unreadable=False)
    else:
        _check_targets(report, store, None, p, skip_unreadable=False)
    return report


def _names_in_file(f: Path) -> set[str] | None:
    """Tensor names the directory's index assigns to ``f`` (None: no index, the file is whole)."""
    index = f.parent / INDEX_NAME
    if not index.exists():
        return None
    try:
        wm = read_json(index, "safetensors index").get("weight_map", {})
    except (ArtifactError, AttributeError):
        return None
    return {k for k, v in wm.items() if v == f.name}
