"""Options that shape an artifact are verified in the written files and recorded in the manifest
as requested vs written (ONNX opset and dtypes; HF format, dtype and shard size); a tied
embedding / lm_head table is stored once per ONNX graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir
import pytest

import converters.writers.onnx as onnx_writer
from converters import get_converter
from converters.checkers import check_path
from converters.common.options import OptionMismatchError, record_option, verify_options
from converters.common.safetensors_io import read_header
from converters.writers.onnx import OpsetError, convert_opset, store_tied_tables_once
from dsnt_export.artifacts import read_manifest
from dsnt_export.cli import main
from tests.tiny_models import make_sparse_hf_dir

VOCAB, HIDDEN = 256, 64  # the tiny fixture's vocabulary and hidden size


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_sparse_hf_dir(tmp_path_factory.mktemp("opt") / "src", "llama")


@pytest.fixture(scope="module")
def tied_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    src = make_sparse_hf_dir(root / "src", "llama", tie_word_embeddings=True)
    out = root / "onnx"
    get_converter("onnx").export(
        src, out, dtypes=("float32",), generation_dtypes=("float32",), progress=False
    )
    return out


def _opsets(out):
    return {
        str(g.relative_to(out)): [
            o.version
            for o in onnx.load(str(g), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        ]
        for g in sorted(out.rglob("*.onnx"))
    }


def test_default_opset_recorded_as_written(tied_export):
    man = read_manifest(tied_export)
    rec = man["extra"]["export"]["options"]["opset"]
    written = {v[0] for v in _opsets(tied_export).values()}
    assert rec["requested"] is None and [rec["written"]] == sorted(written)
    assert man["extra"]["export"]["options"]["dtypes"] == {
        "requested": ["float32"],
        "written": ["float32"],
    }


@pytest.mark.parametrize("opset", [17, 18])
def test_requested_opset_is_the_written_one(src, tmp_path, monkeypatch, opset):
    # every weight (> 1 KiB) skips the version converter as a placeholder and is put back after
    monkeypatch.setattr(onnx_writer, "_PLACEHOLDER_BYTES", 1024)
    out = tmp_path / "onnx"
    gen = ("float32",) if opset == 17 else ()
    res = get_converter("onnx").export(
        src, out, dtypes=("float32",), generation_dtypes=gen, opset=opset, progress=False
    )
    found = _opsets(out)
    assert len(found) == (3 if gen else 1)
    assert all(v == [opset] for v in found.values()), found
    assert res.manifest["extra"]["export"]["options"]["opset"] == {
        "requested": opset,
        "written": opset,
    }
    assert all(g["opset"] == opset for g in res.manifest["extra"]["graphs"].values())
    assert res.parity and all(r["ok"] for r in res.parity.values())  # parity on converted graphs
    assert check_path(out).ok


def test_opset_that_cannot_be_written_is_refused(src, tmp_path, capsys):
    out = tmp_path / "onnx14"
    args = ["export", "onnx", str(src), "--out", str(out), "--dtypes", "float32"]
    rc = main([*args, "--generation-dtypes", "none", "--opset", "14", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "opset 14" in err and "version converter" in err
    assert not out.exists() and not list(tmp_path.glob(".onnx14*"))


def test_convert_opset_refuses_with_the_cause():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Shape", ["x"], ["y"])], "g", [x], [y])
    model = onnx_ir.from_proto(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    )
    assert convert_opset(model, None) is model and convert_opset(model, 18) is model
    assert convert_opset(model, 15).opset_imports[""] == 15
    with pytest.raises(OpsetError, match="opset 14.*Shape"):
        convert_opset(model, 14)


def test_tied_table_stored_once_per_graph(tied_export):
    for g in sorted(tied_export.rglob("*.onnx")):
        model = onnx.load(str(g))
        tables = [t.name for t in model.graph.initializer if sorted(t.dims) == [HIDDEN, VOCAB]]
        assert len(tables) == 1, (g, tables)
    r = check_path(tied_export)
    assert r.ok and len(r.tensors) == 3 * 14  # every pruned weight found in every graph


def _tied_graph_with_copy():
    """``logits = Gather(E, ids) @ E^T`` with ``E^T`` stored as a second initializer."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((8, 4)).astype(np.float32)
    ids = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])
    out = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [3, 8])
    nodes = [
        onnx.helper.make_node("Gather", ["E", "ids"], ["h"]),
        onnx.helper.make_node("MatMul", ["h", "E_T"], ["logits"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(table, "E"),
        onnx.numpy_helper.from_array(np.ascontiguousarray(table.T), "E_T"),
    ]
    graph = onnx.helper.make_graph(nodes, "g", [ids], [out], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    return onnx_ir.from_proto(model), table


def test_store_tied_tables_once_drops_the_transposed_copy():
    import onnxruntime as ort

    program, table = _tied_graph_with_copy()
    ids = np.array([1, 5, 7])
    assert store_tied_tables_once(program) == 1
    assert sorted(program.graph.initializers) == ["E"]
    proto = onnx_ir.to_proto(program)
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, table[ids] @ table.T, rtol=1e-6)
    assert store_tied_tables_once(program) == 0  # nothing left to share


def test_untied_copy_is_kept():
    program, _ = _tied_graph_with_copy()
    e_t = program.graph.initializers["E_T"]
    e_t.const_value = onnx_ir.tensor(e_t.const_value.numpy() + 1.0, name="E_T")
    assert store_tied_tables_once(program) == 0
    assert sorted(program.graph.initializers) == ["E", "E_T"]


def test_hf_options_recorded_and_read_back(src, tmp_path):
    out = tmp_path / "hf"
    res = get_converter("hf").export(src, out, dtype="float16", max_shard_size="60KB")
    opts = res.manifest["extra"]["export"]["options"]
    assert opts["format"] == {"requested": "plain", "written": "plain"}
    assert opts["dtype"] == {"requested": "float16", "written": "float16"}
    shard = opts["max_shard_size"]
    assert shard["requested"] == 60_000 and shard["shards"] > 1
    sizes = [sum(m["nbytes"] for m in read_header(f).values()) for f in out.glob("*.safetensors")]
    assert shard["written"] == max(sizes) and shard["oversize_multi_tensor"] == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == shard["shards"]


def test_hf_legacy_format_recorded(src, tmp_path):
    res = get_converter("hf").export(src, tmp_path / "legacy", format="sparse-24-bitmask")
    opts = res.manifest["extra"]["export"]["options"]
    assert opts["format"] == {"requested": "sparse-24-bitmask", "written": "sparse-24-bitmask"}
    assert opts["dtype"]["requested"] is None and opts["dtype"]["written"] == "float32"


def test_verify_options_names_every_mismatch():
    opts: dict = {}
    record_option(opts, "opset", 17, 18)
    record_option(opts, "dtype", None, "float32")  # the default: any written value holds
    record_option(opts, "max_shard_size", 100, 150)
    with pytest.raises(OptionMismatchError) as e:
        verify_options(opts, "x export")
    assert set(e.value.mismatches) == {"opset", "max_shard_size"}
    assert "requested 17, written 18" in str(e.value)
    verify_options(
        opts | {"opset": {"requested": 18, "written": 18}},
        "x",
        ok={"max_shard_size": lambda req, got: True},
    )
