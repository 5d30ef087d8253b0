"""Exact, tie-aware top-k selection that reproduces a *stable* sort without sorting whole rows.

DSnoT visits at most ``max_cycles`` candidates per row from either end of a stable ascending sort.
We select them with ``torch.topk`` on the float scores and only when two selected, valid scores are
exactly equal (rare with real data) recompute those rows with tie-free integer keys
``(order-preserving float bits) << 32 | column``: ascending key order is a stable ascending sort
(ties: lower column first); descending key order is the same sort walked from its right end (ties:
higher column first). -0.0 is treated as +0.0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INT64_MAX = torch.iinfo(torch.int64).max
INT64_MIN = torch.iinfo(torch.int64).min
_LOW32 = 0xFFFFFFFF


def row_keys(x: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys per row whose order is the stable order of ``x`` (float) along dim -1."""
    x = (x.to(torch.float32) + 0.0).contiguous()  # + 0.0 maps -0.0 to +0.0
    bits = x.view(torch.int32)
    k32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    cols = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return (k32 << 32) + cols


def _exact_rows(score, valid_fn, k, descending):
    keys = row_keys(score)
    valid = valid_fn(score)
    keys = keys.masked_fill(~valid, INT64_MIN if descending else INT64_MAX)
    top = torch.topk(keys, k, dim=-1, largest=descending, sorted=True).values
    cols = (top & _LOW32).clamp(max=score.shape[-1] - 1)  # padding entries point at a real column
    return cols, valid.sum(dim=-1).clamp(max=k)


def select_candidates(
    score: torch.Tensor,
    k: int,
    *,
    descending: bool,
    valid_fn: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` valid columns per row in stable order of ``score`` (float32 ``[R, C]``).

    ``valid_fn(values) -> bool`` marks candidates; it must be monotone in the walk order (all valid
    entries come before all invalid ones, e.g. ``v > 0`` when descending over a tensor whose
    non-candidates hold 0, or ``isfinite`` with +inf fill when ascending), and NaN must not occur.
    Returns ``(columns [R, k] int64, count [R] int64)``; entries past ``count`` are padding.
    """
    cols_total = score.shape[-1]
    k = max(1, min(k, cols_total))
    k1 = min(k + 1, cols_total)
    vals, cols = torch.topk(score, k1, dim=-1, largest=descending, sorted=True)
    valid = valid_fn(vals)
    count = valid[:, :k].sum(dim=-1)
    cols = cols[:, :k]
    if k1 > 1:
        tie = (vals[:, 1:] == vals[:, :-1]) & valid[:, 1:]
        tied_rows = tie.any(dim=-1).nonzero().flatten()
        if tied_rows.numel():  # one host sync per call, never inside the DSnoT loop
            ec, en = _exact_rows(score[tied_rows], valid_fn, k, descending)
            cols = cols.index_copy(0, tied_rows, ec)
            count = count.index_copy(0, tied_rows, en)
    return cols, count


def smallest_k_mask(metric: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the first ``k`` entries per row of a stable ascending sort of ``metric``."""
    v = torch.kthvalue(metric, k, dim=-1, keepdim=True).values
    low = metric <= v
    exact = low.sum(dim=-1) == k
    if bool(exact.all()):
        return low
    rows = (~exact).nonzero().flatten()
    keys = row_keys(metric[rows])
    kth = torch.kthvalue(keys, k, dim=-1, keepdim=True).values
    return low.index_copy(0, rows, keys <= kth)
