"""Walk an ONNX graph to find linear weights and map them back to Hugging Face parameters.

A linear ``y = x W^T`` reaches ONNX as ``MatMul(x, B)`` with a constant ``B = W^T [in, out]``
(2:4 groups along axis 0) or as ``Gemm(x, B, transB=1)`` with ``B = W [out, in]`` (groups along
axis 1; ``transB=0`` means ``B [in, out]``, axis 0). Only such constants directly feeding the
MatMul/Gemm count: a weight routed through Transpose/Cast/DequantizeLinear or fused into another
tensor hides the pattern from TensorRT and Polygraphy and is reported as hidden.

Parameters are matched by VALUE (a fingerprint of the stored bytes of ``W^T`` or ``W``), never by
initializer or node names, which exporters invent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsnt_export.errors import ArtifactError


@dataclass
class LinearWeight:
    """A constant 2-D weight read by a MatMul/Gemm node: its initializer, the node, the
    reduction ``axis`` of the stored array (0 for MatMul ``B [in, out]``), and the array."""

    initializer: str
    node: str
    op: str  # "MatMul" | "Gemm"
    axis: int  # reduction axis of the stored initializer
    shape: list[int]
    dtype: str
    array: np.ndarray = field(repr=False)

    def to_json(self) -> dict:
        """Everything but the array, for the manifest."""
        return {
            "initializer": self.initializer,
            "node": self.node,
            "op": self.op,
            "axis": self.axis,
            "shape": self.shape,
            "dtype": self.dtype,
        }


def load_model(path: str | Path):
    """``onnx.load`` with external data; unreadable/truncated files raise ArtifactError."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"ONNX file not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=True)
    except (DecodeError, OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        raise ArtifactError(
            f"cannot read {p} ({type(e).__name__}: {e}); the ONNX file or its "
            "external data is truncated or corrupt"
        ) from e


def constants(model) -> dict:
    """Constant tensors of the main graph: initializers and ``Constant`` node values."""
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _to_array(t) -> np.ndarray:
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(t)
    except (ValueError, OSError, TypeError) as e:
        raise ArtifactError(
            f"initializer {t.name!r} cannot be read ({e}); external data truncated or missing"
        ) from e


def linear_weights(model) -> tuple[list[LinearWeight], list[dict]]:
    """Constant 2-D weights of MatMul/Gemm nodes, and weights reaching them through other ops."""
    consts = constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    found: list[LinearWeight] = []
    hidden: list[dict] = []
    cache: dict[str, np.ndarray] = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        b = n.input[1]
        if b in consts and len(consts[b].dims) == 2:
            axis = 0
            if n.op_type == "Gemm":
                axis = 1 if any(a.name == "transB" and a.i == 1 for a in n.attribute) else 0
            arr = cache.setdefault(b, _to_array(consts[b]))
            found.append(
                LinearWeight(b, n.name, n.op_type, axis, list(arr.shape), str(arr.dtype), arr)
            )
        elif b in producers and producers[b].op_type in (
            "Transpose",
            "Cast",
            "DequantizeLinear",
            "Reshape",
            "Identity",
        ):
            p = producers[b]
            if p.input and p.input[0] in consts:
                hidden.append({"node": n.name, "via": p.op_type, "source": p.input[0]})
    return found, hidden


def fingerprint(a: np.ndarray) -> str:
    """SHA-1 of an array's dtype, shape and bytes (C order): equal values, equal fingerprint."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha1(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def param_fingerprints(params: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """``{param: (fingerprint of W^T, fingerprint of W)}``: hashes every weight twice, so compute
    it once per dtype and pass it to :func:`map_params` for each graph."""
    return {name: (fingerprint(W.T), fingerprint(W)) for name, W in params.items()}


def map_params(
    weights: list[LinearWeight],
    params: dict[str, np.ndarray],
    fps: dict[str, tuple[str, str]] | None = None,
) -> tuple[dict, list]:
    """Match HF weights ``W [out, in]`` (numpy, in the graph's dtype) to graph weights by value.

    ``fps``: :func:`param_fingerprints` of ``params`` if already computed.
    Returns ``({param: LinearWeight}, [params not found as a MatMul/Gemm constant])``.
    """
    fps = fps if fps is not None else param_fingerprints(params)
    by_fp: dict[str, list[LinearWeight]] = {}
    for w in weights:
        by_fp.setdefault(fingerprint(w.array), []).append(w)
    mapping: dict[str, LinearWeight] = {}
    missing: list[str] = []
    for name in params:
        fp_t, fp_w = fps[name]
        cands = [w for w in by_fp.get(fp_t, []) if w.axis == 0]
        cands += [w for w in by_fp.get(fp_w, []) if w.axis == 1]
        if cands:
            mapping[name] = cands[0]
        else:
            missing.append(name)
    return mapping, missing


def where_is(model, W: np.ndarray) -> str:
    """Explain where a weight that is not a MatMul/Gemm constant went (for error messages)."""
    fps = {fingerprint(W): "as W [out, in]", fingerprint(W.T): "as W^T [in, out]"}
    consts = constants(model)
    for name, t in consts.items():
        if list(t.dims) not in (list(W.shape), list(W.T.shape)):
            continue
        how = fps.get(fingerprint(_to_array(t)))
        if how:
            users = [n.op_type for n in model.graph.node if name in n.input]
            return f"stored {how} in initializer {name!r} but consumed by {users or 'nothing'}"
    return "not stored as a constant (folded, fused or re-typed by the exporter)"


def io_signature(model) -> dict:
    """Input/output names, element types and (symbolic) shapes of the main graph."""
    from onnx import TensorProto

    def sig(vs):
        out = []
        for v in vs:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append(
                {
                    "name": v.name,
                    "dtype": TensorProto.DataType.Name(tt.elem_type).lower(),
                    "shape": dims,
                }
            )
        return out

    return {"inputs": sig(model.graph.input), "outputs": sig(model.graph.output)}
