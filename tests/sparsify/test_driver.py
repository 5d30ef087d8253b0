"""The block-by-block driver on tiny random models of every supported architecture."""

from __future__ import annotations

import json

import pytest
import torch

from dsnt_export.adapters import get_adapter
from dsnt_export.errors import NonFiniteError, ShapeError, UserInputError
from dsnt_export.masks import validate_mask
from dsnt_export.methods import initial_mask
from dsnt_export.patterns import parse_pattern
from dsnt_export.refine import HessianSwapConfig
from dsnt_export.sparsify.driver import SparsifyConfig, sparsify
from dsnt_export.stats import ActivationStats
from tests.tiny_models import ARCHS, calib_ids, tiny_model

# the default refiner (hessian-swap) with its default options
SWAP = HessianSwapConfig()


def _layers(report):
    """The per-layer records as the JSON dicts reports and manifests read."""
    return report.to_json()["layers"]


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mt", ARCHS)
def test_prune_save_reload_same_logits(mt, tmp_path):
    import transformers as T

    model = tiny_model(mt)
    before = _weights(model)
    cfg = SparsifyConfig(pattern="2:4", init="wanda", refine=SWAP, batch_size=2)
    report = sparsify(model, calib_ids(), cfg, device="cpu", progress=False)
    ad = get_adapter(model)
    assert len(report.layers) == model.config.num_hidden_layers * len(ad.linear_names)
    assert report.summary()["swaps"] > 0  # DSnoT did something
    json.dumps(report.to_json())  # JSON-able
    for entry in _layers(report):
        w = model.get_submodule(entry["name"]).weight
        rep = validate_mask(w, "2:4", name=entry["name"])
        assert rep.ok and entry["check_ok"], rep.message
        assert entry["sparsity"] == pytest.approx(0.5)
        assert entry["err_after"] <= entry["err_before"] * 1.0001 or entry["swaps"] == 0
    targeted = {r.name + ".weight" for r in report.layers}
    for n, p in model.named_parameters():  # nothing else touched (embeddings, norms, lm_head)
        if n not in targeted:
            assert torch.equal(p, before[n]), n

    ids = calib_ids(2, 20, seed=7)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits, rtol=0, atol=0)


def _naive_wanda(model, ids, pattern, sequential):
    """Oracle: full-model forwards with hooks, block by block (no replay machinery)."""
    ad = get_adapter(model)
    for block in ad.get_blocks(model):
        stages = [[g] for g in ad.groups] if sequential else [list(ad.groups)]
        for stage in stages:
            stats, handles = {}, []
            for g in stage:
                lin = block.get_submodule(g.linears[0])
                st = stats[g.name] = ActivationStats(lin.in_features)

                def hook(_m, args, _o, st=st):
                    x = args[0]
                    st.update(x.reshape(1, -1, x.shape[-1])[0])

                handles.append(lin.register_forward_hook(hook))
            with torch.no_grad():
                for j in range(ids.shape[0]):
                    model(ids[j : j + 1], use_cache=False)
            for h in handles:
                h.remove()
            for g in stage:
                for name in g.linears:
                    lin = block.get_submodule(name)
                    keep = initial_mask("wanda", lin.weight.data, stats[g.name], pattern)
                    lin.weight.data *= keep


@pytest.mark.parametrize("mt,sequential", [("llama", False), ("opt", False), ("qwen3", True)])
def test_driver_matches_naive_full_model_oracle(mt, sequential):
    ids = calib_ids(3, 16)
    a, b = tiny_model(mt), tiny_model(mt)
    cfg = SparsifyConfig(pattern="2:4", init="wanda", refine="none", sequential=sequential)
    sparsify(a, ids, cfg, progress=False)
    _naive_wanda(b, ids, parse_pattern("2:4"), sequential)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa == 0, pb == 0), n


