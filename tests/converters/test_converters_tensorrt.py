"""TensorRT: build-log parsing, the sparse-layer report and its check, and the no-GPU behaviour.

No tensorrt and no GPU here: engines are never built in these tests. The log parser is tested on
synthetic logs in the formats TensorRT prints, and the artifact check on a hand-made artifact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from converters import get_converter
from converters.checkers import check_path
from converters.checkers.tensorrt import (
    REPORT_NAME,
    REPORT_SCHEMA,
    check_tensorrt,
    engine_entry,
    map_layers_to_params,
    parse_sparsity_log,
    write_report,
)
from converters.writers.tensorrt import TensorRTUnavailable
from dsnt_export.artifacts import new_manifest, write_manifest
from dsnt_export.cli import main
from dsnt_export.errors import MissingDependencyError
from dsnt_export.patterns import parse_pattern
from tests.tiny_models import make_sparse_hf_dir, nm_magnitude_keep

HAVE_TRT = True
try:  # pragma: no cover - depends on the machine
    import tensorrt  # noqa: F401
except ModuleNotFoundError:
    HAVE_TRT = False

TRTEXEC_LOG = """\
[08/05/2024-12:06:54] [I] [TRT] Detected 1 inputs and 1 output network tensors.
[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: node_MatMul_1, node_MatMul_2 + node_Add_3, Conv_9
[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: node_MatMul_2 + node_Add_3
[08/05/2024-12:06:55] [I] Engine built in 3.1 sec.
"""

WRAPPED_LOG = """\
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, Mat
Mul_69, MatMul_83
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:
[07/19/2022-11:58:21] [I] Engine built
"""

WEIGHTS = {
    "model.layers.0.mlp.up_proj.weight": {
        "initializer": "w1",
        "node": "node_MatMul_1",
        "op": "MatMul",
        "axis": 0,
        "shape": [8, 16],
    },
    "model.layers.0.mlp.down_proj.weight": {
        "initializer": "w2",
        "node": "node_MatMul_2",
        "op": "MatMul",
        "axis": 0,
        "shape": [16, 8],
    },
}


def test_parse_trtexec_log():
    p = parse_sparsity_log(TRTEXEC_LOG)
    assert p["eligible"] == ["node_MatMul_1", "node_MatMul_2 + node_Add_3", "Conv_9"]
    assert p["picked"] == ["node_MatMul_2 + node_Add_3"]
    assert p["eligible_line"] and p["picked_line"]


def test_parse_wrapped_and_empty_lines():
    p = parse_sparsity_log(WRAPPED_LOG)
    assert p["eligible"] == ["Conv_22", "MatMul_51", "MatMul_69", "MatMul_83"]
    assert p["picked"] == [] and p["picked_line"]


def test_parse_our_captured_logger_format_and_missing_lines():
    text = "[INFO] (Sparsity) Layers eligible for sparse math: a, b\n[VERBOSE] other"
    assert parse_sparsity_log(text)["eligible"] == ["a", "b"]
    none = parse_sparsity_log("[I] [TRT] Engine built\n")
    assert none == {"eligible": [], "picked": [], "eligible_line": False, "picked_line": False}


def test_layers_map_back_to_parameters():
    per = map_layers_to_params(parse_sparsity_log(TRTEXEC_LOG), WEIGHTS)
    assert per["model.layers.0.mlp.up_proj.weight"] == {
        "node": "node_MatMul_1",
        "eligible": True,
        "picked": False,
    }
    assert per["model.layers.0.mlp.down_proj.weight"]["picked"] is True
    inspector = {
        "Layers": [
            {"Name": "node_MatMul_2 + node_Add_3", "TacticName": "sm90_xmma_sparse_gemm_f16"},
            {"Name": "x"},
        ]
    }
    e = engine_entry("model.sparse.plan", ["SPARSE_WEIGHTS"], TRTEXEC_LOG, WEIGHTS, inspector, 1.0)
    assert (e["n_targets"], e["n_eligible"], e["n_picked"]) == (2, 2, 1)
    assert e["inspector"]["sparse_tactic_layers"][0]["name"] == "node_MatMul_2 + node_Add_3"


def _sparse_fp16(out: int, inp: int, seed: int) -> np.ndarray:
    import torch

    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    return torch.where(nm_magnitude_keep(w, "2:4"), w, 0.0).half().numpy()


def _graph(path: Path) -> dict[str, np.ndarray]:
    """x[?,8] -> MatMul(w1 [8,16]) -> MatMul(w2 [16,8]), FP16; returns HF weights W [out, in]."""
    w_up, w_down = _sparse_fp16(16, 8, 0), _sparse_fp16(8, 16, 1)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["b", 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["b", 8])
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="node_MatMul_1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="node_MatMul_2"),
    ]
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w_up.T), "w1"),
        numpy_helper.from_array(np.ascontiguousarray(w_down.T), "w2"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return {
        "model.layers.0.mlp.up_proj.weight": w_up,
        "model.layers.0.mlp.down_proj.weight": w_down,
    }


def _tensors(hf: dict[str, np.ndarray]) -> dict:
    return {
        k: {"shape": list(w.shape), "layout": "out_in", "sparsity": float((w == 0).mean())}
        for k, w in hf.items()
    }


def _write_toy_manifest(root: Path, kind: str, hf: dict, graph_file: str, **extra) -> None:
    """Write ``root``'s manifest of ``kind`` for the 2:4 toy weights ``hf`` in the one float16
    logits graph ``graph_file``; ``extra`` adds manifest fields (e.g. ``report``)."""
    graph = {"kind": "logits", "dtype": "float16", "files": [graph_file], "weights": WEIGHTS}
    write_manifest(
        root,
        new_manifest(
            kind,
            pattern=parse_pattern("2:4").to_json(),
            tensors=_tensors(hf),
            extra={**extra, "graphs": {graph_file: graph}},
        ),
    )


def make_trt_artifact(root: Path, log: str = TRTEXEC_LOG) -> Path:
    hf = _graph(root / "onnx" / "model.onnx")
    for kind in ("sparse", "dense"):
        (root / f"model.{kind}.plan").write_bytes(b"\x00plan-" + kind.encode())
    engines = {
        "sparse": engine_entry("model.sparse.plan", ["SPARSE_WEIGHTS"], log, WEIGHTS, None, 1.0),
        "dense": engine_entry("model.dense.plan", [], "", WEIGHTS, None, 1.0),
    }
    write_report(
        root / REPORT_NAME,
        {
            "schema": REPORT_SCHEMA,
            "schema_version": 1,
            "onnx": "onnx/model.onnx",
            "engines": engines,
        },
    )
    _write_toy_manifest(root, "tensorrt", hf, "onnx/model.onnx", report=REPORT_NAME)
    return root


def test_check_tensorrt_artifact(tmp_path):
    art = make_trt_artifact(tmp_path / "trt")
    r = check_path(art)
    assert r.kind == "tensorrt" and r.ok, r.summary_lines()
    assert len(r.tensors) == 2 and r.derived_pattern == "2:4"
    assert main(["check", str(art / REPORT_NAME)]) == 0


def test_check_tensorrt_silent_non_use(tmp_path):
    art = make_trt_artifact(
        tmp_path / "none", log=WRAPPED_LOG.replace("Conv_22, MatMul_51, Mat\nMul_69, MatMul_83", "")
    )
    r = check_tensorrt(art)
    assert r.exit_code == 1 and any(f.code == "no-eligible-layers" for f in r.violations)
    dense = make_trt_artifact(
        tmp_path / "dense",
        log=TRTEXEC_LOG.replace("for layers: node_MatMul_2 + node_Add_3", "for layers:"),
    )
    r = check_tensorrt(dense)
    assert r.ok and any(f.code == "no-sparse-tactics" for f in r.findings)
    assert check_tensorrt(dense, require_sparse_tactics=True).exit_code == 1
    assert main(["check", str(dense), "--require-sparse-tactics"]) == 1


def test_check_tensorrt_damage(tmp_path):
    art = make_trt_artifact(tmp_path / "a")
    bad = Path(shutil.copytree(art, tmp_path / "flip"))
    m = onnx.load(str(bad / "onnx" / "model.onnx"))
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[tuple(np.argwhere(w == 0)[0])] = 1.0
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    onnx.save(m, str(bad / "onnx" / "model.onnx"))
    r = check_path(bad)
    assert r.exit_code == 1 and {"mask", "sha256"} <= {f.code for f in r.violations}
    (art / REPORT_NAME).write_text("{ truncated")
    assert check_path(art / REPORT_NAME).exit_code == 2
    (art / "model.sparse.plan").unlink()
    assert check_path(art).exit_code == 2  # unreadable report (and a missing plan)


@pytest.mark.skipif(
    HAVE_TRT, reason="tensorrt is installed: the missing-dependency path cannot run"
)
def test_export_without_tensorrt_from_hf_source(tmp_path):
    src = make_sparse_hf_dir(tmp_path / "src", "llama")
    with pytest.raises(MissingDependencyError, match="needs tensorrt \\+ a CUDA GPU"):
        get_converter("tensorrt").export(src, tmp_path / "trt")
    assert not (tmp_path / "trt").exists()
    assert main(["export", "tensorrt", str(src), "--out", str(tmp_path / "trt")]) != 0
    assert not (tmp_path / "trt").exists()


@pytest.mark.skipif(
    HAVE_TRT, reason="tensorrt is installed: the missing-dependency path cannot run"
)
def test_export_without_tensorrt_runs_onnx_side_check(tmp_path):
    onnx_dir = _fake_onnx_export(tmp_path / "onnx", reference=False)
    with pytest.raises(TensorRTUnavailable) as ei:
        get_converter("tensorrt").export(onnx_dir, tmp_path / "trt")
    msg = str(ei.value)
    assert "needs tensorrt + a CUDA GPU" in msg and "ran on CPU and passed" in msg
    assert "2 weights, derived pattern 2:4" in msg
    assert not (tmp_path / "trt").exists()
    data = json.loads((onnx_dir / "dsnt_manifest.json").read_text())
    assert data["kind"] == "onnx"


def _fake_tensorrt(picked: bool = True):
    """A stand-in for the tensorrt module: just enough API for the converter's build flow. The
    sparse build logs the (Sparsity) lines the way TensorRT does, with the graph's node names."""
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.4.0-fake"
    info = types.SimpleNamespace(name="INFO")

    class ILogger:
        def __init__(self):
            pass

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.path = path
            return True

    class Config:
        def __init__(self):
            self.flags, self.profiling_verbosity = set(), None

        def set_memory_pool_limit(self, pool, size):
            assert pool == "workspace" and size > 0

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            assert profile.shapes["input_ids"][2][0] >= 1

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            assert flags == 1 << 5
            return types.SimpleNamespace(path=None)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if "SPARSE_WEIGHTS" in config.flags:
                nodes = [
                    n.name for n in onnx.load(network.path).graph.node if n.op_type == "MatMul"
                ]
                self.logger.log(
                    info, "(Sparsity) Layers eligible for sparse math: " + ", ".join(nodes)
                )
                self.logger.log(
                    info,
                    "(Sparsity) TRT inference plan picked sparse implementation "
                    "for layers: " + (nodes[0] if picked else ""),
                )
            return b"fake-plan"

    class Engine:
        def create_engine_inspector(self):
            return types.SimpleNamespace(
                get_engine_information=lambda fmt: json.dumps(
                    {"Layers": [{"Name": "node_MatMul_1", "TacticName": "sm90_sparse_gemm"}]}
                )
            )

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, Parser
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda p: Engine())
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="detailed")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="json")
    return trt


