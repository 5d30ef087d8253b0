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
from torch import nn

from dsnt_export.bench.target import Target
from dsnt_export.errors import ArtifactError, require
from dsnt_export.runtimes.base import Engine, LogitsModule

ENGINE_VARIANTS = ("dense", "sparse-kernels")


def unavailable(options: Any) -> str | None:
    try:
        require("tensorrt", "tensorrt", "the TensorRT benchmark")
    except ImportError as e:
        return str(e)
    if torch.device(options.device).type != "cuda" or not torch.cuda.is_available():
        return "TensorRT engines need a CUDA GPU (run with --device cuda on a GPU machine)"
    return None


class TrtEngine(Engine):
    supports_decode = False
    decode_skip_reason = "the TensorRT engine runs the full-sequence graph (no KV cache)"

    def __init__(self, path: Path, variant: str, device: torch.device):
        super().__init__(variant, "tensorrt", device, "float16")
        import tensorrt as trt

        self.trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot deserialize {path} (version or GPU mismatch)")
        self.ctx = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]

    def to_input(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.to(self.device, torch.int64).contiguous()

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        import numpy as np

        self.ctx.set_input_shape(self.inputs[0], tuple(ids.shape))
        self.ctx.set_tensor_address(self.inputs[0], ids.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(self.ctx.get_tensor_shape(n))
            np_dt = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(n)))
            t = torch.empty(
                shape, dtype=torch.from_numpy(np.zeros(0, np_dt)).dtype, device=self.device
            )
            self.ctx.set_tensor_address(n, t.data_ptr())
            outs[n] = t
        stream = torch.cuda.current_stream(self.device)
        if not self.ctx.execute_async_v3(stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed (see the TensorRT log above)")
        return outs.get("logits", next(iter(outs.values())))

    def prefill(self, ids: torch.Tensor) -> Any:
        return self._run(ids)

    def decode(self, state: Any, ids: torch.Tensor) -> Any:
        raise NotImplementedError(self.decode_skip_reason)

    def as_module(self) -> nn.Module:
        return LogitsModule(
            lambda ids: self._run(torch.from_numpy(ids).to(self.device)).float().cpu().numpy()
        )


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
