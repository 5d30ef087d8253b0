"""Benchmarks: timing helpers, row schema, torch and ONNX Runtime latency/perplexity on tiny
models, skips with reasons, artifact resolution, and benchmarks/gpu_check.py --smoke."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dsnt_export.bench import BenchOptions, run_bench
from dsnt_export.bench.schema import SCHEMA, make_row, row_problems
from dsnt_export.bench.target import resolve_target
from dsnt_export.bench.timing import (
    PeakMemory,
    Timing,
    append_rows,
    measure,
    read_rows,
    time_fn,
)
from dsnt_export.cli import main
from dsnt_export.errors import ArtifactError, UserInputError
from tests._scripts import load_script
from tests.runtimes.toy_onnx import toy_onnx_artifact, toy_perplexity
from tests.tiny_models import (
    dense_vs_sparse_options,
    make_dense_and_sparse_dirs,
    tiny_tokenizer,
    write_eval_text,
)

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(prompt_lengths=(8,), batch_sizes=(1, 2), decode_tokens=3, repeats=2, progress=False)


# ------------------------------------------------------------------------------------- timing


def test_measure_excludes_warmup_and_setup():
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1
        time.sleep(0.03)  # untimed
        return calls["setup"]

    seen = []

    def fn(state):
        calls["fn"] += 1
        seen.append(state)

    t = measure(fn, setup=setup, warmup=2, repeats=3)
    assert calls == {"setup": 5, "fn": 5}
    assert seen == [1, 2, 3, 4, 5]  # each call gets its own fresh state
    assert t.repeats == 3 and t.warmup == 2 and len(t.samples_s) == 3
    assert t.median_s < 0.02  # the 30 ms setups are not in the samples


def test_timing_statistics_recomputed():
    t = Timing((0.4, 0.1, 0.3, 0.2, 1.0), warmup=1)
    j = t.to_json()
    assert j["median_s"] == 0.3 and j["min_s"] == 0.1 and j["max_s"] == 1.0
    assert j["q1_s"] == pytest.approx(0.2) and j["q3_s"] == pytest.approx(0.4)
    assert j["stdev_s"] == pytest.approx(float(np.std([0.4, 0.1, 0.3, 0.2, 1.0], ddof=1)))
    assert Timing((0.5,), 0).quartiles_s == (0.5, 0.5)
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)
    assert set(time_fn(lambda: None, repeats=2)) >= {"median_s", "min_s", "max_s", "stdev_s"}


def test_peak_memory_cpu_sees_an_allocation():
    with PeakMemory("cpu") as pm:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
    del x
    assert pm.kind in ("cpu_rss_peak", "cpu_rss_peak_process")
    assert pm.peak_bytes is not None and pm.peak_bytes >= 64 * 2**20


def test_rows_append_read_and_torn_line(tmp_path):
    f = tmp_path / "r" / "rows.jsonl"
    append_rows(f, [{"a": 1}, {"b": float("nan")}])
    append_rows(f, [{"c": [1, 2]}])
    rows = read_rows(f)
    assert rows[0] == {"a": 1} and math.isnan(rows[1]["b"]) and rows[2] == {"c": [1, 2]}
    with open(f, "a") as fh:
        fh.write('{"torn": ')  # a crash mid-write: last line ignored
    assert len(read_rows(f)) == 3
    f.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ArtifactError, match="line 2"):
        read_rows(f)


# ------------------------------------------------------------------------------------- schema


def test_make_row_and_problems():
    r = make_row("latency", "rid", variant="sparse")
    assert r["schema"] == SCHEMA and r["status"] == "ok" and r["run_id"] == "rid"
    assert any("lacks 'latency_ms'" in p for p in row_problems(r))
    assert row_problems(make_row("skip", "rid", status="skipped", reason="x")) == []
    with pytest.raises(ValueError):
        make_row("skip", "rid", status="skipped")
    assert row_problems({"bench": "x"})  # missing common keys
    assert "variant 'nope'" in " ".join(row_problems(make_row("skip", "r", variant="nope")))


def test_options_validated():
    with pytest.raises(UserInputError, match="runtime"):
        BenchOptions(runtime="tflite")
    with pytest.raises(UserInputError, match="prompt lengths"):
        BenchOptions(runtime="torch", prompt_lengths="8,x")
    with pytest.raises(UserInputError, match="nothing to measure"):
        BenchOptions(runtime="torch", ppl=False, latency=False)
    assert BenchOptions(runtime="torch", batch_sizes="1, 4").batch_sizes == (1, 4)


# ------------------------------------------------------------------------------ torch runtime


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    sparse, dense = make_dense_and_sparse_dirs(root)
    return root, sparse, dense


def _check_latency_row(r):
    assert row_problems(r) == []
    med = r["timing"]["median_s"]
    toks = r["prompt_len"] if r["phase"] == "prefill" else r["decode_tokens"]
    assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * toks / med)
    per = med / (1 if r["phase"] == "prefill" else r["decode_tokens"])
    assert r["latency_ms"] == pytest.approx(per * 1e3)
    assert r["timing"]["repeats"] == 2 and len(r["timing"]["samples_s"]) == 2


def test_torch_dense_vs_sparse_rows(tiny_dirs):
    root, sparse, dense = tiny_dirs
    seen = []
    opts = dense_vs_sparse_options(
        "torch", dense, root / "eval.txt", seqlen=32, max_windows=3, **FAST
    )
    rows = run_bench(sparse, opts, sink=seen.append)
    assert seen == rows
    assert len({r["run_id"] for r in rows}) == 1
    assert all(row_problems(r) == [] for r in rows), [row_problems(r) for r in rows]
    lat = [r for r in rows if r["bench"] == "latency"]
    assert {(r["variant"], r["phase"], r["batch_size"]) for r in lat} == {
        (v, p, b) for v in ("dense", "sparse") for p in ("prefill", "decode") for b in (1, 2)
    }
    for r in lat:
        _check_latency_row(r)
        assert r["peak_mem_kind"].startswith("cpu_rss") and r["peak_mem_bytes"] > 0
        assert r["env"]["versions"]["torch"] == torch.__version__
    ppl = {r["variant"]: r for r in rows if r["bench"] == "perplexity"}
    assert set(ppl) == {"dense", "sparse"} and ppl["dense"]["ppl"] != ppl["sparse"]["ppl"]
    assert ppl["sparse"]["model"]["pattern"] == "2:4" and ppl["dense"]["model"]["pattern"] is None
    # independent recomputation of the sparse perplexity with the same windows
    from transformers import AutoModelForCausalLM

    from dsnt_export.data import get_eval_tokens

    toks, _ = get_eval_tokens(f"file:{root / 'eval.txt'}", tiny_tokenizer())
    w = toks[0, : 3 * 32].reshape(3, 32)
    m = AutoModelForCausalLM.from_pretrained(sparse).eval()
    with torch.no_grad():
        lg = m(input_ids=w).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1))
    assert ppl["sparse"]["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    skips = [r for r in rows if r["status"] == "skipped"]
    assert [(r["variant"], "CUDA" in r["reason"]) for r in skips] == [("sparse-kernels", True)]


def test_absent_runtimes_are_skipped_with_reason(tiny_dirs, tmp_path):
    _, sparse, _ = tiny_dirs
    out = tmp_path / "rows.jsonl"
    for rt, dev in (
        ("vllm", "cpu"),
        ("tensorrt", "cpu"),
        ("onnxruntime", "cuda"),
        ("torch", "cuda"),
    ):
        if rt == "torch" and torch.cuda.is_available():
            continue
        assert (
            main(
                [
                    "bench",
                    str(sparse),
                    "--runtime",
                    rt,
                    "--device",
                    dev,
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    rows = read_rows(out)
    assert rows and all(r["status"] == "skipped" and r["reason"] for r in rows)
    assert all(row_problems(r) == [] for r in rows)


def test_semi_structured_guards_on_cpu():
    from dsnt_export.runtimes.torch_semi import (
        semi_structured_backend,
        shape_problem,
        to_semi_structured,
    )

    backend, why = semi_structured_backend(torch.device("cpu"))
    assert backend is None and "CUDA" in why
    assert "dtype" in shape_problem(torch.zeros(64, 64), "cutlass")
    assert "multiple" in shape_problem(torch.zeros(48, 64, dtype=torch.float16), "cutlass")
    assert shape_problem(torch.zeros(64, 128, dtype=torch.float16), "cutlass") is None
    lin = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32)).half()
    with torch.no_grad():
        lin[0].weight.zero_()
        lin[1].weight.fill_(1.0)  # not 2:4
    recs = to_semi_structured(lin, ["0.weight", "1.weight", "9.weight"], "cutlass")
    assert [r["converted"] for r in recs] == [False, False, False]
    assert "CUDA" in recs[0]["reason"]  # the kernels refuse CPU tensors: recorded, not raised
    assert "not 2:4" in recs[1]["reason"] and "no such module" in recs[2]["reason"]
    assert isinstance(lin[0].weight.data, torch.Tensor) and lin[0].weight.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm80+)")
def test_semi_structured_conversion_matches_dense_on_gpu():
    from dsnt_export.runtimes.torch_semi import semi_structured_backend, to_semi_structured

    dev = torch.device("cuda")
    backend, why = semi_structured_backend(dev)
    if backend is None:
        pytest.skip(why)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128)).half().to(dev)
    w = model[0].weight.data
    grp = w.reshape(128, 64, 4)
    keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(-1, grp.abs().topk(2, -1).indices, 1)
    model[0].weight.data = (grp * keep).reshape(128, 256).contiguous()
    x = torch.randn(32, 256, device=dev, dtype=torch.float16)
    ref = model(x)
    assert to_semi_structured(model, ["0.weight"], backend)[0]["converted"]
    assert torch.allclose(model(x), ref, atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------- ONNX Runtime


def test_onnxruntime_latency_and_perplexity_on_toy_graphs(tmp_path):
    art, emb, head = toy_onnx_artifact(tmp_path / "onnx", 0)
    dense, demb, dhead = toy_onnx_artifact(tmp_path / "dense_onnx", 1)
    corpus = write_eval_text(tmp_path / "eval.txt", words=300, step=13)
    opts = dense_vs_sparse_options(
        "onnxruntime", dense, corpus, seqlen=16, max_windows=4, threads=1, **FAST
    )
    rows = run_bench(art, opts)
    assert all(row_problems(r) == [] for r in rows) and all(r["status"] == "ok" for r in rows)
    lat = [r for r in rows if r["bench"] == "latency"]
    assert len(lat) == 8 and {r["backend"] for r in lat} == {"CPUExecutionProvider"}
    for r in lat:
        _check_latency_row(r)
    # perplexity recomputed independently from the graphs' weights
    from dsnt_export.data import get_eval_tokens

    toks, _ = get_eval_tokens(f"file:{tmp_path / 'eval.txt'}", tiny_tokenizer())
    w = toks[0, : 4 * 16].reshape(4, 16).numpy()
    for variant, (e, h) in (("sparse", (emb, head)), ("dense", (demb, dhead))):
        got = [r for r in rows if r["bench"] == "perplexity" and r["variant"] == variant][0]
        assert got["ppl"] == pytest.approx(toy_perplexity(e, h, w), rel=1e-5)


def test_ort_engine_decode_grows_the_cache(tmp_path):
    from dsnt_export.runtimes.onnxruntime import OrtEngine, graphs_of

    art, emb, _ = toy_onnx_artifact(tmp_path / "onnx", 0)
    eng = OrtEngine(graphs_of(art, "float32"), "sparse", ["CPUExecutionProvider"], "float32", 1)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    st = eng.prefill(eng.to_input(ids))
    assert st.length == 3 and st.cache["cache.layers.0.keys"].shape == (2, 1, 3, 16)
    st = eng.decode_step(st, eng.to_input(torch.tensor([[11], [12]])))
    assert st.length == 4 and st.cache["cache.layers.0.keys"].shape == (2, 1, 4, 16)
    assert np.allclose(st.cache["cache.layers.0.values"][1, 0, 3], emb[12])
    assert eng.dtype == torch.float32 and eng.prefill_note is None and eng.supports_decode
    with pytest.raises(ArtifactError, match="float16"):
        graphs_of(art, "float16")


@pytest.mark.slow
def test_onnxruntime_on_a_real_export_matches_torch_perplexity(tiny_dirs, tmp_path):
    """The converters' ONNX export of the tiny sparse model (slow: the exporter traces 3 graphs)."""
    from converters import get_converter

    root, sparse, dense = tiny_dirs
    get_converter("onnx").export(sparse, tmp_path / "run" / "onnx", dtypes=("float32",))
    common = dict(ppl=True, seqlen=32, max_windows=3, ppl_data=f"file:{root / 'eval.txt'}", **FAST)
    ort_rows = run_bench(tmp_path / "run", BenchOptions(runtime="onnxruntime", **common))
    torch_rows = run_bench(sparse, BenchOptions(runtime="torch", sparse_kernels=False, **common))
    ppl = {
        (r["runtime"], r["variant"]): r["ppl"]
        for r in ort_rows + torch_rows
        if r["bench"] == "perplexity"
    }
    assert ppl[("onnxruntime", "sparse")] == pytest.approx(ppl[("torch", "sparse")], rel=1e-4)
    assert sum(r["bench"] == "latency" and r["status"] == "ok" for r in ort_rows) == 4


