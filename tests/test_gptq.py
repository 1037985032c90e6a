"""GPTQ: the pure column-wise quantizer, block stages, and calibrated output error on stories260k."""

from __future__ import annotations

import pytest
import torch
from edgepack.compressor.calib_blocks import plan_blocks, trace_inputs
from edgepack.compressor.calib_grid import grid_for, quantize_on_grid
from edgepack.compressor.gptq import block_stages, gptq_quantize
from edgepack.compressor.quantize import QuantConfig, QuantFormat, linear_sites, quantize

from edgepack.errors import EdgepackError
from edgepack.model import load_model, load_tokenizer
from edgepack.textdata import calibration_samples, read_text, split_text, tokenize


@pytest.fixture(scope="module")
def setup(stories, shakespeare):
    """The fp model, calibration ids (8 x 128) and held-out ids (4 x 128) from Tiny Shakespeare."""
    torch.manual_seed(0)
    model = load_model(stories)
    tok = load_tokenizer(stories)
    train, held = split_text(read_text(shakespeare))
    calib = calibration_samples(tok, train, 8, 128)
    held_ids = tokenize(tok, held, 4 * 128).view(4, 128)
    with torch.no_grad():
        ref = model(input_ids=held_ids).logits
    return stories, calib, held_ids, ref


