"""vLLM's offline ``LLM`` API on the HF checkpoints: dense source vs sparse (zeros in place).

Current vLLM has no 2:4 kernels (runtimes.md): both variants run dense GEMMs, and the rows say
how they compare. Latency: prefill = ``generate(max_tokens=1)``; decode per token =
(``generate(max_tokens=1 + N, ignore_eos)`` - prefill) / N, both medians over the repeats.
Perplexity: the prompt log-probabilities of each window (``prompt_logprobs=0``), scored with the
windows of :func:`dsnt_export.evaluation.perplexity.make_windows`. Needs ``vllm`` and a CUDA GPU.

Not exercised in this project's CI (no GPU there): treat its numbers as first-run numbers.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dsnt_export.bench.target import Target
from dsnt_export.errors import NonFiniteError, require
from dsnt_export.runtimes.base import Engine


def unavailable(options: Any) -> str | None:
    try:
        require("vllm", "vllm", "the vLLM benchmark")
    except ImportError as e:
        return str(e)
    if torch.device(options.device).type != "cuda" or not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU (run with --device cuda on a GPU machine)"
    return None


class VllmEngine(Engine):
    decode_by_generate = True

    def __init__(self, path, variant: str, dtype: str, device: torch.device):
        super().__init__(variant, "vllm", device, dtype)
        from vllm import LLM

        self.llm = LLM(
            model=str(path),
            dtype="float16" if dtype == "auto" else dtype,
            gpu_memory_utilization=0.6,
            seed=0,
        )

    def to_input(self, ids: torch.Tensor) -> list[list[int]]:
        return ids.tolist()

    def _prompts(self, ids: list[list[int]]):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=r) for r in ids]

    def generate(self, ids: list[list[int]], max_tokens: int, **kw: Any):
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
        return self.llm.generate(self._prompts(ids), sp, use_tqdm=False)

    def prefill(self, ids: list[list[int]]) -> Any:
        return self.generate(ids, 1)

    def decode(self, state: Any, ids: Any) -> Any:
        raise NotImplementedError("vLLM decodes inside generate(); see decode_by_generate")

    def as_module(self) -> nn.Module:
        raise NotImplementedError("vLLM exposes log-probabilities, not logits: use perplexity()")

    def perplexity(self, tokens: torch.Tensor, seqlen: int, max_windows: int | None, dataset):
        from dsnt_export.evaluation.perplexity import PerplexityResult, make_windows

        t0 = time.perf_counter()
        windows = make_windows(tokens.long(), seqlen, max_windows)
        outs = self.generate(windows.tolist(), 1, prompt_logprobs=0)
        total = 0.0
        for w, o in zip(windows.tolist(), outs, strict=True):
            for pos in range(1, len(w)):
                lp = o.prompt_logprobs[pos][w[pos]].logprob
                total -= float(lp)
        scored = windows.shape[0] * (seqlen - 1)
        nll = total / scored
        if not math.isfinite(nll):
            raise NonFiniteError("vLLM returned a non-finite prompt log-probability")
        return PerplexityResult(
            ppl=math.exp(nll),
            nll=nll,
            n_windows=windows.shape[0],
            n_tokens_scored=scored,
            seqlen=seqlen,
            dataset=dict(dataset),
            seconds=round(time.perf_counter() - t0, 3),
        )

    def close(self) -> None:
        self.llm = None
        gc.collect()


def variants(target: Target, options: Any) -> Iterator[tuple[str, Callable[[], Engine] | str]]:
    dev = torch.device(options.device)
    if target.dense is None:
        yield "dense", target.dense_reason or "no dense reference"
    else:
        yield "dense", lambda: VllmEngine(target.dense, "dense", options.dtype, dev)
    yield "sparse", lambda: VllmEngine(target.path, "sparse", options.dtype, dev)
