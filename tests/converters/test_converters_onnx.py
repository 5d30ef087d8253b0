"""The ONNX converter: graphs, weight mapping by value, ORT parity, Polygraphy, damage checks.

One export of a tiny 2:4 Llama (fp32 logits + prefill/decode, fp16 logits) is shared by the module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from converters import get_converter
from converters.checkers import check_path
from converters.common.onnx_graph import linear_weights, load_model, map_params, param_fingerprints
from converters.common.source import read_source
from converters.writers.onnx import (
    generation_cache,
    graph_weights,
    name_weights,
    save_graph,
    weight_names,
)
from dsnt_export.artifacts import MANIFEST_NAME, read_manifest
from dsnt_export.cli import main
from dsnt_export.runtimes.base import teacher_forced_logits
from dsnt_export.runtimes.onnxruntime import OrtEngine, session
from tests.tiny_models import make_sparse_hf_dir

Q = "model.layers.0.self_attn.q_proj.weight"  # [64, 64]: square
UP = "model.layers.1.mlp.up_proj.weight"  # [128, 64]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    src = make_sparse_hf_dir(root / "src", "llama")
    res = get_converter("onnx").export(src, root / "onnx")
    return src, root / "onnx", res


@pytest.fixture
def art(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported[1], tmp_path / "art"))


def test_layout_and_manifest(exported):
    src, out, res = exported
    man = read_manifest(out)
    assert man["kind"] == "onnx" and man["pattern"]["string"] == "2:4"
    graphs = man["extra"]["graphs"]
    assert {g: v["kind"] for g, v in graphs.items()} == {
        "float32/model.onnx": "logits",
        "float32/prefill.onnx": "prefill",
        "float32/decode.onnx": "decode",
        "float16/model.onnx": "logits",
    }
    logits = graphs["float32/model.onnx"]
    assert [i["name"] for i in logits["inputs"]] == ["input_ids"]
    assert all(isinstance(d, str) for d in logits["inputs"][0]["shape"])  # batch, seq dynamic
    assert logits["outputs"][0]["name"] == "logits"
    assert graphs["float16/model.onnx"]["outputs"][0]["dtype"] == "float16"
    assert any(i["name"].startswith("input.cache") for i in graphs["float32/decode.onnx"]["inputs"])
    for rel, g in graphs.items():
        assert len(g["weights"]) == 14, rel
        for rec in g["weights"].values():
            assert rec["op"] == "MatMul" and rec["axis"] == 0
    assert graphs["float32/model.onnx"]["weights"][UP]["shape"] == [64, 128]  # [in, out]
    for f in ("config.json", "tokenizer.json", "dsnt_reference.npz"):
        assert (out / f).is_file()
    assert set(man["files"]) >= {"float32/model.onnx", "dsnt_reference.npz"}


def test_mapping_is_by_value_not_name(exported):
    src, out, _ = exported
    man = read_manifest(out)
    sd = read_source(src).target_weights()
    for dt, np_dt in (("float32", np.float32), ("float16", np.float16)):
        model = load_model(out / dt / "model.onnx")
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for param, rec in man["extra"]["graphs"][f"{dt}/model.onnx"]["weights"].items():
            assert rec["initializer"] == f"{param}.T"  # HF name, stored transposed for MatMul
            b = inits[rec["initializer"]]
            assert b.dtype == np_dt
            assert np.array_equal(b, sd[param].to(getattr(torch, dt)).numpy().T)


def test_mapping_survives_renamed_initializers(exported, tmp_path):
    """graph_weights finds every weight again after all initializer names are scrambled."""
    src, out, _ = exported
    params = {k: v.numpy() for k, v in read_source(src).target_weights().items()}
    model = load_model(out / "float32" / "model.onnx")
    new = {t.name: f"w{i}" for i, t in enumerate(model.graph.initializer)}
    for t in model.graph.initializer:
        t.name = new[t.name]
    for n in model.graph.node:
        n.input[:] = [new.get(x, x) for x in n.input]
    onnx.save(model, str(tmp_path / "model.onnx"))
    mapping, problems = graph_weights(tmp_path / "model.onnx", params)
    assert not problems and set(mapping) == set(params)
    assert {m["initializer"] for m in mapping.values()} == {new[f"{p}.T"] for p in params}


def test_name_weights_gemm_and_matmul():
    """W stored as-is under Gemm(transB=1) keeps the parameter's name; W^T under MatMul gets '.T'."""
    import onnx_ir

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((3, 4)).astype(np.float32)  # [out, in]
    w2 = rng.standard_normal((2, 3)).astype(np.float32)
    other = rng.standard_normal((2, 2)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "a"], ["h"], transB=1),
            helper.make_node("MatMul", ["h", "b"], ["y0"]),
            helper.make_node("MatMul", ["y0", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(w1, "a"),
            numpy_helper.from_array(np.ascontiguousarray(w2.T), "b"),
            numpy_helper.from_array(other, "c"),
        ],
    )
    ir = onnx_ir.serde.deserialize_model(helper.make_model(graph))
    names = weight_names(param_fingerprints({"l1.weight": w1, "l2.weight": w2}))
    assert name_weights(ir, names) == 2
    assert set(ir.graph.initializers) == {"l1.weight", "l2.weight.T", "c"}
    proto = onnx_ir.serde.serialize_model(ir)
    assert [list(n.input) for n in proto.graph.node] == [
        ["x", "l1.weight"],
        ["h", "l2.weight.T"],
        ["y0", "c"],
    ]
    # a second pass changes nothing; a taken name is never reused
    assert name_weights(ir, names) == 0
    assert (
        name_weights(ir, weight_names(param_fingerprints({"c": w1}))) == 0
    )  # would rename l1.weight to the existing "c"