def _fake_onnx_export(onnx_dir: Path, reference: bool = True) -> Path:
    """A one-graph float16 ONNX export of the 2:4 toy weights with its manifest; with
    ``reference``, also its config.json and a saved reference input (what the build checks)."""
    hf = _graph(onnx_dir / "float16" / "model.onnx")
    if reference:
        from converters.reference import save_reference

        (onnx_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
        save_reference(onnx_dir, {"input_ids": np.zeros((1, 4), np.int64)})
    _write_toy_manifest(onnx_dir, "onnx", hf, "float16/model.onnx")
    return onnx_dir


@pytest.mark.parametrize("picked", [True, False])
def test_build_flow_with_a_stand_in_tensorrt(tmp_path, monkeypatch, picked):
    """The converter's orchestration (no GPU): engines, logs, report, manifest, check."""
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", _fake_tensorrt(picked))
    src = _fake_onnx_export(tmp_path / "onnx")
    out = tmp_path / "trt"
    res = get_converter("tensorrt").export(src, out, check_parity=False, max_seq=512)
    for f in (
        "model.sparse.plan",
        "model.dense.plan",
        "build.sparse.log",
        "build.dense.log",
        REPORT_NAME,
        "onnx/model.onnx",
        "dsnt_reference.npz",
        "dsnt_manifest.json",
    ):
        assert (out / f).is_file(), f
    rep = json.loads((out / REPORT_NAME).read_text())
    sp, dense = rep["engines"]["sparse"], rep["engines"]["dense"]
    assert rep["profile"]["input_ids"]["max"] == [4, 64]  # clamped to max_position_embeddings
    assert sp["flags"] == ["SPARSE_WEIGHTS"] and dense["flags"] == []
    assert (sp["n_eligible"], sp["n_picked"]) == (2, 1 if picked else 0)
    assert dense["eligible"] == [] and sp["inspector"]["sparse_tactic_layers"]
    assert "2/2 targeted linears eligible" in res.notes[0]
    r = check_path(out)
    assert r.ok and len(r.tensors) == 2
    assert any(f.code == "no-sparse-tactics" for f in r.findings) != picked
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
