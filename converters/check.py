"""``dsnt-export check``: re-validate an artifact from its stored tensors, against its manifest.

Artifact kinds: a Hugging Face checkpoint directory, a single ``.safetensors`` file, an ONNX file or
export directory, a TensorRT sparsity report (JSON) or engine directory. For each the pattern is
re-derived from the tensors themselves, compared with the manifest (pattern, per-tensor shape and
sparsity, file sha256) and, for checkpoints, the config is checked against current vLLM's contract.
See :mod:`converters.check_report` for the exit codes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dsnt_export.artifacts import MANIFEST_NAME, file_digest, read_manifest
from dsnt_export.errors import ArtifactError, DsntError
from dsnt_export.masks import validate_mask
from dsnt_export.patterns import NM, Pattern, parse_pattern

from . import bitmask, vllm_compat
from .check_report import UNREADABLE, VIOLATION, WARNING, CheckReport
from .source import CONFIG_NAME, INDEX_NAME, read_json, sparsity_config_of, weight_files

log = logging.getLogger(__name__)

DEFAULT_PATTERN = "2:4"


def derive_nm(keep_or_weight, axis: int, m: int) -> str | None:
    """The tightest ``N:m`` the tensor satisfies along ``axis`` (None if ``m`` does not divide it)."""
    t = torch.as_tensor(keep_or_weight)
    keep = t if t.dtype == torch.bool else t != 0
    k = keep if axis % 2 == 1 else keep.t()
    if k.shape[1] % m or k.numel() == 0:
        return None
    n = int(k.reshape(k.shape[0], -1, m).sum(-1).max())
    return f"{n}:{m}" if n < m else "dense"


def looks_sparse(t: torch.Tensor, pattern: Pattern) -> bool:
    """A tensor counts as a sparse target (when no manifest says so) at half the pattern's zeros."""
    return (
        t.dim() == 2
        and t.is_floating_point()
        and t.numel() > 0
        and float((t == 0).float().mean()) >= 0.5 * pattern.sparsity
    )


def check_tensor(
    report: CheckReport,
    name: str,
    t: torch.Tensor,
    pattern: Pattern,
    *,
    axis: int,
    expected_shape: list[int] | None = None,
    expected_sparsity: float | None = None,
    extra: dict | None = None,
) -> None:
    """Validate one stored weight and compare it with what the manifest recorded."""
    shape = list(t.shape)
    if expected_shape is not None and shape != list(expected_shape):
        if len(shape) == 2 and shape == list(expected_shape)[::-1]:
            report.add(
                VIOLATION,
                "transposed",
                name,
                f"stored shape {shape} is the transpose of the manifest's {expected_shape}: "
                "the weight was exported transposed, its groups lie on the wrong axis",
            )
        else:
            report.add(
                VIOLATION,
                "shape",
                name,
                f"stored shape {shape} differs from the manifest's {expected_shape}",
            )
    if t.dim() != 2:
        report.add(VIOLATION, "shape", name, f"expected a 2-D weight, got shape {shape}")
        return
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        report.add(VIOLATION, "non-finite", name, "NaN or Inf values in the stored weight")
    rep = validate_mask(t, pattern, axis=axis, name=name)
    entry = rep.to_json()
    m = pattern.m if isinstance(pattern, NM) else 4
    entry["derived"] = derive_nm(t, axis, m)
    entry.update(extra or {})
    if not rep.ok:
        report.add(VIOLATION, "mask", name, rep.message)
    if expected_sparsity is not None:
        entry["manifest_sparsity"] = expected_sparsity
        if abs(rep.sparsity - float(expected_sparsity)) > 0.5 / max(t.numel(), 1):
            report.add(
                VIOLATION,
                "sparsity-mismatch",
                name,
                f"stored sparsity {rep.sparsity:.6f} != manifest {float(expected_sparsity):.6f}"
                f" ({round(abs(rep.sparsity - float(expected_sparsity)) * t.numel())} "
                "weights differ in zero/non-zero)",
            )
    report.tensors[name] = entry


def weakest(derived: list[str | None]) -> str | None:
    """The loosest pattern among per-tensor derived ones ("dense" beats any N:M)."""
    vals = [d for d in derived if d]
    if not vals:
        return None
    if "dense" in vals:
        return "dense"
    return max(vals, key=lambda s: int(s.split(":")[0]) / int(s.split(":")[1]))


