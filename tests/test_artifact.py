"""The artifact format owner: stored sizes per target scale dtype (what mixed precision budgets against) equal
the bytes the exporter writes, and decoding the stored planes gives back the quantized codes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_random_model
from edgepack.compressor.mixed import BUDGET_LOWERING, _unquantized_bytes, stored_bytes
from edgepack.compressor.quantize import QuantConfig, QuantFormat, QuantLinear, linear_sites, quantize
from edgepack.exporter.builder import BuildOptions, build_decoder

from edgepack.artifact import QuantLayer, decode_weight, dtype_bytes
from edgepack.errors import EdgepackError
from edgepack.model import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("art"), "Qwen2ForCausalLM")  # biases too


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("wbits", "symmetric"), [(3, False), (4, True), (6, False)])
def test_budgeted_bytes_equal_written_bytes(folder, dtype, wbits, symmetric):
    """mixed.stored_bytes (the budget's cost) == the bytes the exporter stores per weight, for cpu (fp32
    scales) and cuda (fp16 scales) alike, in the lowering budgeted exports use (odd widths compact)."""
    model = load_model(folder)
    # one format everywhere (the head too: "auto" would widen it, which the pipeline undoes for compact)
    quantize(model, QuantConfig(wbits=wbits, group_size=32, symmetric=symmetric, head_bits=None))
    graph = build_decoder(model, BuildOptions(dtype=dtype, activations="float", lowering=BUDGET_LOWERING))
    fmt = QuantFormat(wbits, 32, symmetric)
    layers = graph.meta["quant_layers"]
    assert len(layers) == 3 * 7 + 1
    for name, facts in layers.items():
        shape = tuple(model.get_submodule(name).codes.shape)
        assert facts["bytes"] == stored_bytes(shape, fmt, dtype=dtype), (name, facts)
    scales = [v for v in graph.graph.initializers.values() if v.name.endswith(".scales")]
    assert {v.const_value.dtype.itemsize for v in scales} == {dtype_bytes(dtype)}


def test_fp16_budget_counts_float_parameters_at_two_bytes(folder):
    model = load_model(folder)
    sites = linear_sites(model, QuantConfig(wbits=4))
    assert _unquantized_bytes(model, sites, "float16") * 2 == _unquantized_bytes(model, sites, "float32")


@pytest.mark.parametrize("wbits", [3, 5, 8])
def test_decode_recovers_codes_and_zero_points(folder, wbits):
    model = load_model(folder)
    quantize(model, QuantConfig(wbits=wbits, group_size=32))
    graph = build_decoder(model, BuildOptions(lowering="planes" if wbits == 5 else "auto"))
    inits = {name: np.array(v.const_value.numpy()) for name, v in graph.graph.initializers.items()}
    name = "model.layers.1.mlp.down_proj"
    module: QuantLinear = model.get_submodule(name)
    facts = graph.meta["quant_layers"][name]
    layer = QuantLayer.from_dict({"name": name, "shape": list(module.codes.shape), "bits": wbits, **facts})
    w = decode_weight(inits.__getitem__, inits.__contains__, layer)
    assert np.array_equal(w.codes, module.codes.numpy())
    assert np.array_equal(w.zero_points, module.zero_points.numpy())
    assert np.allclose(w.scales, module.scales.float().numpy())
    assert not np.array_equal(w.codes, np.roll(module.codes.numpy(), 1))  # a real comparison


def test_unknown_dtype_is_one_line():
    with pytest.raises(EdgepackError, match="unknown dtype 'bfloat8'"):
        dtype_bytes("bfloat8")
