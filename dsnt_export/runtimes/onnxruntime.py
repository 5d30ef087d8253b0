"""ONNX Runtime: the exported graphs on the CPU execution provider (CUDA / TensorRT EPs when
onnxruntime-gpu provides them and the device is CUDA).

An ONNX artifact (``dsnt-export export onnx``) holds per dtype a full-sequence ``logits`` graph
(``model.onnx``: ids -> logits) and, where generation graphs were exported, ``prefill`` (prompt ->
logits + KV cache) and ``decode`` (one token + cache -> logits + grown cache). :class:`OrtEngine`
runs them: ``logits`` on the logits graph, ``prefill``/``decode_step`` on the generation graphs.
An artifact with only the logits graph (what ``dsnt-export run`` writes) is timed on that graph
for prefill (``prefill_note`` says so in the rows) and its decode is skipped with the reason.

``dtype="auto"`` picks the float32 graphs on CPU (the project's policy: float32 on CPU) and on a
CUDA device the float16 graphs where they were exported (else float32); the engine records the
graphs' dtype. ORT has no 2:4 kernels on its CPU and CUDA providers: dense and sparse should time
the same there, and the rows show whether they do. The dense reference is an ONNX artifact given
with ``--dense``, or the dense HF checkpoint exported on the fly (same exporter as ``dsnt-export
export onnx``, the same graph kinds as the sparse artifact) into a temporary directory that is
removed when the engine closes.
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

from dsnt_export.artifacts import read_manifest
from dsnt_export.bench.target import Target
from dsnt_export.errors import ArtifactError, UserInputError, require
from dsnt_export.runtimes.base import Engine, Step

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
GRAPH_KINDS = ("logits", "prefill", "decode")
LOGITS_PREFILL_NOTE = (
    "prefill timed on the full-sequence logits graph (the artifact has no KV-cache prefill "
    "graph): one forward over the prompt, logits for every position, no cache built"
)
NO_DECODE_REASON = (
    "the ONNX artifact has no decode graph (dsnt-export run exports only the logits graph); "
    "export the KV-cache graphs with `dsnt-export export onnx` (--generation-dtypes) to time decode"
)


def unavailable(options: Any) -> str | None:
    """Why ONNX Runtime cannot run on ``options.device`` here (None if it can)."""
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


def session(path: str | Path, providers: list | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` of the graph at ``path`` (CPU provider by default).

    Raises ArtifactError when ONNX Runtime refuses the graph, MissingDependencyError (an
    ImportError) when onnxruntime is not installed.
    """
    ort = require("onnxruntime", None, "running ONNX graphs")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        if type(e).__module__.startswith("onnxruntime"):
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}") from e
        raise


def graphs_of(art: Path, dtype: str) -> dict[str, Path]:
    """``{"logits"|"prefill"|"decode": path}`` of an ONNX artifact's ``dtype`` graphs, read from
    its manifest. Raises ArtifactError if it is no ONNX artifact or has no such graphs."""
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
        elif n.startswith("input.") and n.removeprefix("input.") in cache:
            feeds[n] = cache[n.removeprefix("input.")]
        elif n.startswith("input."):
            raise ArtifactError(
                f"ONNX graph input {n!r} is cache state that no earlier step outputs: the "
                "engine feeds a graph's input.<name> from the previous step's output.<name> "
                "(and a prefill nothing); re-export the graphs with dsnt-export export onnx"
            )
        else:
            raise ArtifactError(
                f"ONNX graph input {n!r} is not one the engine knows how to feed (input_ids, "
                "position_ids, cache_position, attention_mask, input.cache.*)"
            )
    return feeds