def test_parity_numbers(exported):
    _, out, res = exported
    p = res.parity
    assert p["float32/model.onnx:logits"]["max_abs_diff"] < 1e-4
    assert p["float32/model.onnx:perplexity"]["rel_diff"] < 1e-3  # within 0.1 % of torch
    assert p["float32/prefill.onnx+decode:logits"]["max_abs_diff"] < 1e-4
    assert p["float16/model.onnx:logits"]["ok"]
    assert all(r["ok"] for r in p.values())
    assert read_manifest(out)["extra"]["parity"] == json.loads(json.dumps(p))


def test_ort_runs_independently_of_the_converter(exported):
    """ORT logits and a KV-cache decode vs a plain transformers load of the source."""
    from transformers import AutoModelForCausalLM

    src, out, _ = exported
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(4, 256, (3, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    eng = OrtEngine.from_artifact(out, "float32")
    got = eng.logits(ids).numpy()
    assert np.abs(got - want).max() < 1e-4
    gen = teacher_forced_logits(eng, ids, prompt_len=5).numpy()
    assert np.abs(gen - want[:, 4:]).max() < 1e-4


@pytest.mark.parametrize(
    "graph", ["float32/model.onnx", "float16/model.onnx", "float32/decode.onnx"]
)
def test_polygraphy_inspect_sparsity_agrees(exported, graph):
    pytest.importorskip("polygraphy", reason="polygraphy not installed (extra 'inspect')")
    _, out, _ = exported
    cmd = [
        sys.executable,
        "-c",
        "import sys; from polygraphy.tools import main; sys.exit(main())",
        "inspect",
        "sparsity",
        str(out / graph),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    sparse = set(re.findall(r"Found sparse tensor: (\S+)", text))
    dense = set(re.findall(r"Found non-sparse tensor: (\S+)", text))
    weights = read_manifest(out)["extra"]["graphs"][graph]["weights"]
    assert sparse == {r["initializer"] for r in weights.values()}
    assert len(dense) == 1  # lm_head only


def test_check_passes_on_export(exported):
    _, out, _ = exported
    r = check_path(out)
    assert r.ok, r.summary_lines()
    assert r.kind == "onnx" and len(r.tensors) == 56 and r.derived_pattern == "2:4"
    single = check_path(out / "float16" / "model.onnx")
    assert single.ok and len(single.tensors) == 14 and single.pattern_source == "manifest"


def _edit_initializer(path: Path, name: str, fn) -> None:
    m = onnx.load(str(path))
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(fn(numpy_helper.to_array(t)), name)
            )
    onnx.save(m, str(path))


def _init_of(art: Path, graph: str, param: str) -> str:
    return read_manifest(art)["extra"]["graphs"][graph]["weights"][param]["initializer"]


def _codes(r) -> set[str]:
    return {f.code for f in r.findings if f.severity != "warning"}


def test_check_catches_flipped_weight(art):
    g = "float32/model.onnx"

    def flip(b):
        b = b.copy()
        r, c = np.argwhere(b == 0)[0]
        b[r, c] = 0.5
        return b

    _edit_initializer(art / g, _init_of(art, g, UP), flip)
    r = check_path(art)
    assert r.exit_code == 1 and {"mask", "sparsity-mismatch", "sha256"} <= _codes(r)
    assert [f.subject for f in r.violations if f.code == "mask"] == [f"{g}:{UP}"]
    # the single file without any manifest: re-derived, default 2:4
    lone = art.parent / "lone.onnx"
    shutil.copy(art / g, lone)
    r = check_path(lone)
    assert r.exit_code == 1 and _codes(r) == {"mask"} and r.pattern_source == "default"


def test_check_catches_transposed_weight(art):
    g = "float16/model.onnx"
    _edit_initializer(art / g, _init_of(art, g, Q), lambda b: np.ascontiguousarray(b.T))
    r = check_path(art)
    assert r.exit_code == 1 and "mask" in _codes(r)
    assert f"{g}:{Q}" in {f.subject for f in r.violations if f.code == "mask"}


def test_check_catches_missing_weight(art):
    g = "float32/model.onnx"
    name = _init_of(art, g, UP)
    m = onnx.load(str(art / g))
    for n in m.graph.node:  # route the weight through a Transpose pair: hidden from TensorRT
        for i, x in enumerate(n.input):
            if x == name and n.op_type == "MatMul":
                n.input[i] = "hidden_w"
    t1 = helper.make_node("Transpose", [name], ["hidden_t"], name="t1", perm=[1, 0])
    t2 = helper.make_node("Transpose", ["hidden_t"], ["hidden_w"], name="t2", perm=[1, 0])
    m.graph.node.insert(0, t2)
    m.graph.node.insert(0, t1)
    onnx.save(m, str(art / g))
    r = check_path(art)
    assert r.exit_code == 1 and "missing-tensor" in _codes(r)
    assert any(f.subject == f"{g}:{UP}" for f in r.violations if f.code == "missing-tensor")


def test_check_truncated_onnx_is_unreadable(art):
    f = art / "float32" / "decode.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    assert main(["check", str(art)]) == 2
    assert main(["check", str(f)]) == 2


def test_external_data_round_trip(exported, tmp_path):
    import onnx_ir

    src, out, _ = exported
    prog = onnx_ir.load(str(out / "float32" / "model.onnx"))
    files = save_graph(prog, tmp_path / "model.onnx", threshold=0)
    assert files == ["model.onnx", "model.onnx.data"]
    bare = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    external = {
        t.name for t in bare.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert len(external) >= 15  # 14 pruned linears + lm_head (+ embeddings)
    params = {k: v.numpy() for k, v in read_source(src).target_weights().items()}
    weights, problems = graph_weights(tmp_path / "model.onnx", params)
    assert problems == [] and len(weights) == 14
    assert check_path(tmp_path / "model.onnx").ok
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert check_path(tmp_path / "model.onnx").exit_code == 2


def _tiny_graph(w: np.ndarray, *, gemm: bool, hide: bool) -> onnx.ModelProto:
    """x [1, in] -> y: MatMul(x, W^T) / Gemm(x, W, transB=1), or W^T via a Transpose node."""
    out_f, in_f = w.shape
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, in_f])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, out_f])
    nodes = []
    if gemm:
        init = numpy_helper.from_array(w, "W")
        nodes.append(helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm", transB=1))
    elif hide:
        init = numpy_helper.from_array(w, "W")
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], name="tr", perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"))
    else:
        init = numpy_helper.from_array(np.ascontiguousarray(w.T), "B")
        nodes.append(helper.make_node("MatMul", ["x", "B"], ["y"], name="mm"))
    g = helper.make_graph(nodes, "g", [x], [y], [init])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["matmul", "gemm", "hidden"])