# -------------------------------------------------------------------------------- resolution


def test_resolve_target_in_a_run_dir(tiny_dirs, tmp_path):
    root, sparse, dense = tiny_dirs
    t = resolve_target(root / "run", "torch")
    assert t.path == sparse and t.kind == "hf" and len(t.targets) == 14
    assert t.dense is None and "--dense" in t.dense_reason  # fixture names no local source
    assert resolve_target(root / "run", "torch", dense=dense).dense == dense
    with pytest.raises(ArtifactError, match="export onnx"):
        resolve_target(root / "run", "onnxruntime")
    with pytest.raises(UserInputError):
        resolve_target(tmp_path / "missing", "torch")


# -------------------------------------------------------------------------------- gpu_check


def test_gpu_check_smoke(tmp_path, monkeypatch):
    mod = load_script("gpu_check", monkeypatch)
    out = tmp_path / "gc.jsonl"
    rc = mod.main(["--smoke", "--out", str(out), "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0, [r for r in rows if r["status"] == "failed"]
    assert all(row_problems(r) == [] for r in rows)
    sections = {r["section"]: r["status"] for r in rows if r["bench"] == "section"}
    assert sections == {
        "cuda": "skipped",
        "gemm": "ok",
        "layers": "ok",
        "pipeline": "ok",
        "devices": "ok",
    }
    (dev,) = [r for r in rows if r["bench"] == "devices"]
    assert dev["status"] == "ok" and dev["streamed_equals_in_memory"] and dev["masks_ok"]
    assert dev["block_devices"] == dev["streamed_block_devices"] == ["cpu"] * 4
    benches = {r["bench"] for r in rows if r["status"] == "ok"}
    assert benches >= {
        "gemm",
        "init_layer",
        "dsnot_layer",
        "sparsegpt_layer",
        "pipeline",
        "latency",
    }
    skipped = [r for r in rows if r["status"] == "skipped" and r["bench"] != "section"]
    assert any(r["bench"] == "gemm" and "CUDA" in r["reason"] for r in skipped)
    assert any(r.get("variant") == "sparse-kernels" and "CUDA" in r["reason"] for r in skipped)
    pipe = [r for r in rows if r["bench"] == "pipeline"]
    assert [p.get("init") for p in pipe] == [None, "sparsegpt", "wanda", "sparsegpt"]  # floor first
    assert all(p["all_checks_ok"] and p["sparsity"] == pytest.approx(0.5) for p in pipe[1:])
    assert all(r["mask_ok"] for r in rows if r["bench"] == "dsnot_layer")


def test_cli_default_rows_path_is_outside_the_artifact(tiny_dirs, tmp_path):
    from dsnt_export.commands.bench import default_rows_path

    root, sparse, _ = tiny_dirs
    assert default_rows_path(str(sparse)) == sparse.parent / "bench" / "rows.jsonl"
    assert default_rows_path(str(root / "run")) == root / "run" / "bench" / "rows.jsonl"


def test_tensorrt_variants_from_the_converter_report(tmp_path):
    """The engine list comes from tensorrt_report.json (listing needs no tensorrt)."""
    from dsnt_export.bench.target import Target
    from dsnt_export.runtimes import tensorrt as trt_rt

    (tmp_path / "tensorrt_report.json").write_text(
        json.dumps(
            {
                "engines": {
                    "sparse": {"file": "model.sparse.plan", "n_picked": 3, "n_targets": 14},
                    "dense": {"file": "model.dense.plan"},
                }
            }
        )
    )
    opts = BenchOptions(runtime="tensorrt")
    t = Target(
        "tensorrt", tmp_path, "tensorrt", {"extra": {"report": "tensorrt_report.json"}}, None, None
    )
    got = dict(trt_rt.variants(t, opts))
    assert set(got) == {"dense", "sparse-kernels"} and all(callable(f) for f in got.values())
    t.manifest = {"extra": {}}
    assert all("no TensorRT report" in f for f in dict(trt_rt.variants(t, opts)).values())


# ------------------------------------------------------------------------- default grid (F3)


def test_default_grid_on_cpu_is_small_and_recorded():
    """CPU defaults: 2 batch sizes x 2 prompt lengths, 32 steps, 1 warm-up + 5 repeats, 64
    perplexity windows; the resolved values (never None/"auto") are what the rows record."""
    from dsnt_export.bench import CPU_GRID, default_grid, work_plan

    o = BenchOptions(runtime="torch", ppl=True)
    assert (o.batch_sizes, o.prompt_lengths) == ((1, 4), (128, 256))
    assert (o.decode_tokens, o.repeats, o.warmup, o.max_windows) == (32, 5, 1, 64)
    assert default_grid("cpu") == CPU_GRID and o.to_json()["max_windows"] == 64
    plan = work_plan(o, n_variants=2, n_windows=64)
    assert plan["latency_configs"] == 4
    # per variant: 4 configs x 6 runs x (1 prefill + 1 prefill + 32 steps) + 64 windows
    assert plan["forwards"] == 2 * (4 * 6 * 34 + 64)
    prompt_tok = sum(b * n for b in (1, 4) for n in (128, 256))
    decode_tok = sum(b * 32 for b in (1, 4) for _ in (128, 256))
    assert plan["tokens"] == 2 * (6 * (2 * prompt_tok + decode_tok) + 64 * 256)
    assert "64 windows x 256" in plan["text"] and "batch 1,4 x prompt 128,256" in plan["text"]
    # the old CPU default (batch 1,4 x prompt 32,128,512) was more than 2x the tokens
    old = BenchOptions(runtime="torch", ppl=True, prompt_lengths=(32, 128, 512), max_windows=None)
    assert work_plan(old, 2, 205)["tokens"] > 2 * plan["tokens"]


def test_default_grid_is_bigger_on_an_accelerator_and_flags_override_it():
    from dsnt_export.bench import ACCELERATOR_GRID, work_plan

    o = BenchOptions(runtime="torch", device="cuda", ppl=True)  # nothing is initialised
    assert o.batch_sizes == ACCELERATOR_GRID["batch_sizes"] and o.max_windows is None
    assert work_plan(o, 1, 10)["latency_configs"] == 9
    o = BenchOptions(runtime="torch", prompt_lengths="32,512", repeats=3, max_windows=None)
    assert (o.prompt_lengths, o.repeats, o.batch_sizes, o.max_windows) == (
        (32, 512),
        3,
        (1, 4),
        None,
    )
    with pytest.raises(UserInputError, match="max_windows"):
        BenchOptions(runtime="torch", max_windows=0)


def test_cli_help_documents_the_defaults_and_max_windows_all(capsys):
    import argparse

    from dsnt_export.commands.bench import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    helptext = " ".join(p.format_help().split())
    for s in ("128,256 on CPU", "1,4 on CPU", "32 on CPU", "5 on CPU", "64", "vLLM"):
        assert s in helptext, s
    a = p.parse_args(["d", "--runtime", "torch", "--max-windows", "all"])
    assert a.max_windows is None and a.prompt_lengths is None
    assert p.parse_args(["d", "--runtime", "torch"]).max_windows == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["d", "--runtime", "torch", "--max-windows", "0"])


def test_the_work_is_announced_before_the_first_row(tiny_dirs, capsys):
    root, sparse, dense = tiny_dirs
    printed_at_first_row = []

    def sink(row):
        if not printed_at_first_row:
            printed_at_first_row.append(capsys.readouterr().err)

    opts = dense_vs_sparse_options(
        "torch", dense, root / "eval.txt", seqlen=32, max_windows=2, **FAST
    )
    run_bench(sparse, opts, sink=sink)
    err = printed_at_first_row[0]
    assert "bench plan: 2 variant(s)" in err and "perplexity on 2 windows x 32 tokens" in err
    # 2 variants x (2 configs x 3 runs x (1 + 1 + 3) forwards + 2 windows)
    assert f"= up to {2 * (2 * 3 * 5 + 2)} forward passes" in err


def test_latency_progress_bar_counts_configs(tiny_dirs, monkeypatch):
    """The latency loop drives a tqdm bar over the configs, disabled by progress=False."""
    import tqdm.auto

    from dsnt_export.bench.runner import latency_rows

    seen = []
    real = tqdm.auto.tqdm

    def spy(*a, **k):
        if str(k.get("desc", "")).endswith("latency"):  # not transformers' loading bars
            seen.append((len(a[0]), k.get("disable")))
        return real(*a, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    from dsnt_export.runtimes import runtime_module

    _, sparse, _ = tiny_dirs
    target = resolve_target(sparse, "torch")
    for progress in (True, False):
        opts = BenchOptions(runtime="torch", **{**FAST, "progress": progress})
        (_, factory), *_ = [
            p for p in runtime_module("torch").variants(target, opts) if p[0] == "sparse"
        ]
        eng = factory()
        try:
            list(latency_rows(eng, opts, 256))
        finally:
            eng.close()
    assert seen == [(2, False), (2, True)]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_child_peak_rss_is_its_own_not_its_parents():
    """A child started while this process holds ~600 MiB reports its own small peak: the
    out-of-core memory test measures its prune in such a child (getrusage would report ours)."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page
    code = "from dsnt_export.bench.timing import cpu_peak_rss_bytes as f; print(f())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    child_peak = int(out.strip().splitlines()[-1])
    assert len(ballast) == 600 * 2**20
    assert child_peak < 400 * 2**20, (
        f"child peak {child_peak / 2**20:.0f} MiB includes the parent's"
    )
