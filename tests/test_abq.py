"""ABQ calibration: loss math, exact codes, quality vs RTN, W2* grid, folded weights, determinism."""

from __future__ import annotations

import pytest
import torch
from edgepack.compressor import abq, gptq
from edgepack.compressor.calib_grid import grid_for
from edgepack.compressor.quantize import QuantConfig, QuantFormat, QuantLinear, quantize
from torch import nn

from edgepack.model import load_model, load_tokenizer
from edgepack.textdata import calibration_samples, read_text, split_text, tokenize

FAST = {"epochs": 4, "batch_size": 2}  # 8 samples -> 16 steps per block


@pytest.fixture(scope="module")
def setup(stories, shakespeare):
    """The model path, calibration ids (8 x 128), held-out ids (4 x 128) and their fp logits."""
    model = load_model(stories)
    tok = load_tokenizer(stories)
    train, held = split_text(read_text(shakespeare))
    calib = calibration_samples(tok, train, 8, 128)
    held_ids = tokenize(tok, held, 4 * 128).view(4, 128)
    with torch.no_grad():
        ref = model(input_ids=held_ids).logits
    return stories, calib, held_ids, ref


def quantized(setup, fold: bool = False, **config) -> tuple[nn.Module, dict]:
    path, calib, _, _ = setup
    model = load_model(path)
    if fold:
        share_block(model, 1, 2)
    report = quantize(model, QuantConfig(**config), calib)
    return model, report


def output_error(setup, model) -> float:
    _, _, held, ref = setup
    with torch.no_grad():
        logits = model(input_ids=held).logits
    return float((logits - ref).pow(2).mean() / ref.pow(2).mean())


def share_block(model: nn.Module, src: int, dst: int) -> None:
    """Fold: layer ``dst`` uses layer ``src``'s linear weights (shared Parameters, own norms)."""
    layers = model.model.layers
    for name, module in layers[dst].named_modules():
        if isinstance(module, nn.Linear):
            module.weight = layers[src].get_submodule(name).weight


def test_loss_terms_vanish_at_the_target_and_kl_is_symmetric():
    torch.manual_seed(0)
    y = torch.randn(2, 5, 8)
    p = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    q = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    assert abq.dlc_loss(y, [y, y], p, [p, p]).abs() < 1e-6
    assert torch.isclose(abq.symmetric_kl(p, q), abq.symmetric_kl(q, p))
    assert abq.dlc_loss(y, [y + 0.1 * torch.randn_like(y)], p, [q]) > 0.1


@pytest.mark.parametrize("fmt,balance", [(QuantFormat(3, 32), False), (QuantFormat(2, 16), True)])
def test_learnable_quant_freezes_to_exactly_what_it_trained(fmt, balance):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    smooth = nn.Parameter(0.3 * torch.randn(64))
    module = abq.LearnableQuant(lin, grid_for(fmt, balance), fmt.group_size, 16, smooth, rounding=True)
    with torch.no_grad():
        module.hi.uniform_(-1, 4)
        module.offset.uniform_(-0.7, 0.7)
        x = torch.randn(3, 64)
        trained = module(x)
        q = module.freeze()
        frozen = QuantLinear(q, lin.bias.detach())(x / smooth.exp())
    assert torch.equal(trained, frozen)
    assert q.bits == (3 if balance else fmt.wbits)


# RTN searches its group ranges (weight_range "mse", the default), which takes most of the W3 gain that ABQ's
# learned clipping had over min/max RTN (0.93x at W3 g128 with these 16 steps per block; W2: 0.39x).
@pytest.mark.parametrize("wbits,group,bound", [(3, 128, 0.97), (2, 64, 0.6)])
def test_abq_beats_rtn_on_stories(setup, wbits, group, bound):
    rtn = output_error(setup, quantized(setup, wbits=wbits, group_size=group)[0])
    calibrated = output_error(
        setup, quantized(setup, wbits=wbits, group_size=group, method="abq", options=FAST)[0]
    )
    assert calibrated < bound * rtn, (calibrated, rtn)


@pytest.mark.parametrize("method", ["rtn", "gptq", "abq"])
def test_bit_balance_uses_exactly_five_levels(setup, method):
    options = {"bit_balance": True, **(FAST if method == "abq" else {})}
    model, report = quantized(setup, wbits=2, group_size=64, method=method, options=options, head_bits=None)
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {layer["bits"] for layer in report["layers"]} == {3}
    codes = torch.cat([m.codes.flatten() for m in modules])
    assert set(codes.unique().tolist()) == {2, 3, 4, 5, 6}
    assert all(bool((m.zero_points == 4).all()) for m in modules)