def test_graph_walk_axes_and_hidden_weights(tmp_path, kind):
    w = np.array([[1, 0, 0, 2, 0, 3, 4, 0], [0, 0, 5, 6, 7, 0, 0, 8]] * 4, dtype=np.float32)
    model = _tiny_graph(w, gemm=kind == "gemm", hide=kind == "hidden")
    found, hidden = linear_weights(model)
    mapping, missing = map_params(found, {"lin.weight": w})
    if kind == "hidden":
        assert found == [] and missing == ["lin.weight"] and hidden[0]["via"] == "Transpose"
    else:
        assert missing == [] and mapping["lin.weight"].axis == (1 if kind == "gemm" else 0)
    onnx.save(model, str(tmp_path / "m.onnx"))
    r = check_path(tmp_path / "m.onnx")
    if kind == "hidden":
        assert r.exit_code == 1 and "hidden" in _codes(r)
    else:
        assert r.ok and r.derived_pattern == "2:4"
        y = session(tmp_path / "m.onnx").run(None, {"x": np.ones((1, 8), np.float32)})[0]
        assert y.shape == (1, 8)


@pytest.mark.parametrize(("arch", "exporter"), [("qwen2", "torch"), ("opt", "transformers")])
def test_other_architectures_fp32_logits(tmp_path, arch, exporter):
    src = make_sparse_hf_dir(tmp_path / "src", arch)
    res = get_converter("onnx").export(
        src, tmp_path / "onnx", dtypes=("float32",), generation_dtypes=(), exporter=exporter
    )
    assert res.parity["float32/model.onnx:logits"]["max_abs_diff"] < 1e-4
    assert res.parity["float32/model.onnx:perplexity"]["rel_diff"] < 1e-3
    man = read_manifest(tmp_path / "onnx")
    weights = man["extra"]["graphs"]["float32/model.onnx"]["weights"]
    assert set(weights) == set(man["tensors"]) and len(weights) == (12 if arch == "opt" else 14)
    if exporter == "transformers":  # OnnxExporter keeps OPT's fc1/fc2 as Gemm(transB=1)
        assert {(r["op"], r["axis"]) for r in weights.values()} == {("MatMul", 0), ("Gemm", 1)}
    assert check_path(tmp_path / "onnx").ok
    assert MANIFEST_NAME in {p.name for p in (tmp_path / "onnx").iterdir()}