@pytest.mark.parametrize("pattern", ["1:4", "4:8", "unstructured:0.6"])
def test_patterns_and_inits(pattern):
    for init in ("magnitude", "sparsegpt"):
        model = tiny_model("llama")
        dense = _weights(model)
        cfg = SparsifyConfig(pattern=pattern, init=init, refine=SWAP)
        report = sparsify(model, calib_ids(), cfg, progress=False)
        p = parse_pattern(pattern)
        for e in _layers(report):
            w = model.get_submodule(e["name"]).weight
            assert validate_mask(w, p).ok
            n_in = e["shape"][1]
            want = p.n_prune_per_row(n_in) / n_in if not p.is_structured else p.sparsity
            assert e["sparsity"] >= want - 1e-6
            if init == "sparsegpt":  # the OBS update moved some kept weights
                kept = w != 0
                assert not torch.equal(w[kept], dense[e["name"] + ".weight"][kept])


def test_refine_exclude_and_exclude_are_recorded():
    model = tiny_model("mistral")
    dense = _weights(model)
    cfg = SparsifyConfig(
        pattern="2:4",
        init="wanda",
        refine=SWAP,
        exclude=("mlp.down_proj",),
        refine_exclude=("mlp",),
    )
    report = sparsify(model, calib_ids(), cfg, progress=False)
    assert {s["name"] for s in report.skipped} == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    for s in report.skipped:
        assert torch.equal(model.get_submodule(s["name"]).weight, dense[s["name"] + ".weight"])
    for e in _layers(report):
        if e["kind"] == "mlp":
            assert e["refine"] is None and "mlp" in e["refine_skipped"]
        else:
            # the refiner's own name, no criterion (older records said "dsnot" + "hessian")
            assert e["refine"] == "hessian-swap" and e["method"] == "wanda+hessian-swap"
            assert "criterion" not in e


def test_batching_and_offload_do_not_change_the_result():
    ids = calib_ids(5, 16)
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    sparsify(a, ids, SparsifyConfig(pattern="2:4", refine=SWAP), progress=False)
    cfg = SparsifyConfig(pattern="2:4", refine=SWAP, batch_size=3, offload_activations=True)
    sparsify(b, ids, cfg, progress=False)
    agree = [
        float(((pa == 0) == (pb == 0)).float().mean())
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    ]
    assert min(agree) > 0.99  # batched matmuls may flip a borderline tie, nothing more


