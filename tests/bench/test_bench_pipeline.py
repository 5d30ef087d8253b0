"""benchmarks/bench_pipeline.py (floor vs prune stages vs llm-compressor) and gpu_check's pipeline
side by side: stage split, ratios, table, the floor's block passes, and the whole script on a tiny
checkpoint (one subprocess per configuration; the peer skipped where llm-compressor is absent)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from dsnt_export.bench.schema import row_problems
from dsnt_export.methods.nm_sweep_cpu import kernel_available
from tests._scripts import load_script
from tests.tiny_models import calib_ids, make_dense_and_sparse_dirs, tiny_model


@pytest.fixture(scope="module")
def bp():
    return load_script("bench_pipeline")


# ------------------------------------------------------------------------------ pure helpers


def test_stage_seconds_takes_the_reports_stage_keys(bp):
    t = {"capture_s": 1.0, "stats_s": 4.0, "init_s": 2.0, "refine_s": 3.0, "rerun_s": 5.0}
    st = bp.stage_seconds({**t, "total_s": 16.5, "block_0_s": 15.0}, [{"init": 99.0}])
    assert st["source"] == "report"
    assert {k: st[k] for k in t} == t  # the layer records are not used when the report has keys
    assert st["total_s"] == 16.5 and st["other_s"] == pytest.approx(1.5)
    assert "forwards_s" not in st


def test_stage_seconds_falls_back_to_layer_records(bp):
    """An older report (capture_s and total_s only): init/refine summed over the layers, the rest
    is the forwards."""
    layers = [{"init": 0.5, "refine": 2.0, "total": 2.6}, {"init": 1.5, "refine": 1.0}]
    st = bp.stage_seconds({"capture_s": 1.0, "total_s": 10.0}, layers)
    assert st["source"] == "layer records"
    assert (st["init_s"], st["refine_s"]) == (2.0, 3.0)
    assert st["stats_s"] is None and st["rerun_s"] is None
    assert st["forwards_s"] == pytest.approx(10.0 - 1.0 - 2.0 - 3.0)
    assert st["other_s"] == pytest.approx(0.0)
    with pytest.raises(KeyError):
        bp.stage_seconds({"capture_s": 1.0}, layers)


def test_ratios_to_floor_and_peer(bp):
    rows = [
        {"config": "floor", "status": "ok", "seconds": 50.0},
        {"config": "peer", "status": "ok", "seconds": 100.0},
        {"config": "sparsegpt", "status": "ok", "seconds": 60.0},
        {"config": "recipe", "status": "ok", "seconds": 75.0},
        {"config": "recipe", "status": "failed", "reason": "x"},
    ]
    bp.add_ratios(rows)
    assert rows[1]["ratio_to_floor"] == 2.0 and "ratio_to_peer" not in rows[1]
    assert (rows[2]["ratio_to_floor"], rows[2]["ratio_to_peer"]) == (1.2, 0.6)
    assert (rows[3]["ratio_to_floor"], rows[3]["ratio_to_peer"]) == (1.5, 0.75)
    assert "ratio_to_floor" not in rows[0] and "ratio_to_floor" not in rows[4]
    skipped_peer = [dict(r) for r in rows[:1]] + [
        {"config": "peer", "status": "skipped", "reason": "absent"},
        {"config": "sparsegpt", "status": "ok", "seconds": 60.0},
    ]
    bp.add_ratios(skipped_peer)
    assert skipped_peer[2]["ratio_to_floor"] == 1.2 and skipped_peer[2]["ratio_to_peer"] is None
    table = bp.format_table(rows)
    lines = table.splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "| sparsegpt |" in table and "1.20x" in table and "0.60x" in table
    assert "failed: x" in table


# ---------------------------------------------------------------------- measurements (tiny)


def test_floor_runs_every_block_twice_per_repeat(bp):
    model = tiny_model("llama")
    calls = [0] * len(model.model.layers)
    for i, b in enumerate(model.model.layers):
        b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = calib_ids(5, 12)
    res = bp.floor_passes(model, ids, device="cpu", batch_size=2, repeats=3)
    # 5 windows in batches of 2 -> 3 forwards per pass; 2 passes x 3 repeats. Block 0 also: once
    # per window during the capture (its forward is the recorder; the last block raises there,
    # so its hook never fires) and one warm-up pass (3 forwards)
    assert calls == [5 + 3 + 3 * 2 * 3, 3 * 2 * 3]
    assert res["timing"]["repeats"] == 3 and res["timing"]["warmup"] == 1
    assert res["seconds"] == pytest.approx(sorted(res["timing"]["samples_s"])[1])
    assert res["one_pass_s"] == pytest.approx(res["seconds"] / 2) and res["passes"] == 2


def test_prune_stages_split_the_total(bp):
    from dsnt_export.sparsify.driver import SparsifyConfig

    model = tiny_model("llama")
    cfg = SparsifyConfig(pattern="2:4", init="sparsegpt", refine="hessian-swap")
    report, st = bp.prune_stages(model, calib_ids(4, 16), cfg, device="cpu")
    assert len(report.layers) == 14 and report.summary()["all_checks_ok"]
    parts = [st[k] for k in ("capture_s", "stats_s", "init_s", "refine_s", "rerun_s")]
    assert all(p is not None and p >= 0 for p in parts), st
    assert sum(parts) <= st["total_s"] + 1e-6
    assert st["other_s"] == pytest.approx(st["total_s"] - sum(parts), abs=1e-6)


# ------------------------------------------------------------------------- the whole script


@pytest.mark.slow  # four child processes (each imports torch + transformers): ~40 s idle
def test_script_on_a_tiny_checkpoint(bp, tmp_path, capsys):
    """One subprocess per configuration on a tiny checkpoint: well-formed rows, the same
    calibration hash in every row, ratios to the floor, perplexities, and the peer skipped with
    a reason when llm-compressor does not import."""
    _, dense = make_dense_and_sparse_dirs(tmp_path)
    text = tmp_path / "eval.txt"
    out = tmp_path / "rows.jsonl"
    rc = bp.main(
        [
            "--model", str(dense), "--calib", f"file:{text}:4x16", "--eval", f"file:{text}",
            "--eval-seqlen", "32", "--ppl", "--ppl-windows", "2", "--floor-repeats", "2",
            "--threads", "1", "--peer-python", sys.executable, "--out", str(out),
        ]
    )  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0, [r.get("reason") for r in rows]
    assert all(row_problems(r) == [] for r in rows)
    assert [r["config"] for r in rows] == ["floor", "peer", "sparsegpt", "recipe"]
    assert len({r["run_id"] for r in rows}) == 1
    assert len({r["calibration"]["hash"] for r in rows}) == 1
    assert all(r["calibration"]["nsamples"] == 4 and r["threads"] == 1 for r in rows)
    by = {r["config"]: r for r in rows}
    peer = by["peer"]
    if importlib.util.find_spec("llmcompressor") is None:
        assert peer["status"] == "skipped" and "llm-compressor" in peer["reason"]
        assert by["sparsegpt"]["ratio_to_peer"] is None
    floor = by["floor"]
    assert floor["status"] == "ok" and floor["timing"]["repeats"] == 2
    assert floor["ppl"]["n_windows"] == 2 and floor["ppl"]["ppl"] > 1
    for name, method in (("sparsegpt", "sparsegpt"), ("recipe", "sparsegpt+refit")):
        r = by[name]
        assert r["status"] == "ok" and r["method"] == method and r["mask_ok"]
        assert r["ratio_to_floor"] == pytest.approx(r["seconds"] / floor["seconds"])
        assert r["stages"]["save_s"] > 0 and r["stages"]["total_s"] == r["seconds"]
        assert r["peak_host_bytes"] >= r["host_after_load_bytes"] > 0
        assert r["peak_device_bytes"] is None  # CPU
        want = "numba" if kernel_available() else "torch ops"
        assert r["sparsegpt_sweep"] == want  # SparseGPT's compiled CPU sweep, where it runs
        assert r["ppl"]["ppl"] > 1 and r["ppl"]["dataset_hash"] == floor["ppl"]["dataset_hash"]
    assert by["sparsegpt"]["stages"]["refine_s"] < by["recipe"]["stages"]["refine_s"]
    printed = capsys.readouterr().out
    assert "| recipe | sparsegpt+refit |" in printed and "skipped" in printed


@pytest.mark.skipif(
    importlib.util.find_spec("llmcompressor") is not None, reason="llm-compressor is installed"
)
def test_peer_child_skips_cleanly_without_llmcompressor(bp, tmp_path):
    """Without llm-compressor the peer child returns a skip with the reason (no traceback), and
    run_child passes it through; a child that crashes becomes a failed result with its log tail."""
    from dsnt_export.patterns import parse_pattern

    torch.save(calib_ids(2, 8), tmp_path / "ids.pt")
    job = bp.peer_job(
        ids=str(tmp_path / "ids.pt"),
        model_path=str(tmp_path / "nowhere"),
        pattern=parse_pattern("2:4"),
        state_out=str(tmp_path / "state.pt"),
    )
    res = bp._child_peer(job)
    assert res["status"] == "skipped" and "llm-compressor not importable" in res["reason"]
    assert not (tmp_path / "state.pt").exists()
    work = tmp_path / "work"
    work.mkdir()
    bad = bp.run_child(
        sys.executable, {"kind": "floor", "recipe": {}}, work, verbose=False, timeout=60
    )
    assert bad["status"] == "failed" and "floor child exit 1" in bad["reason"]


def test_peer_job_maps_our_pattern_to_llmcompressors(bp):
    """llm-compressor's "N:M" counts pruned weights: our 2:4 (keep 2 of 4) is its 2:4, our 1:4
    (keep 1) its 3:4 at sparsity 0.75; unstructured keeps its ratio."""
    from dsnt_export.patterns import parse_pattern

    assert bp.peer_pattern(parse_pattern("2:4")) == ("2:4", 0.5)
    assert bp.peer_pattern(parse_pattern("1:4")) == ("3:4", 0.75)
    assert bp.peer_pattern(parse_pattern("unstructured:0.6")) == (None, 0.6)


# ------------------------------------------------------------------------------- gpu_check


def test_gpu_check_pipeline_side_by_side_on_cpu(tmp_path, monkeypatch):
    """--smoke on the CPU runs the floor and three prunes with stages and ratios; without
    --smoke a CPU skips the LLaMA-7B-shaped pipeline with a reason (and exits 0)."""
    gc = load_script("gpu_check", monkeypatch)
    out = tmp_path / "gc.jsonl"
    rc = gc.main(["--smoke", "--sections", "pipeline", "--device", "cpu", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0, [r for r in rows if r["status"] == "failed"]
    pipe = [r for r in rows if r["bench"] == "pipeline"]
    assert [r["config"] for r in pipe] == ["floor", "sparsegpt", "wanda+dsnot", "default"]
    floor = pipe[0]
    assert floor["passes"] == 2 and floor["seconds"] > 0
    for r in pipe[1:]:
        assert r["all_checks_ok"] and r["sparsity"] == pytest.approx(0.5)
        assert r["ratio_to_floor"] == pytest.approx(r["seconds"] / floor["seconds"])
        assert r["stages"]["source"] == "report" and r["peak_device_bytes"] is None
        assert r["peak_host_bytes"] > 0
    assert [r["refine"] for r in pipe[1:]] == ["none", "dsnot", "refit"]
    out2 = tmp_path / "gc2.jsonl"
    assert gc.main(["--sections", "pipeline", "--device", "cpu", "--out", str(out2)]) == 0
    skip = [json.loads(line) for line in out2.read_text().splitlines()]
    assert any(
        r["bench"] == "pipeline" and r["status"] == "skipped" and "CUDA" in r["reason"]
        for r in skip
    )


def test_floor_matches_the_models_hidden_states(bp):
    """The floor's passes are real block forwards: its last block's output equals the last block's
    output in the model's own forward (hooks on the last block)."""
    model = tiny_model("llama")
    ids = calib_ids(2, 8)
    got = []
    last = model.model.layers[-1]
    h = last.register_forward_hook(
        lambda _m, _a, out: got.append(out[0] if isinstance(out, tuple) else out)
    )
    bp.floor_passes(model, ids, device="cpu", batch_size=2, repeats=1, warmup=False)
    h.remove()
    want = []
    h = last.register_forward_hook(
        lambda _m, _a, out: want.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    assert len(got) == 2  # the statistics pass and the re-run pass
    torch.testing.assert_close(got[-1], want[0], rtol=1e-5, atol=1e-5)


def test_median_run_keeps_the_median_runs_split_and_stops_at_a_failure(bp):
    times = iter([9.0, 7.0, 8.0])
    res = bp.median_run(lambda: {"seconds": (s := next(times)), "stages": {"total_s": s}}, 3)
    assert res["seconds"] == 8.0 and res["stages"]["total_s"] == 8.0
    assert res["repeat_seconds"] == [7.0, 8.0, 9.0]
    assert "repeat_seconds" not in bp.median_run(lambda: {"seconds": 1.0}, 1)
    calls = []
    fail = {"status": "failed", "reason": "boom"}
    assert bp.median_run(lambda: calls.append(1) or fail, 3) == fail and len(calls) == 1
    even = iter([4.0, 1.0, 3.0, 2.0])  # lower of the two middle runs
    assert bp.median_run(lambda: {"seconds": next(even)}, 4)["seconds"] == 2.0
