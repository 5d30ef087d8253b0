"""``dsnt-export check`` against deliberately damaged artifacts: each damage kind must be caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import get_converter
from converters.checkers import check_path
from converters.checkers.common import derive_nm
from dsnt_export.artifacts import MANIFEST_NAME
from dsnt_export.cli import main
from tests.tiny_models import make_sparse_hf_dir

UP = "model.layers.0.mlp.up_proj.weight"  # [128, 64]
Q = "model.layers.1.self_attn.q_proj.weight"  # [64, 64]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check")
    src = make_sparse_hf_dir(root / "src", "llama", pattern="2:4")
    get_converter("hf").export(src, root / "hf")
    return root / "hf"


@pytest.fixture
def art(exported, tmp_path) -> Path:
    """A fresh copy of the exported checkpoint to damage."""
    return Path(shutil.copytree(exported, tmp_path / "art"))


def edit_weights(d: Path, fn) -> None:
    f = d / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def drop_hashes(d: Path) -> None:
    """Remove the file hashes so that the tensor checks alone must catch the damage."""
    m = json.loads((d / MANIFEST_NAME).read_text())
    m.pop("files")
    (d / MANIFEST_NAME).write_text(json.dumps(m))


def codes(report) -> set[str]:
    return {f.code for f in report.findings if f.severity != "warning"}


def test_clean_export_passes(art, capsys):
    assert main(["check", str(art)]) == 0
    r = check_path(art)
    assert r.ok and r.derived_pattern == "2:4" and len(r.tensors) == 14
    assert r.pattern_source == "manifest"


@pytest.mark.parametrize("hashes", [True, False])
def test_single_flipped_weight(art, hashes):
    def flip(sd):
        w = sd[UP]
        r, c = (w == 0).nonzero()[0].tolist()
        w[r, c] = 1e-3  # one pruned zero made non-zero

    edit_weights(art, flip)
    if not hashes:
        drop_hashes(art)
    r = check_path(art)
    assert r.exit_code == 1
    assert {"mask", "sparsity-mismatch"} <= codes(r)
    assert ("sha256" in codes(r)) == hashes
    bad = [f for f in r.violations if f.code == "mask"]
    assert [f.subject for f in bad] == [UP] and bad[0].message.startswith("1 of")
    # the printed line names the tensor once (subject), not again in the message
    line = next(x for x in r.summary_lines() if "] mask " in x)
    assert line.count(UP) == 1, line
    assert r.tensors[UP]["derived"] == "3:4"


def test_flipped_weight_without_manifest(art, capsys):
    edit_weights(art, lambda sd: sd[Q].__setitem__((0, int((sd[Q][0] == 0).nonzero()[0])), 0.5))
    (art / MANIFEST_NAME).unlink()
    r = check_path(art, pattern="2:4")
    assert r.exit_code == 1 and codes(r) == {"mask"}
    capsys.readouterr()
    assert main(["check", str(art), "--pattern", "2:4"]) == 1
    out = capsys.readouterr()
    # a failed verdict is output, not an error: `dsnt-export check X > log` keeps it
    assert out.out.startswith("FAILED: ") and "] mask " in out.out and not out.err
    assert r.derived_pattern == "3:4"


@pytest.mark.parametrize("name", [UP, Q])
def test_transposed_export(art, name):
    edit_weights(art, lambda sd: sd.__setitem__(name, sd[name].t().contiguous()))
    drop_hashes(art)
    r = check_path(art)
    assert r.exit_code == 1
    assert "mask" in codes(r)  # the groups now lie along the wrong axis
    if name == UP:
        assert "transposed" in codes(r)


def test_missing_tensor(art):
    edit_weights(art, lambda sd: sd.pop(Q))
    drop_hashes(art)
    r = check_path(art)
    assert r.exit_code == 1 and codes(r) == {"missing-tensor"}
    assert r.violations[0].subject == Q


def test_truncated_file_is_unreadable(art):
    f = art / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert main(["check", str(art)]) == 2
    r = check_path(art)
    assert r.exit_code == 2 and "unreadable" in codes(r) and "sha256" in codes(r)


def test_truncated_shard_of_sharded_checkpoint(tmp_path):
    src = make_sparse_hf_dir(tmp_path / "src", "qwen2")
    out = tmp_path / "sharded"
    get_converter("hf").export(src, out, max_shard_size="60KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    assert check_path(out).ok
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    r = check_path(out)
    assert r.exit_code == 2 and "unreadable" in codes(r)


@pytest.mark.parametrize("fmt", ["dense", "sparse-24-bitmask"])
def test_leftover_sparsity_config(art, fmt):
    cfg = json.loads((art / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": fmt,
            "sparsity_structure": "2:4",
            "targets": ["Linear"],
            "ignore": ["lm_head"],
        },
    }
    (art / "config.json").write_text(json.dumps(cfg))
    drop_hashes(art)
    r = check_path(art)
    assert r.exit_code == 1 and codes(r) == {"vllm-config"}


def test_unknown_architecture(art):
    cfg = json.loads((art / "config.json").read_text())
    cfg["architectures"] = ["MyCustomForCausalLM"]
    (art / "config.json").write_text(json.dumps(cfg))
    r = check_path(art)
    assert r.exit_code == 1 and codes(r) == {"vllm-config", "sha256"}  # config.json was edited


def test_single_safetensors_file(art):
    assert check_path(art / "model.safetensors").ok
    edit_weights(art, lambda sd: sd.pop(Q))
    r = check_path(art / "model.safetensors")
    assert r.exit_code == 1 and {"missing-tensor", "sha256"} <= codes(r)


def test_pattern_option(art):
    r = check_path(art, pattern="1:4")
    assert r.exit_code == 1 and "pattern-mismatch" in codes(r) and "mask" in codes(r)
    assert main(["check", str(art), "--pattern", "5:4"]) == 2


def test_bad_inputs(tmp_path):
    assert main(["check", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tmp_path / "empty")]) == 2
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    assert main(["check", str(tmp_path / "x.safetensors")]) == 2


def test_json_and_junit(art, tmp_path, capsys):
    edit_weights(art, lambda sd: sd[UP].__setitem__((3, int((sd[UP][3] == 0).nonzero()[0])), 2.0))
    junit = tmp_path / "check.xml"
    assert main(["check", str(art), "--json", "--junit", str(junit)]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False and rep["exit_code"] == 1
    assert any(f["code"] == "mask" and f["subject"] == UP for f in rep["findings"])
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("tests")) >= 14 and int(suite.get("failures")) >= 2
    failed = {c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None}
    assert UP in failed and Q not in failed


def test_legacy_bitmask_export_checks_and_catches_corruption(tmp_path):
    src = make_sparse_hf_dir(tmp_path / "src", "llama")
    out = tmp_path / "legacy"
    get_converter("hf").export(src, out, format="sparse-24-bitmask")
    r = check_path(out)
    assert r.ok and any(f.code == "vllm-legacy" for f in r.findings)
    sd = load_file(str(out / "model.safetensors"))
    mod = Q[: -len(".weight")]
    sd[f"{mod}.bitmask"][0, 0] ^= 0b1  # corrupt one bit of the mask
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = check_path(out)
    assert r.exit_code == 1 and "bitmask" in codes(r)


def test_derive_nm():
    w = torch.tensor([[1.0, 0, 0, 0, 1, 1, 0, 0]])
    assert derive_nm(w, -1, 4) == "2:4"
    assert derive_nm(w, -1, 8) == "3:8"
    assert derive_nm(w.t(), 0, 4) == "2:4"
    assert derive_nm(torch.ones(2, 4), -1, 4) == "dense"
    assert derive_nm(torch.ones(2, 6), -1, 4) is None


def test_sparsity_config_without_targets_is_only_a_warning(art):
    cfg = json.loads((art / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {"format": "dense", "sparsity_structure": "2:4", "targets": []},
    }
    (art / "config.json").write_text(json.dumps(cfg))
    drop_hashes(art)
    r = check_path(art)
    assert r.exit_code == 0
    assert any(f.code == "vllm-config" and f.severity == "warning" for f in r.findings)


# --- the checker registry and its one-way imports ---------------------------------------------


def test_registry_unknown_kind_lists_known_ones():
    from converters.checkers import CHECKERS, get_checker
    from dsnt_export.errors import UserInputError

    assert set(CHECKERS) == {"hf", "safetensors", "onnx", "tensorrt"}
    assert get_checker("onnx") is CHECKERS["onnx"]
    with pytest.raises(UserInputError) as e:
        get_checker("gguf")
    assert "'gguf'" in str(e.value) and "hf, onnx, safetensors, tensorrt" in str(e.value)


def _imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_checker_imports_go_one_way():
    """dispatcher (package) -> a kind's module -> common/report; never back."""
    import converters.checkers as pkg

    root = Path(pkg.__file__).parent
    kinds = {"converters.checkers.hf", "converters.checkers.onnx", "converters.checkers.tensorrt"}
    for shared in ("common.py", "report.py"):
        imported = _imports(root / shared)
        assert not imported & (kinds | {"converters.checkers"}), (shared, imported)
        assert not any(m.startswith("converters.writers") for m in imported), shared
    for kind in kinds:
        imported = _imports(root / f"{kind.rsplit('.', 1)[1]}.py")
        assert "converters.checkers" not in imported, kind  # the dispatcher is not imported back
        assert not any(m.startswith("converters.writers") for m in imported), kind
    common = Path(pkg.__file__).parents[1] / "common"
    for f in common.glob("*.py"):
        assert not any(m.startswith("converters.checkers") for m in _imports(f)), f


