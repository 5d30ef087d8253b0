"""benchmarks/runtime_matrix.py: the README's runtime table comes from bench rows, each cell
saying where it was verified (or "not yet")."""

from __future__ import annotations

from dsnt_export.bench.schema import make_row
from tests._scripts import load_script


def _matrix():
    return load_script("runtime_matrix")


def _ppl(rt, variant, ppl, **kw):
    ds = {"sha256": "abc"}
    return make_row("perplexity", "r", runtime=rt, variant=variant, ppl=ppl, n_windows=4,
                    seqlen=64, dataset=ds, **kw)  # fmt: skip


def test_cells_from_rows():
    m = _matrix()
    cpu = [
        _ppl("torch", "sparse", 40.0),
        _ppl("vllm", "sparse", 40.0 * (1 + 2e-6)),
        make_row("latency", "r", runtime="vllm", variant="sparse", phase="prefill"),
        _ppl("onnxruntime", "sparse", 41.0),
        make_row(
            "skip",
            "r",
            status="failed",
            runtime="tensorrt",
            variant="sparse",
            reason="loading failed: no engine",
        ),  # fmt: skip
    ]
    gpu = [
        make_row("conversion", "g", runtime="torch", variant="sparse-kernels", n_converted=3),
    ]
    t = m.cells({"CI (CPU)": cpu, "H200": gpu})
    assert t["vllm"]["loads"] == "yes (CI (CPU))"
    assert t["vllm"]["perplexity parity with torch"].startswith("yes (CI (CPU): rel 2.0e-06")
    assert t["vllm"]["latency"] == "yes (CI (CPU))"
    assert t["vllm"]["sparse kernels used"].startswith("no (CI (CPU)")
    assert t["onnxruntime"]["perplexity parity with torch"].startswith("no (CI (CPU): rel 2.5e-02")
    assert t["onnxruntime"]["latency"] == "not yet"
    assert t["tensorrt"]["loads"].startswith("no (CI (CPU): loading failed")
    assert t["torch"]["sparse kernels used"] == "yes (H200)"
    assert t["torch"]["perplexity parity with torch"] == "the reference"
    md = m.markdown(t).splitlines()
    assert md[0].startswith("| runtime | loads |") and len(md) == 2 + len(m.RUNTIMES)
