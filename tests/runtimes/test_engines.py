"""The runtime layer: engine parity against eager torch, the registry, the dtype really used,
fresh prompts per timed repeat, and ONNX artifacts that hold only the logits graph."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dsnt_export.bench import BenchOptions, run_bench
from dsnt_export.bench.schema import row_problems
from dsnt_export.errors import ArtifactError, UserInputError
from dsnt_export.evaluation.perplexity import perplexity, windows_perplexity
from dsnt_export.runtimes.base import Engine, Step, teacher_forced_logits
from tests.runtimes.toy_onnx import toy_onnx_artifact, toy_perplexity
from tests.tiny_models import (
    dense_vs_sparse_options,
    make_sparse_hf_dir,
    tiny_model,
    write_eval_text,
)

FAST = dict(prompt_lengths=(8,), batch_sizes=(1,), decode_tokens=2, repeats=2, progress=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0).eval()


def _ids(vocab: int, shape=(2, 12), seed: int = 5) -> torch.Tensor:
    return torch.randint(4, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ engine parity


def test_torch_engine_matches_eager(model):
    """logits == the eager forward; prefill + decode == the full forward; dtype/device read."""
    from dsnt_export.runtimes.torch_eager import TorchEngine

    eng = TorchEngine(model, "sparse")
    assert (eng.name, eng.backend, eng.dtype, eng.device.type) == (
        "torch",
        "eager",
        torch.float32,
        "cpu",
    )
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
    got = eng.logits(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)
    gen = teacher_forced_logits(eng, ids, prompt_len=5)
    assert gen.shape == (2, 12 - 5 + 1, want.shape[-1])
    scale = max(1.0, float(want.abs().max()))
    assert float((gen - want[:, 4:]).abs().max()) <= 1e-5 * scale  # KV-cache path, fp32
    # perplexity through the engine == through the module (one protocol)
    w = _ids(model.config.vocab_size, (3, 16), seed=7)
    assert windows_perplexity(eng, w) == pytest.approx(windows_perplexity(model, w), rel=1e-12)
    eng.close()
    assert eng.model is None


def test_onnxruntime_engine_matches_eager(model, tmp_path):
    """The tiny model's exported logits graph on ORT: logits within 1e-4 x max|logit|,
    perplexity within 1e-5 relative (the ONNX converter's float32 tolerance)."""
    pytest.importorskip("onnxruntime")
    from converters.writers.onnx import (
        EXTERNAL_DATA_THRESHOLD,
        OnnxConverter,
        export_logits_graph,
        save_graph,
    )
    from dsnt_export.runtimes.onnxruntime import LOGITS_PREFILL_NOTE, OrtEngine

    tol = OnnxConverter.tolerance["float32"]
    save_graph(export_logits_graph(model), tmp_path / "model.onnx", EXTERNAL_DATA_THRESHOLD)
    ids = _ids(model.config.vocab_size, (5, 12))  # 5 rows: two internal batches of <= 4
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
    with OrtEngine({"logits": tmp_path / "model.onnx"}, "sparse", threads=1) as eng:
        assert (eng.name, eng.backend, eng.dtype_name) == (
            "onnxruntime",
            "CPUExecutionProvider",
            "float32",
        )
        got = eng.logits(ids)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).abs().max()) <= tol.logits_atol * float(want.abs().max())
        w = _ids(model.config.vocab_size, (3, 16), seed=7)
        ppl = windows_perplexity(eng, w)
        assert ppl == pytest.approx(windows_perplexity(model, w), rel=tol.ppl_rel)
        # a logits-only artifact: prefill runs the logits graph, decode says why it cannot
        assert eng.prefill_note == LOGITS_PREFILL_NOTE and not eng.supports_decode
        st = eng.prefill(eng.to_input(ids))
        assert st.length == 12 and st.cache is None
        assert torch.allclose(eng.step_logits(st), got[:, -1:])
        with pytest.raises(NotImplementedError, match="no decode graph"):
            eng.decode_step(st, eng.to_input(ids[:, :1]))


def test_ort_engine_refuses_unknown_graph_kinds_and_bad_graphs(tmp_path):
    pytest.importorskip("onnxruntime")
    from dsnt_export.runtimes.onnxruntime import OrtEngine

    with pytest.raises(UserInputError, match="graphs of kinds"):
        OrtEngine({"encoder": tmp_path / "x.onnx"})
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="cannot load"):
        OrtEngine({"logits": tmp_path / "bad.onnx"})


