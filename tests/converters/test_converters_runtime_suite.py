"""`pytest runtime_tests --artifact DIR` as a user's CI runs it: passes on a clean export,
fails on a damaged one, skips cleanly without an artifact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from converters import get_converter
from tests.tiny_models import make_sparse_hf_dir

ROOT = Path(__file__).resolve().parents[2]


def run_suite(*artifacts: Path) -> subprocess.CompletedProcess:
    args = [a for p in artifacts for a in ("--artifact", str(p))]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "runtime_tests",
        *args,
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_runtime_suite_on_hf_exports(tmp_path):
    src = make_sparse_hf_dir(tmp_path / "src", "qwen2")
    get_converter("hf").export(src, tmp_path / "hf")
    get_converter("hf").export(src, tmp_path / "legacy", format="sparse-24-bitmask")
    bad = tmp_path / "damaged"
    get_converter("hf").export(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    w = sd["model.layers.1.mlp.down_proj.weight"]
    w[0, int((w[0] == 0).nonzero()[0])] = 0.3  # a pruned zero made non-zero
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})

    ok = run_suite(tmp_path / "hf", tmp_path / "legacy")
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "passed" in ok.stdout and "vllm not installed" in ok.stdout
    failed = run_suite(bad)
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "test_mask_in_stored_tensors" in failed.stdout
    assert "test_torch_load_keeps_the_pattern" in failed.stdout


def test_runtime_suite_without_artifact_skips():
    res = run_suite()
    assert res.returncode == 0 and "no artifact given" in res.stdout
