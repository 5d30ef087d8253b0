"""The hf/vLLM converter: plain checkpoint for current vLLM, legacy sparse-24-bitmask, atomicity."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converters import ExportResult, get_converter
from converters.checkers import check_path
from converters.common.bitmask import FORMAT
from converters.common.source import read_source
from converters.common.vllm_compat import config_problems, strip_sparsity_config
from dsnt_export.artifacts import read_manifest
from dsnt_export.errors import PatternError, UnsupportedModelError, UserInputError
from tests.tiny_models import make_sparse_hf_dir

LEFTOVER = {
    "format": "dense",
    "sparsity_structure": "2:4",
    "targets": ["Linear"],
    "ignore": ["lm_head"],
}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_sparse_hf_dir(
        tmp_path_factory.mktemp("hf") / "src", "llama", sparsity_config=LEFTOVER
    )


def test_plain_export_for_current_vllm(src, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        res = get_converter("hf").export(src, out)
    assert isinstance(res, ExportResult) and res.out_dir == out
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and config_problems(cfg) == []
    assert any("sparsity_config" in w for w in res.warnings)
    assert "stripped quantization_config.sparsity_config" in caplog.text
    for f in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "dsnt_manifest.json",
    ):
        assert (out / f).is_file(), f
    man = read_manifest(out)
    assert man["kind"] == "hf" and man["pattern"]["string"] == "2:4"
    assert man["extra"]["export"]["format"] == "plain"
    assert set(man["files"]) >= {"model.safetensors", "config.json"}
    assert len(man["tensors"]) == 14 and all(t["check"]["ok"] for t in man["tensors"].values())
    assert res.parity["logits"]["ok"] and res.parity["logits"]["max_abs_diff"] == 0.0
    assert res.parity["perplexity"]["rel_diff"] == 0.0
    # an independent loader (transformers itself) gives the source's logits
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(out).eval()
    b = read_source(src).load_model()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert check_path(out).ok


def test_sharded_above_threshold(src, tmp_path):
    out = tmp_path / "sharded"
    get_converter("hf").export(src, out, max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    for s in shards:
        assert (out / s).stat().st_size < 50_000 + 40_000  # one tensor may overflow a shard
    sd = read_source(src).state_dict()
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_legacy_bitmask_layout(tmp_path, dtype, capsys):
    src = make_sparse_hf_dir(tmp_path / "src", "qwen2", dtype=dtype)
    res = get_converter("hf").export(src, tmp_path / "legacy", format=FORMAT)
    assert any("vLLM <= 0.18" in n for n in res.notes)
    cfg = json.loads((tmp_path / "legacy" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    sc = q["sparsity_config"]
    assert sc["format"] == FORMAT and sc["sparsity_structure"] == "2:4"
    assert len(sc["targets"]) == 14 and sc["ignore"] == ["lm_head"]
    assert sc["global_sparsity"] == pytest.approx(0.5)
    sd = load_file(str(tmp_path / "legacy" / "model.safetensors"))
    m = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert f"{m}.weight" not in sd
    assert sd[f"{m}.compressed"].dtype == dtype and tuple(sd[f"{m}.compressed"].shape) == (64, 64)
    assert sd[f"{m}.bitmask"].dtype == torch.uint8 and tuple(sd[f"{m}.bitmask"].shape) == (64, 16)
    assert sd[f"{m}.shape"].dtype == torch.int64 and sd[f"{m}.shape"].tolist() == [[64], [128]]
    assert "model.layers.0.self_attn.q_proj.bias" in sd  # biases stay as they are
    # unpacked by our reader: same values as the source (pruned -0.0 become +0.0)
    a, b = read_source(src).state_dict(), read_source(tmp_path / "legacy").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert res.parity["logits"]["max_abs_diff"] == 0.0


def test_stranded_legacy_checkpoint_reexported_plain(tmp_path):
    src = make_sparse_hf_dir(tmp_path / "src", "llama")
    get_converter("hf").export(src, tmp_path / "legacy", format=FORMAT)
    res = get_converter("hf").export(tmp_path / "legacy", tmp_path / "plain")
    assert any("sparsity_config" in w for w in res.warnings)
    sd = load_file(str(tmp_path / "plain" / "model.safetensors"))
    ref = read_source(src).state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert check_path(tmp_path / "plain").ok


def test_opt_export(tmp_path):
    src = make_sparse_hf_dir(tmp_path / "src", "opt")
    res = get_converter("hf").export(src, tmp_path / "out", format=FORMAT)
    assert res.parity["logits"]["ok"] and check_path(tmp_path / "out").ok
    sc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.fc1" not in sc["sparsity_config"]["targets"]
    assert "model.decoder.layers.0.fc1" in sc["sparsity_config"]["targets"]


def test_failures_leave_no_artifact(tmp_path):
    src48 = make_sparse_hf_dir(tmp_path / "src48", "llama", pattern="4:8")
    with pytest.raises(PatternError, match="only 2:4"):
        get_converter("hf").export(src48, tmp_path / "bad", format=FORMAT)
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    cfg = json.loads((src48 / "config.json").read_text())
    cfg["architectures"] = ["NotAModelForCausalLM"]
    (src48 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="NotAModelForCausalLM"):
        get_converter("hf").export(src48, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(UserInputError, match="already exists"):
        get_converter("hf").export(src48, tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    with pytest.raises(UserInputError, match="unknown export target"):
        get_converter("gguf")


def test_strip_sparsity_config_keeps_real_quantization():
    cfg = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {"g": {"weights": {"num_bits": 8}}},
            "sparsity_config": LEFTOVER,
        }
    }
    out, removed = strip_sparsity_config(cfg)
    assert removed == ["quantization_config.sparsity_config"]
    assert (
        out["quantization_config"]["config_groups"]
        and "sparsity_config" not in out["quantization_config"]
    )
    assert "sparsity_config" in cfg["quantization_config"]  # input untouched
    out, removed = strip_sparsity_config(
        {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "sparsity_config": LEFTOVER,
                "version": "0.9",
            }
        }
    )
    assert "quantization_config" not in out and len(removed) == 2


def test_cli_export_prints_parity_and_version_caveat(src, tmp_path, capsys):
    from dsnt_export.cli import main

    out = tmp_path / "cli"
    assert main(["export", "hf", str(src), "--out", str(out), "--format", FORMAT]) == 0
    text = capsys.readouterr().out
    assert "parity logits: max |diff| 0.000e+00" in text
    assert "vLLM <= 0.18" in text and "warning: stripped" in text
    assert check_path(out).ok
    assert main(["export", "hf", str(src), "--out", str(out)]) == 2  # exists: bad input
    assert main(["export", "hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
