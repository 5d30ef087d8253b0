"""Tiny random causal LMs and tiny sparse checkpoint directories, built in-process (no downloads).

The one place tests get a model from: one config builder (:func:`tiny_config`), one model
builder (:func:`tiny_model`), and on top of them the sparse helpers (:func:`tiny_sparse_model`,
:func:`make_sparse_hf_dir`, ...). ``tests/conftest.py`` wraps :func:`tiny_model` in the
``tiny_lm`` fixture, parametrized over :data:`ARCHS`.

For structural tests only: random weights say nothing about sparsification quality. Sparse
directories have the layout ``dsnt-export prune`` writes: config.json, generation_config.json,
model.safetensors (or shards + index), tokenizer files and a ``dsnt_manifest.json`` of kind "hf"
whose "tensors" maps every pruned decoder linear to its shape, layout, method, sparsity and mask
check. Their masks are plain magnitude masks within groups: enough for structural tests, nothing
more. Usage::

    from tests.tiny_models import make_sparse_hf_dir, tiny_model
    src = make_sparse_hf_dir(tmp_path / "src", "llama", pattern="2:4")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsnt_export.artifacts import new_manifest, write_manifest
from dsnt_export.masks import validate_mask
from dsnt_export.patterns import NM, parse_pattern

#: every architecture family the adapters table supports, one tiny model each
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt")
#: tokens in the tiny vocabulary of configs, tokenizers and sparse checkpoints
VOCAB = 256
#: default position table length (OPT's learned positions; RoPE caches elsewhere)
MAX_POSITIONS = 256
#: vocabulary and position table of :func:`tiny_model` / :func:`calib_ids` by default. Kept at
#: 128 because the sparsify and adapter tests were written against the random weights drawn
#: with it (a bigger embedding table shifts every later draw; e.g. the DSnoT "error does not
#: grow" check of tests/sparsify fails for llama with 256). Pass ``vocab=VOCAB`` to match a
#: :func:`tiny_tokenizer`.
SMALL_VOCAB = 128
# where each fixture architecture keeps its decoder blocks (test-side knowledge only)
_BLOCKS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "qwen3": "model.layers",
    "opt": "model.decoder.layers",
}


def tiny_config(
    arch: str,
    *,
    hidden: int = 64,
    inter: int = 128,
    layers: int = 2,
    vocab: int = VOCAB,
    max_positions: int = MAX_POSITIONS,
    **kw,
):
    """A ``transformers`` config of a tiny ``arch`` model (4 heads; 2 KV heads where GQA exists).

    ``inter`` is the MLP width (OPT: ``ffn_dim``); ``kw`` overrides or adds config fields (e.g.
    Mistral's ``sliding_window``, OPT's ``word_embed_proj_dim``). Token ids: pad 0, bos 1, eos 2
    (those of :func:`tiny_tokenizer`). Raises ``ValueError`` (from ``transformers``) for an
    unknown ``arch``.
    """
    import transformers as T

    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "opt":
        cfg.update(ffn_dim=inter, word_embed_proj_dim=hidden, dropout=0.0)
        cfg.update(kw)
        return T.OPTConfig(**cfg)
    cfg.update(
        intermediate_size=inter,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        tie_word_embeddings=False,
    )
    cfg.update(kw)
    return T.AutoConfig.for_model(arch, **cfg)


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    vocab: int = SMALL_VOCAB,
    max_positions: int = SMALL_VOCAB,
    std: float = 0.2,
    **kw,
):
    """A random tiny causal LM of ``arch`` in eval mode, float32, on CPU.

    Every 2-D parameter is drawn from N(0, ``std``²) (0.2 by default) after seeding
    ``torch.manual_seed(seed)``, so activations and statistics are not all tiny and two calls with
    the same arguments give the same weights. ``kw`` goes to :func:`tiny_config`.
    """
    import transformers as T

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab=vocab, max_positions=max_positions, **kw)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model.eval()


def calib_ids(n: int = 4, t: int = 16, seed: int = 1, *, vocab: int = SMALL_VOCAB) -> torch.Tensor:
    """``n`` random calibration sequences of ``t`` token ids: int64 ``[n, t]`` in ``[0, vocab)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def nm_magnitude_keep(w: torch.Tensor, pattern) -> torch.Tensor:
    """Keep-mask (bool ``[out, in]``): the ``n_keep`` largest |w| in every group of ``m`` inputs.

    For an unstructured pattern: the smallest |w| of every row are pruned to the pattern's ratio.
    """
    p = parse_pattern(pattern)
    out, inp = w.shape
    a = w.detach().abs().float()
    if isinstance(p, NM):
        g = a.reshape(out, inp // p.m, p.m)
        idx = g.topk(p.n_keep, dim=-1).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(out, inp)
    k = p.n_prune_per_row(inp)
    idx = a.topk(k, dim=-1, largest=False).indices
    return torch.ones_like(a, dtype=torch.bool).scatter_(-1, idx, False)


def target_linears(model, arch: str) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of every decoder block, by its full module name."""
    blocks = model.get_submodule(_BLOCKS[arch])
    prefix = _BLOCKS[arch]
    out = {}
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[f"{prefix}.{i}.{name}"] = mod
    return out


def tiny_sparse_model(
    arch: str = "llama", *, pattern="2:4", dtype=torch.float32, seed: int = 0, **cfg_kw
):
    """:func:`tiny_model` with every decoder linear pruned to ``pattern`` (zeros in place).

    Returns ``(model, masks)`` with ``masks[param_name] = keep`` (bool ``[out, in]``); the model
    is cast to ``dtype`` after pruning.
    """
    cfg_kw.setdefault("vocab", VOCAB)
    cfg_kw.setdefault("max_positions", MAX_POSITIONS)
    model = tiny_model(arch, seed=seed, **cfg_kw)
    masks = {}
    with torch.no_grad():
        for name, lin in target_linears(model, arch).items():
            keep = nm_magnitude_keep(lin.weight, pattern)
            lin.weight.mul_(keep)
            masks[f"{name}.weight"] = keep
    return model.to(dtype), masks


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level fast tokenizer over ``vocab`` tokens (``<pad> <s> </s> <unk> w4 w5 ...``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def sparse_manifest(model, masks: dict, pattern, *, arch: str, method: str = "magnitude") -> dict:
    """The ``dsnt_manifest.json`` (kind "hf") ``dsnt-export prune`` would write for ``masks``."""
    p = parse_pattern(pattern)
    sd = model.state_dict()
    tensors = {}
    for name in masks:
        w = sd[name]
        rep = validate_mask(w, p, name=name)
        tensors[name] = {
            "shape": list(w.shape),
            "layout": "out_in",
            "method": method,
            "sparsity": rep.sparsity,
            "check": rep.to_json(),
        }
    return new_manifest(
        "hf",
        source_model={"id": f"tiny-random-{arch}", "model_type": arch},
        pattern=p.to_json(),
        recipe={"pattern": str(p), "init": method, "refine": "none"},
        tensors=tensors,
        skipped=[],
        calibration={"source": "none (test fixture)"},
        timings={},
        extra={},
    )


def make_sparse_hf_dir(
    path,
    arch: str = "llama",
    *,
    pattern="2:4",
    dtype=torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    sparsity_config: dict | None = None,
    **cfg_kw,
) -> Path:
    """Write a tiny sparse HF checkpoint directory as ``dsnt-export prune`` would; return its path.

    ``sparsity_config``: if given, put it into config.json's quantization_config (to test that
    exporters strip a leftover one). ``cfg_kw`` goes to :func:`tiny_config`.
    """
    path = Path(path)
    model, masks = tiny_sparse_model(arch, pattern=pattern, dtype=dtype, seed=seed, **cfg_kw)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    if sparsity_config is not None:
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "sparsity_config": sparsity_config,
        }
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    write_manifest(path, sparse_manifest(model, masks, pattern, arch=arch))
    return path


def write_eval_text(path: Path, *, words: int = 400, step: int = 7) -> Path:
    """Write a plain-text evaluation corpus of ``words`` words ``w4`` .. ``w253`` to ``path``.

    Every word is in :func:`tiny_tokenizer`'s vocabulary; ``step`` picks the (deterministic) word
    order. Benchmarks read it as ``ppl_data=f"file:{path}"``. Returns ``path``.
    """
    path = Path(path)
    path.write_text(" ".join(f"w{(i * step) % 250 + 4}" for i in range(words)))
    return path


def make_dense_and_sparse_dirs(root: Path, arch: str = "llama") -> tuple[Path, Path]:
    """Write what a dense-vs-sparse benchmark needs under ``root``; return ``(sparse, dense)``.

    ``root/run/hf``: a sparse checkpoint (:func:`make_sparse_hf_dir`); ``root/dense``: a dense
    random model of the same config (drawn with seed 0) with a tokenizer; ``root/eval.txt``: an
    evaluation corpus (:func:`write_eval_text`).
    """
    import transformers as T

    root = Path(root)
    sparse = make_sparse_hf_dir(root / "run" / "hf", arch)
    torch.manual_seed(0)
    dense = root / "dense"
    T.AutoModelForCausalLM.from_config(tiny_config(arch)).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    write_eval_text(root / "eval.txt")
    return sparse, dense


def dense_vs_sparse_options(runtime: str, dense, eval_txt: Path, **kw):
    """``BenchOptions`` that measure latency and perplexity of a sparse artifact against ``dense``.

    Perplexity runs on the corpus ``eval_txt`` (see :func:`write_eval_text`); ``kw`` (seqlen,
    max_windows, the latency grid, threads, ...; ``ppl=False`` too) goes to ``BenchOptions``.
    """
    from dsnt_export.bench import BenchOptions

    base = {"runtime": runtime, "ppl": True, "dense": str(dense), "ppl_data": f"file:{eval_txt}"}
    return BenchOptions(**{**base, **kw})
