"""Perplexity with the WikiText-2 protocol (spec section 6).

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
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    n_windows: int
    n_tokens_scored: int
    seqlen: int
    dataset: dict = field(default_factory=dict)
    seconds: float | None = None

    def to_json(self) -> dict:
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


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def window_nll_sums(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL per window of ``batch[b, T]`` (float64 [b])."""
    logits = model(input_ids=batch, use_cache=False).logits
    logits = logits[:, :-1, :].float()
    targets = batch[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return losses.view(batch.shape[0], -1).double().sum(dim=1)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
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

    ``device`` is where the input ids go (default: the device of the model's first parameter);
    the model is not moved. ``max_windows`` keeps only the first windows (for quick checks).
    ``dataset`` (e.g. the description from :func:`dsnt_export.data.get_eval_tokens`) is stored
    in the result.
    """
    import time

    from tqdm.auto import tqdm

    if int(batch_size) < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    dev = torch.device(device) if device is not None else _model_device(model)
    windows = make_windows(tokens.long(), seqlen, max_windows)
    was_training = model.training
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


def evaluate_source(
    model: torch.nn.Module,
    tokenizer: Any,
    source: str = "stdlib-docs",
    seqlen: int = 256,
    **kwargs: Any,
) -> PerplexityResult:
    """Tokenize the evaluation part of ``source`` and compute its perplexity."""
    from dsnt_export.data import get_eval_tokens

    tokens, desc = get_eval_tokens(source, tokenizer)
    return perplexity(model, tokens, seqlen, dataset=desc, **kwargs)
