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
    read_json,
    sparsity_config_of,
    weight_files,
)
from dsnt_export.artifacts import MANIFEST_NAME, read_manifest
from dsnt_export.errors import ArtifactError, DsntError
from dsnt_export.patterns import Pattern


def _read_all(report: CheckReport, files: list[Path]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Tensors of every readable file; unreadable files become findings (their names returned)."""
    from converters.common.source import read_safetensors

    tensors: dict[str, torch.Tensor] = {}
    bad: set[str] = set()
    for f in files:
        try:
            tensors.update(read_safetensors([f]))
        except ArtifactError as e:
            report.add(UNREADABLE, "unreadable", f.name, str(e))
            bad.add(f.name)
    return tensors, bad


def _unpack_legacy(report: CheckReport, tensors: dict[str, torch.Tensor]) -> list[str]:
    mods = bitmask.packed_modules(tensors)
    for m in mods:
        try:
            tensors[f"{m}.weight"] = bitmask.unpack_24(
                tensors.pop(f"{m}.compressed"),
                tensors.pop(f"{m}.bitmask"),
                tensors.pop(f"{m}.shape"),
                name=m,
            )
        except DsntError as e:
            report.add(VIOLATION, "bitmask", m, str(e))
    return mods


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
    except ArtifactError as e:
        report.add(UNREADABLE if "JSON" in str(e) else VIOLATION, "weights", "weights", str(e))
        return report
    tensors, bad_files = _read_all(report, [f for f in files if f.exists()])
    for f in files:
        if not f.exists() and f.name not in (man or {}).get("files", {}):
            report.add(
                VIOLATION, "missing-file", f.name, "weight shard named by the index is absent"
            )
    if index is not None:
        for k, fname in index["weight_map"].items():
            if fname not in bad_files and (root / fname).exists() and k not in tensors:
                report.add(
                    VIOLATION,
                    "missing-tensor",
                    k,
                    f"the index maps it to {fname}, which does not hold it",
                )
    mods = _unpack_legacy(report, tensors)
    _check_vllm(report, config, man, legacy=bool(mods))
    _check_targets(report, tensors, man, p, skip_unreadable=bool(bad_files))
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
    tensors: dict[str, torch.Tensor],
    man: dict | None,
    p: Pattern,
    *,
    skip_unreadable: bool,
) -> None:
    if man is not None and man.get("tensors"):
        for name, meta in sorted(man["tensors"].items()):
            if name not in tensors:
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
                tensors[name],
                p,
                axis=axis,
                expected_shape=meta.get("shape"),
                expected_sparsity=meta.get("sparsity"),
            )
    else:
        targets = sorted(k for k, t in tensors.items() if looks_sparse(t, p))
        report.info["targets"] = "inferred: 2-D tensors with at least half the pattern's zeros"
        if not targets:
            report.add(
                VIOLATION,
                "no-sparse-tensors",
                "weights",
                f"no tensor has even half the zeros of {p}; not a sparse checkpoint?",
            )
        for name in targets:
            check_tensor(report, name, tensors[name], p, axis=-1)
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
    tensors, bad = _read_all(report, [f])
    if bad:
        return report
    _unpack_legacy(report, tensors)
    if man is not None:
        mine = _names_in_file(f)
        sub = dict(
            man,
            tensors={
                k: v
                for k, v in man.get("tensors", {}).items()
                if k in tensors or mine is None or k in mine
            },
        )
        _check_targets(report, tensors, sub, p, skip_unreadable=False)
    else:
        _check_targets(report, tensors, None, p, skip_unreadable=False)
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
