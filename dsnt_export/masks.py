"""Mask validation: does a keep-mask or a weight satisfy a sparsity pattern?

Works on a bool keep-mask (True = kept) or on a weight (kept = non-zero; -0.0 counts as zero), as a
torch tensor or a numpy array, in the HF layout ``[out, in]`` (groups along ``axis=-1``) or the ONNX
``MatMul`` layout ``B = W^T [in, out]`` (groups along ``axis=0``). Always returns a structured
:class:`MaskReport`; :func:`check_mask` raises :class:`MaskViolationError` carrying it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dsnt_export.errors import MaskViolationError, ShapeError
from dsnt_export.patterns import NM, Pattern, Unstructured, parse_pattern


@dataclass(frozen=True)
class MaskReport:
    """The result of checking one 2-D weight or keep-mask against a pattern (never raises).

    ``shape`` is the tensor's shape as given; ``axis`` (0 or 1) the reduction axis the groups run
    along; ``ok`` whether the pattern holds. N:M: ``n_groups`` groups of ``m`` were counted and
    ``n_violations`` keep more than ``n_keep``; ``first_violation`` locates the first one (row/line,
    group, kept count, index span) or is None; ``divisibility_error`` says why no group could be
    formed (reduction axis not a multiple of ``m``). Unstructured: ``n_groups`` is the row count and
    ``first_violation`` holds ``{"pruned", "required"}`` when too few weights are pruned.
    ``sparsity`` is the overall pruned fraction and ``row_sparsity_min``/``_max`` its range over
    rows, all in [0, 1]; ``source`` is ``"mask"`` (bool input) or ``"weight"`` (kept = non-zero);
    ``message`` is one human-readable line.
    """

    name: str | None
    shape: tuple[int, ...]
    pattern: str
    axis: int
    ok: bool
    n_groups: int
    n_violations: int
    first_violation: dict | None
    divisibility_error: str | None
    sparsity: float
    row_sparsity_min: float
    row_sparsity_max: float
    source: str  # "mask" or "weight"
    message: str

    def to_json(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (``shape`` as a list), as manifests store it."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _as_keep(t: Any) -> tuple[torch.Tensor, str]:
    if isinstance(t, np.ndarray):
        if t.dtype == np.float16 or t.dtype.kind == "V":
            t = torch.from_numpy(np.ascontiguousarray(t).view(np.uint16).astype(np.int32))
            t = (t & 0x7FFF) != 0  # bit test: non-zero magnitude bits = kept (handles -0.0)
            return t, "weight"
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"expected a torch tensor or numpy array, got {type(t).__name__}")
    if t.dtype == torch.bool:
        return t, "mask"
    return t != 0, "weight"


def validate_mask(
    t: Any, pattern: Pattern | str, *, axis: int = -1, name: str | None = None
) -> MaskReport:
    """Check ``t`` (keep-mask or weight) against ``pattern`` along ``axis`` (the reduction axis).

    ``t``: a 2-D torch tensor or numpy array; bool means keep-mask, any other dtype a weight whose
    non-zeros are kept (fp16 numpy arrays and raw 16-bit views are read bitwise, so -0.0 counts as
    pruned). ``axis=-1``/``1`` for HF ``W[out, in]``, ``0`` for ONNX ``B = W^T [in, out]``.
    ``pattern``: a :class:`~dsnt_export.patterns.Pattern` or a string for
    :func:`~dsnt_export.patterns.parse_pattern`. Returns a :class:`MaskReport` whether or not the
    pattern holds; raises :class:`~dsnt_export.errors.ShapeError` for a non-2-D input, a bad
    ``axis`` or an input that is neither tensor nor array, and
    :class:`~dsnt_export.errors.PatternError` for an unparsable pattern.
    """
    pattern = parse_pattern(pattern)
    keep, source = _as_keep(t)
    shape = tuple(keep.shape)
    if keep.dim() != 2:
        raise ShapeError(f"{name or 'tensor'}: expected a 2-D weight or mask, got shape {shape}")
    if axis not in (-1, 0, 1):
        raise ShapeError(f"axis must be 0, 1 or -1 for a 2-D tensor, got {axis}")
    ax = axis % 2
    k = keep if ax == 1 else keep.t()  # rows x reduction axis
    rows, red = k.shape
    kept = int(torch.count_nonzero(k))
    sparsity = 1.0 - kept / max(1, k.numel())
    base = dict(
        name=name, shape=shape, pattern=str(pattern), axis=ax, sparsity=sparsity, source=source
    )
    if isinstance(pattern, NM):
        return _check_nm(k, pattern, ax, base)
    return _check_unstructured(k, pattern, base)


def _row_range(kept_per_row: torch.Tensor, red: int) -> dict:
    if kept_per_row.numel() == 0:
        return {"row_sparsity_min": 0.0, "row_sparsity_max": 0.0}
    return {
        "row_sparsity_min": 1.0 - int(kept_per_row.max()) / max(1, red),
        "row_sparsity_max": 1.0 - int(kept_per_row.min()) / max(1, red),
    }


def _check_nm(k: torch.Tensor, pattern: NM, ax: int, base: dict) -> MaskReport:
    rows, red = k.shape
    label = base["name"] or "tensor"
    if red % pattern.m:
        base.update(_row_range(k.contiguous().view(torch.uint8).sum(dim=1, dtype=torch.int32), red))
        msg = (
            f"{label}: reduction axis {ax} has {red} channels, not divisible by M={pattern.m}; "
            f"an {pattern} pattern cannot hold (pad or exclude this tensor)"
        )
        return MaskReport(
            ok=False,
            n_groups=0,
            n_violations=0,
            first_violation=None,
            divisibility_error=msg,
            message=msg,
            **base,
        )
    u8 = k.contiguous().view(torch.uint8).reshape(rows, red // pattern.m, pattern.m)
    counts = u8.sum(dim=-1, dtype=torch.uint8 if pattern.m < 256 else torch.int32)
    base.update(_row_range(counts.sum(dim=1, dtype=torch.int32), red))
    bad = counts > pattern.n_keep
    n_bad = int(bad.sum())
    n_groups = counts.numel()
    first = None
    if n_bad:
        r, g = (int(v) for v in bad.nonzero()[0])
        span = [g * pattern.m, (g + 1) * pattern.m]
        index = {"row": r, "cols": span} if ax == 1 else {"rows": span, "col": r}
        first = {
            "group": g,
            "line": r,
            "kept": int(counts[r, g]),
            "allowed": pattern.n_keep,
            "index": index,
        }
        msg = (
            f"{label}: {n_bad} of {n_groups} groups of {pattern.m} along axis {ax} keep more than "
            f"{pattern.n_keep} weights; first at {index} keeps {first['kept']}"
        )
    else:
        msg = f"{label}: all {n_groups} groups satisfy {pattern} along axis {ax}"
    return MaskReport(
        ok=n_bad == 0,
        n_groups=n_groups,
        n_violations=n_bad,
        first_violation=first,
        divisibility_error=None,
        message=msg,
        **base,
    )


def _check_unstructured(k: torch.Tensor, pattern: Unstructured, base: dict) -> MaskReport:
    rows, red = k.shape
    label = base["name"] or "tensor"
    # each row of the reference prunes int(red * ratio); allow that rounding, nothing more
    need = pattern.n_prune_per_row(red) * rows
    base.update(_row_range(k.contiguous().view(torch.uint8).sum(dim=1, dtype=torch.int32), red))
    pruned = int((~k).sum())
    ok = pruned >= need
    msg = (
        f"{label}: {pruned} of {k.numel()} weights pruned ({base['sparsity']:.4f}), "
        f"{'meets' if ok else 'below'} the {pattern} target of {need}"
    )
    return MaskReport(
        ok=ok,
        n_groups=rows,
        n_violations=0 if ok else 1,
        first_violation=None if ok else {"pruned": pruned, "required": need},
        divisibility_error=None,
        message=msg,
        **base,
    )


def check_mask(
    t: Any, pattern: Pattern | str, *, axis: int = -1, name: str | None = None
) -> MaskReport:
    """Like :func:`validate_mask` but raises :class:`MaskViolationError` when the check fails.

    The error's message is the report's ``message`` and the error carries the
    :class:`MaskReport`; returns the report when the pattern holds.
    """
    report = validate_mask(t, pattern, axis=axis, name=name)
    if not report.ok:
        raise MaskViolationError(report.message, report)
    return report
