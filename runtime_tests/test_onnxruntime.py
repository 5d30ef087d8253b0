"""ONNX Runtime: every exported graph loads, and its logits and perplexity match the reference."""

from __future__ import annotations

import pytest

PROMPT = 8  # prefill this many reference tokens, decode the rest one at a time


@pytest.fixture(scope="session")
def ort():
    return pytest.importorskip("onnxruntime", reason="onnxruntime not installed")


def _providers(ort, runtime_device):
    if runtime_device and runtime_device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("CUDAExecutionProvider not available (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def test_onnxruntime_graphs_match_reference(artifact, reference, ort, runtime_device):
    """Collects every graph's mismatches, then fails once with the per-output max difference."""
    artifact.require("onnx", "tensorrt")
    from converters.parity import ParityCheck
    from converters.writers.onnx import OnnxConverter
    from dsnt_export.runtimes.logits_lm import ort_lm, windows_ppl
    from dsnt_export.runtimes.onnx_io import run_generation, run_logits, session

    providers = _providers(ort, runtime_device)
    check = ParityCheck(f"onnxruntime ({providers[0]})")
    graphs = artifact.graphs
    assert graphs, "the manifest lists no ONNX graphs"
    for rel, g in sorted(graphs.items()):
        dt, kind = g["dtype"], g["kind"]
        ref_logits = reference["logits"]  # eager torch, float32
        tol = OnnxConverter.tolerance[dt]
        sess = session(artifact.path / rel, providers)
        ids = reference["input_ids"]
        if kind == "logits":
            check.compare(f"{rel}:logits", run_logits(sess, ids), ref_logits, tol)
            ppl = windows_ppl(ort_lm(sess), reference["ppl_ids"])
            check.compare_ppl(f"{rel}:perplexity", ppl, float(reference["ppl"]), tol)
        elif kind == "prefill":
            decode = session(artifact.path / rel.replace("prefill.onnx", "decode.onnx"), providers)
            got = run_generation(sess, decode, ids, prompt_len=PROMPT)
            check.compare(f"{rel}+decode:logits", got, ref_logits[:, PROMPT - 1 :], tol)
    check.raise_if_failed()