class OrtEngine(Engine):
    """The graphs of one ONNX artifact (one dtype) on ONNX Runtime.

    ``graphs``: ``{"logits"|"prefill"|"decode": path}`` (at least one); ``providers``: the
    execution providers, the first naming the backend; ``tmpdir``: a directory the engine owns
    and removes on :meth:`close` (graphs exported on the fly). Sessions for every given graph
    are created here, so a graph ORT refuses fails at load time. ``batch`` bounds the rows per
    ``logits`` run. Token ids go in as int64 numpy; logits come out as float32 CPU tensors.
    """

    name = "onnxruntime"
    distributions = ("onnxruntime", "onnxruntime-gpu")

    def __init__(
        self,
        graphs: dict[str, Path],
        variant: str = "sparse",
        providers: list | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        tmpdir: Path | None = None,
        batch: int = 4,
    ):
        providers = providers or ["CPUExecutionProvider"]
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        device = "cuda" if first in GPU_PROVIDERS else "cpu"
        super().__init__(variant, first, device, dtype)
        unknown = set(graphs) - set(GRAPH_KINDS)
        if not graphs or unknown:
            raise UserInputError(
                f"OrtEngine takes graphs of kinds {GRAPH_KINDS}, got {sorted(graphs)}"
            )
        self._tmpdir, self.batch = tmpdir, int(batch)
        try:
            self._sess = {k: session(p, providers, threads) for k, p in graphs.items()}
        except BaseException:
            self.close()
            raise
        if "prefill" not in self._sess:
            self.prefill_note = LOGITS_PREFILL_NOTE
        if "decode" not in self._sess:
            self.decode_skip_reason = NO_DECODE_REASON

    @classmethod
    def from_artifact(
        cls, path: str | Path, dtype: str = "float32", kinds=GRAPH_KINDS, **kw: Any
    ) -> OrtEngine:
        """An engine over the ``kinds`` graphs of ``dtype`` that the artifact at ``path`` has."""
        graphs = {k: p for k, p in graphs_of(Path(path), dtype).items() if k in kinds}
        if not graphs:
            raise ArtifactError(f"{path}: none of the graph kinds {list(kinds)} in {dtype}")
        return cls(graphs, dtype=dtype, **kw)

    def _get(self, kind: str):
        if kind not in self._sess:
            raise ArtifactError(f"the ONNX artifact has no {kind!r} graph; re-export it")
        return self._sess[kind]

    def to_input(self, ids: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(torch.as_tensor(ids).cpu().numpy().astype(np.int64))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        sess = self._get("logits")
        x = self.to_input(ids)
        name = sess.get_inputs()[0].name
        outs = [
            sess.run(["logits"], {name: x[i : i + self.batch]})[0]
            for i in range(0, len(x), self.batch)
        ]
        return torch.from_numpy(np.concatenate(outs).astype(np.float32, copy=False))

    @staticmethod
    def _split(sess, outs: list[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits, cache = None, {}
        for o, v in zip(sess.get_outputs(), outs, strict=True):
            if o.name == "logits":
                logits = v
            else:
                cache[o.name.removeprefix("output.")] = v
        return logits, cache

    def prefill(self, ids: np.ndarray) -> Step:
        if "prefill" not in self._sess:  # a logits-only artifact: time the full-sequence graph
            sess = self._get("logits")
            out = sess.run(["logits"], {sess.get_inputs()[0].name: ids})[0]
            return Step(out[:, -1:], None, ids.shape[1])
        sess = self._sess["prefill"]
        logits, cache = self._split(sess, sess.run(None, _feeds(sess, ids, 0, {})))
        return Step(logits[:, -1:], cache, ids.shape[1])

    def decode_step(self, state: Step, ids: np.ndarray) -> Step:
        if "decode" not in self._sess or state.cache is None:
            raise NotImplementedError(self.decode_skip_reason or NO_DECODE_REASON)
        sess = self._sess["decode"]
        outs = sess.run(None, _feeds(sess, ids, state.length, state.cache))
        logits, cache = self._split(sess, outs)
        return Step(logits[:, -1:], cache, state.length + ids.shape[1])

    def close(self) -> None:
        getattr(self, "_sess", {}).clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def export_dense(hf_dir: Path, kinds: set[str]) -> tuple[dict[str, Path], Path]:
    """Export a dense HF checkpoint's float32 ``kinds`` graphs into a temporary directory;
    returns ``({kind: path}, tmpdir)`` (the caller removes tmpdir)."""
    from converters.writers.onnx import (
        EXTERNAL_DATA_THRESHOLD,
        export_generation_graphs,
        export_logits_graph,
        save_graph,
    )
    from dsnt_export.runtimes.torch_eager import load_model

    tmp = Path(tempfile.mkdtemp(prefix="dsnt-bench-dense-onnx-"))
    try:
        model = load_model(hf_dir, torch.float32, "cpu")
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


def needed_kinds(options: Any, have: set[str]) -> set[str]:
    """The graph kinds the bench needs: ``logits`` for perplexity; for latency ``prefill`` +
    ``decode`` where the artifact ``have``s them, else the ``logits`` graph (timed for prefill)."""
    kinds = {"logits"} if options.ppl else set()
    if options.latency:
        gen = {"prefill", "decode"} & have
        kinds |= gen if gen else {"logits"}
    return kinds


def graph_dtype(name: str, device: torch.device, target: Target) -> str:
    """Which graphs to run: ``name`` as given, or for ``"auto"`` float32 on CPU and float16 on
    an accelerator where the artifact has float16 graphs (else float32)."""
    if name != "auto":
        return name
    if device.type == "cpu":
        return "float32"
    graphs = ((target.manifest or {}).get("extra") or {}).get("graphs") or {}
    return "float16" if any(g.get("dtype") == "float16" for g in graphs.values()) else "float32"


def _dense_factory(target: Target, options: Any, providers: list, dtype: str, kinds: set[str]):
    d = target.dense
    man = read_manifest(d, required=False)
    if man and man.get("kind") == "onnx":
        return lambda: OrtEngine.from_artifact(
            d, dtype, kinds, variant="dense", providers=providers, threads=options.threads
        )
    if not (d / "config.json").is_file():
        raise UserInputError(f"--dense {d} is neither an ONNX artifact nor an HF checkpoint")

    def make():
        log.info("exporting the dense model %s to ONNX (%s) for the comparison", d, sorted(kinds))
        graphs, tmp = export_dense(d, kinds)
        return OrtEngine(graphs, "dense", providers, "float32", options.threads, tmpdir=tmp)

    return make


def variants(target: Target, options: Any) -> Iterator[tuple[str, Callable[[], Engine] | str]]:
    """``dense`` and ``sparse`` per execution provider (the sparse with TensorRT's 2:4 tactics
    on where that provider is used)."""
    dtype = graph_dtype(options.dtype, torch.device(options.device), target)
    try:
        have = set(graphs_of(target.path, dtype))
    except ArtifactError as e:  # e.g. --dtype float16 on an export without fp16 graphs
        yield "dense", f"not compared: {e}"
        yield "sparse", str(e)
        return
    kinds = needed_kinds(options, have)
    for providers in providers_for(torch.device(options.device)):
        if target.dense is None:
            yield "dense", target.dense_reason or "no dense reference"
        else:
            yield "dense", _dense_factory(target, options, providers, dtype, kinds)
        sparse_p = list(providers)
        if sparse_p[0] == "TensorrtExecutionProvider":  # the one EP with 2:4 tactics
            sparse_p[0] = ("TensorrtExecutionProvider", {"trt_sparsity_enable": True})
        yield (
            "sparse",
            lambda p=sparse_p: OrtEngine.from_artifact(
                target.path, dtype, kinds, variant="sparse", providers=p, threads=options.threads
            ),
        )