@pytest.mark.parametrize("method", ["gptq", "abq"])
def test_folded_weights_are_quantized_once(setup, method, monkeypatch):
    calls = []
    if method == "gptq":
        real = gptq.gptq_quantize
        monkeypatch.setattr(gptq, "gptq_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    else:
        real = abq.LearnableQuant.freeze
        monkeypatch.setattr(abq.LearnableQuant, "freeze", lambda self: calls.append(1) or real(self))
    # the head is GPTQ'd once too; without the RTN check (which re-runs a GPTQ win on every sample)
    options = FAST if method == "abq" else {"head": "gptq", "choose": False}
    model, report = quantized(setup, fold=True, wbits=3, method=method, options=options)
    assert len(calls) == len(report["layers"]) == 5 * 7 + 1 - 7
    layers = model.model.layers
    assert layers[1].self_attn.q_proj is layers[2].self_attn.q_proj
    assert isinstance(layers[2].mlp.down_proj, QuantLinear)
    shared = next(r for r in report["layers"] if r["name"] == "model.layers.1.mlp.up_proj")
    assert shared["uses"] == ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]


def test_abq_is_deterministic(setup):
    a, _ = quantized(setup, wbits=3, method="abq", options=FAST)
    b, _ = quantized(setup, wbits=3, method="abq", options=FAST)
    _, _, held, _ = setup
    for ma, mb in zip(a.modules(), b.modules(), strict=True):
        if isinstance(ma, QuantLinear):
            assert torch.equal(ma.codes, mb.codes) and torch.equal(ma.scales, mb.scales)
    with torch.no_grad():
        la = a(input_ids=held).logits
        assert torch.equal(la, b(input_ids=held).logits)
        assert torch.equal(la, a(input_ids=held).logits)


def test_w4a8_smoothing_folds_into_norms(setup):
    model, _ = quantized(setup, wbits=4, abits=8, method="abq", options=FAST)
    rtn, _ = quantized(setup, wbits=4, abits=8)
    norms = [layer.input_layernorm.weight for layer in model.model.layers]
    originals = [layer.input_layernorm.weight for layer in rtn.model.layers]
    assert any(not torch.equal(a, b) for a, b in zip(norms, originals, strict=True))
    assert output_error(setup, model) < output_error(setup, rtn)


def test_bounds_hold_the_learned_rounding_and_clipping():
    """round_bound caps the offsets at +-bound steps (smoothly), clip_min floors the kept range."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    fmt = QuantFormat(3, 32)
    module = abq.LearnableQuant(
        lin, grid_for(fmt), 32, 16, None, rounding=True, round_bound=0.5, clip_min=0.6
    )
    with torch.no_grad():
        module.offset.uniform_(-20, 20)
        module.hi.fill_(-50.0)
        module.lo.fill_(-50.0)
    assert module.rounding_offset().abs().max() <= 0.5
    assert module.clip(module.hi).min() >= 0.6 - 1e-6
    # Each code is at most one step from round-to-nearest on the same (clipped) grid.
    scales, zeros = module.grid_params()
    q = module.freeze()
    nearest = torch.round(lin.weight.detach() / scales.repeat_interleave(32, 1)) + zeros.repeat_interleave(
        32, 1
    )
    assert (q.codes.float() - nearest.clamp(0, 7)).abs().max() <= 1


def test_split_holdout_and_early_stopping_keep_the_best_epoch():
    train, held = abq.split_holdout(8, 0.25, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(8))
    assert abq.split_holdout(1, 0.5, 0) == ([0], [])  # one batch: nothing held out
    # A held-out loss that gets worse with every step stops training after the first epoch at the start.
    p = nn.Parameter(torch.zeros(()))
    module = nn.Module()
    module.p, module.offset = p, None  # the two attributes _train reads
    steps = [lambda: (p - 1) ** 2] * 3 + [lambda: (p + 1) ** 2]  # training pulls p to 1, held-out wants -1
    opts = abq.ABQOptions(epochs=5, lr=0.5, holdout=0.25, seed=0)
    _, held_idx = abq.split_holdout(4, 0.25, 0)
    steps = [steps[3] if i in held_idx else steps[0] for i in range(4)]
    abq._train([module], steps, opts)
    assert p.item() == 0.0, "the best held-out epoch is the initial state"


def test_clipping_starts_at_the_searched_range():
    """weight_range "mse": ABQ's learnable clipping starts at RTN's searched range (so the untrained quantizer is
    the searched RTN wherever the search shrank a group below the 0.98 start), "minmax": at 0.98 of min/max."""
    from edgepack.compressor.calib_grid import grid_for, quantize_on_grid, search_range

    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.StudentT(3.0).sample((16, 64)))
    grid = grid_for(QuantFormat(3, 32))
    shrink = search_range(lin.weight, grid, 32)
    searched = abq.LearnableQuant(lin, grid, 32, 16, None, search=True)
    plain = abq.LearnableQuant(lin, grid, 32, 16, None)
    moved = shrink < 0.98
    assert 0 < int(moved.sum()) < moved.numel()
    assert torch.allclose(searched.clip(searched.hi)[moved], shrink[moved], atol=1e-4)
    assert torch.allclose(plain.clip(plain.hi), torch.sigmoid(torch.tensor(abq.CLIP_INIT)))
    rows = moved.all(1)  # rows whose every group moved: the untrained codes are the searched RTN's
    rtn = quantize_on_grid(lin.weight, QuantFormat(3, 32), search=True)
    assert rows.any() and torch.equal(searched.freeze().codes[rows], rtn.codes[rows])
