"""Sparsity patterns as value objects, parsed once at the boundary.

``NM(n_keep, m)``: in every group of ``m`` consecutive *input* channels (the reduction axis K of a
linear ``y = x W^T``, i.e. the last axis of ``W[out, in]``) at most ``n_keep`` weights are kept.
``n_keep`` counts KEPT weights (torchao's convention), so 2:4 keeps 2 of 4 and 1:4 keeps 1 of 4.

``Unstructured(ratio)``: ``ratio`` is the fraction of weights PRUNED in every output row
(``int(in_features * ratio)`` per row, as the reference code does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsnt_export.errors import PatternError


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: at most ``n_keep`` kept weights in every group of ``m``.

    Groups are ``m`` consecutive input channels (the last axis of ``W[out, in]``), the layout
    NVIDIA's 2:4 sparse tensor cores and torch's semi-structured kernels need
    (docs/runtimes.md). Raises :class:`~dsnt_export.errors.PatternError` unless ``n_keep`` and
    ``m`` are ints with ``0 < n_keep < m``.
    """

    n_keep: int
    m: int

    def __post_init__(self):
        if not isinstance(self.n_keep, int) or not isinstance(self.m, int):
            raise PatternError(
                f"N:M pattern needs integers, got n_keep={self.n_keep!r}, m={self.m!r}; "
                "write it like '2:4'"
            )
        if not (0 < self.n_keep < self.m):
            raise PatternError(
                f"N:M pattern needs 0 < N < M (N = kept weights per group of M), got {self.n_keep}:{self.m}; "
                "for 2:4 sparsity write '2:4'"
            )

    @property
    def n_prune(self) -> int:
        """Pruned weights per group of ``m`` (``m - n_keep``)."""
        return self.m - self.n_keep

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned, in [0, 1) (0.5 for 2:4)."""
        return self.n_prune / self.m

    @property
    def is_structured(self) -> bool:
        """True: the count holds per group, not only per row."""
        return True

    def __str__(self) -> str:
        return f"{self.n_keep}:{self.m}"

    def to_json(self) -> dict:
        """``{"kind": "nm", "n_keep", "m", "string"}`` as written into manifests."""
        return {"kind": "nm", "n_keep": self.n_keep, "m": self.m, "string": str(self)}


@dataclass(frozen=True)
class Unstructured:
    """Unstructured sparsity: the fraction ``ratio`` of every output row's weights is pruned.

    ``int(in_features * ratio)`` weights per row, anywhere in the row, as the DSnoT reference
    code prunes (docs/dsnot-spec.md section 4, "Initial mask, unstructured"). ``ratio`` is a float;
    raises :class:`~dsnt_export.errors.PatternError` unless it is a number with
    ``0 < ratio < 1``.
    """

    ratio: float

    def __post_init__(self):
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < float(r) < 1.0):
            raise PatternError(
                f"unstructured sparsity ratio must be a number strictly between 0 and 1 (fraction pruned), "
                f"got {r!r}; write it like 'unstructured:0.6' or '0.6'"
            )
        object.__setattr__(self, "ratio", float(r))

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned (the ``ratio``)."""
        return self.ratio

    @property
    def is_structured(self) -> bool:
        """False: only the per-row count is fixed."""
        return False

    def n_prune_per_row(self, in_features: int) -> int:
        """Weights pruned in a row of ``in_features``: ``int(in_features * ratio)`` (rounds down)."""
        return int(in_features * self.ratio)

    def __str__(self) -> str:
        return f"unstructured:{self.ratio:g}"

    def to_json(self) -> dict:
        """``{"kind": "unstructured", "ratio", "string"}`` as written into manifests."""
        return {"kind": "unstructured", "ratio": self.ratio, "string": str(self)}


#: any parsed sparsity pattern
Pattern = NM | Unstructured

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_UNSTRUCTURED_RE = re.compile(
    r"^\s*(?:unstructured\s*[:=]\s*)?([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(%?)\s*$"
)


def parse_pattern(s: str | Pattern) -> Pattern:
    """Parse '2:4', '4:8', any 'N:M' with 0 < N < M, 'unstructured:0.6' or a bare ratio '0.6'.

    Also accepts 'unstructured=0.6' and a percentage ('60%'); whitespace and case are ignored.
    An :class:`NM` or :class:`Unstructured` is returned unchanged. Raises
    :class:`~dsnt_export.errors.PatternError` (with the accepted forms) for anything else.
    """
    if isinstance(s, (NM, Unstructured)):
        return s
    if not isinstance(s, str):
        raise PatternError(
            f"a sparsity pattern must be a string like '2:4' or 'unstructured:0.6', got {type(s).__name__} {s!r}"
        )
    m = _NM_RE.match(s)
    if m:
        return NM(int(m.group(1)), int(m.group(2)))
    u = _UNSTRUCTURED_RE.match(s.lower())
    if u:
        value = float(u.group(1))
        if u.group(2) == "%":
            value /= 100.0
        return Unstructured(value)
    raise PatternError(
        f"cannot parse sparsity pattern {s!r}; expected 'N:M' with 0 < N < M (N kept per group of M, "
        "e.g. '2:4', '4:8', '1:4'), 'unstructured:R' with 0 < R < 1 (fraction pruned, e.g. "
        "'unstructured:0.6') or a bare ratio like '0.6'"
    )