# --- check of an HF directory streams one tensor at a time ------------------------------------


def _full_load_reference(d: Path, pattern: str = "2:4"):
    """What a check that loads every tensor at once finds per tensor (the manifest's targets)."""
    from converters.checkers.common import check_tensor
    from converters.checkers.report import CheckReport
    from dsnt_export.artifacts import read_manifest
    from dsnt_export.patterns import parse_pattern

    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    man = read_manifest(d)
    ref = CheckReport(str(d), "hf")
    for name, meta in sorted(man["tensors"].items()):
        if name in sd:
            check_tensor(
                ref,
                name,
                sd[name],
                parse_pattern(pattern),
                axis=-1,
                expected_shape=meta.get("shape"),
                expected_sparsity=meta.get("sparsity"),
            )
    return ref


@pytest.mark.parametrize("damage", ["none", "flip", "transpose", "nan", "drop"])
def test_streaming_check_finds_what_a_full_load_finds(art, damage):
    def fn(sd):
        if damage == "flip":
            w = sd[UP]
            r, c = (w == 0).nonzero()[0].tolist()
            w[r, c] = 1e-3
        elif damage == "transpose":
            sd[UP] = sd[UP].t().contiguous()
        elif damage == "nan":
            sd[Q][0, 0] = float("nan")
        elif damage == "drop":
            sd.pop(Q)

    edit_weights(art, fn)
    drop_hashes(art)
    got = check_path(art)
    ref = _full_load_reference(art)
    assert got.tensors == ref.tensors
    tensor_findings = sorted(
        (f.code, f.subject, f.message) for f in got.findings if f.subject in ref.tensors
    )
    assert tensor_findings == sorted((f.code, f.subject, f.message) for f in ref.findings)
    assert (got.exit_code == 0) == (damage == "none")