def test_tensorrt_engine_checks_deserialization(tmp_path, monkeypatch):
    """A plan TensorRT cannot deserialize is an ArtifactError naming the fix (stand-in trt)."""
    trt = types.SimpleNamespace(Logger=lambda level: object())
    trt.Logger.WARNING = 2
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda b: None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    from dsnt_export.runtimes.tensorrt import TrtEngine

    (tmp_path / "model.sparse.plan").write_bytes(b"\0" * 8)
    with pytest.raises(ArtifactError, match="cannot deserialize"):
        TrtEngine(tmp_path / "model.sparse.plan", "sparse-kernels", "cpu")


# ----------------------------------------------------------------------------------- registry


def test_registry_lists_runtimes_and_refuses_unknown_ones():
    import argparse

    from dsnt_export.commands.bench import add_arguments
    from dsnt_export.runtimes import get_runtime, runtime_names

    names = runtime_names()
    assert {"torch", "onnxruntime", "tensorrt", "vllm"} <= set(names)
    assert get_runtime("onnxruntime").artifact_kind == "onnx"
    with pytest.raises(UserInputError, match="known: torch, onnxruntime"):
        get_runtime("tflite")
    with pytest.raises(UserInputError, match="unknown runtime 'tflite'"):
        BenchOptions(runtime="tflite")
    p = argparse.ArgumentParser()
    add_arguments(p)
    choices = next(a.choices for a in p._actions if a.dest == "runtime")
    assert tuple(choices) == names


class _EchoEngine(Engine):
    """A runtime in one class: logits = one-hot of the next id (so perplexity is known)."""

    name = "echo"

    def __init__(self, variant: str, vocab: int):
        super().__init__(variant, "python", "cpu", "float64")
        self.vocab = vocab
        self.prompts: list[torch.Tensor] = []

    def logits(self, ids):
        ids = torch.as_tensor(ids)
        return torch.zeros(*ids.shape, self.vocab)  # uniform: ppl == vocab

    def prefill(self, ids):
        self.prompts.append(ids.clone())
        return Step(torch.zeros(ids.shape[0], 1, self.vocab), None, ids.shape[1])

    def decode_step(self, state, ids):
        return Step(state.logits, None, state.length + 1)


def test_a_new_runtime_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    """A runtime registered from outside the package is benchmarked like the built-in ones;
    every timed prefill (warm-ups included) sees a fresh prompt."""
    from dsnt_export.runtimes import RUNTIMES, register_runtime

    engines: list[_EchoEngine] = []
    mod = types.ModuleType("echo_runtime")
    mod.unavailable = lambda options: None

    def variants(target, options):
        def make(v):
            engines.append(_EchoEngine(v, 256))
            return engines[-1]

        yield "dense", lambda: make("dense")
        yield "sparse", lambda: make("sparse")

    mod.variants = variants
    monkeypatch.setitem(sys.modules, "echo_runtime", mod)
    monkeypatch.setattr("dsnt_export.runtimes.base.RUNTIMES", dict(RUNTIMES))
    register_runtime("echo", "echo_runtime", "hf")
    src = make_sparse_hf_dir(tmp_path / "hf", "llama")
    corpus = write_eval_text(tmp_path / "eval.txt", words=200)
    opts = dense_vs_sparse_options("echo", src, corpus, seqlen=16, max_windows=2, warmup=1, **FAST)
    rows = run_bench(src, opts)
    assert all(r["status"] == "ok" and row_problems(r) == [] for r in rows), rows
    assert {r["model"]["dtype"] for r in rows} == {"float64"}  # the engine's, never "auto"
    ppl = [r["ppl"] for r in rows if r["bench"] == "perplexity"]
    assert ppl == pytest.approx([256.0, 256.0])  # uniform logits over 256 ids
    for eng in engines:
        timed = eng.prompts[1:]  # [0]: the engine warm-up; then prefill + decode points
        assert len(timed) == 2 * (opts.warmup + opts.repeats)
        assert len({tuple(p.flatten().tolist()) for p in timed}) == len(timed), "repeated prompt"


# --------------------------------------------------------------------------------------- dtype