def output_error(setup, **config) -> float:
    """Relative MSE of the quantized model's held-out logits against full precision."""
    path, calib, held, ref = setup
    model = load_model(path)
    quantize(model, QuantConfig(**config), calib)
    with torch.no_grad():
        logits = model(input_ids=held).logits
    return float((logits - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(act_order):
    torch.manual_seed(0)
    x = torch.randn(512, 96) @ torch.randn(96, 96)  # correlated inputs
    w = torch.randn(48, 96)
    h = x.t() @ x * (2 / len(x))
    fmt = QuantFormat(3, 32)
    q, _ = gptq_quantize(w, h, grid_for(fmt), 32, act_order=act_order)
    rtn = quantize_on_grid(w, fmt)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7 and q.scales.shape == (48, 3)
    err = ((q.dequantize() - w) @ x.t()).pow(2).sum()
    err_rtn = ((rtn.dequantize() - w) @ x.t()).pow(2).sum()
    assert err < 0.7 * err_rtn


def test_block_stages_follow_shared_inputs(stories):
    model = load_model(stories)
    sites = linear_sites(model, QuantConfig())
    plan = plan_blocks(model, sites)
    ids = torch.randint(0, 512, (2, 16))
    trace = trace_inputs(model, plan.layers, ids, 2, head=model.get_output_embeddings())
    stages = block_stages(plan.layers[0], plan.owned[0], trace.hidden[0], trace.layer_kwargs[0][0])
    names = [[s.name.split(".", 3)[-1] for s in stage] for stage in stages]
    assert names == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("wbits,group", [(3, 128), (2, 64)])
def test_gptq_beats_rtn_on_stories(setup, wbits, group):
    rtn = output_error(setup, wbits=wbits, group_size=group)
    gptq = output_error(setup, wbits=wbits, group_size=group, method="gptq", options={"batch_size": 4})
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_gptq_needs_calibration_and_known_options(stories):
    model = load_model(stories)
    with pytest.raises(EdgepackError, match="needs calibration text"):
        quantize(model, QuantConfig(method="gptq"), None)
    with pytest.raises(EdgepackError, match="unknown options"):
        quantize(
            model, QuantConfig(method="gptq", options={"epochs": 3}), torch.zeros(2, 8, dtype=torch.long)
        )


def test_head_rtn_leaves_the_tied_head_on_the_rtn_grid(setup):
    """head="rtn": the tied lm_head/embedding gets round-to-nearest codes, the blocks still GPTQ's."""
    path, calib, _, _ = setup
    model, plain = load_model(path), load_model(path)
    quantize(
        model, QuantConfig(wbits=3, method="gptq", options={"head": "rtn", "batch_size": 4, "e2e": 0}), calib
    )
    quantize(plain, QuantConfig(wbits=3), calib)
    head, rtn_head = model.get_output_embeddings(), plain.get_output_embeddings()
    assert torch.equal(head.codes, rtn_head.codes) and torch.equal(head.scales, rtn_head.scales)
    q, q_rtn = model.model.layers[0].mlp.up_proj, plain.model.layers[0].mlp.up_proj
    assert not torch.equal(q.codes, q_rtn.codes)
    with pytest.raises(EdgepackError, match="head='lora'"):
        quantize(load_model(path), QuantConfig(method="gptq", options={"head": "lora"}), calib)


def test_too_few_calibration_tokens_are_flagged(setup, caplog):
    """Fewer than 16 tokens per input feature of the widest linear (stories260k: 172) is a logged warning."""
    path, calib, _, _ = setup  # 8 x 128 = 1024 tokens < 16 * 172
    with caplog.at_level("WARNING", logger="edgepack.compressor.gptq"):
        quantize(load_model(path), QuantConfig(wbits=4, method="gptq"), calib[:, :64])
    assert "512 calibration tokens for linears with 172 inputs" in caplog.text
    caplog.clear()
    enough = calib.repeat(3, 2)  # 24 x 256 = 6144 tokens
    with caplog.at_level("WARNING", logger="edgepack.compressor.gptq"):
        quantize(load_model(path), QuantConfig(wbits=4, method="gptq"), enough)
    assert "calibration tokens" not in caplog.text


def test_head_damp_weighs_the_tied_embedding(setup):
    """head_damp adds the embedding's identity term to the tied head's Hessian: strong damping -> RTN codes."""
    path, calib, _, _ = setup
    models = {}
    for damp in (None, 1e4):
        model = load_model(path)
        options = {"batch_size": 4, "head": "gptq", "damp": 0.1, **({"head_damp": damp} if damp else {})}
        quantize(model, QuantConfig(wbits=3, method="gptq", options=options), calib)
        models[damp] = model.get_output_embeddings()
    rtn = load_model(path)
    quantize(rtn, QuantConfig(wbits=3), calib)
    rtn_codes = rtn.get_output_embeddings().codes
    same = {d: float((m.codes == rtn_codes).float().mean()) for d, m in models.items()}
    assert same[1e4] > 0.99 and same[None] < 0.9, same


def test_choice_keeps_rtn_where_gptq_does_not_generalize():
    """choose_codes: GPTQ fit on inputs confined to a subspace pushes its error into the unseen directions; on
    held-out inputs that span them RTN's error is lower, so RTN's codes are kept. Held-out inputs like the
    fit ones keep GPTQ's (re-run on every sample). The decision and both errors are in ``QTensor.note``."""
    from edgepack.compressor.gptq import GPTQOptions, choose_codes
    from edgepack.compressor.quantize import LinearSite

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=False)
    site = LinearSite("x", lin, QuantFormat(3, 32))
    basis = torch.randn(12, 96)
    fit_x = torch.randn(2048, 12) @ basis  # rank 12 of 96
    fit = fit_x.t() @ fit_x
    rtn = quantize_on_grid(lin.weight.detach(), site.fmt, search=True)  # RTN as weight_range "mse" does it
    wide_x = torch.randn(512, 96)
    opts, config = GPTQOptions(damp=0.01), QuantConfig()
    q = choose_codes(site, fit, wide_x.t() @ wide_x, (2048, 512), opts, config)
    assert q.note["choice"] == "rtn" and torch.equal(q.codes, rtn.codes)
    assert q.note["held_out_error"]["rtn"] < q.note["held_out_error"]["gptq"]
    like_x = torch.randn(512, 12) @ basis
    q = choose_codes(site, fit, like_x.t() @ like_x, (2048, 512), opts, config)
    assert q.note["choice"] == "gptq" and not torch.equal(q.codes, rtn.codes)
    assert q.note["held_out_error"]["gptq"] < 0.7 * q.note["held_out_error"]["rtn"]


def test_choice_is_recorded_per_site_on_stories(setup):
    """Default GPTQ on stories260k: every block linear records GPTQ-or-RTN and both held-out errors, the choice
    is the lower one, and choose=False records nothing."""
    path, calib, _, _ = setup
    report = quantize(load_model(path), QuantConfig(wbits=3, method="gptq", options={"batch_size": 4}), calib)
    blocks = [layer for layer in report["layers"] if layer["name"] != "lm_head"]
    assert len(blocks) == 5 * 7
    for layer in blocks:
        note = layer["calibration"]
        errors = note["held_out_error"]
        assert note["choice"] == min(errors, key=lambda k: (errors[k], k != "gptq"))
    off = quantize(
        load_model(path),
        QuantConfig(wbits=3, method="gptq", options={"batch_size": 4, "choose": False}),
        calib,
    )
    assert not any("calibration" in layer for layer in off["layers"])


def test_act_order_and_damp_defaults_at_every_width(setup, monkeypatch):
    """act_order / damp unset: on and 0.1 at W3 g128, W4 g64, W4 g128 and W2 (round 5 of the cross-domain table);
    given options win."""
    from edgepack.compressor import gptq

    path, calib, _, _ = setup
    seen = []
    real = gptq.gptq_quantize
    monkeypatch.setattr(gptq, "gptq_quantize", lambda *a, **k: seen.append((a[4], a[5])) or real(*a, **k))
    for wbits, group, options, expected in (
        (3, 128, {}, (0.1, True)),
        (4, 64, {}, (0.1, True)),
        (4, 128, {}, (0.1, True)),
        (2, 64, {}, (0.1, True)),
        (3, 128, {"act_order": False, "damp": 1.0}, (1.0, False)),
    ):
        seen.clear()
        cfg = QuantConfig(wbits=wbits, group_size=group, method="gptq", options={"choose": False, **options})
        quantize(load_model(path), cfg, calib)
        assert seen and set(seen) == {expected}, (wbits, group, set(seen))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_searches_each_groups_range(act_order):
    """search=True (QuantConfig.weight_range "mse", the default): each group's scales come from the range shrink
    ``search_range`` picks on the group's current weights, not from min/max, and the output error on the
    inputs' Hessian falls. Heavy-tailed weights, as in trained models: a few outliers stretch min/max."""
    torch.manual_seed(0)
    x = torch.randn(1024, 128) @ torch.randn(128, 128)
    h = x.t() @ x * (2 / len(x))
    w = torch.distributions.StudentT(3.0).sample((64, 128))
    grid = grid_for(QuantFormat(3, 32))
    errors, scales = {}, {}
    for search in (False, True):
        q, _ = gptq_quantize(w, h, grid, 32, damp=0.1, act_order=act_order, search=search)
        dw = q.dequantize() - w
        errors[search] = float(((dw @ h) * dw).sum())
        scales[search] = q.scales
    shrunk = scales[True] < scales[False] * 0.99
    assert 0.2 < float(shrunk.float().mean()) < 1.0  # many groups shrunk, not all
    assert errors[True] < 0.95 * errors[False], errors


def test_gptq_rtn_paths_follow_weight_range(setup):
    """Every RTN path inside GPTQ (the head by RTN, the per-site RTN alternative) uses ``weight_range``: with
    "minmax" the head equals min/max RTN's, with "mse" (default) the searched RTN's, which differs."""
    path, calib, _, _ = setup
    heads = {}
    for rng in ("mse", "minmax"):
        model, plain = load_model(path), load_model(path)
        opts = {"head": "rtn", "batch_size": 4, "e2e": 0}
        quantize(model, QuantConfig(wbits=3, method="gptq", weight_range=rng, options=opts), calib)
        quantize(plain, QuantConfig(wbits=3, weight_range=rng), calib)
        head, rtn_head = model.get_output_embeddings(), plain.get_output_embeddings()
        assert torch.equal(head.codes, rtn_head.codes) and torch.equal(head.scales, rtn_head.scales)
        heads[rng] = head.scales
    assert not torch.equal(heads["mse"], heads["minmax"])
