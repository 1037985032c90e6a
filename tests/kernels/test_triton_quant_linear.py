"""The Triton GPU packing and the pure-torch fallback of `TritonQuantLinear`, against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edgepack.kernels.packing import TRITON_PLANE_BITS, pack_for_triton
from edgepack.kernels.reference import dequantize
from edgepack.kernels.torch_backend import TritonQuantLinear, quantized_linear_reference


def _random_quant(rng: np.random.Generator, n: int, k: int, bits: int, group: int):
    k_groups = -(-k // group)
    codes = rng.integers(0, 2**bits, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, k_groups)).astype(np.float32)
    zero_points = rng.integers(0, 2**bits, size=(n, k_groups), dtype=np.uint8)
    return codes, scales, zero_points


@pytest.mark.parametrize("bits", sorted(TRITON_PLANE_BITS))
def test_pack_for_triton_layout(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(6, 70), dtype=np.uint8)
    planes = pack_for_triton(codes, bits)
    assert [p.shape for p in planes] == [(3 * b, 6) for b in TRITON_PLANE_BITS[bits]]  # K_pad = 96
    assert all(p.dtype == np.int32 for p in planes)
    # Word [w, n] of the top plane holds element k = w * per + i at bits i * b.
    b = TRITON_PLANE_BITS[bits][0]
    lo = bits - b
    word = int(planes[0][1, 2].view(np.uint32))
    assert (word >> b) & ((1 << b) - 1) == codes[2, 32 // b + 1] >> lo


@pytest.mark.parametrize("bits", sorted(TRITON_PLANE_BITS))
@pytest.mark.parametrize("group", [32, 64, 70])
def test_reference_fallback_matches_numpy(bits: int, group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(
        "TRITON_INTERPRET", raising=False
    )  # CPU tensors take the fallback, not the interpreter
    rng = np.random.default_rng(bits * 7 + group)
    n, k = 20, 70
    codes, scales, zero_points = _random_quant(rng, n, k, bits, group)
    bias = torch.randn(n)
    layer = TritonQuantLinear(codes, scales, zero_points, bits, group, bias=bias)
    x = torch.randn(2, 3, k)
    weight = dequantize(codes, scales, zero_points, group).astype(np.float64)
    xs = x.numpy().astype(np.float64)
    # exact to float64; the fallback sums K float32 products in whatever order its BLAS takes
    want = xs @ weight.T
    # float32 summation error is bounded by the sum of the terms' magnitudes (K * eps * sum|x w| at worst), not
    # by the result, which cancels: bound each output by 1e-5 of its terms' magnitudes
    bound = 1e-5 * (np.abs(xs) @ np.abs(weight).T) + 1e-6
    assert np.all(np.abs(layer(x).numpy() - (want + bias.numpy())) <= bound + 1e-6 * np.abs(bias.numpy()))
    got = quantized_linear_reference(x, layer.planes, layer.scales, layer.zeros, bits, group)
    assert np.all(np.abs(got.numpy() - want) <= bound)


def test_quant_linear_rejects_bad_shapes() -> None:
    codes = np.zeros((4, 64), np.uint8)
    with pytest.raises(ValueError, match="scales and zero points"):
        TritonQuantLinear(codes, np.ones((4, 1), np.float32), np.zeros((4, 1), np.uint8), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        TritonQuantLinear(codes, np.ones((4, 2), np.float32), np.zeros((4, 2), np.uint8), 7, 32)


@pytest.mark.parametrize("bits", sorted(TRITON_PLANE_BITS))
def test_pack_for_triton_every_word(bits: int) -> None:
    """Every word of every plane against the layout's definition: word [w, n] of a b-bit plane holds bits
    shift.. of code k = w * (32 // b) + i at bits i * b, K padded with zero codes."""
    rng = np.random.default_rng(100 + bits)
    n, k = 5, 75
    codes = rng.integers(0, 2**bits, size=(n, k), dtype=np.uint8)
    padded = np.zeros((n, 96), np.int64)
    padded[:, :k] = codes
    shift = bits
    for plane, b in zip(pack_for_triton(codes, bits), TRITON_PLANE_BITS[bits], strict=True):
        shift -= b
        per = 32 // b
        want = np.zeros((96 // per, n), np.int64)
        for w in range(96 // per):
            for i in range(per):
                want[w] |= ((padded[:, w * per + i] >> shift) & ((1 << b) - 1)) << (i * b)
        assert plane.dtype == np.int32 and plane.flags.c_contiguous
        np.testing.assert_array_equal(plane.view(np.uint32).astype(np.int64), want)


@pytest.mark.parametrize(("k", "group"), [(96, 32), (100, 32), (64, 64)])
def test_dequantize_whole_and_ragged_groups(k: int, group: int) -> None:
    """reference.dequantize (broadcast per group where K is whole groups, repeated otherwise) is
    (q - z[k // g]) * s[k // g] element by element, in float32."""
    rng = np.random.default_rng(k)
    codes, scales, zero_points = _random_quant(rng, 7, k, 4, group)
    want = np.array(
        [[(np.float32(codes[r, c]) - np.float32(zero_points[r, c // group])) * scales[r, c // group]
          for c in range(k)] for r in range(7)], np.float32)  # fmt: skip
    got = dequantize(codes, scales, zero_points, group)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
