"""Toy ONNX artifacts with the exporter's I/O names (no tracing: built node by node)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsnt_export.artifacts import new_manifest, write_manifest
from dsnt_export.patterns import NM
from tests.tiny_models import tiny_tokenizer


def _onnx_lm(kind: str, emb: np.ndarray, head: np.ndarray):
    """A toy LM graph with the exporter's I/O names: logits = E[ids] @ W; cache = E[ids]."""
    from onnx import TensorProto, helper, numpy_helper

    V, H = emb.shape
    inits = [
        numpy_helper.from_array(emb, "E"),
        numpy_helper.from_array(head, "W"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
    ]
    inp = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", V])]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["logits"]),
        helper.make_node("Unsqueeze", ["h", "ax1"], ["kv"]),
    ]
    if kind in ("prefill", "decode"):
        inp.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "t"]))
    for n in ("keys", "values"):
        name = f"cache.layers.0.{n}"
        if kind == "prefill":
            nodes.append(helper.make_node("Identity", ["kv"], [name]))
            out.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", 1, "t", H]))
        elif kind == "decode":
            inp.append(
                helper.make_tensor_value_info(f"input.{name}", TensorProto.FLOAT, ["b", 1, "p", H])
            )
            nodes.append(
                helper.make_node("Concat", [f"input.{name}", "kv"], [f"output.{name}"], axis=2)
            )
            out.append(
                helper.make_tensor_value_info(f"output.{name}", TensorProto.FLOAT, ["b", 1, "q", H])
            )
    g = helper.make_graph(nodes, kind, inp, out, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def toy_onnx_artifact(
    path: Path, seed: int, kinds: tuple[str, ...] = ("logits", "prefill", "decode")
) -> tuple[Path, np.ndarray, np.ndarray]:
    """An ONNX artifact (manifest, config, tokenizer) of toy float32 graphs of ``kinds``;
    returns (path, E [256, 16], W [16, 256]): logits = E[ids] @ W."""
    import onnx

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((256, 16)).astype(np.float32)
    head = rng.standard_normal((16, 256)).astype(np.float32)
    (path / "float32").mkdir(parents=True)
    graphs = {}
    files = {"logits": "model", "prefill": "prefill", "decode": "decode"}
    for kind in kinds:
        fname = files[kind]
        onnx.save(_onnx_lm(kind, emb, head), path / "float32" / f"{fname}.onnx")
        graphs[f"float32/{fname}.onnx"] = {"kind": kind, "dtype": "float32"}
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 256, "max_position_embeddings": 64})
    )
    tiny_tokenizer().save_pretrained(path)
    write_manifest(
        path,
        new_manifest(
            "onnx",
            source_model={"id": "toy"},
            pattern=NM(2, 4).to_json(),
            tensors={},
            extra={"graphs": graphs},
        ),
    )
    return path, emb, head


def toy_perplexity(emb: np.ndarray, head: np.ndarray, windows: np.ndarray) -> float:
    """Perplexity of the toy graphs (logits = E[ids] @ W) on ``windows [n, T]``, computed in
    numpy float64 independently of the project's code."""
    lg = (emb[windows] @ head)[:, :-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = float((lse - np.take_along_axis(lg, windows[:, 1:, None], -1)[..., 0]).mean())
    return float(np.exp(nll))
