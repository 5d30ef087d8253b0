"""Architecture adapters: the table, block capture/replay, selectors, unsupported models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsnt_export.adapters import ADAPTERS, get_adapter, resolve, supported_model_types
from dsnt_export.errors import UnsupportedModelError, UserInputError
from dsnt_export.patterns import parse_pattern
from dsnt_export.sparsify.capture import capture_block_inputs, normalize_samples, run_block
from dsnt_export.sparsify.plan import plan_targets
from tests.tiny_models import ARCHS, calib_ids, tiny_model


def test_table_covers_required_families():
    for mt in ARCHS:
        assert mt in supported_model_types()
        assert ADAPTERS[mt].model_type == mt


def test_adapter_resolves_every_linear(tiny_lm):
    model = tiny_lm
    ad = get_adapter(model)
    blocks = ad.get_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    linears = {n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    assert linears == set(ad.linear_names)  # the table lists every linear of a block, no more
    assert ad.get_modules(model, ad.pre_block)  # embeddings exist
    assert isinstance(resolve(model, ad.lm_head), nn.Linear)


def _dense_chain(model, ids):
    """Replay every block from the captured inputs and kwargs; returns the last hidden states."""
    ad = get_adapter(model)
    samples = normalize_samples(ids)
    cap = capture_block_inputs(model, ad, samples, device=torch.device("cpu"))
    xs = cap.inputs
    groups = [[i] for i in range(len(xs))]
    per_block = [xs]
    for i, block in enumerate(ad.get_blocks(model)):
        xs = run_block(
            block, xs, cap.block_kwargs[i], groups, device=torch.device("cpu"), collect_outputs=True
        )
        per_block.append(xs)
    return per_block


def test_capture_and_replay_match_the_model(tiny_lm):
    model = tiny_lm
    ids = calib_ids(3, 12)
    per_block = _dense_chain(model, ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[i] is the input of block i; the last one has the final norm applied
    for i in range(model.config.num_hidden_layers):
        got = torch.cat(per_block[i], 0)
        torch.testing.assert_close(got, ref[i], rtol=1e-5, atol=1e-5)


def test_per_block_kwargs_sliding_window_layers():
    # Qwen2 with a sliding-window block: blocks get different masks, captured per block
    model = tiny_model(
        "qwen2",
        layers=3,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        attn_implementation="eager",
    )
    assert len(set(model.config.layer_types)) == 2
    ids = calib_ids(2, 12)
    per_block = _dense_chain(model, ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(3):
        torch.testing.assert_close(torch.cat(per_block[i], 0), ref[i], rtol=1e-5, atol=1e-5)


def test_batched_replay_matches_single():
    model = tiny_model("llama")
    ad = get_adapter(model)
    cap = capture_block_inputs(model, ad, normalize_samples(calib_ids(4, 10)), device=None)
    block = ad.get_blocks(model)[0]
    one = run_block(
        block,
        cap.inputs,
        cap.block_kwargs[0],
        [[0], [1], [2], [3]],
        device=None,
        collect_outputs=True,
    )
    two = run_block(
        block, cap.inputs, cap.block_kwargs[0], [[0, 1], [2, 3]], device=None, collect_outputs=True
    )
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_model_type_fails_before_any_work():
    import transformers as T

    cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = T.GPT2LMHeadModel(cfg)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedModelError) as e:
        plan_targets(model, parse_pattern("2:4"))
    msg = str(e.value)
    assert "'gpt2'" in msg
    for mt in ARCHS:
        assert mt in msg
    assert not calls


def test_selectors():
    model = tiny_model("llama", layers=3)
    p = parse_pattern("2:4")
    full = plan_targets(model, p)
    assert len(full.targets) == 3 * 7 and not full.skipped
    no_mlp = plan_targets(model, p, exclude=("mlp",))
    assert {t.kind for t in no_mlp.targets} == {"attention"}
    assert len(no_mlp.skipped) == 9 and all("mlp" in s["reason"] for s in no_mlp.skipped)
    ranged = plan_targets(model, p, exclude=("1-2:mlp.down_proj", "0:attn_in"))
    names = {t.name for t in ranged.targets}
    assert "model.layers.0.mlp.down_proj" in names
    assert "model.layers.1.mlp.down_proj" not in names
    assert "model.layers.0.self_attn.k_proj" not in names
    assert "model.layers.1.self_attn.k_proj" in names
    refine = plan_targets(model, p, refine_exclude=("mlp",))
    assert all(t.refine == (t.kind == "attention") for t in refine.targets)
    with pytest.raises(UserInputError, match="unknown module selector 'o_proj'.*self_attn.o_proj"):
        plan_targets(model, p, exclude=("o_proj",))
    with pytest.raises(UserInputError, match="outside 0..2"):
        plan_targets(model, p, exclude=("5:mlp",))


def test_opt_350m_layout_project_in_and_post_norm():
    # OPT-350m: embeddings narrower than the blocks (project_in/out), layer norm after the blocks
    model = tiny_model("opt", word_embed_proj_dim=32, do_layer_norm_before=False)
    assert model.model.decoder.project_in is not None
    ids = calib_ids(2, 12)
    per_block = _dense_chain(model, ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(model.config.num_hidden_layers):
        torch.testing.assert_close(torch.cat(per_block[i], 0), ref[i], rtol=1e-5, atol=1e-5)
