"""Runtimes: one engine class per backend behind one interface (:mod:`dsnt_export.runtimes.base`).

The registry below is the one list of runtimes; ``dsnt-export bench --runtime`` choices, the
artifact kind each runtime reads and the row schema are derived from it. To add a runtime, write
one module (``unavailable``, ``variants`` and an :class:`~dsnt_export.runtimes.base.Engine`
subclass) and add one ``register_runtime`` line here. Modules are imported only when used.
"""

from dsnt_export.runtimes.base import (
    RUNTIMES,
    Engine,
    Step,
    get_runtime,
    register_runtime,
    runtime_module,
    runtime_names,
)

register_runtime(
    "torch", "dsnt_export.runtimes.torch_eager", "hf", "PyTorch eager (+ 2:4 kernels)", scores=True
)
register_runtime(
    "onnxruntime", "dsnt_export.runtimes.onnxruntime", "onnx", "ONNX Runtime", scores=True
)
register_runtime("tensorrt", "dsnt_export.runtimes.tensorrt", "tensorrt", "TensorRT engines")
register_runtime("vllm", "dsnt_export.runtimes.vllm", "hf", "vLLM offline LLM API", scores=True)

__all__ = [
    "RUNTIMES",
    "Engine",
    "Step",
    "get_runtime",
    "register_runtime",
    "runtime_module",
    "runtime_names",
]
