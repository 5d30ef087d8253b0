"""TensorRT engines: dense vs SPARSE_WEIGHTS, built by ``dsnt-export export tensorrt``.

Reads the artifact (kind "tensorrt", written by ``converters.writers.tensorrt``): its manifest's
``extra.report`` names ``tensorrt_report.json``, whose ``engines`` hold ``{"sparse": {"file": ...,
"n_eligible", "n_picked", ...}, "dense": {"file": ...}}``; the SPARSE_WEIGHTS engine is benchmarked
as variant "sparse-kernels" (with how many linears TensorRT ran sparse), the other as "dense"
(the same 2:4 weights on dense tactics). Engines are built from the
full-sequence logits graph (no KV cache), so perplexity and prefill latency are measured here and
decode latency is reported as skipped. Needs ``tensorrt`` and a CUDA GPU; without them every row
is a skip with the reason.

Not exercised in this project's CI (no GPU there): treat its numbers as first-run numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dsnt_export.bench.target import Target
from dsnt_export.errors import ArtifactError, require
from dsnt_export.runtimes.base import Engine, Step

ENGINE_VARIANTS = ("dense", "sparse-kernels")


def unavailable(options: Any) -> str | None:
    """Why TensorRT cannot run on ``options.device`` here (None if it can)."""
    try:
        require("tensorrt", "tensorrt", "the TensorRT benchmark")
    except ImportError as e:
        return str(e)
    if torch.device(options.device).type != "cuda" or not torch.cuda.is_available():
        return "TensorRT engines need a CUDA GPU (run with --device cuda on a GPU machine)"
    return None


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    import numpy as np

    return torch.from_numpy(np.zeros(0, np.dtype(trt.nptype(trt_dtype)))).dtype


class TrtEngine(Engine):
    """A serialized TensorRT engine (``model.<kind>.plan``) of the full-sequence logits graph.

    The plan is deserialized here (ArtifactError when TensorRT refuses it: another TensorRT
    version or GPU). I/O buffers are torch tensors on ``device``; ``dtype`` is the engine's
    logits dtype (float16 for the engines ``dsnt-export export tensorrt`` builds). ``logits``
    runs ``batch`` rows at a time; ``prefill`` is one full-sequence forward (no KV cache), so
    decode is not available (``decode_skip_reason``).
    """

    name = "tensorrt"
    decode_skip_reason = "the TensorRT engine runs the full-sequence graph (no KV cache)"
    prefill_note = "prefill timed on the full-sequence logits engine (no KV cache built)"

    def __init__(
        self, path: str | Path, variant: str, device: torch.device | str = "cuda", batch: int = 4
    ):
        import tensorrt as trt

        self.trt, self.batch = trt, int(batch)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"TensorRT cannot deserialize {path} (built by another TensorRT version or for "
                "another GPU); rebuild it here with dsnt-export export tensorrt"
            )
        self.ctx = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        self._logits_name = "logits" if "logits" in self.outputs else self.outputs[0]
        out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._logits_name))
        super().__init__(variant, "tensorrt", device, out_dtype)

    def to_input(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(ids).to(self.device, torch.int64).contiguous()

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        self.ctx.set_input_shape(self.inputs[0], tuple(ids.shape))
        self.ctx.set_tensor_address(self.inputs[0], ids.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(self.ctx.get_tensor_shape(n))
            dt = _torch_dtype(self.trt, self.engine.get_tensor_dtype(n))
            t = torch.empty(shape, dtype=dt, device=self.device)
            self.ctx.set_tensor_address(n, t.data_ptr())
            outs[n] = t
        stream = torch.cuda.current_stream(self.device)
        if not self.ctx.execute_async_v3(stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed (see the TensorRT log above)")
        return outs[self._logits_name]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.to_input(ids)
        return torch.cat(
            [self._run(x[i : i + self.batch]).float() for i in range(0, len(x), self.batch)]
        )

    def prefill(self, ids: torch.Tensor) -> Step:
        out = self._run(ids)
        return Step(out[:, -1:], None, int(ids.shape[1]))

    def close(self) -> None:
        self.ctx = self.engine = None


ENGINE_KIND = {"dense": "dense", "sparse-kernels": "sparse"}  # variant -> report's engine kind


def engines_of(target: Target) -> tuple[dict, str | None]:
    """The report's ``engines`` dict, or ({}, why not)."""
    import json

    extra = (target.manifest or {}).get("extra") or {}
    name = extra.get("report")
    if not name or not (target.path / name).is_file():
        return {}, (
            f"{target.path}: no TensorRT report (manifest extra.report); rebuild with "
            "dsnt-export export tensorrt"
        )
    try:
        data = json.loads((target.path / name).read_text())
    except (OSError, ValueError) as e:
        return {}, f"{target.path / name} is unreadable ({e})"
    return data.get("engines") or {}, None


def variants(target: Target, options: Any) -> Iterator[tuple[str, Callable[[], Engine] | str]]:
    """``dense`` and ``sparse-kernels`` (SPARSE_WEIGHTS) engines named by the artifact's report."""
    dev = torch.device(options.device)
    engines, why = engines_of(target)
    for v in ENGINE_VARIANTS:
        e = engines.get(ENGINE_KIND[v])
        if e is None or not e.get("file"):
            yield v, why or f"no {ENGINE_KIND[v]} engine in {target.path}"
            continue

        def make(p=target.path / e["file"], v=v, e=e):
            eng = TrtEngine(p, v, dev)
            eng.rows.append(
                {
                    "bench": "conversion",
                    "n_converted": e.get("n_picked"),
                    "n_fallback": (e.get("n_targets") or 0) - (e.get("n_picked") or 0),
                    "n_eligible": e.get("n_eligible"),
                    "flags": e.get("flags"),
                    "layers": [],
                }
            )
            return eng

        yield v, make