def test_move_blocks_false_keeps_modules_in_place():
    a, b = tiny_model("qwen3"), tiny_model("qwen3")
    cfg = SparsifyConfig(pattern="2:4", refine=SWAP)
    sparsify(a, calib_ids(), cfg, device="cpu", progress=False)
    sparsify(b, calib_ids(), cfg, device=None, move_blocks=False, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(UserInputError, match="move_blocks=False"):
        sparsify(b, calib_ids(), cfg, device="cpu", move_blocks=False, progress=False)


def test_device_none_is_auto(monkeypatch):
    # None means what it means everywhere (hf_io.resolve_device): the accelerator if any, else CPU
    import dsnt_export.hf_io as hf_io

    seen = []
    real = hf_io.resolve_device
    monkeypatch.setattr(hf_io, "resolve_device", lambda d: seen.append(d) or real("cpu"))
    sparsify(
        tiny_model("llama"), calib_ids(), SparsifyConfig(pattern="2:4"), device=None, progress=False
    )
    assert seen == [None]
    monkeypatch.undo()
    with pytest.raises(UserInputError, match="unknown device"):
        sparsify(
            tiny_model("llama"),
            calib_ids(),
            SparsifyConfig(pattern="2:4"),
            device="nope",
            progress=False,
        )


def test_not_divisible_by_m_fails_before_work():
    model = tiny_model("llama", inter=130)  # down_proj in_features = 130
    dense = _weights(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.mlp\.down_proj.*in_features=130"):
        sparsify(model, calib_ids(), SparsifyConfig(pattern="2:4"), progress=False)
    assert not calls
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())
    # excluding the offending linears makes it work
    cfg = SparsifyConfig(pattern="2:4", refine="none", exclude=("mlp.down_proj",))
    report = sparsify(model, calib_ids(), cfg, progress=False)
    assert len(report.skipped) == 2


def test_nan_weight_is_named():
    model = tiny_model("opt")
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.decoder\.layers\.1\.fc1\.weight"):
        sparsify(model, calib_ids(), SparsifyConfig(pattern="2:4"), progress=False)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a, b = tiny_model("llama"), tiny_model("llama")
    cfg = SparsifyConfig(pattern="2:4", init="sparsegpt", refine=SWAP)
    sparsify(a, calib_ids(), cfg, device="cpu", progress=False)
    sparsify(b, calib_ids(), cfg, device="cuda", progress=False)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pb.device.type == "cpu", n  # blocks go back where they were
        assert float(((pa == 0) == (pb == 0)).float().mean()) > 0.98, n


@pytest.mark.parametrize(
    "init, percdamp", [("wanda", None), ("sparsegpt", None), ("sparsegpt", 0.3)]
)
def test_default_refiner_lowers_every_layer_loss_and_logs_it(init, percdamp):
    # hessian-swap: every refined linear's exact (dampened) loss goes down or stays, the
    # logged value is that of the weight written into the model, and masks hold.
    model = tiny_model("llama")
    dense = _weights(model)
    ids = calib_ids()
    hs = {}

    def grab(name):
        def hook(mod, inp, out):
            hs.setdefault(name, ActivationStats(mod.in_features, hessian=True)).update(inp[0])

        return hook

    swap = HessianSwapConfig() if percdamp is None else HessianSwapConfig(percdamp=percdamp)
    cfg = SparsifyConfig(pattern="2:4", init=init, refine=swap)
    assert cfg.refine == "hessian-swap" and cfg.needs_hessian
    report = sparsify(model, ids, cfg, progress=False)
    assert sum(r.swaps for r in report.layers) > 0
    block0 = [e for e in _layers(report) if e["block"] == 0]
    for e in _layers(report):
        assert e["refine"] == "hessian-swap" and e["loss_after"] <= e["loss_before"] * (1 + 1e-5)
        assert validate_mask(model.get_submodule(e["name"]).weight, "2:4").ok
    # block 0 sees the embeddings, whatever happened before: recompute its Hessians and losses
    ref = tiny_model("llama")
    hooks = [ref.get_submodule(e["name"]).register_forward_hook(grab(e["name"])) for e in block0]
    with torch.no_grad():
        for i in range(ids.shape[0]):
            ref(ids[i : i + 1])
    for h in hooks:
        h.remove()
    for e in block0:
        H = hs[e["name"]].hessian
        H = H + cfg.refine_config.percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0])
        d = dense[e["name"] + ".weight"] - model.get_submodule(e["name"]).weight.detach()
        assert float(((d @ H) * d).sum()) == pytest.approx(e["loss_after"], rel=1e-3), e["name"]


def test_report_timings_split_the_run_by_stage():
    # capture, dense statistics, initial masks, refinement, pruned re-run: totals in seconds,
    # the per-block keys beside them; the stages fit inside the blocks' wall time
    model = tiny_model("llama")
    cfg = SparsifyConfig(pattern="2:4", init="sparsegpt", refine=SWAP)
    t = sparsify(model, calib_ids(), cfg, progress=False).timings
    stages = ("capture_s", "stats_s", "init_s", "refine_s", "rerun_s", "total_s")
    assert all(isinstance(t[k], float) and t[k] > 0 for k in stages), t
    blocks = [t[f"block_{i}_s"] for i in range(model.config.num_hidden_layers)]
    assert sum(t[k] for k in ("stats_s", "init_s", "refine_s", "rerun_s")) <= sum(blocks)
    assert t["capture_s"] + sum(blocks) <= t["total_s"]


