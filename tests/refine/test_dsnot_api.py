import pytest
import torch

from dsnt_export.errors import MaskViolationError, NonFiniteError, ShapeError, UserInputError
from dsnt_export.masks import validate_mask
from dsnt_export.methods import initial_mask, initial_metric
from dsnt_export.patterns import NM, Unstructured
from dsnt_export.refine.dsnot import DSnoTConfig, refine, refine_with_info
from dsnt_export.stats import ActivationStats


def make_layer(rows, cols, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    st = ActivationStats(cols)
    mean = torch.randn(cols, generator=g)
    scale = torch.rand(cols, generator=g) * 3 + 0.1
    for _ in range(4):
        st.update(torch.randn(32, cols, generator=g) * scale + mean)
    return w, st


def test_official_preset_values_and_overrides():
    c = DSnoTConfig.official()
    assert (c.max_cycles, c.update_threshold, c.var_power, c.sign_check) == (50, 0.1, 1.0, None)
    assert c.sign_check_for(NM(2, 4)) is True and c.sign_check_for(Unstructured(0.6)) is False
    c2 = DSnoTConfig.official(max_cycles=10, update_threshold=0.0, var_power=0, sign_check=True)
    assert (c2.max_cycles, c2.update_threshold, c2.var_power, c2.sign_check) == (10, 0.0, 0, True)
    assert c2.sign_check_for(Unstructured(0.6)) is True
    with pytest.raises(UserInputError, match="known"):
        DSnoTConfig.official(cycles=3)
    with pytest.raises(UserInputError):
        DSnoTConfig(max_cycles=-1)
    with pytest.raises(UserInputError):
        DSnoTConfig(update_threshold=float("nan"))
    assert DSnoTConfig.from_json(c2.to_json()) == c2
    g = DSnoTConfig.guarded(max_cycles=7)
    assert (g.sign_check, g.loss_guard, g.max_cycles, g.preset) == (
        True,
        True,
        7,
        "guarded+overrides",
    )
    assert g.needs_hessian and not c.needs_hessian and DSnoTConfig.from_json(g.to_json()) == g
    for gone in ("criterion", "percdamp"):  # the hessian-swap refiner's options live there now
        with pytest.raises(UserInputError, match="known"):
            DSnoTConfig.official(**{gone: 0.03})


@pytest.mark.parametrize(
    "pattern", ["2:4", "4:8", "1:4", "2:8", "unstructured:0.5", "unstructured:0.6"]
)
@pytest.mark.parametrize("cols", [48, 64, 96])
def test_small_layers_never_run_past_candidates(pattern, cols):
    """Spec defect 2/3: the reference walks past its candidate lists at in = 48..96; ours stops."""
    if pattern.startswith(("4:8", "2:8")) and cols % 8:
        pytest.skip("in_features must be divisible by M")
    w, st = make_layer(64, cols, seed=cols)
    keep = initial_mask("wanda", w, st, pattern)
    for cfg in (
        DSnoTConfig.official(update_threshold=0.0),
        DSnoTConfig.official(update_threshold=0.0, sign_check=False, max_cycles=200),
    ):
        new, info = refine_with_info(w, keep, st, pattern, cfg)
        assert torch.equal(new.sum(1), keep.sum(1)), "per-row kept counts changed"
        assert validate_mask(new, pattern).ok
        # a weight changes state at most once: pruned->kept only from pruned, kept->pruned only from kept
        grown = new & ~keep
        dropped = keep & ~new
        assert int(grown.sum()) == int(dropped.sum()) == info.n_swaps


def test_refine_reduces_reconstruction_error_and_keeps_weights():
    w, st = make_layer(128, 256, seed=3)
    w_before = w.clone()
    for pattern in ["2:4", "unstructured:0.5"]:
        keep = initial_mask("wanda", w, st, pattern)
        new, info = refine_with_info(w, keep, st, pattern, DSnoTConfig.official())
        assert info.err_after.abs().mean() < info.err_before.abs().mean()
        assert info.n_swaps > 0
        # err_after is the error of the returned mask, recomputed independently
        D = w.float() * st.sum
        torch.testing.assert_close(info.err_after, (D * (~new)).sum(1), rtol=1e-4, atol=1e-3)
    assert torch.equal(w, w_before)


def test_auto_metric_detects_magnitude_for_nm():
    w, st = make_layer(32, 64, seed=5)
    keep = initial_mask("magnitude", w, st, "2:4")
    _, info = refine_with_info(w, keep, st, "2:4")
    assert info.initial_metric == "magnitude"
    explicit = refine(w, keep, st, "2:4", initial_metric=initial_metric("magnitude", w, st))
    assert torch.equal(refine(w, keep, st, "2:4"), explicit)
    _, info = refine_with_info(w, initial_mask("wanda", w, st, "2:4"), st, "2:4")
    assert info.initial_metric == "wanda"


def test_zero_cycles_is_identity_and_fp16_accepted():
    w, st = make_layer(16, 32, seed=1, dtype=torch.float16)
    keep = initial_mask("wanda", w, st, "2:4")
    assert torch.equal(refine(w, keep, st, "2:4", DSnoTConfig.official(max_cycles=0)), keep)
    assert validate_mask(refine(w, keep, st, "2:4"), "2:4").ok


def test_bad_inputs():
    w, st = make_layer(8, 16)
    keep = initial_mask("wanda", w, st, "2:4")
    with pytest.raises(UserInputError, match="bool"):
        refine(w, keep.float(), st, "2:4")
    with pytest.raises(ShapeError, match="shape"):
        refine(w, keep[:, :8], st, "2:4")
    with pytest.raises(MaskViolationError):
        refine(w, torch.ones_like(keep), st, "2:4")  # not a 2:4 mask to begin with
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        refine(bad, keep, st, "2:4")
    with pytest.raises(ShapeError, match="in_features"):
        refine(torch.randn(8, 20), torch.ones(8, 20, dtype=torch.bool), st, "0.5")
    with pytest.raises(UserInputError, match="initial_metric"):
        refine(w, keep, st, "2:4", initial_metric="random")


@pytest.mark.parametrize("init", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "unstructured:0.5"])
def test_loss_guard_never_raises_the_second_order_loss(init, pattern):
    from dsnt_export.methods import prune_initial

    g = torch.Generator().manual_seed(11)
    cols = 64
    X = torch.randn(512, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.2 + 1.5
    st = ActivationStats(cols, hessian=True)
    for i in range(8):
        st.update(X[i * 64 : (i + 1) * 64])
    w = torch.randn(48, cols, generator=g)
    r = prune_initial(init, w, st, pattern)
    cfg = DSnoTConfig.guarded(update_threshold=0.0)
    keep, info = refine_with_info(
        r.weight, r.keep, st, pattern, cfg, initial_metric=r.metric, reference_weight=w
    )
    delta = w - r.weight * keep
    loss = float(torch.einsum("ri,ij,rj->", delta, st.hessian, delta))
    assert info.loss_after == pytest.approx(loss, rel=1e-3)
    assert info.loss_after <= info.loss_before * (1 + 1e-6)
    assert validate_mask(keep, pattern).ok and torch.equal(keep.sum(1), r.keep.sum(1))
    with pytest.raises(UserInputError, match="hessian=True"):
        st2 = ActivationStats.from_tensors(st.sq_sum, st.sum, st.var)
        refine(r.weight, r.keep, st2, pattern, cfg)
