"""ONNX Runtime: the exported graphs on the CPU execution provider (CUDA / TensorRT EPs when
onnxruntime-gpu provides them and the device is CUDA).

Perplexity runs the full-sequence ``logits`` graph; latency runs ``prefill`` (prompt -> logits +
KV cache) and ``decode`` (one token + cache -> logits + grown cache) of the artifact's float32
graphs (``--dtype float16`` picks the fp16 ones where they were exported). ORT has no 2:4 kernels
on its CPU and CUDA providers: dense and sparse should time the same there, and the rows show
whether they do. The dense reference is an ONNX artifact given with ``--dense``, or the dense HF
checkpoint exported on the fly (same exporter as ``dsnt-export export onnx``) into a temporary
directory that is removed afterwards.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dsnt_export.artifacts import read_manifest
from dsnt_export.bench.target import Target
from dsnt_export.errors import ArtifactError, UserInputError, require
from dsnt_export.runtimes.base import Engine, LogitsModule

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def unavailable(options: Any) -> str | None:
    try:
        ort = require("onnxruntime", None, "the onnxruntime benchmark")
    except ImportError as e:
        return str(e)
    if torch.device(options.device).type == "cuda":
        have = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
        if not have:
            return (
                "--device cuda needs onnxruntime-gpu (CUDA/TensorRT execution providers); "
                f"installed providers: {ort.get_available_providers()}. "
                "Install with: pip install 'dsnt-export[gpu]'"
            )
    return None


def providers_for(device: torch.device) -> list[list[str]]:
    """Provider lists to benchmark on ``device``: one backend per list."""
    if device.type != "cuda":
        return [["CPUExecutionProvider"]]
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [[p, "CPUExecutionProvider"] for p in GPU_PROVIDERS if p in avail]


def graphs_of(art: Path, dtype: str) -> dict[str, Path]:
    """``{"logits"|"prefill"|"decode": path}`` of an ONNX artifact, read from its manifest."""
    man = read_manifest(art)
    if man.get("kind") != "onnx":
        raise ArtifactError(f"{art} has a manifest of kind {man.get('kind')!r}, expected 'onnx'")
    graphs = (man.get("extra") or {}).get("graphs") or {}
    out = {g["kind"]: art / rel for rel, g in graphs.items() if g.get("dtype") == dtype}
    if not out:
        have = sorted({g.get("dtype") for g in graphs.values()})
        raise ArtifactError(f"{art}: no {dtype} graphs in the manifest (have: {have})")
    return out


def _feeds(sess, ids: np.ndarray, past: int, cache: dict[str, np.ndarray]) -> dict:
    b, t = ids.shape
    feeds = {}
    for inp in sess.get_inputs():
        n = inp.name
        if n == "input_ids":
            feeds[n] = ids
        elif n == "position_ids":
            feeds[n] = np.broadcast_to(np.arange(past, past + t, dtype=np.int64), (b, t)).copy()
        elif n == "cache_position":
            feeds[n] = np.arange(past, past + t, dtype=np.int64)
        elif n == "attention_mask":
            feeds[n] = np.ones((b, past + t), dtype=np.int64)
        elif n.startswith("input.") and n[len("input.") :] in cache:
            feeds[n] = cache[n[len("input.") :]]
        else:
            raise ArtifactError(f"ONNX graph input {n!r} is not one the benchmark can feed")
    return feeds


class OrtEngine(Engine):
    def __init__(
        self,
        graphs: dict[str, Path],
        variant: str,
        providers: list,
        dtype: str,
        threads: int | None,
        tmpdir: Path | None = None,
    ):
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        super().__init__(variant, first, "cpu", dtype)
        from dsnt_export.runtimes.onnx_io import session

        self._graphs, self._providers, self._threads = graphs, providers, threads
        self._session = session
        self._sess: dict[str, Any] = {}
        self._tmpdir = tmpdir
        for kind in ("prefill", "decode"):
            if kind in graphs:
                self._get(kind)

    def _get(self, kind: str):
        if kind not in self._sess:
            if kind not in self._graphs:
                raise ArtifactError(f"the ONNX artifact has no {kind!r} graph; re-export it")
            self._sess[kind] = self._session(self._graphs[kind], self._providers, self._threads)
        return self._sess[kind]

    def to_input(self, ids: torch.Tensor) -> np.ndarray:
        return ids.cpu().numpy().astype(np.int64)

    def prefill(self, ids: np.ndarray) -> tuple[dict, int]:
        sess = self._get("prefill")
        outs = sess.run(None, _feeds(sess, ids, 0, {}))
        return self._cache(sess, outs), ids.shape[1]

    def decode(self, state: tuple[dict, int], ids: np.ndarray) -> tuple[dict, int]:
        cache, past = state
        sess = self._get("decode")
        outs = sess.run(None, _feeds(sess, ids, past, cache))
        return self._cache(sess, outs), past + ids.shape[1]

    @staticmethod
    def _cache(sess, outs) -> dict:
        cache = {}
        for o, v in zip(sess.get_outputs(), outs, strict=True):
            if o.name != "logits":
                cache[o.name.removeprefix("output.")] = v
        return cache

    def as_module(self) -> nn.Module:
        sess = self._get("logits")
        name = sess.get_inputs()[0].name
        return LogitsModule(lambda ids: sess.run(["logits"], {name: ids})[0].astype(np.float32))

    def close(self) -> None:
        self._sess.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def export_dense(hf_dir: Path, kinds: set[str]) -> tuple[dict[str, Path], Path]:
    """Export a dense HF checkpoint's float32 graphs into a temporary directory."""
    from transformers import AutoModelForCausalLM

    from converters.writers.onnx import (
        EXTERNAL_DATA_THRESHOLD,
        export_generation_graphs,
        export_logits_graph,
        save_graph,
    )

    tmp = Path(tempfile.mkdtemp(prefix="dsnt-bench-dense-onnx-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        programs = {}
        if "logits" in kinds:
            programs["logits"] = export_logits_graph(model)
        if kinds & {"prefill", "decode"}:
            programs.update(export_generation_graphs(model))
        out = {}
        for kind, prog in programs.items():
            save_graph(prog, tmp / f"{kind}.onnx", EXTERNAL_DATA_THRESHOLD)
            out[kind] = tmp / f"{kind}.onnx"
        return out, tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dense_factory(target: Target, options: Any, providers: list[str], dtype: str):
    d = target.dense
    if read_manifest(d, required=False) and read_manifest(d)["kind"] == "onnx":
        return lambda: OrtEngine(graphs_of(d, dtype), "dense", providers, dtype, options.threads)
    if not (d / "config.json").is_file():
        raise UserInputError(f"--dense {d} is neither an ONNX artifact nor an HF checkpoint")
    kinds = ({"logits"} if options.ppl else set()) | (
        {"prefill", "decode"} if options.latency else set()
    )

    def make():
        log.info("exporting the dense model %s to ONNX for the comparison", d)
        graphs, tmp = export_dense(d, kinds)
        return OrtEngine(graphs, "dense", providers, dtype, options.threads, tmpdir=tmp)

    return make


def variants(target: Target, options: Any) -> Iterator[tuple[str, Callable[[], Engine] | str]]:
    dtype = "float32" if options.dtype in ("auto", "float32") else options.dtype
    for providers in providers_for(torch.device(options.device)):
        if target.dense is None:
            yield "dense", target.dense_reason or "no dense reference"
        else:
            yield "dense", _dense_factory(target, options, providers, dtype)
        graphs = graphs_of(target.path, dtype)
        sparse_p = list(providers)
        if sparse_p[0] == "TensorrtExecutionProvider":  # the one EP with 2:4 tactics
            sparse_p[0] = ("TensorrtExecutionProvider", {"trt_sparsity_enable": True})
        yield (
            "sparse",
            (lambda g=graphs, p=sparse_p: OrtEngine(g, "sparse", p, dtype, options.threads)),
        )
