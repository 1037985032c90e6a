"""Mixed precision: bit-plane storage costs, the knapsack choice, and budgets on stories260k."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from edgepack.compressor.mixed import GROUPS, Sensitivity, choose_formats, plan_mixed_precision, stored_bytes
from edgepack.compressor.quantize import QuantConfig, QuantFormat, linear_sites, quantize

from edgepack.errors import EdgepackError
from edgepack.model import load_model, load_tokenizer
from edgepack.textdata import calibration_samples, read_text, split_text


@pytest.fixture(scope="module")
def calib(stories, shakespeare):
    tok = load_tokenizer(stories)
    return calibration_samples(tok, split_text(read_text(shakespeare))[0], 8, 128)


def test_every_width_costs_its_bits_in_the_compact_plane_layout():
    shape = (256, 512)
    cost = {b: stored_bytes(shape, QuantFormat(b, 128)) for b in (2, 3, 4, 5, 6, 8)}
    assert cost[2] < cost[3] < cost[4] < cost[5] < cost[6] < cost[8]
    assert cost[2] == pytest.approx(256 * 512 * (2 + 32 / 128 + 2 / 128) / 8)
    # odd widths: one shared scale, the 1-bit plane at 1 bit, a zero point per plane
    assert cost[3] == pytest.approx(256 * 512 * (3 + 32 / 128 + (2 + 2) / 128) / 8)
    # W2* is a 3-bit symmetric code: two planes, no zero points on the top plane
    w2star = stored_bytes(shape, QuantFormat(2, 64), bit_balance=True)
    assert stored_bytes(shape, QuantFormat(2, 64)) < w2star < cost[4]


def test_choose_formats_matches_brute_force():
    torch.manual_seed(0)
    layers = []
    for i in range(5):
        size = float(torch.randint(1, 5, ()).item()) * 100
        base = float(torch.rand(()))
        layers.append(
            Sensitivity(
                f"l{i}",
                int(size),
                {w: size * w / 8 for w in (2, 4, 8)},
                {w: base * 4.0 ** (-w) * (1 + i) for w in (2, 4, 8)},
            )
        )
    budget = sum(s.bytes[2] for s in layers) * 1.8
    chosen = choose_formats(layers, budget)
    assert sum(s.bytes[chosen[s.name]] for s in layers) <= budget
    best = min(
        sum(s.loss[w] for s, w in zip(layers, combo, strict=True))
        for combo in itertools.product((2, 4, 8), repeat=len(layers))
        if sum(s.bytes[w] for s, w in zip(layers, combo, strict=True)) <= budget
    )
    assert sum(s.loss[chosen[s.name]] for s in layers) <= 1.05 * best


def stored_bits(model, config: QuantConfig, plan: dict) -> float:
    """Average stored bits per quantized weight under ``plan``."""
    sites = linear_sites(model, config)
    stored = sum(stored_bytes(tuple(s.module.weight.shape), replace(s.fmt, **plan[s.name])) for s in sites)
    return 8 * stored / sum(s.module.weight.numel() for s in sites)


def minimum_bits(model, config: QuantConfig) -> float:
    """2-bit everywhere, each layer at its cheapest group size."""
    sites = linear_sites(model, config)
    stored = sum(
        min(stored_bytes(tuple(s.module.weight.shape), QuantFormat(2, g)) for g in GROUPS) for s in sites
    )
    return 8 * stored / sum(s.module.weight.numel() for s in sites)


def test_plan_meets_bits_per_weight_budget_and_quantizes(stories, calib):
    model = load_model(stories)
    config = QuantConfig(group_size=32)
    budget = minimum_bits(model, config) + 1.0
    plan = plan_mixed_precision(model, config, calib, budget_bits_per_weight=budget)
    assert set(plan) == {s.name for s in linear_sites(model, config)}
    assert budget - 0.3 <= stored_bits(model, config, plan) <= budget
    report = quantize(model, replace(config, overrides=plan), None)
    assert len({layer["bits"] for layer in report["layers"]}) > 1


def test_plan_meets_byte_budget(stories, calib):
    model = load_model(stories)
    config = QuantConfig(group_size=32)
    plan = plan_mixed_precision(model, config, calib, budget_bytes=300_000)
    numel = sum(s.module.weight.numel() for s in linear_sites(model, config))
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert stored_bits(model, config, plan) * numel / 8 + other <= 300_000


def test_impossible_budgets_name_the_minimum(stories, calib):
    model = load_model(stories)
    config = QuantConfig(group_size=32)
    minimum = minimum_bits(model, config)
    with pytest.raises(EdgepackError, match=f"minimum achievable {minimum:.3f}"):
        plan_mixed_precision(model, config, calib, budget_bits_per_weight=minimum - 0.05)
    with pytest.raises(EdgepackError, match=r"minimum achievable [0-9.]+ KB"):
        plan_mixed_precision(model, config, calib, budget_bytes=10_000)
    with pytest.raises(EdgepackError, match="exactly one budget"):
        plan_mixed_precision(model, config, calib)