@pytest.mark.parametrize(
    ("arch", "kw", "sliding"),
    [
        ("llama", {}, False),
        ("mistral", {"sliding_window": None}, False),
        ("mistral", {}, True),  # Mistral's default window, 4096
        ("mistral", {"sliding_window": 4}, True),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, True),
    ],
)
def test_generation_cache_has_keys_and_values_only(arch, kw, sliding):
    """Sliding-window layers (from ``sliding_window`` or ``layer_types``) export as full layers."""
    from transformers.cache_utils import DynamicLayer

    from tests.tiny_models import tiny_config

    cache = generation_cache(tiny_config(arch, **kw))
    if not sliding:
        assert cache is None  # generate() builds its own, already plain
        return
    assert [type(layer) for layer in cache.layers] == [DynamicLayer, DynamicLayer]
    assert not any(
        isinstance(v, torch.Tensor) for layer in cache.layers for v in vars(layer).values()
    )


def test_mistral_sliding_window_generation_parity(tmp_path):
    """A sliding-window Mistral: prefill/decode take keys and values only (no
    ``_sliding_window_tensor`` cache input) and match torch past the window."""
    from transformers import AutoModelForCausalLM

    src = make_sparse_hf_dir(tmp_path / "src", "mistral", sliding_window=4)
    res = get_converter("onnx").export(src, tmp_path / "onnx", dtypes=("float32",))
    assert res.parity["float32/prefill.onnx+decode:logits"]["max_abs_diff"] < 1e-4
    assert res.parity["float32/model.onnx:logits"]["max_abs_diff"] < 1e-4
    graphs = read_manifest(tmp_path / "onnx")["extra"]["graphs"]
    cache_io = re.compile(r"(input\.|output\.)?cache\.layers\.[01]\.(keys|values)")
    for g in ("float32/prefill.onnx", "float32/decode.onnx"):
        names = [i["name"] for i in graphs[g]["inputs"]] + [o["name"] for o in graphs[g]["outputs"]]
        assert {n for n in names if not cache_io.fullmatch(n)} == {
            "input_ids",
            "position_ids",
            "logits",
        }, g
        assert len(graphs[g]["weights"]) == 14
    # prompt shorter than the window, decode well past it, vs a plain transformers load
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    assert model.config.sliding_window == 4
    ids = torch.randint(4, 256, (2, 14), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    out = tmp_path / "onnx" / "float32"
    eng = OrtEngine({"prefill": out / "prefill.onnx", "decode": out / "decode.onnx"})
    gen = teacher_forced_logits(eng, ids, prompt_len=3).numpy()
    assert np.abs(gen - want[:, 2:]).max() < 1e-4


def test_runtime_suite_on_onnx_export(exported):
    from tests.converters.test_converters_runtime_suite import run_suite

    res = run_suite(exported[1])
    assert res.returncode == 0, res.stdout[-3000:]
    assert (
        "test_onnxruntime_graphs_match_reference" not in res.stdout.split("short test summary")[-1]
    )
