"""Build TensorRT engines from the FP16 ONNX graph: one with SPARSE_WEIGHTS, one dense.

Needs the ``tensorrt`` wheels (extra ``tensorrt``) and a CUDA GPU. TensorRT 11 is strongly typed
(no FP16 builder flag), so the engines are built from the FP16-typed ``float16/model.onnx`` of an
ONNX export (made on the fly when the source is a Hugging Face checkpoint). The sparse build's log
is captured, its "(Sparsity)" lines parsed and mapped back to parameters
(:mod:`converters.checkers.tensorrt`), and ``tensorrt_report.json`` saved next to the engines::

    out/  model.sparse.plan  model.dense.plan  build.sparse.log  build.dense.log
          tensorrt_report.json  onnx/model.onnx  dsnt_reference.npz  dsnt_manifest.json

Without tensorrt or a GPU the export fails with "needs tensorrt + a CUDA GPU" after running the
ONNX-side 2:4 check on CPU (when the source is an ONNX export), and writes nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from converters import Converter, ExportResult, Tolerance, register
from converters.checkers.common import mask_checks_from_report
from converters.checkers.tensorrt import REPORT_NAME, REPORT_SCHEMA, engine_entry, write_report
from converters.parity import ParityCheck, compare_reference
from converters.reference import REFERENCE_NAME, load_reference
from dsnt_export.artifacts import new_manifest, read_manifest
from dsnt_export.errors import ArtifactError, MissingDependencyError, UserInputError

log = logging.getLogger(__name__)

FP16_GRAPH = "float16/model.onnx"
NEEDS = "needs tensorrt + a CUDA GPU"


class TensorRTUnavailable(MissingDependencyError):
    """tensorrt is not installed, or no CUDA GPU is usable by it."""

    def __init__(self, why: str, onnx_check: str = ""):
        Exception.__init__(
            self,
            f"TensorRT engine build {NEEDS}: {why}. Install with: pip install "
            f"'dsnt-export[tensorrt]' on a machine with an NVIDIA GPU.{onnx_check}",
        )
        self.package = "tensorrt"


def _onnx_side_check(src: Path) -> str:
    """Run the CPU 2:4 check of the FP16 graph an ONNX source holds; a line for the error text."""
    from converters.checkers.onnx import check_onnx

    graph = src / FP16_GRAPH
    if not graph.exists():
        return ""
    report = check_onnx(graph)
    verdict = "passed" if report.ok else f"FAILED ({len(report.violations)} violations)"
    msg = (
        f" The ONNX-side 2:4 check of {graph} ran on CPU and {verdict}: "
        f"{len(report.tensors)} weights, derived pattern {report.derived_pattern}."
    )
    log.info(msg.strip())
    return msg


def _source_kind(src: Path) -> str:
    m = read_manifest(src, required=False) if src.is_dir() else None
    if m is None or m.get("kind") not in ("hf", "onnx"):
        raise UserInputError(
            f"{src}: expected an ONNX export (dsnt-export export onnx) or a "
            "sparse checkpoint directory with its dsnt_manifest.json"
        )
    return m["kind"]


@register
class TensorRTConverter(Converter):
    """``dsnt-export export tensorrt``: a SPARSE_WEIGHTS and a dense engine from the FP16 ONNX
    graph, the sparse-tactic report, and parity of both engines against the stored reference."""

    name = "tensorrt"
    extras = ("tensorrt",)
    tolerance = {"float16": Tolerance(logits_atol=3e-2, ppl_rel=2e-2)}
    description = "TensorRT engines (SPARSE_WEIGHTS and dense) + sparse-tactic report"

    def check_environment(self, src_dir: str | Path, **opts: Any) -> None:
        """Raise TensorRTUnavailable (after the CPU-side ONNX 2:4 check of an ONNX source)
        when tensorrt is not installed."""
        src = Path(src_dir)
        note = _onnx_side_check(src) if _source_kind(src) == "onnx" else ""
        try:
            import tensorrt  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "tensorrt":
                raise TensorRTUnavailable("the 'tensorrt' package is not installed", note) from e
            raise

    def write(
        self,
        src_dir: Path,
        tmp: Path,
        result: ExportResult,
        *,
        max_batch: int = 4,
        max_seq: int = 512,
        opt_seq: int = 128,
        workspace_gib: float = 8.0,
        **opts: Any,
    ) -> dict:
        """Build both engines into ``tmp`` (profile ``[1..max_batch, 1..max_seq]``, optimum
        ``opt_seq``, workspace in GiB), write the report; returns the manifest."""
        staging = tmp / ".onnx-source"
        try:
            onnx_dir = self._onnx_source(src_dir, staging, opts)
            man = read_manifest(onnx_dir)
            graph = man["extra"]["graphs"].get(FP16_GRAPH)
            if graph is None:
                raise UserInputError(
                    f"{onnx_dir} has no {FP16_GRAPH}; export ONNX with float16 "
                    "(the default) for TensorRT"
                )
            (tmp / "onnx").mkdir()
            for f in graph["files"]:
                shutil.copy2(onnx_dir / f, tmp / "onnx" / Path(f).name)
            shutil.copy2(onnx_dir / REFERENCE_NAME, tmp / REFERENCE_NAME)
            config = json.loads((onnx_dir / "config.json").read_text())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        rel_graph = dict(graph, files=[f"onnx/{Path(f).name}" for f in graph["files"]])
        shapes = self._profile(config, max_batch, max_seq, opt_seq)
        engines = {
            kind: self._build(tmp, kind, kind == "sparse", shapes, workspace_gib, graph["weights"])
            for kind in ("sparse", "dense")
        }
        report = {
            "schema": REPORT_SCHEMA,
            "schema_version": 1,
            "onnx": "onnx/model.onnx",
            "profile": shapes,
            "engines": engines,
            "tensorrt_version": self._trt().__version__,
        }
        write_report(tmp / REPORT_NAME, report)
        sp = engines["sparse"]
        result.notes.append(
            f"TensorRT: {sp['n_eligible']}/{sp['n_targets']} targeted linears "
            f"eligible for sparse math, {sp['n_picked']} picked sparse tactics"
        )
        if sp["n_eligible"] == 0:
            result.warnings.append(
                "TensorRT found no layer eligible for sparse math: the 2:4 "
                "weights are not used (check the ONNX graph and GPU)"
            )
        return new_manifest(
            "tensorrt",
            source_model=man.get("source_model", {}),
            pattern=man["pattern"],
            recipe=man.get("recipe", {}),
            tensors=man.get("tensors", {}),
            calibration=man.get("calibration", {}),
            skipped=man.get("skipped", []),
            timings={},
            extra={
                "report": REPORT_NAME,
                "graphs": {"onnx/model.onnx": rel_graph},
                "export": {"converter": self.name, "source": str(src_dir)},
            },
        )

    @staticmethod
    def _trt():
        import tensorrt as trt

        return trt

    @staticmethod
    def _onnx_source(src: Path, staging: Path, opts: dict) -> Path:
        """The ONNX export to build from: ``src`` itself, or an FP16 export of it in ``staging``."""
        if _source_kind(src) == "onnx":
            return src
        from converters import get_converter

        get_converter("onnx").export(
            src,
            staging,
            dtypes=("float16",),
            generation_dtypes=(),
            exporter=opts.get("exporter", "torch"),
        )
        return staging

    @staticmethod
    def _profile(config: dict, max_batch: int, max_seq: int, opt_seq: int) -> dict:
        max_seq = min(max_seq, int(config.get("max_position_embeddings") or max_seq))
        opt_seq = min(opt_seq, max_seq)
        return {"input_ids": {"min": [1, 1], "opt": [1, opt_seq], "max": [max_batch, max_seq]}}

    def _build(
        self, tmp: Path, kind: str, sparse: bool, shapes: dict, workspace_gib: float, weights: dict
    ) -> dict:
        trt = self._trt()
        logger = capturing_logger(trt)
        try:
            builder = trt.Builder(logger)
        except (RuntimeError, TypeError) as e:  # no usable CUDA device
            raise TensorRTUnavailable(f"TensorRT could not create a builder ({e})") from e
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(tmp / "onnx" / "model.onnx")):
            errs = [parser.get_error(i).desc() for i in range(parser.num_errors)]
            raise ArtifactError(f"TensorRT's ONNX parser rejected the graph: {errs[:5]}")
        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        if sparse:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        config.add_optimization_profile(profile)
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - t0
        (tmp / f"build.{kind}.log").write_text(logger.text())
        if plan is None:
            raise ArtifactError(
                f"TensorRT failed to build the {kind} engine; see the log:\n"
                + "\n".join(logger.errors()[-10:])
            )
        (tmp / f"model.{kind}.plan").write_bytes(bytes(plan))
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        info = json.loads(
            engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        )
        flags_used = ["SPARSE_WEIGHTS"] if sparse else []
        return engine_entry(f"model.{kind}.plan", flags_used, logger.text(), weights, info, build_s)

    def check_masks(self, tmp: Path, manifest: dict) -> dict[str, dict]:
        """The ONNX-side check of the copied graph; engine findings go to the report only."""
        from converters.checkers.onnx import check_onnx

        report = check_onnx(
            tmp / "onnx" / "model.onnx",
            manifest=dict(manifest, kind="onnx"),
            root=tmp,
            hashes=False,
        )
        return mask_checks_from_report(report)

    def parity(
        self,
        src_dir: Path,
        tmp: Path,
        manifest: dict,
        check: ParityCheck,
        device: str = "cuda",
        **_: Any,
    ) -> None:
        """Both engines through :class:`dsnt_export.runtimes.tensorrt.TrtEngine` against the
        stored float32 reference (logits and perplexity, FP16 tolerance)."""
        from dsnt_export.runtimes.tensorrt import TrtEngine

        ref = load_reference(tmp)
        tol = self.tolerance["float16"]
        for kind in ("sparse", "dense"):
            with TrtEngine(tmp / f"model.{kind}.plan", kind, device) as engine:
                compare_reference(check, kind, engine, tol, ref)


def capturing_logger(trt):
    """A ``trt.ILogger`` that keeps every message (the "(Sparsity)" lines are INFO)."""

    class CapturingLogger(trt.ILogger):
        """Keeps (severity, message) pairs."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[tuple[str, str]] = []

        def log(self, severity, msg):
            """Record one TensorRT message."""
            self.lines.append((str(getattr(severity, "name", severity)), msg))

        def text(self) -> str:
            """Every message, one ``[SEVERITY] message`` line each."""
            return "\n".join(f"[{s}] {m}" for s, m in self.lines)

        def errors(self) -> list[str]:
            """The ERROR messages."""
            return [m for s, m in self.lines if "ERROR" in s]

    return CapturingLogger()