def resolve_pattern(
    report: CheckReport, cli: str | None, manifest: dict | None, config: dict | None = None
) -> Pattern:
    man = (manifest or {}).get("pattern", {}).get("string") if manifest else None
    sc = sparsity_config_of(config or {}) or {}
    if cli is not None:
        p, src = parse_pattern(cli), "--pattern"
        if man is not None and parse_pattern(man) != p:
            report.add(
                VIOLATION,
                "pattern-mismatch",
                "manifest",
                f"the manifest records pattern {man}, but --pattern {p} was asked for",
            )
    elif man is not None:
        p, src = parse_pattern(man), "manifest"
    elif sc.get("sparsity_structure"):
        p, src = parse_pattern(sc["sparsity_structure"]), "config sparsity_config"
    else:
        p, src = parse_pattern(DEFAULT_PATTERN), "default"
    report.pattern, report.pattern_source = str(p), src
    return p


def check_files(
    report: CheckReport, root: Path, manifest: dict | None, *, only: set[str] | None = None
) -> None:
    """Compare files on disk with the manifest's ``files`` (size and sha256)."""
    if not manifest or "files" not in manifest:
        if manifest is not None:
            report.add(WARNING, "no-hashes", MANIFEST_NAME, "the manifest records no file hashes")
        return
    for rel, want in sorted(manifest["files"].items()):
        if only is not None and rel not in only:
            continue
        p = root / rel
        if not p.is_file():
            report.add(VIOLATION, "missing-file", rel, f"listed in the manifest but absent: {p}")
            continue
        got = file_digest(p)
        if got["bytes"] != want.get("bytes"):
            report.add(
                VIOLATION,
                "sha256",
                rel,
                f"{got['bytes']} bytes on disk, manifest says "
                f"{want.get('bytes')} (truncated or replaced)",
            )
        elif got["sha256"] != want.get("sha256"):
            report.add(
                VIOLATION,
                "sha256",
                rel,
                "content differs from the manifest's sha256 (modified after export)",
            )
    if only is None:
        listed = set(manifest["files"])
        for p in sorted(root.rglob("*")):
            rel = str(p.relative_to(root))
            if p.is_file() and rel not in listed and p.name != MANIFEST_NAME:
                report.add(WARNING, "unlisted-file", rel, "file not listed in the manifest")


def _read_all(report: CheckReport, files: list[Path]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Tensors of every readable file; unreadable files become findings (their names returned)."""
    from .source import read_safetensors

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


def detect_kind(path: Path) -> str:
    if path.is_dir():
        man = None
        try:
            man = read_manifest(path, required=False)
        except ArtifactError:
            pass
        if man is not None and man.get("kind") in ("hf", "onnx", "tensorrt"):
            return man["kind"]
        if (
            (path / CONFIG_NAME).exists()
            or (path / INDEX_NAME).exists()
            or any(path.glob("*.safetensors"))
        ):
            return "hf"
        if any(path.rglob("*.onnx")):
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
    """Detect the artifact kind of ``path`` and check it."""
    p = Path(path)
    if not p.exists():
        r = CheckReport(str(p), "unknown")
        r.add(UNREADABLE, "not-found", str(p), "no such file or directory")
        return r
    if pattern is not None:
        parse_pattern(pattern)  # bad pattern strings fail fast (exit 2)
    kind = detect_kind(p)
    if kind == "hf":
        return check_hf_dir(p, pattern=pattern)
    if kind == "safetensors":
        return check_safetensors_file(p, pattern=pattern)
    if kind == "onnx":
        from .check_onnx import check_onnx

        return check_onnx(p, pattern=pattern)
    if kind == "tensorrt":
        from .tensorrt import check_tensorrt

        return check_tensorrt(p, pattern=pattern, require_sparse_tactics=require_sparse_tactics)
    r = CheckReport(str(p), "unknown")
    r.add(
        UNREADABLE,
        "unknown-kind",
        str(p),
        "not an artifact this tool knows: expected a checkpoint dir (config.json + safetensors), "
        "a .safetensors file, an ONNX file/dir, or a TensorRT report .json",
    )
    return r


def mask_checks_from_report(report: CheckReport, *, ignore: tuple[str, ...] = ()) -> dict:
    """``{subject: {"ok", "message", ...}}`` for an exporter's written-artifact check: every tensor
    entry, failed where a non-warning finding concerns it, plus findings about other subjects."""
    problems = [f for f in report.findings if f.severity != WARNING and f.code not in ignore]
    out: dict[str, dict] = {}
    for name, entry in report.tensors.items():
        mine = [f.message for f in problems if f.subject == name]
        out[name] = dict(
            entry,
            ok=entry["ok"] and not mine,
            message="; ".join(mine) if mine else entry["message"],
        )
    for f in problems:
        if f.subject not in report.tensors:
            out[f.subject] = {"ok": False, "message": f.message}
    return out


def load_json_file(path: Path, report: CheckReport) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.add(UNREADABLE, "unreadable", path.name, f"cannot read JSON: {e}")
        return None
    return data if isinstance(data, dict) else None
