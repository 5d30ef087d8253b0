"""``dsnt-export prune`` in-process on tiny checkpoints saved to a temporary directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsnt_export.artifacts import MANIFEST_NAME
from dsnt_export.cli import main
from dsnt_export.masks import validate_mask
from tests.tiny_models import tiny_model

TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    '''A last-in first-out stack.'''\n"
    "    def push(self, x):\n        self.items.append(x)\n"
) * 12


def _tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}  # 97 < the tiny vocab of 128
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


@pytest.fixture
def ckpt(tmp_path):
    def make(mt="llama", **kw):
        d = tmp_path / f"src-{mt}"
        tiny_model(mt, **kw).save_pretrained(d)
        _tiny_tokenizer().save_pretrained(d)
        return d

    return make


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    return p


def _prune(src, out, text_file, *extra):
    return main(
        [
            "prune",
            "--model",
            str(src),
            "--calib",
            f"file:{text_file}:4x32",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


@pytest.mark.parametrize("mt", ["llama", "opt"])
def test_prune_writes_a_loadable_checkpoint_with_manifest(mt, ckpt, text_file, tmp_path, capsys):
    import transformers as T

    src, out = ckpt(mt), tmp_path / "out"
    rc = _prune(src, out, text_file, "--pattern", "2:4", "--init", "wanda", "--refine", "dsnot")
    assert rc == 0, capsys.readouterr().err
    assert "mask check OK" in capsys.readouterr().out
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["kind"] == "hf" and m["pattern"]["string"] == "2:4" and m["mask_check_ok"]
    assert m["recipe"]["init"] == "wanda" and m["recipe_hash"]
    assert m["calibration"]["nsamples"] == 4 and m["calibration"]["seqlen"] == 32
    assert m["source_model"]["model_type"] == mt
    n_lin = 2 * (7 if mt == "llama" else 6)
    assert len(m["tensors"]) == n_lin and len(m["extra"]["run_report"]["layers"]) == n_lin
    assert "model.safetensors" in m["files"] and "tokenizer.json" in m["files"]
    cfg = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in cfg and "quantization_config" not in cfg
    assert (out / "generation_config.json").exists()
    model = T.AutoModelForCausalLM.from_pretrained(out)
    for name, t in m["tensors"].items():
        w = model.get_parameter(name)
        assert validate_mask(w, "2:4").ok and t["check"]["ok"]
        assert t["sparsity"] == pytest.approx(0.5)
    T.AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the checkpoint


def test_recipe_file_and_flags(ckpt, text_file, tmp_path):
    src, out = ckpt("qwen3"), tmp_path / "out"
    r = tmp_path / "r.yaml"
    r.write_text("base: official\npattern: '1:4'\nsequential: true\n")
    assert _prune(src, out, text_file, "--recipe", str(r), "--init", "magnitude") == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    rec = m["recipe"]
    assert (rec["pattern"], rec["init"], rec["sequential"], rec["refine_exclude"]) == (
        "1:4",
        "magnitude",
        True,
        ["mlp"],
    )
    layers = m["extra"]["run_report"]["layers"]
    assert all((e["refine"] == "dsnot") == (e["kind"] == "attention") for e in layers)


def _assert_failed_cleanly(rc, out, capsys, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_missing_model_dir(tmp_path, text_file, capsys):
    out = tmp_path / "out"
    rc = _prune(tmp_path / "nope" / "model", out, text_file)
    _assert_failed_cleanly(rc, out, capsys, "nope")


def test_corrupt_safetensors(ckpt, text_file, tmp_path, capsys):
    src, out = ckpt(), tmp_path / "out"
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _assert_failed_cleanly(_prune(src, out, text_file), out, capsys, "corrupt")


def test_dims_not_divisible(ckpt, text_file, tmp_path, capsys):
    src, out = ckpt(inter=130), tmp_path / "out"
    rc = _prune(src, out, text_file, "--pattern", "2:4")
    _assert_failed_cleanly(rc, out, capsys, "mlp.down_proj", "in_features=130")


def test_nan_weights(ckpt, text_file, tmp_path, capsys):
    import transformers as T

    src, out = ckpt(), tmp_path / "out"
    model = T.AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    model.save_pretrained(src)
    rc = _prune(src, out, text_file)
    _assert_failed_cleanly(rc, out, capsys, "model.layers.0.self_attn.v_proj.weight")


def test_unsupported_model_type(tmp_path, text_file, capsys):
    import transformers as T

    src, out = tmp_path / "gpt2", tmp_path / "out"
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        src
    )
    _assert_failed_cleanly(_prune(src, out, text_file), out, capsys, "'gpt2'", "llama", "opt")


def test_existing_out_is_not_touched(ckpt, text_file, tmp_path, capsys):
    src, out = ckpt(), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = _prune(src, out, text_file)
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_calibration_spec(ckpt, text_file, tmp_path, capsys):
    src, out = ckpt(), tmp_path / "out"
    rc = main(["prune", "--model", str(src), "--calib", f"file:{text_file}", "--out", str(out)])
    _assert_failed_cleanly(rc, out, capsys, "SOURCE:NxT")


def test_run_end_to_end_on_a_tiny_model(ckpt, text_file, tmp_path, capsys):
    src, out = ckpt("mistral"), tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            str(src),
            "--calib",
            f"file:{text_file}:4x32",
            "--eval",
            f"file:{text_file}",
            "--eval-seqlen",
            "32",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "dense" in printed and "mask check OK" in printed
    s = json.loads((out / "report" / "summary.json").read_text())
    assert f"mask check OK, prune {s['timings']['prune']:.0f} s" in printed, printed
    # the first line, printed before any work, names the model, the method and the output
    first = printed.splitlines()[0]
    assert str(src) in first and "sparsegpt" in first and str(out) in first, first
    assert "ONNX (fp32)" in printed and "check: hf OK, onnx OK" in printed, printed
    s = json.loads((out / "report" / "summary.json").read_text())
    assert s["validation"]["ok"] and s["validation"]["n_tensors"] == 14
    ppl = s["perplexity"]
    assert ppl["seqlen"] == 32 and ppl["n_windows"] >= 1 and ppl["dense"] > 1 and ppl["sparse"] > 1
    assert s["recipe"]["init"] == "sparsegpt" and s["sparsify"]["n_refined"] == 14
    assert (out / "report" / "summary.md").read_text().startswith("# dsnt-export run")
    assert (out / "hf" / MANIFEST_NAME).exists() and (out / "report" / MANIFEST_NAME).exists()
    # the default ONNX export: the float32 logits graph, parity-checked, every linear found in it
    onnx = s["exports"]["onnx"]
    assert onnx["level"] == "fp32" and onnx["mask_checks"] == {"tensors": 14, "failed": []}
    assert {r["ok"] for r in onnx["parity"].values()} == {True} and len(onnx["parity"]) == 2
    assert sorted(p.name for p in (out / "onnx" / "float32").iterdir()) == ["model.onnx"]
    # eager reference outputs of the saved checkpoint, for `pytest runtime_tests --artifact OUT/hf`
    from converters.common.source import read_source
    from converters.reference import load_reference, torch_logits

    ref = load_reference(out / "hf")
    model = read_source(out / "hf").load_model().float().eval()
    assert np.allclose(torch_logits(model, ref["input_ids"]), ref["logits"], atol=1e-5)
    # written in a temporary directory, then renamed: no record points into the temporary one
    for f in out.rglob("*"):
        if f.suffix in (".json", ".jsonl", ".md"):
            assert ".tmp-" not in f.read_text(), f
    assert (
        (out / "report" / "report.md")
        .read_text()
        .startswith(f"# dsnt-export run report: {out.name}")
    )
    onnx_manifest = json.loads((out / "onnx" / MANIFEST_NAME).read_text())
    assert onnx_manifest["extra"]["export"]["source"]["path"] == "../hf"
    from dsnt_export.bench.target import resolve_target

    assert resolve_target(out / "onnx", "onnxruntime").hf_dir.resolve() == (out / "hf").resolve()


@pytest.mark.parametrize(
    "flags, graphs",
    [
        (["--onnx", "none"], None),
        (["--no-export"], None),
        (
            ["--export-onnx"],
            {
                "float32/model.onnx",
                "float32/prefill.onnx",
                "float32/decode.onnx",
                "float16/model.onnx",
            },
        ),
    ],
)
def test_run_onnx_levels(ckpt, text_file, tmp_path, flags, graphs):
    out = tmp_path / "run"
    args = ["run", "--model", str(ckpt("llama")), "--calib", f"file:{text_file}:2x32"]
    args += ["--no-eval", "--device", "cpu", "--out", str(out), "--no-progress", *flags]
    assert main(args) == 0
    s = json.loads((out / "report" / "summary.json").read_text())
    # every file run writes into hf/ (dsnt_reference.npz included) is listed in its manifest
    assert s["exports"]["check"]["hf"]["findings"] == [], s["exports"]["check"]["hf"]
    assert "dsnt_reference.npz" in json.loads((out / "hf" / MANIFEST_NAME).read_text())["files"]
    if graphs is None:
        assert "skipped" in s["exports"]["onnx"] and not (out / "onnx").exists()
        assert set(s["exports"]["check"]) == {"hf"}
    else:
        manifest = json.loads((out / "onnx" / MANIFEST_NAME).read_text())
        assert set(manifest["extra"]["graphs"]) == graphs
        assert s["exports"]["onnx"]["level"] == "full" and s["exports"]["check"]["onnx"]["ok"]


def test_validate_checkpoint_reads_the_saved_tensors(ckpt, text_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from dsnt_export.workflow import validate_checkpoint

    src, out = ckpt(), tmp_path / "out"
    assert _prune(src, out, text_file, "--init", "magnitude", "--refine", "none") == 0
    assert validate_checkpoint(out)["ok"]
    f = out / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, :4] = 1.0  # a dense group of 4
    save_file(tensors, f, metadata={"format": "pt"})
    v = validate_checkpoint(out)
    assert not v["ok"] and list(v["violations"]) == [name]


@pytest.mark.parametrize(
    "config_text,needle",
    [('{"model_type": "mamba2"}', "'mamba2' is not supported"), ("{not json", "not valid JSON")],
)
def test_bad_config_json(tmp_path, text_file, capsys, config_text, needle):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "config.json").write_text(config_text)
    (src / "model.safetensors").write_bytes(b"")  # weights present: the config is what fails
    _assert_failed_cleanly(_prune(src, out, text_file), out, capsys, needle)


def test_run_recipe_is_a_library_call(ckpt, text_file, tmp_path, capsys):
    """run_recipe prints nothing, returns a RunSummary whose JSON is summary.json; the report can be
    rewritten later by `dsnt-export report` and keeps the run's summary and manifest fields."""
    from dsnt_export.recipe import Recipe
    from dsnt_export.workflow import STAGES, RunSummary, run_recipe

    names = [s.name for s in STAGES]
    assert isinstance(STAGES, tuple) and names[0] == "load" and names[-1] == "report"
    assert names.index("save") < names.index("validate") < names.index("export_onnx")
    recipe = Recipe.preset("default").replace(
        model=str(ckpt("llama")), calib=f"file:{text_file}:2x32", device="cpu"
    )
    out = tmp_path / "run"
    s = run_recipe(recipe, out, onnx="none", evaluate=False, progress=False)
    assert capsys.readouterr().out == ""
    assert isinstance(s, RunSummary) and s.ok and s.out == out and s.perplexity is None
    on_disk = json.loads((out / "report" / "summary.json").read_text())
    # the report writer adds the run's library versions (its hf/ manifest's) to the summary
    assert list(on_disk) == [*RunSummary.JSON_KEYS, "versions"]
    hf_versions = json.loads((out / "hf" / MANIFEST_NAME).read_text())["versions"]
    assert on_disk.pop("versions").items() >= {k: v for k, v in hf_versions.items() if v}.items()
    assert on_disk == json.loads(json.dumps(s.to_json(), default=str))
    assert "eval_data" not in s.timings and list(s.timings)[-1] == "total"
    man = json.loads((out / "report" / MANIFEST_NAME).read_text())
    assert man["recipe_hash"] == s.recipe_hash and "summary.json" in man["files"]
    before = (out / "report" / "summary.md").read_text()
    assert main(["report", str(out)]) == 0
    again = json.loads((out / "report" / MANIFEST_NAME).read_text())
    assert again["recipe"] == man["recipe"] and set(again["files"]) == set(man["files"])
    assert (out / "report" / "summary.md").read_text() == before
    from dsnt_export.errors import UserInputError

    with pytest.raises(UserInputError, match="already exists"):
        run_recipe(recipe, out, onnx="none")
    with pytest.raises(UserInputError, match="onnx level"):
        run_recipe(recipe, tmp_path / "other", onnx="fp8")
