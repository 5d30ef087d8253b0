"""Blocks spread over devices (dsnt_export/sparsify/devices.py) and the streamed path's prefetch.

The map's logic is checked with device objects only (no second device is needed to say which
block goes where); the drivers are run with maps on this machine's devices and must give the same
weights as without a map. Mixed CUDA/CPU maps run in benchmarks/gpu_check.py (``devices``).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import dsnt_export.sparsify.devices as devices
from dsnt_export.cli import main
from dsnt_export.errors import UserInputError
from dsnt_export.recipe import Recipe
from dsnt_export.sparsify.devices import KwargsByDevice, balanced_split, resolve_block_devices
from dsnt_export.sparsify.driver import SparsifyConfig, sparsify
from dsnt_export.workflow import prune_to_dir
from tests.sparsify.test_streaming import _recipe, _source, _tensors
from tests.tiny_models import calib_ids, tiny_model

CPU = torch.device("cpu")
G0, G1, G2 = (torch.device("cuda", i) for i in range(3))  # objects only: nothing runs on them


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that reports two accelerators (for the map's logic; nothing is computed)."""
    monkeypatch.setattr(devices, "_visible_accelerators", lambda: [G0, G1])


# ------------------------------------------------------------------------------ which device


def test_balanced_split_golden():
    assert balanced_split(30, [G0, G1, G2]) == [G0] * 10 + [G1] * 10 + [G2] * 10
    assert balanced_split(7, [G0, G1, G2]) == [G0] * 3 + [G1] * 2 + [G2] * 2
    assert balanced_split(2, [G0, G1, G2]) == [G0, G1]
    assert balanced_split(0, [G0]) == []
    with pytest.raises(ValueError):
        balanced_split(3, [])


def test_balanced_split_properties_over_random_counts():
    rng = random.Random(0)
    for _ in range(200):
        n, k = rng.randrange(0, 100), rng.randrange(1, 9)
        devs = [torch.device("cuda", i) for i in range(k)]
        got = balanced_split(n, devs)
        assert len(got) == n
        runs = [sum(1 for d in got if d == dev) for dev in devs]
        assert max(runs) - min(runs) <= 1  # nearly equal
        assert [d.index for d in got] == sorted(d.index for d in got)  # contiguous, in order


def test_no_map_puts_every_block_on_the_default():
    assert resolve_block_devices(None, "model.layers", 3, CPU) == [CPU] * 3


def test_accelerate_style_map_longest_prefix_wins(two_gpus):
    m = {"model.embed_tokens": 0, "model.layers": 0, "model.layers.1": 1, "lm_head": "cpu"}
    got = resolve_block_devices(m, "model.layers", 12, CPU)
    # "model.layers.1" is block 1 only: blocks 10 and 11 do not start with "model.layers.1."
    assert got == [G0, G1] + [G0] * 10
    assert resolve_block_devices({"": 1}, "model.layers", 2, CPU) == [G1, G1]
    assert resolve_block_devices({"model.layers": "cpu"}, "model.layers", 2, G0) == [CPU, CPU]


def test_balanced_uses_every_accelerator(two_gpus):
    assert resolve_block_devices("balanced", "model.layers", 5, CPU) == [G0] * 3 + [G1] * 2


@pytest.mark.parametrize(
    "device_map, match",
    [
        ({"model.layers.0": "cpu"}, r"no device for 2 block\(s\): model\.layers\.1, model\.la"),
        ({"model.layers": "disk"}, "'disk' and 'meta' hold no computation"),
        ({"model.layers": "meta"}, "'disk' and 'meta' hold no computation"),
        ({"model.layers": "auto"}, "name a device"),
        ({"model.layers": 2}, r"2 accelerator\(s\), numbered 0\.\.1"),
        ({"model.layers": True}, "expected an accelerator index"),
        ({"model.layers": 1.5}, "expected an accelerator index"),
        ({3: "cpu"}, "keys are module names"),
        ("everywhere", "expected 'balanced' or a mapping"),
        (["cpu"], "got list"),
    ],
)
def test_bad_maps_say_what_is_wrong(two_gpus, device_map, match):
    with pytest.raises(UserInputError, match=match):
        resolve_block_devices(device_map, "model.layers", 3, CPU)


def test_without_accelerators_indices_and_balanced_are_refused(monkeypatch):
    monkeypatch.setattr(devices, "_visible_accelerators", lambda: [])
    with pytest.raises(UserInputError, match="sees none"):
        resolve_block_devices("balanced", "model.layers", 2, CPU)
    with pytest.raises(UserInputError, match=r"0 accelerator\(s\); use 'cpu'"):
        resolve_block_devices({"model.layers": 0}, "model.layers", 2, CPU)


def test_kwargs_move_once_per_device_and_stay_shared():
    cos, sin, mask = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.ones(1, 1, 4, 4)
    shared = (cos, sin)
    captured = [{4: {"position_embeddings": shared, "attention_mask": mask}} for _ in range(3)]
    kw = KwargsByDevice(CPU)
    assert kw.on(captured[0], CPU) is captured[0] and kw.on(captured[0], None) is captured[0]
    meta = torch.device("meta")
    a, b = kw.on(captured[1], meta), kw.on(captured[2], meta)
    pe = a[4]["position_embeddings"]
    assert pe[0].device == meta and pe[0].shape == cos.shape and a[4]["attention_mask"].is_meta
    assert pe is b[4]["position_embeddings"]  # one copy per device, shared by the blocks
    assert captured[1][4]["position_embeddings"][0].device == CPU  # the captured ones untouched


# ------------------------------------------------------------------------------- the drivers


