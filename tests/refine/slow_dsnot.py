"""Slow, obviously-correct DSnoT (spec sections 3-4), written row by row for testing.

This is a test oracle, not library code: a plain Python loop over rows and cycles with explicit
per-row candidate lists. It follows docs/dsnot-spec.md and, where bits matter, the official preset's
float32 arithmetic:

* ``D = W.float() * s`` and the Wanda metric ``|W| * sqrt(a)`` in float32;
* the initial error of every row is ``torch.sum`` over the whole ``[out, in]`` tensor of D with the
  kept entries set to 0 (``dim=1, keepdim=True``), not a sum over a gathered subset;
* grow scores are ``D / var ** p`` (no epsilon; no division at all when ``p == 0``);
* ``err`` is a float32 0-d tensor updated as ``err = (err + D[j]) - D[i]``;
* threshold and sign tests are done by torch in float32.

It also has the defect fixes of spec section 5: a row stops for good as soon as the candidate list
it needs is exhausted, and an N:M grow whose group has no unused kept weight is skipped (the grow
candidate is used up, there is no swap, the row stays active).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SlowResult:
    keep: torch.Tensor  # bool [out, in], True = kept
    err_before: torch.Tensor  # float32 [out]
    err_after: torch.Tensor  # float32 [out]
    n_swaps: int
    swaps: list  # (row, cycle, grown i, pruned j) of every accepted swap, in order


def slow_wanda_metric(weight: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    return torch.abs(weight.float()) * torch.sqrt(sq_sum.float().reshape(1, -1))


def slow_metric(method: str, weight: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    if method == "wanda":
        return slow_wanda_metric(weight, sq_sum)
    if method == "magnitude":
        return torch.abs(weight.float())
    raise ValueError(f"unknown method {method!r}")


def slow_initial_keep(metric: torch.Tensor, pattern) -> torch.Tensor:
    """Spec section 4: unstructured = first int(in*ratio) of a stable ascending sort per row are
    pruned; N:M = in each group of M the M-N smallest are pruned (ties: lower column first)."""
    rows, cols = metric.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    vals = metric.tolist()
    for r in range(rows):
        if hasattr(pattern, "m"):
            for g0 in range(0, cols, pattern.m):
                cols_g = sorted(range(g0, g0 + pattern.m), key=lambda c: (vals[r][c], c))
                for c in cols_g[: pattern.m - pattern.n_keep]:
                    keep[r, c] = False
        else:
            k = int(cols * pattern.ratio)
            for c in sorted(range(cols), key=lambda c: (vals[r][c], c))[:k]:
                keep[r, c] = False
    return keep


def _grow_lists(score_row: list[float], pruned: list[int]) -> tuple[list[int], list[int]]:
    """Pruned columns with a positive score, largest first, and with a negative score, smallest
    first. Ties follow a stable ascending sort read from the right end / the left end."""
    pos = sorted((j for j in pruned if score_row[j] > 0), key=lambda j: (score_row[j], j))
    neg = sorted((j for j in pruned if score_row[j] < 0), key=lambda j: (score_row[j], j))
    return pos[::-1], neg


def _prune_lists(d_row: list[float], wanda_row: list[float], kept: list[int]):
    """Unstructured prune candidates: kept columns with D > 0 and with D < 0, each in ascending
    Wanda order (ties: lower column first)."""
    key = lambda j: (wanda_row[j], j)  # noqa: E731
    pos = sorted((j for j in kept if d_row[j] > 0), key=key)
    neg = sorted((j for j in kept if d_row[j] < 0), key=key)
    return pos, neg


def slow_refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    sq_sum: torch.Tensor,
    s: torch.Tensor,
    var: torch.Tensor,
    pattern,
    *,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    var_power: float = 1.0,
    sign_check: bool | None = None,
    nm_metric: torch.Tensor | str = "wanda",
) -> SlowResult:
    """DSnoT on one layer. ``pattern`` is an NM (has ``.m``) or Unstructured object;
    ``nm_metric`` is the initial metric used for the N:M prune choice (a name or a tensor)."""
    is_nm = hasattr(pattern, "m")
    if sign_check is None:
        sign_check = is_nm
    w32 = weight.float()
    D = w32 * s.float().reshape(1, -1)
    masked = D.clone()
    masked[keep] = 0
    err0 = torch.sum(masked, dim=1, keepdim=True)  # [out, 1], over the whole row
    score = masked
    if var_power:
        score = masked / torch.pow(var.float().reshape(1, -1), var_power)
    wanda = slow_wanda_metric(weight, sq_sum)
    if isinstance(nm_metric, str):
        nm_metric = slow_metric(nm_metric, weight, sq_sum)
    new_keep = keep.clone()
    swaps = []
    err_after = torch.empty(keep.shape[0], dtype=torch.float32)
    thr = update_threshold
    for r in range(keep.shape[0]):
        kept = [j for j in range(keep.shape[1]) if bool(keep[r, j])]
        pruned = [j for j in range(keep.shape[1]) if not bool(keep[r, j])]
        grow_pos, grow_neg = _grow_lists(score[r].tolist(), pruned)
        prune_pos, prune_neg = _prune_lists(D[r].tolist(), wanda[r].tolist(), kept)
        metric_row = nm_metric[r].tolist()
        available = set(kept)  # N:M: initially kept columns not yet swapped out
        err = err0[r, 0].clone()
        sign0 = torch.sign(err)
        for cycle in range(max_cycles):
            grow_list = grow_pos if bool(err > 0) else grow_neg
            if not grow_list:
                break  # candidates of the needed side exhausted: the row stops
            i = grow_list.pop(0)
            if is_nm:
                g0 = i - i % pattern.m
                group = [c for c in range(g0, g0 + pattern.m) if c in available]
                if not group:
                    continue  # nothing left to prune in i's group: skip this grow, stay active
                j = min(group, key=lambda c: (metric_row[c], c))
            else:
                prune_list = prune_pos if bool(err < 0) else prune_neg
                if not prune_list:
                    break
                j = prune_list.pop(0)
            after = (err + D[r, j]) - D[r, i]
            ok = bool(torch.abs(err) > thr)
            if sign_check:
                ok = ok and bool(torch.sign(after) == sign0)
            if not ok:
                break  # a refused swap freezes the row for good
            available.discard(j)
            new_keep[r, j] = False
            new_keep[r, i] = True
            err = after
            swaps.append((r, cycle, i, j))
        err_after[r] = err
    return SlowResult(new_keep, err0.reshape(-1), err_after, len(swaps), swaps)
