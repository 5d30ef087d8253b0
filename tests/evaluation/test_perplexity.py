"""Perplexity (WikiText-2 protocol) against an independent naive computation, and `dsnt-export eval`."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dsnt_export.errors import NonFiniteError, ShapeError, UserInputError
from dsnt_export.evaluation.perplexity import make_windows, perplexity
from tests.tiny_models import tiny_model

VOCAB = 256


def tiny_llama(seed: int = 0, vocab: int = VOCAB):
    """A tiny random Llama (hidden 32, MLP 64, 2 layers, weights N(0, 0.3²)) in eval mode."""
    return tiny_model(
        "llama", seed=seed, vocab=vocab, max_positions=256, hidden=32, inter=64, std=0.3
    )


def naive_ppl(model, tokens: torch.Tensor, seqlen: int, max_windows=None) -> tuple[float, int]:
    """One window at a time, mean loss per window, mean over windows (the reference's loop)."""
    n = tokens.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    losses = []
    with torch.no_grad():
        for i in range(n):
            x = tokens[:, i * seqlen : (i + 1) * seqlen]
            logits = model(x).logits
            loss = F.cross_entropy(logits[0, :-1].double(), x[0, 1:])
            losses.append(float(loss))
    return math.exp(sum(losses) / n), n


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (1, 1000), generator=g)


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_matches_naive_loop(model, tokens, batch_size):
    ref, n = naive_ppl(model, tokens, 64)
    res = perplexity(model, tokens, 64, batch_size=batch_size, progress=False)
    assert res.n_windows == n == 1000 // 64  # tail of 1000 % 64 tokens dropped
    assert res.n_tokens_scored == n * 63
    assert res.seqlen == 64
    assert res.ppl == pytest.approx(ref, rel=1e-5)
    assert res.nll == pytest.approx(math.log(ref), rel=1e-5)


def test_max_windows_and_dataset_record(model, tokens):
    ref, n = naive_ppl(model, tokens, 32, max_windows=5)
    res = perplexity(model, tokens, 32, max_windows=5, progress=False, dataset={"source": "x"})
    assert (res.n_windows, res.ppl) == (5, pytest.approx(ref, rel=1e-5))
    assert res.to_json()["dataset"] == {"source": "x"}


def test_windows_are_independent(model, tokens):
    """Changing tokens of window 2 must not change windows 0-1 (no context carried over)."""
    a = perplexity(model, tokens, 50, max_windows=2, progress=False)
    changed = tokens.clone()
    changed[0, 100:] = (changed[0, 100:] + 1) % VOCAB
    b = perplexity(model, changed, 50, max_windows=2, progress=False)
    c = perplexity(model, changed, 50, max_windows=3, progress=False)
    assert a.ppl == b.ppl and c.ppl != a.ppl


class _ConstLogits(torch.nn.Module):
    def __init__(self, vocab: int, value: float = 0.0):
        super().__init__()
        self.vocab, self.value = vocab, value
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        b, t = input_ids.shape
        return SimpleNamespace(logits=torch.full((b, t, self.vocab), self.value))


def test_uniform_model_has_ppl_equal_to_vocab(tokens):
    res = perplexity(_ConstLogits(VOCAB), tokens, 100, batch_size=4, progress=False)
    assert res.ppl == pytest.approx(VOCAB, rel=1e-6)  # fp32 log-softmax


def test_nan_logits_raise(tokens):
    with pytest.raises(NonFiniteError, match="window 0"):
        perplexity(_ConstLogits(VOCAB, float("nan")), tokens, 100, progress=False)


def test_bad_inputs(model):
    with pytest.raises(ShapeError, match=r"\[1, N\]"):
        perplexity(model, torch.zeros(2, 100, dtype=torch.long), 10, progress=False)
    with pytest.raises(UserInputError, match="fewer than one window"):
        perplexity(model, torch.zeros(1, 10, dtype=torch.long), 64, progress=False)
    with pytest.raises(UserInputError, match="batch_size"):
        perplexity(model, torch.zeros(1, 100, dtype=torch.long), 10, batch_size=0)
    with pytest.raises(UserInputError, match="seqlen"):
        make_windows(torch.zeros(100, dtype=torch.long), 1)


def test_make_windows_drops_tail():
    w = make_windows(torch.arange(23).view(1, -1), 5)
    assert w.shape == (4, 5) and w[-1].tolist() == [15, 16, 17, 18, 19]


# ------------------------------------------------------------------------ the eval command


def byte_tokenizer():
    """A real HF fast tokenizer (byte-level, no merges, no special tokens): 1 byte = 1 token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(d / "hf")
    byte_tokenizer().save_pretrained(d / "hf")
    text = d / "eval.txt"
    text.write_text("def f(x):\n    return x * 2  # doubles\n" * 40)
    return d


def test_eval_command_json_matches_library(checkpoint, capsys):
    from dsnt_export.cli import main

    text = checkpoint / "eval.txt"
    rc = main(
        [
            "eval",
            str(checkpoint),
            "--ppl",
            "--data",
            f"file:{text}",
            "--seqlen",
            "32",
            "--device",
            "cpu",
            "--json",
            "--no-progress",
            "--batch-size",
            "3",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    ids = torch.tensor([byte_tokenizer()(text.read_text())["input_ids"]])
    assert ids.shape[1] == len(text.read_bytes())
    ref, n = naive_ppl(tiny_llama(), ids, 32)
    assert out["perplexity"]["ppl"] == pytest.approx(ref, rel=1e-5)
    assert out["perplexity"]["n_windows"] == n
    assert out["dtype"] == "float32" and out["model"].endswith("hf")
    assert out["perplexity"]["dataset"]["n_tokens"] == ids.shape[1]


def test_eval_command_text_output_and_missing_dir(checkpoint, tmp_path, capsys):
    from dsnt_export.cli import main

    rc = main(
        [
            "eval",
            str(checkpoint / "hf"),
            "--data",
            f"file:{checkpoint / 'eval.txt'}",
            "--seqlen",
            "64",
            "--max-windows",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nope"), "--ppl", "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nll_sums_is_the_one_scoring_step(model, tokens):
    """nll_sums on a forward's logits == perplexity()'s windows; logits_perplexity agrees;
    mismatched shapes are refused."""
    from dsnt_export.evaluation.perplexity import logits_perplexity, nll_sums

    w = make_windows(tokens, 32, 4)
    with torch.no_grad():
        logits = model(w).logits
    sums = nll_sums(logits, w)
    assert sums.dtype == torch.float64 and sums.shape == (4,)
    res = perplexity(model, tokens, 32, max_windows=4, progress=False)
    assert float(sums.sum()) / (4 * 31) == pytest.approx(res.nll, rel=1e-12)
    assert logits_perplexity(logits, w) == pytest.approx(res.ppl, rel=1e-12)
    with pytest.raises(ShapeError, match="logits of shape"):
        nll_sums(logits[:, :-1], w)