def test_in_memory_prune_with_a_map_matches_the_plain_one():
    ids = calib_ids()
    cfg = SparsifyConfig(pattern="2:4", init="sparsegpt", batch_size=2)
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = sparsify(a, ids, cfg, device="cpu", progress=False)
    rb = sparsify(b, ids, cfg, device="cpu", progress=False, device_map={"model.layers": "cpu"})
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert "block_devices" not in ra.config
    assert rb.config["block_devices"] == ["cpu"] * a.config.num_hidden_layers
    with pytest.raises(UserInputError, match="move_blocks=False"):
        sparsify(a, ids, cfg, device=None, move_blocks=False, device_map="balanced")


@pytest.mark.parametrize("prefetch", [False, True])
def test_streamed_prune_with_a_map_and_prefetch_matches_in_memory(tmp_path, monkeypatch, prefetch):
    import dsnt_export.sparsify.streaming as streaming

    real = streaming.sparsify_streamed
    monkeypatch.setattr(
        streaming, "sparsify_streamed", lambda *a, **kw: real(*a, **kw, prefetch=prefetch)
    )
    src = _source(tmp_path, "llama")
    recipe = _recipe(src, tmp_path, refine="none")
    mem = prune_to_dir(recipe, tmp_path / "mem", progress=False)
    mapped = recipe.replace(out_of_core=True, device_map={"model.layers": "cpu"})
    ooc = prune_to_dir(mapped, tmp_path / "ooc", progress=False)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "ooc")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ooc.manifest["recipe"]["device_map"] == {"model.layers": "cpu"}
    assert "device_map" not in mem.manifest["recipe"]
    assert ooc.manifest["extra"]["run_report"]["config"]["block_devices"] == ["cpu", "cpu"]


def test_read_ahead_by_default_only_onto_accelerators():
    from dsnt_export.sparsify.streaming import _BlockReader

    devs = [CPU, G0, G1, CPU]
    auto = _BlockReader(None, [[]] * 4, devs, None)
    assert auto.ahead == [False, True, True, False] and auto.pool is not None
    auto.close()
    assert _BlockReader(None, [[]] * 2, [CPU, CPU], None).pool is None  # all on the CPU: none
    forced = _BlockReader(None, [[]] * 2, [CPU, CPU], True)
    assert forced.ahead == [True, True]
    forced.close()
    assert _BlockReader(None, [[]] * 2, [G0, G1], False).pool is None


def test_a_read_failing_in_the_prefetch_thread_is_raised_and_leaves_nothing(tmp_path, monkeypatch):
    import dsnt_export.sparsify.streaming as streaming
    from dsnt_export.shards import SafetensorsCheckpoint

    threads = []
    real_streamed = streaming.sparsify_streamed
    monkeypatch.setattr(
        streaming, "sparsify_streamed", lambda *a, **kw: real_streamed(*a, **kw, prefetch=True)
    )
    real = SafetensorsCheckpoint.read

    def read(self, key):
        import threading

        threads.append(threading.current_thread().name)
        if key.startswith("model.layers.1."):
            raise OSError(f"disk error reading {key}")
        return real(self, key)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", read)
    src = _source(tmp_path, "llama")
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"disk error reading model\.layers\.1\."):
        prune_to_dir(_recipe(src, tmp_path, refine="none", out_of_core=True), out, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert any(t.startswith("dsnt-prefetch") for t in threads)  # the block reads ran ahead


# ------------------------------------------------------------------------ recipe and CLI


def test_recipe_device_map_is_checked_and_listed_only_when_set():
    r = Recipe.preset("default")
    assert "device_map" not in r.to_dict()
    assert r.replace(device_map="balanced").to_dict()["device_map"] == "balanced"
    m = {"model.layers": 0, "model.layers.20": "cuda:1"}
    assert r.replace(device_map=m).to_dict()["device_map"] == m
    for bad in ("everywhere", {}, {"model.layers": [0]}, {"model.layers": None}, 3):
        with pytest.raises(UserInputError, match="device_map"):
            r.replace(device_map=bad)


def test_cli_device_map_forms(tmp_path, capsys):
    from dsnt_export.commands.prune import _device_map_arg

    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model.layers": "cpu"}))
    assert _device_map_arg("balanced") == "balanced"
    assert _device_map_arg('{"model.layers": 0}') == {"model.layers": 0}
    assert _device_map_arg(str(f)) == {"model.layers": "cpu"}
    said = {
        "[0, 1]": "expected a JSON object of module -> device, got [0, 1]",
        "{oops": "not valid JSON",
        str(tmp_path / "missing.json"): "is neither 'balanced', a JSON object nor an existing",
    }
    for bad, msg in said.items():
        rc = main(["prune", "--model", "x", "--out", str(tmp_path / "o"), "--device-map", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "argument --device-map" in err and msg in err, err


def test_cli_balanced_without_accelerator_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import dsnt_export.hf_io as hf_io

    monkeypatch.setattr(devices, "_visible_accelerators", lambda: [])

    def no_load(*a, **kw):
        raise AssertionError("the map must be refused before any weight is read")

    monkeypatch.setattr(hf_io, "load_model", no_load)
    monkeypatch.setattr("dsnt_export.workflow.loading.load_model", no_load)
    src = _source(tmp_path, "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    args = ["prune", "--model", str(src), "--calib", f"file:{calib}:2x16", "--device", "cpu"]
    for extra in ([], ["--out-of-core"]):
        out = tmp_path / "o"
        rc = main([*args, *extra, "--device-map", "balanced", "--out", str(out), "--no-progress"])
        assert rc == 2
        assert "sees none" in capsys.readouterr().err
        assert not out.exists()
