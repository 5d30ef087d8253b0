"""Helpers every artifact checker shares: one tensor's pattern check, the pattern to check against,
file hashes against the manifest, findings turned into an exporter's mask checks.

Imports go one way (:mod:`converters.checkers` dispatcher -> a kind's checker -> this module):
nothing here imports a kind's checker or the dispatcher. See :mod:`converters.checkers.report`
for the findings and exit codes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from converters.checkers.report import UNREADABLE, VIOLATION, WARNING, CheckReport
from converters.common.source import sparsity_config_of
from dsnt_export.artifacts import MANIFEST_NAME, file_digest
from dsnt_export.masks import validate_mask
from dsnt_export.patterns import NM, Pattern, parse_pattern

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
        and int(torch.count_nonzero(t == 0)) / t.numel() >= 0.5 * pattern.sparsity  # exact count
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
    if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
        report.add(VIOLATION, "non-finite", name, "NaN or Inf values in the stored weight")
    keep = t != 0  # -0.0 counts as zero; computed once for the check and the derivation
    rep = validate_mask(keep, pattern, axis=axis, name=name)
    entry = dict(rep.to_json(), source="weight")
    m = pattern.m if isinstance(pattern, NM) else 4
    entry["derived"] = derive_nm(keep, axis, m)
    entry.update(extra or {})
    if not rep.ok:
        # the finding's subject already names the tensor: not again at the message's start
        report.add(VIOLATION, "mask", name, rep.message.removeprefix(f"{name}: "))
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
    """The pattern to check against, recorded in ``report``: ``--pattern`` (``cli``), else the
    manifest's, else the config's ``sparsity_config.sparsity_structure``, else 2:4. A ``cli``
    pattern that differs from the manifest's is a ``pattern-mismatch`` violation; a malformed
    pattern string raises :class:`~dsnt_export.errors.PatternError`."""
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
    """The JSON object in ``path``; an unreadable file is an ``unreadable`` finding and None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.add(UNREADABLE, "unreadable", path.name, f"cannot read JSON: {e}")
        return None
    return data if isinstance(data, dict) else None