def test_dtype_auto_is_the_project_policy_and_rows_record_it(tmp_path):
    """auto: float32 on CPU, the checkpoint's 16-bit dtype on an accelerator (via
    hf_io.resolve_dtype); bench rows record the dtype the engine really used."""
    import json

    from dsnt_export.bench.target import compute_dtype, resolve_target

    src = make_sparse_hf_dir(tmp_path / "hf", "llama")
    t = resolve_target(src, "torch", dense=src)
    cfg = json.loads((src / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    assert compute_dtype("auto", "cpu", t) == torch.float32
    for declared, on_gpu in (("bfloat16", torch.bfloat16), (None, torch.float16)):
        cfg.pop("dtype", None)
        if declared:
            cfg["dtype"] = declared
        (src / "config.json").write_text(json.dumps(cfg))
        assert compute_dtype("auto", "cuda", t) == on_gpu
        assert compute_dtype("auto", "cpu", t) == torch.float32
    assert compute_dtype("float16", "cpu", t) == torch.float16
    for asked, used in (("auto", "float32"), ("bfloat16", "bfloat16")):
        opts = BenchOptions(runtime="torch", dtype=asked, dense=str(src), warmup=0, **FAST)
        rows = [r for r in run_bench(src, opts) if r["bench"] == "latency"]
        assert rows and all(r["status"] == "ok" for r in rows)
        assert {r["model"]["dtype"] for r in rows} == {used}


# --------------------------------------------------------------- ONNX: logits-only artifacts


def test_onnx_logits_only_artifact_times_prefill_on_the_logits_graph(tmp_path):
    """`dsnt-export run` exports only the logits graph: dense and sparse both time prefill on
    it (the row says so) and skip decode with the reason; no failed row."""
    pytest.importorskip("onnxruntime")
    art, emb, head = toy_onnx_artifact(tmp_path / "onnx", 0, kinds=("logits",))
    dense, _, _ = toy_onnx_artifact(tmp_path / "dense", 1, kinds=("logits",))
    corpus = write_eval_text(tmp_path / "eval.txt", words=300, step=13)
    opts = dense_vs_sparse_options(
        "onnxruntime", dense, corpus, latency=True, seqlen=16, max_windows=2, threads=1, **FAST
    )
    rows = run_bench(art, opts)
    assert not [r for r in rows if r["status"] == "failed"], rows
    assert all(row_problems(r) == [] for r in rows)
    for v in ("dense", "sparse"):
        pre = [r for r in rows if r.get("phase") == "prefill" and r["variant"] == v]
        dec = [r for r in rows if r.get("phase") == "decode" and r["variant"] == v]
        assert pre and all(r["status"] == "ok" and "logits graph" in r["prefill_note"] for r in pre)
        assert dec and all(r["status"] == "skipped" and "decode graph" in r["reason"] for r in dec)
        assert [r["status"] for r in rows if r["bench"] == "perplexity" and r["variant"] == v] == [
            "ok"
        ]
    # the graphs' own numbers: perplexity of E[ids] @ W recomputed in numpy
    from dsnt_export.data import get_eval_tokens
    from tests.tiny_models import tiny_tokenizer

    toks, _ = get_eval_tokens(f"file:{tmp_path / 'eval.txt'}", tiny_tokenizer())
    w = toks[0, :32].reshape(2, 16).numpy()
    got = [r for r in rows if r["bench"] == "perplexity" and r["variant"] == "sparse"][0]
    assert got["ppl"] == pytest.approx(toy_perplexity(emb, head, w), rel=1e-5)


def test_perplexity_accepts_an_engine_and_a_module_alike(model):
    from dsnt_export.runtimes.torch_eager import TorchEngine

    toks = _ids(model.config.vocab_size, (1, 100), seed=3)
    a = perplexity(model, toks, 20, batch_size=3, progress=False)
    b = perplexity(TorchEngine(model, "sparse"), toks, 20, batch_size=3, progress=False)
    assert (a.n_windows, a.n_tokens_scored) == (b.n_windows, b.n_tokens_scored) == (5, 95)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-12)


def test_onnx_artifact_without_the_asked_dtype_gives_skipped_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    art, _, _ = toy_onnx_artifact(tmp_path / "onnx", 0, kinds=("logits",))
    opts = BenchOptions(runtime="onnxruntime", dtype="float16", dense=str(art), **FAST)
    rows = run_bench(art, opts)
    assert [(r["variant"], r["status"]) for r in rows] == [
        ("dense", "skipped"),
        ("sparse", "skipped"),
    ]
    assert all("no float16 graphs" in r["reason"] for r in rows)