def test_any_order_of_the_calibration_windows_gives_bit_identical_weights():
    # issue 16.1: the driver sorts the windows canonically (calibration_order "canonical", the
    # default), so permutations of the same windows give the same statistics, masks and weights
    ids = calib_ids(6, 16, seed=3)
    cfg = SparsifyConfig(pattern="2:4", init="sparsegpt", refine=SWAP, batch_size=2)
    assert (cfg.statistics, cfg.calibration_order) == ("sum", "canonical")
    ref = tiny_model("llama")
    sparsify(ref, ids, cfg, progress=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(ids.shape[0], generator=g)
        m = tiny_model("llama")
        sparsify(m, [ids[i] for i in perm], cfg, progress=False)
        for (n, pa), pb in zip(ref.named_parameters(), m.parameters(), strict=True):
            assert torch.equal(pa, pb), n
    # the given order is honoured when asked for: then a permutation changes the rounding
    given = SparsifyConfig(pattern="2:4", init="sparsegpt", refine=SWAP, calibration_order="given")
    a, b = tiny_model("llama"), tiny_model("llama")
    sparsify(a, ids, given, progress=False)
    sparsify(b, ids.flip(0), given, progress=False)
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    assert any(not torch.equal(pa, pb) for pa, pb in pairs)


def test_canonical_order_sorts_by_length_then_token_ids():
    from dsnt_export.sparsify.capture import canonical_order

    s = [torch.tensor([3, 1]), torch.tensor([1, 2, 3]), torch.tensor([1, 1]), torch.tensor([3, 1])]
    assert canonical_order(s) == [2, 0, 3, 1]
    perm = [3, 1, 0, 2]
    again = [s[i] for i in perm]
    assert [again[i].tolist() for i in canonical_order(again)] == [
        s[i].tolist() for i in canonical_order(s)
    ]


def test_statistics_and_order_defaults_and_errors():
    from dsnt_export.refine import DSnoTConfig

    d = SparsifyConfig(pattern="2:4", init="sparsegpt")
    assert (d.statistics, d.calibration_order) == ("sum", "canonical")
    assert d.to_json()["statistics"] == "sum" and d.to_json()["calibration_order"] == "canonical"
    assert not d.needs_variance  # hessian-swap never reads the variance
    # DSnoT: the reference code's accumulation, in the given order (reference parity)
    o = SparsifyConfig(pattern="2:4", init="wanda", refine=DSnoTConfig.official())
    assert (o.statistics, o.calibration_order, o.needs_variance) == ("reference", "given", True)
    c = SparsifyConfig(pattern="2:4", statistics="reference")
    assert c.calibration_order == "given"
    with pytest.raises(UserInputError, match="statistics"):
        SparsifyConfig(pattern="2:4", statistics="float64")
    with pytest.raises(UserInputError, match="calibration_order"):
        SparsifyConfig(pattern="2:4", calibration_order="sorted")


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "unstructured:0.5"])
def test_refit_refiner_keeps_the_initial_mask_and_lowers_every_layer_loss(pattern):
    """``refine: refit`` after SparseGPT: the mask of every linear is SparseGPT's (a re-fit never
    changes it), the kept values moved, and every recorded (dampened) loss went down."""
    from dsnt_export.refine import RefitConfig

    ids = calib_ids()
    a, b = tiny_model("llama"), tiny_model("llama")
    sparsify(
        a, ids, SparsifyConfig(pattern=pattern, init="sparsegpt", refine="none"), progress=False
    )
    cfg = SparsifyConfig(pattern=pattern, init="sparsegpt", refine=RefitConfig())
    assert cfg.refine == "refit" and cfg.needs_hessian
    report = sparsify(b, ids, cfg, progress=False)
    p = parse_pattern(pattern)
    moved = 0
    for e in _layers(report):
        wa, wb = a.get_submodule(e["name"]).weight, b.get_submodule(e["name"]).weight
        assert validate_mask(wb, p).ok
        assert e["refine"] == "refit" and e["swaps"] == 0
        assert e["loss_after"] < e["loss_before"]
        if e["block"] == 0:  # later blocks see different (re-fitted) inputs in b than in a
            assert torch.equal(wa != 0, wb != 0), e["name"]
            moved += int(not torch.equal(wa, wb))
    assert moved > 0
