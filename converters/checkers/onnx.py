"""``dsnt-export check`` for ONNX files and ONNX export directories.

Every linear weight that a MatMul/Gemm reads as a constant is validated along its reduction axis
(MatMul ``B [in, out]``: axis 0; Gemm ``transB=1``: axis 1). With a manifest, each targeted
parameter must be found in each graph where the manifest mapped it, with the recorded op, axis,
shape and sparsity; without one, every constant linear weight that looks sparse is a target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converters.checkers.common import (
    check_files,
    check_tensor,
    looks_sparse,
    resolve_pattern,
    weakest,
)
from converters.checkers.report import UNREADABLE, VIOLATION, WARNING, CheckReport
from converters.common.onnx_graph import LinearWeight, constants, linear_weights, load_model
from dsnt_export.artifacts import MANIFEST_NAME, onnx_graphs_in, read_manifest
from dsnt_export.errors import ArtifactError


def _find_manifest(path: Path, report: CheckReport) -> tuple[dict | None, Path]:
    """The onnx manifest governing ``path`` and the directory its file paths are relative to."""
    candidates = [path] if path.is_dir() else [path.parent, path.parent.parent]
    for d in candidates:
        try:
            m = read_manifest(d, required=False)
        except ArtifactError as e:
            report.add(UNREADABLE, "manifest", str(d / MANIFEST_NAME), str(e))
            return None, d
        if m is not None:
            if m.get("kind") != "onnx":
                report.add(
                    VIOLATION,
                    "kind",
                    MANIFEST_NAME,
                    f"manifest kind {m.get('kind')!r}, expected 'onnx'",
                )
                return None, d
            return m, d
    return None, candidates[0]


def check_onnx(
    path: str | Path,
    *,
    pattern: str | None = None,
    manifest: dict | None = None,
    root: str | Path | None = None,
    hashes: bool = True,
) -> CheckReport:
    """Check an ONNX file or export dir. ``manifest`` (with ``root``, the directory its graph
    paths are relative to, for a file) replaces the one found on disk."""
    p = Path(path)
    report = CheckReport(str(p), "onnx")
    if manifest is not None:
        man = manifest
        root = Path(root) if root is not None else (p if p.is_dir() else p.parent)
    else:
        man, root = _find_manifest(p, report)
    root = Path(root)
    pat = resolve_pattern(report, pattern, man)
    graphs = (man or {}).get("extra", {}).get("graphs", {})
    if p.is_dir():
        rels = sorted(graphs) if graphs else [str(f.relative_to(p)) for f in onnx_graphs_in(p)]
        if hashes:
            check_files(report, root, man)
    else:
        rels = [str(p.relative_to(root)) if man is not None else p.name]
        root = root if man is not None else p.parent
        if hashes and man is not None:
            files = set(graphs.get(rels[0], {}).get("files", [rels[0]]))
            check_files(report, root, man, only=files)
    if not rels:
        report.add(UNREADABLE, "no-graphs", str(p), "no .onnx graph found")
    for rel in rels:
        _check_graph(report, root, rel, graphs.get(rel), man, pat)
    report.derived_pattern = weakest([e.get("derived") for e in report.tensors.values()])
    report.info["graphs"] = rels
    return report


def _check_graph(report, root: Path, rel: str, graph: dict | None, man: dict | None, pat) -> None:
    try:
        model = load_model(root / rel)
        found, hidden = linear_weights(model)
    except ArtifactError as e:
        report.add(UNREADABLE, "unreadable", rel, str(e))
        return
    for h in hidden:
        t = _const_array(model, h["source"])
        if t is not None and looks_sparse(t, pat):
            report.add(
                VIOLATION,
                "hidden",
                f"{rel}:{h['source']}",
                f"sparse weight reaches MatMul/Gemm node {h['node']} through {h['via']}: "
                "not a constant weight, its pattern is hidden from TensorRT",
            )
    if graph is None:
        targets = [w for w in found if looks_sparse(_tensor(w), pat)]
        if not targets:
            report.add(
                VIOLATION,
                "no-sparse-tensors",
                rel,
                f"no constant MatMul/Gemm weight has even half the zeros of {pat}",
            )
        for w in targets:
            check_tensor(
                report,
                f"{rel}:{w.initializer}",
                _tensor(w),
                pat,
                axis=w.axis,
                extra={"node": w.node, "op": w.op},
            )
        return
    by_init: dict[str, list[LinearWeight]] = {}
    for w in found:
        by_init.setdefault(w.initializer, []).append(w)
    expected = set((man or {}).get("tensors", {})) or set(graph.get("weights", {}))
    for param in sorted(expected - set(graph.get("weights", {}))):
        report.add(
            VIOLATION,
            "missing-tensor",
            f"{rel}:{param}",
            "targeted parameter has no recorded weight in this graph",
        )
    tensors_meta = (man or {}).get("tensors", {})
    for param, rec in sorted(graph.get("weights", {}).items()):
        name = f"{rel}:{param}"
        cands = [
            w
            for w in by_init.get(rec["initializer"], [])
            if w.op == rec["op"] and w.axis == rec["axis"]
        ]
        if not cands:
            why = (
                "is consumed by other ops, not as a constant MatMul/Gemm weight"
                if rec["initializer"] in constants(model)
                else "is absent from the graph"
            )
            report.add(
                VIOLATION,
                "missing-tensor",
                name,
                f"initializer {rec['initializer']!r} recorded for it {why}",
            )
            continue
        w = cands[0]
        check_tensor(
            report,
            name,
            _tensor(w),
            pat,
            axis=w.axis,
            expected_shape=rec["shape"],
            expected_sparsity=tensors_meta.get(param, {}).get("sparsity"),
            extra={"node": w.node, "op": w.op, "initializer": w.initializer},
        )
    extra = [
        w
        for w in found
        if w.initializer not in {r["initializer"] for r in graph.get("weights", {}).values()}
        and looks_sparse(_tensor(w), pat)
    ]
    for w in extra:
        report.add(
            WARNING,
            "unmapped-sparse",
            f"{rel}:{w.initializer}",
            "sparse-looking linear weight not recorded in the manifest",
        )


def _tensor(w: LinearWeight) -> torch.Tensor:
    a = np.ascontiguousarray(w.array)
    if not a.flags.writeable:
        a = a.copy()
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch's
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _const_array(model, name: str):
    from onnx import numpy_helper

    t = constants(model).get(name)
    if t is None or len(t.dims) != 2:
        return None
    return torch.from_numpy(numpy_helper.to_array(t).copy())
