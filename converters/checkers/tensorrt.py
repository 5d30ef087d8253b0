"""Which layers TensorRT made sparse: build-log parsing, the JSON report, and its check.

TensorRT logs, at INFO level, when built with ``BuilderFlag.SPARSE_WEIGHTS``::

    (Sparsity) Layers eligible for sparse math: node_MatMul_12, node_MatMul_40 + node_Add_41
    (Sparsity) TRT inference plan picked sparse implementation for layers: node_MatMul_40 + ...

Layer names come from ONNX node names; fused layers join them with " + ". The report maps them
back to the Hugging Face parameters through the ONNX export's value-based weight mapping, so it
says per parameter whether it was eligible and whether a sparse tactic was picked. An empty
eligible list means the 2:4 weights went unnoticed: a violation for ``dsnt-export check``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from converters.checkers.common import check_files, load_json_file
from converters.checkers.report import UNREADABLE, VIOLATION, WARNING, CheckReport
from dsnt_export.artifacts import MANIFEST_NAME, read_manifest
from dsnt_export.errors import ArtifactError

REPORT_NAME = "tensorrt_report.json"
REPORT_SCHEMA = "dsnt-export/tensorrt-report"
_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_PICKED = re.compile(
    r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$"
)
_LOG_LINE = re.compile(r"^\s*(\[[^\]]*\]\s*)+")  # "[08/05/2024-12:06:54] [I] [TRT] " prefixes


def _join_wrapped(text: str) -> list[str]:
    """Log lines; a terminal-wrapped continuation (no ``[...]`` prefix) of a (Sparsity) line is
    glued back on as is (wrapping cuts names mid-token: ``Mat`` + ``Mul_139``)."""
    lines: list[str] = []
    for raw in text.splitlines():
        if (
            lines
            and raw
            and not raw.lstrip().startswith("[")
            and "(Sparsity)" in lines[-1]
            and "(Sparsity)" not in raw
        ):
            lines[-1] += raw
        else:
            lines.append(raw)
    return lines


def _layers(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(", ") if s.strip()]


def parse_sparsity_log(text: str) -> dict[str, Any]:
    """``{"eligible": [...], "picked": [...], "eligible_line": bool, "picked_line": bool}``.

    Lists hold TensorRT layer names in log order; the ``*_line`` flags say whether the line was
    logged at all (it is missing when SPARSE_WEIGHTS was not set or the log level hid it).
    """
    out: dict[str, Any] = {
        "eligible": [],
        "picked": [],
        "eligible_line": False,
        "picked_line": False,
    }
    for line in _join_wrapped(text):
        body = _LOG_LINE.sub("", line)
        if m := _ELIGIBLE.search(body):
            out["eligible"] += _layers(m.group(1))
            out["eligible_line"] = True
        elif m := _PICKED.search(body):
            out["picked"] += _layers(m.group(1))
            out["picked_line"] = True
    return out


def layer_components(layer: str) -> list[str]:
    """ONNX node names inside a (possibly fused) TensorRT layer name."""
    return [p.strip() for p in layer.split(" + ") if p.strip()]


def map_layers_to_params(parsed: dict, weights: dict[str, dict]) -> dict[str, dict]:
    """Per HF parameter: its ONNX node and whether TensorRT found it eligible / picked sparse."""
    node_of = {rec["node"]: param for param, rec in weights.items()}
    eligible = {c for layer in parsed["eligible"] for c in layer_components(layer)}
    picked = {c for layer in parsed["picked"] for c in layer_components(layer)}
    return {
        node_of[n]: {"node": n, "eligible": n in eligible, "picked": n in picked} for n in node_of
    }


def summarize_inspector(info: dict | None) -> dict[str, Any]:
    """Layer count and layers whose tactic name says sparse, from the engine inspector JSON."""
    if not info:
        return {"available": False}
    layers = info.get("Layers", [])
    sparse = []
    for layer in layers:
        if isinstance(layer, dict):
            tactic = str(layer.get("TacticName", "") or layer.get("Tactic", ""))
            if "sparse" in tactic.lower():
                sparse.append({"name": layer.get("Name"), "tactic": tactic})
    return {"available": True, "n_layers": len(layers), "sparse_tactic_layers": sparse}


def engine_entry(
    file: str,
    flags: list[str],
    log_text: str,
    weights: dict[str, dict],
    inspector: dict | None,
    build_s: float,
) -> dict[str, Any]:
    """The report entry of one built engine: which target layers TensorRT found 2:4-eligible and
    which it picked a sparse tactic for, per HF parameter.

    ``file``: the engine file; ``flags``: the builder flags it was built with; ``log_text``: the
    builder's verbose log (:func:`parse_sparsity_log`); ``weights``: ``{param: {"node": ONNX
    initializer/node name, ...}}`` of the export; ``inspector``: the engine inspector JSON or None;
    ``build_s``: build wall time in seconds. Returns a JSON-ready dict with ``params`` ``{param:
    {"node", "eligible", "picked"}}`` and the counts ``n_targets``/``n_eligible``/``n_picked``.
    Raises KeyError when a ``weights`` record has no ``"node"``.
    """
    parsed = parse_sparsity_log(log_text)
    per_param = map_layers_to_params(parsed, weights)
    return {
        "file": file,
        "flags": flags,
        "build_s": build_s,
        "eligible": parsed["eligible"],
        "picked": parsed["picked"],
        "log_has_sparsity_lines": parsed["eligible_line"] or parsed["picked_line"],
        "params": per_param,
        "n_targets": len(per_param),
        "n_eligible": sum(p["eligible"] for p in per_param.values()),
        "n_picked": sum(p["picked"] for p in per_param.values()),
        "inspector": summarize_inspector(inspector),
    }


def write_report(path: Path, report: dict) -> None:
    """Write a TensorRT sparsity report (:data:`REPORT_SCHEMA`) as indented JSON."""
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def check_tensorrt(
    path: str | Path,
    *,
    pattern: str | None = None,
    require_sparse_tactics: bool = False,
    manifest: dict | None = None,
    hashes: bool = True,
) -> CheckReport:
    """Check a TensorRT artifact dir or its report JSON: ONNX-side 2:4, files, sparse layers."""
    from converters.checkers.onnx import check_onnx

    p = Path(path)
    root = p if p.is_dir() else p.parent
    report = CheckReport(str(p), "tensorrt")
    data = load_json_file(root / REPORT_NAME if p.is_dir() else p, report)
    if data is None:
        return report
    if data.get("schema") != REPORT_SCHEMA:
        report.add(
            UNREADABLE,
            "not-a-report",
            str(p),
            f"schema {data.get('schema')!r} is not {REPORT_SCHEMA!r}",
        )
        return report
    try:
        man = manifest if manifest is not None else read_manifest(root, required=False)
    except ArtifactError as e:
        report.add(UNREADABLE, "manifest", MANIFEST_NAME, str(e))
        man = None
    if hashes:
        check_files(report, root, man)
    graph = root / data.get("onnx", "onnx/model.onnx")
    if man is not None:
        sub = check_onnx(
            graph, pattern=pattern, manifest=dict(man, kind="onnx"), root=root, hashes=False
        )
    else:
        sub = check_onnx(graph, pattern=pattern)
    report.findings += sub.findings
    report.tensors.update(sub.tensors)
    report.pattern, report.pattern_source = sub.pattern, sub.pattern_source
    report.derived_pattern = sub.derived_pattern
    _check_engines(report, root, data, require_sparse_tactics)
    return report


def _check_engines(report: CheckReport, root: Path, data: dict, require_sparse: bool) -> None:
    engines = data.get("engines", {})
    sp = engines.get("sparse")
    if sp is None:
        report.add(VIOLATION, "no-sparse-engine", REPORT_NAME, "the report has no sparse engine")
        return
    for kind, e in engines.items():
        if not (root / e.get("file", "")).is_file():
            report.add(VIOLATION, "missing-file", e.get("file", kind), f"{kind} engine plan absent")
    if not sp.get("eligible"):
        report.add(
            VIOLATION,
            "no-eligible-layers",
            "engine:sparse",
            "TensorRT found no layer eligible for sparse math: the 2:4 weights are unused",
        )
    missed = sorted(k for k, v in sp.get("params", {}).items() if not v.get("eligible"))
    if missed and sp.get("eligible"):
        report.add(
            WARNING,
            "not-eligible",
            "engine:sparse",
            f"{len(missed)} targeted linears not eligible: {missed[:5]}",
        )
    if not sp.get("picked"):
        sev = VIOLATION if require_sparse else WARNING
        report.add(
            sev,
            "no-sparse-tactics",
            "engine:sparse",
            "TensorRT picked dense tactics for every layer (sparse ones were not faster "
            "at these shapes): expect no speedup",
        )
    report.info["tensorrt"] = {
        k: {"eligible": len(e.get("eligible", [])), "picked": len(e.get("picked", []))}
        for k, e in engines.items()
    }
