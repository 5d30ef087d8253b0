"""Benchmarks of exported artifacts: perplexity and latency, dense vs sparse, per runtime.

    from dsnt_export.bench import BenchOptions, run_bench
    rows = run_bench("out/onnx", BenchOptions(runtime="onnxruntime", ppl=True), sink=print)

Runtimes come from the registry of :mod:`dsnt_export.runtimes` (each module imported only when
used): ``torch`` (eager, CPU/CUDA, plus 2:4 semi-structured kernels on sm80+), ``onnxruntime``
(CPU EP; CUDA/TensorRT EPs with onnxruntime-gpu), ``tensorrt`` (engines, dense vs
SPARSE_WEIGHTS), ``vllm`` (offline LLM API). Every runtime is driven through the one engine
interface of :mod:`dsnt_export.runtimes.base`.
A runtime, device or variant that is absent yields a row with status "skipped" and the reason.
The row schema is documented in :mod:`dsnt_export.bench.schema`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dsnt_export.errors import UserInputError
from dsnt_export.runtimes import RUNTIMES, get_runtime, runtime_module


def _ints(v, what: str) -> tuple[int, ...]:
    if isinstance(v, str):
        v = [x for x in v.replace(" ", "").split(",") if x]
    try:
        out = tuple(int(x) for x in v)
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{what} must be a comma list of integers, got {v!r}") from e
    if not out or any(x < 1 for x in out):
        raise UserInputError(f"{what} must be positive integers, got {v!r}")
    return out


# measured on the embedded SmolLM2-135M run output, 2 CPU cores (see dsnt-export bench --help)
CPU_GRID = {
    "batch_sizes": (1, 4),
    "prompt_lengths": (128, 256),
    "decode_tokens": 32,
    "repeats": 5,
    "warmup": 1,
    "max_windows": 64,  # the windows `dsnt-export run` evaluates (recipe eval_max_windows)
}
ACCELERATOR_GRID = {
    "batch_sizes": (1, 4, 16),
    "prompt_lengths": (128, 512, 2048),
    "decode_tokens": 64,
    "repeats": 10,
    "warmup": 2,
    "max_windows": None,  # every window
}


def default_grid(device: str = "cpu") -> dict:
    """The default bench grid for ``device``: :data:`CPU_GRID` on the CPU (a few minutes on 2
    cores for a ~135M model), :data:`ACCELERATOR_GRID` on anything else."""
    kind = str(device).split(":")[0]
    return dict(CPU_GRID if kind == "cpu" else ACCELERATOR_GRID)


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how (validated at construction; UserInputError when invalid).

    ``dtype="auto"`` is the project's one policy (:func:`dsnt_export.hf_io.resolve_dtype`:
    float32 on CPU, the checkpoint's 16-bit dtype on an accelerator); rows record the dtype each
    engine really used.

    The grid fields left at ``None`` (``prompt_lengths``, ``batch_sizes``, ``decode_tokens``,
    ``repeats``, ``warmup``) and ``max_windows="auto"`` take the device's defaults
    (:func:`default_grid`: a grid that finishes in a few minutes on 2 CPU cores for a ~135M
    model, a bigger one on an accelerator); ``max_windows=None`` scores every window. The
    resolved values are what the rows record.
    """

    runtime: str
    device: str = "cpu"
    dtype: str = "auto"
    ppl: bool = False
    latency: bool = True
    dense: str | None = None
    prompt_lengths: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    decode_tokens: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    ppl_data: str = "stdlib-docs"
    seqlen: int = 256
    max_windows: int | str | None = "auto"
    ppl_batch_size: int = 1
    sparse_kernels: bool = True
    semi_backend: str = "auto"
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        get_runtime(self.runtime)  # UserInputError listing the registered runtimes
        grid = default_grid(self.device)
        for name in ("prompt_lengths", "batch_sizes", "decode_tokens", "repeats", "warmup"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, grid[name])
        if self.max_windows == "auto":
            object.__setattr__(self, "max_windows", grid["max_windows"])
        elif self.max_windows is not None and (
            not isinstance(self.max_windows, int)
            or isinstance(self.max_windows, bool)
            or self.max_windows < 1
        ):
            raise UserInputError(
                f"max_windows must be a positive integer, None (all) or 'auto', "
                f"got {self.max_windows!r}"
            )
        object.__setattr__(self, "prompt_lengths", _ints(self.prompt_lengths, "prompt lengths"))
        object.__setattr__(self, "batch_sizes", _ints(self.batch_sizes, "batch sizes"))
        for name, lo in (("decode_tokens", 0), ("repeats", 1), ("warmup", 0), ("seqlen", 2)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UserInputError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not (self.ppl or self.latency):
            raise UserInputError("nothing to measure: ask for --ppl and/or --latency")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise UserInputError(
                f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"
            )

    def to_json(self) -> dict:
        """The options as a JSON-able dict (recorded in every row)."""
        return asdict(self)


def work_plan(options: BenchOptions, n_variants: int, n_windows: int | None = None) -> dict:
    """The work ``options`` ask of ``n_variants`` engines, counted before anything is timed.

    ``n_windows`` is the number of perplexity windows actually scored (None when ``--ppl`` is
    off). Returns ``{"latency_configs", "forwards", "tokens", "text"}``: every forward pass
    (warm-ups included: each prefill point runs ``warmup + repeats`` prompts, each decode point
    ``warmup + repeats`` x (an untimed prefill + ``decode_tokens`` steps)) and every token they
    process, summed over the variants, an upper bound where an engine cannot decode (e.g. ONNX
    Runtime on a logits-only artifact); ``text`` is the one-line summary the CLI prints first.
    """
    runs = options.warmup + options.repeats
    k = options.decode_tokens
    cfgs = [(b, n) for b in options.batch_sizes for n in options.prompt_lengths]
    fwd = tok = 0
    if options.latency:
        for b, n in cfgs:
            fwd += runs * (1 + (1 + k if k else 0))
            tok += runs * (b * n + ((b * n + b * k) if k else 0))
    if options.ppl and n_windows:
        fwd += n_windows
        tok += n_windows * options.seqlen
    fwd, tok = fwd * n_variants, tok * n_variants
    parts = []
    if options.ppl:
        parts.append(f"perplexity on {n_windows} windows x {options.seqlen} tokens")
    if options.latency:
        parts.append(
            f"latency on {len(cfgs)} configs (batch {_csv(options.batch_sizes)} x prompt "
            f"{_csv(options.prompt_lengths)}), prefill + {k} decode steps, median of "
            f"{options.repeats} after {options.warmup} warm-up"
        )
    text = (
        f"bench plan: {n_variants} variant(s) x ({'; '.join(parts)}) = up to {fwd} forward "
        f"passes, {tok} tokens (decode counted as planned: a runtime without decode skips it)"
    )
    return {"latency_configs": len(cfgs), "forwards": fwd, "tokens": tok, "text": text}


def _csv(xs) -> str:
    return ",".join(str(x) for x in xs)


def run_bench(path, options: BenchOptions, *, sink=None) -> list[dict]:
    """Benchmark the artifact at ``path``; every row is passed to ``sink`` as soon as it exists."""
    from dsnt_export.bench.runner import run

    return run(path, options, sink=sink)


__all__ = [
    "ACCELERATOR_GRID",
    "BenchOptions",
    "CPU_GRID",
    "RUNTIMES",
    "default_grid",
    "run_bench",
    "runtime_module",
    "work_plan",
]
