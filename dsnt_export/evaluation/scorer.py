"""Continuation log-likelihoods for lm-eval, on any runtime: :class:`LogLikelihoodScorer`.

lm-evaluation-harness asks a model (``lm_eval.api.model.LM``) for ``loglikelihood`` (the summed
log-probability of a continuation after a context, and whether greedy decoding would produce it)
and ``loglikelihood_rolling`` (a whole text's log-likelihood). :class:`LogLikelihoodScorer` answers
both in two halves:

- tokenisation, the same whatever runs the model, following lm-eval's HF model (``HFLM``):
  trailing whitespace of the context moves to the continuation; ``context + continuation`` is
  encoded once without special tokens and the continuation is what follows the context's own
  encoding; an empty context is replaced by the BOS (else EOS) token; a request longer than
  ``max_length`` keeps its last ``max_length + 1`` tokens (the model sees ``max_length``);
- the log-probabilities, from an :class:`~dsnt_export.runtimes.base.Engine`'s
  ``token_logprobs``: eager torch (a loaded transformers model is wrapped in
  :class:`~dsnt_export.runtimes.torch_eager.TorchEngine`), ONNX Runtime (the logits graph; both
  through the engine's default float32 log-softmax) or vLLM (its own prompt log-probabilities).

A continuation's log-likelihood is the float64 sum of its tokens' log-probabilities; ``is_greedy``
says every continuation token is the argmax at its position. lm-eval turns these into ``acc``,
``acc_norm`` and their standard errors. :func:`as_lm` wraps a scorer as an lm-eval ``LM``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from dsnt_export.errors import UserInputError

__all__ = ["LogLikelihoodScorer", "as_lm", "DEFAULT_MAX_LENGTH"]

#: the context length used when neither the caller nor the model says (lm-eval's default)
DEFAULT_MAX_LENGTH = 2048


class LogLikelihoodScorer:
    """Log-likelihoods of continuations under one model (the maths behind lm-eval's LM).

    ``model``: an :class:`~dsnt_export.runtimes.base.Engine`, or a ``transformers`` causal LM
    (any dtype/device; not moved), run through a
    :class:`~dsnt_export.runtimes.torch_eager.TorchEngine`. ``tokenizer``: the model's tokenizer.
    ``batch_size``: requests per ``token_logprobs`` call (sequences per forward on torch and ONNX
    Runtime, prompts per ``generate`` on vLLM). ``max_length``: the longest input in tokens
    (default: the model config's ``max_position_embeddings``, else 2048), lowered to fit the
    engine's ``max_window``. ``progress``: a progress bar over the batches. Raises
    UserInputError for a batch size below 1.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        *,
        progress: bool = False,
    ) -> None:
        from dsnt_export.runtimes.base import Engine

        if batch_size < 1:
            raise UserInputError(f"batch size must be >= 1, got {batch_size}")
        if isinstance(model, Engine):
            self.engine = model
        else:
            from dsnt_export.runtimes.torch_eager import TorchEngine

            self.engine = TorchEngine(model, "model")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = int(batch_size), progress
        if max_length is None:
            cfg = getattr(getattr(self.engine, "model", None), "config", None)
            max_length = int(getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)
        if self.engine.max_window is not None:  # the window holds the input and one more token
            max_length = min(max_length, self.engine.max_window - 1)
        self.max_length = int(max_length)

    @property
    def device(self) -> torch.device:
        """Where the engine runs."""
        return self.engine.device

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS, else EOS."""
        tok = self.tokenizer
        tid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if tid is None:
            raise UserInputError(
                "the tokenizer has neither a BOS nor an EOS token; an empty context cannot be "
                "scored. Use a tokenizer with one of them"
            )
        return int(tid)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's HF model splits them."""
        if context == "":
            return [self.prefix_token_id], self.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), is_greedy)`` for each (context, continuation)."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in pairs])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text (lm-eval's rolling windows of ``max_length``)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for text in texts:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            out.append(sum(ll for ll, _ in self.score_tokens(windows)))
        return out

    def score_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        """Score token-level (context, continuation) pairs; longest first, results in input order.

        Each pair becomes the window ``(context + continuation)[-(max_length + 1):]``; its last
        ``len(continuation)`` log-probabilities from the engine are summed (float64). Raises
        UserInputError for an empty continuation.
        """
        from tqdm.auto import tqdm

        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for i, (_, cont) in enumerate(pairs):
            if not cont:
                raise UserInputError(f"empty continuation after tokenising request {i}")
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        step = self.batch_size
        bar = tqdm(total=len(order), desc="loglikelihood", unit="req", disable=not self.progress)
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            windows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1) :] for i in idx]
            scored = self.engine.token_logprobs(windows, batch_size=step)
            for i, s in zip(idx, scored, strict=True):
                n = len(pairs[i][1])
                results[i] = (float(s.logprob[-n:].double().sum()), bool(s.is_argmax[-n:].all()))
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _lm_class():
    """``lm_eval.api.model.LM`` subclass over a :class:`LogLikelihoodScorer` (built lazily)."""
    from lm_eval.api.model import LM

    class ScorerLM(LM):
        """lm-eval model backed by a :class:`LogLikelihoodScorer`; generation is not supported."""

        def __init__(self, scorer: LogLikelihoodScorer) -> None:
            super().__init__()
            self.scorer = scorer

        @property
        def device(self):
            return self.scorer.device

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise UserInputError(
                "generation tasks (output_type generate_until) are not supported by dsnt-export's "
                "zero-shot evaluation; choose log-likelihood / multiple-choice tasks such as "
                "the dsnot-paper group"
            )

    return ScorerLM


def as_lm(scorer: LogLikelihoodScorer):
    """Wrap ``scorer`` as an ``lm_eval.api.model.LM`` instance (raises UserInputError when
    lm-eval is not installed)."""
    from dsnt_export.evaluation.zero_shot import _lm_eval

    _lm_eval()
    return _lm_class()(scorer)
