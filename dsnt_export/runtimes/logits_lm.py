"""Exported runtimes behind the eager model's calling convention, for shared evaluation code.

``dsnt_export.evaluation.perplexity.perplexity(model, tokens, seqlen)`` calls ``model(input_ids=...,
use_cache=False).logits``; these wrappers give an ONNX Runtime session or any ``ids -> logits``
function that shape, so the exported graph is scored by exactly the same protocol as torch.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from dsnt_export.evaluation.perplexity import perplexity


class LogitsFnLM(torch.nn.Module):
    """A module whose forward runs ``fn(ids: np.ndarray[int64]) -> logits np.ndarray``."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]):
        super().__init__()
        self.fn = fn

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_):
        logits = self.fn(input_ids.detach().cpu().numpy().astype(np.int64))
        return SimpleNamespace(logits=torch.from_numpy(np.asarray(logits, dtype=np.float32)))


def ort_lm(sess) -> LogitsFnLM:
    """An ONNX Runtime logits graph as a causal LM."""
    from dsnt_export.runtimes.onnx_io import run_logits

    return LogitsFnLM(lambda ids: run_logits(sess, ids))


def windows_ppl(model, windows: np.ndarray, *, batch_size: int = 4) -> float:
    """Perplexity (project protocol) over ``windows [n, T]``: each window scored on its own."""
    w = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    res = perplexity(
        model, w.reshape(1, -1), int(w.shape[1]), batch_size=batch_size, progress=False
    )
    return res.ppl