def test_streaming_check_holds_one_tensor_at_a_time(art, monkeypatch):
    """At most one weight read from the files is alive at any time during a check."""
    import gc
    import weakref

    import safetensors

    real = safetensors.safe_open
    alive: list[weakref.ref] = []
    peak = [0]

    class Counting:
        def __init__(self, *a, **kw):
            self._fh = real(*a, **kw)

        def __enter__(self):
            self._inner = self._fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            gc.collect()
            alive[:] = [r for r in alive if r() is not None]
            t = self._inner.get_tensor(name)
            alive.append(weakref.ref(t))
            peak[0] = max(peak[0], len(alive))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    r = check_path(art)
    assert r.ok and len(r.tensors) == 14
    assert len(alive) >= 1 and peak[0] == 1


def test_a_missing_path_is_unreadable_and_says_only_why(tmp_path, capsys):
    """Exit 2 with the path and the reason; no "pattern None (from None)" line about tensors
    that were never read."""
    missing = tmp_path / "no-such-artifact"
    assert main(["check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
    assert "None" not in err


def test_onnx_export_found_at_its_depth_not_anywhere_below(tmp_path):
    """A directory is an ONNX export when graphs sit in it or one level below (how exports lay
    them out); one that merely contains ONNX files deep down (a temp dir, a venv with ONNX test
    data) is refused as an unknown kind at once, not walked and checked file by file."""
    from converters.checkers import detect_kind

    export = tmp_path / "export"
    (export / "float32").mkdir(parents=True)
    (export / "float32" / "model.onnx").write_bytes(b"")
    assert detect_kind(export) == "onnx"
    assert detect_kind(export / "float32") == "onnx"

    wide = tmp_path / "wide"
    (wide / "venv" / "lib" / "onnx" / "test").mkdir(parents=True)
    (wide / "venv" / "lib" / "onnx" / "test" / "model.onnx").write_bytes(b"")
    assert detect_kind(wide) == "unknown"
    report = check_path(wide)
    assert report.exit_code == 2
    assert [f.code for f in report.findings] == ["unknown-kind"]
