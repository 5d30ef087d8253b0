"""Perplexity with the WikiText-2 protocol (docs/dsnot-spec.md section 6).

The evaluation text is tokenized once into ``tokens[1, N]``; it is cut into ``N // seqlen``
non-overlapping windows of ``seqlen`` tokens (the tail is dropped); each window is scored on its
own (no context carried over), every position predicting the next token, so a window scores
``seqlen - 1`` tokens. The result is the mean token NLL over all windows and ``ppl = exp(mean)``.
As all windows have the same length this equals the reference's mean of per-window mean losses.

Numerics: logits are cast to float32 before the log-softmax, per-token losses are summed in
float64. A non-finite loss raises :class:`NonFiniteError` instead of reporting ``nan``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dsnt_export.errors import NonFiniteError, ShapeError, UserInputError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """One perplexity measurement: ``ppl = exp(nll)``, ``nll`` the mean token NLL in nats over
    ``n_tokens_scored = n_windows * (seqlen - 1)`` tokens; ``dataset`` describes the text,
    ``seconds`` the wall time of the scoring."""

    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    n_windows: int
    n_tokens_scored: int
    seqlen: int
    dataset: dict = field(default_factory=dict)
    seconds: float | None = None

    def to_json(self) -> dict:
        """The fields as a JSON-able dict (the bench's perplexity row fields)."""
        return asdict(self)


def make_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut ``tokens[1, N]`` (or ``[N]``) into ``[N // seqlen, seqlen]`` windows, tail dropped."""
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ShapeError(
            f"perplexity expects token ids of shape [1, N] or [N], got {tuple(tokens.shape)}; "
            "join the evaluation text and tokenize it once (data.get_eval_tokens)"
        )
    if int(seqlen) < 2:
        raise UserInputError(f"seqlen must be at least 2 to score any token, got {seqlen}")
    n = tokens.numel() // int(seqlen)
    if max_windows is not None:
        if int(max_windows) < 1:
            raise UserInputError(f"max_windows must be at least 1, got {max_windows}")
        n = min(n, int(max_windows))
    if n == 0:
        raise UserInputError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one window of "
            f"seqlen={seqlen}; use a shorter --seqlen or more text"
        )
    return tokens[: n * int(seqlen)].reshape(n, int(seqlen))


def _model_device(model: Any) -> torch.device:
    if not isinstance(model, torch.nn.Module):  # an engine: it moves ids where it runs
        return torch.device("cpu")
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def nll_sums(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL per window: float64 ``[B]`` from ``logits [B, T, V]`` of ``ids [B, T]``.

    The one scoring step of the protocol: position ``t`` predicts ``ids[:, t + 1]``; logits are
    cast to float32 before the log-softmax and the per-token losses summed in float64.
    """
    logits = torch.as_tensor(logits)
    ids = torch.as_tensor(ids, dtype=torch.long)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ShapeError(
            f"logits of shape [B, T, V] matching ids [B, T] expected, got logits "
            f"{tuple(logits.shape)} and ids {tuple(ids.shape)}"
        )
    lg = logits[:, :-1, :].float()
    targets = ids[:, 1:].to(lg.device)
    losses = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.view(ids.shape[0], -1).double().sum(dim=1)


def window_nll_sums(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL per window of ``batch[B, T]`` (float64 ``[B]``).

    ``model`` is an eager causal LM (``model(input_ids=..., use_cache=False).logits``) or a runtime
    engine (:class:`dsnt_export.runtimes.base.Engine`, scored through its ``nll_sums``).
    """
    if not isinstance(model, torch.nn.Module) and hasattr(model, "nll_sums"):
        return model.nll_sums(batch)
    return nll_sums(model(input_ids=batch, use_cache=False).logits, batch)


@torch.no_grad()
def perplexity(
    model: Any,
    tokens: torch.Tensor,
    seqlen: int,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
    progress: bool = True,
    dataset: dict | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``tokens[1, N]`` with the WikiText-2 protocol.

    ``model`` is an eager causal LM (an ``nn.Module`` called as ``model(input_ids=...,
    use_cache=False)``) or any runtime engine (:class:`dsnt_export.runtimes.base.Engine`): both go
    through :func:`window_nll_sums`, so every runtime is scored by the same protocol.
    ``device`` is where the input ids go (default: the device of the model's first parameter,
    the CPU for an engine); the model is not moved. ``max_windows`` keeps only the first windows (for quick checks).
    ``dataset`` (e.g. the description from :func:`dsnt_export.data.get_eval_tokens`) is stored
    in the result.
    """
    import time

    from tqdm.auto import tqdm

    if int(batch_size) < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    dev = torch.device(device) if device is not None else _model_device(model)
    windows = make_windows(tokens.long(), seqlen, max_windows)
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress)
    try:
        for start in range(0, windows.shape[0], int(batch_size)):
            batch = windows[start : start + int(batch_size)].to(dev)
            sums = window_nll_sums(model, batch).cpu()
            if not torch.isfinite(sums).all():
                bad = start + int((~torch.isfinite(sums)).nonzero()[0])
                raise NonFiniteError(
                    f"the model produced a non-finite loss on evaluation window {bad} "
                    f"(tokens {bad * seqlen}..{(bad + 1) * seqlen - 1}); its weights or "
                    "activations overflow (try float32) or contain NaN/Inf"
                )
            total += sums.sum()
            bar.update(batch.shape[0])
    finally:
        bar.close()
        if is_module:
            model.train(was_training)
    n_windows = windows.shape[0]
    scored = n_windows * (int(seqlen) - 1)
    nll = float(total) / scored
    ppl = math.exp(nll) if nll < 709 else math.inf
    logger.info("perplexity %.4f over %d windows of %d tokens", ppl, n_windows, seqlen)
    return PerplexityResult(
        ppl=ppl,
        nll=nll,
        n_windows=n_windows,
        n_tokens_scored=scored,
        seqlen=int(seqlen),
        dataset=dict(dataset or {}),
        seconds=round(time.perf_counter() - t0, 3),
    )


def windows_perplexity(model: Any, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Perplexity (this module's protocol) of ``windows [n, T]`` int64, each scored on its own.

    ``model`` as for :func:`perplexity`. Used for parity on stored reference windows.
    """
    w = torch.as_tensor(windows, dtype=torch.long)
    if w.dim() != 2:
        raise ShapeError(f"windows of shape [n, T] expected, got {tuple(w.shape)}")
    res = perplexity(
        model, w.reshape(1, -1), int(w.shape[1]), batch_size=batch_size, progress=False
    )
    return res.ppl


def logits_perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Perplexity of already computed ``logits [n, T, V]`` of windows ``ids [n, T]`` (this
    module's protocol, no second forward pass); ``inf`` where the mean NLL overflows ``exp``."""
    sums = nll_sums(logits, ids)
    ids = torch.as_tensor(ids)
    nll = float(sums.sum()) / max(ids.shape[0] * (ids.shape[1] - 1), 1)
    return math.exp(nll) if nll < 709 else math.inf
