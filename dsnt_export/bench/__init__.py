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


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how (validated at construction; UserInputError when invalid).

    ``dtype="auto"`` is the project's one policy (:func:`dsnt_export.hf_io.resolve_dtype`:
    float32 on CPU, the checkpoint's 16-bit dtype on an accelerator); rows record the dtype each
    engine really used.
    """

    runtime: str
    device: str = "cpu"
    dtype: str = "auto"
    ppl: bool = False
    latency: bool = True
    dense: str | None = None
    prompt_lengths: tuple[int, ...] = (32, 128, 512)
    batch_sizes: tuple[int, ...] = (1, 4)
    decode_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    ppl_data: str = "stdlib-docs"
    seqlen: int = 256
    max_windows: int | None = None
    ppl_batch_size: int = 1
    sparse_kernels: bool = True
    semi_backend: str = "auto"
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        get_runtime(self.runtime)  # UserInputError listing the registered runtimes
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


def run_bench(path, options: BenchOptions, *, sink=None) -> list[dict]:
    """Benchmark the artifact at ``path``; every row is passed to ``sink`` as soon as it exists."""
    from dsnt_export.bench.runner import run

    return run(path, options, sink=sink)


__all__ = ["BenchOptions", "RUNTIMES", "run_bench", "runtime_module"]
