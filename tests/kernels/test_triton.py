"""Triton kernels in the interpreter (TRITON_INTERPRET=1, CPU) against the NumPy reference, small shapes."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are built for the interpreter

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be checked")

from edgepack.kernels.packing import pack_for_triton  # noqa: E402
from edgepack.kernels.reference import dequantize  # noqa: E402
from edgepack.kernels.torch_backend import TritonQuantLinear  # noqa: E402
from edgepack.kernels.triton_matmul import _fit_block_k, quant_gemm, quant_gemv  # noqa: E402

# GEMM: max error relative to max |y|, since its dot rounds the dequantized weight to fp16 (11 bits) or
# bf16 (8 bits). GEMV: computes in float32 and rounds once, so every element is within one output ulp.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _case(bits: int, n: int, k: int, group: int, m: int, dtype: torch.dtype, seed: int):
    """Random asymmetric quantized weight, its Triton tensors, activations and the exact float32 product."""
    rng = np.random.default_rng(seed)
    k_groups = -(-k // group)
    codes = rng.integers(0, 2**bits, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, k_groups)).astype(np.float32)
    zero_points = rng.integers(0, 2**bits, size=(n, k_groups), dtype=np.uint8)
    planes = tuple(torch.from_numpy(p) for p in pack_for_triton(codes, bits))
    s = torch.from_numpy(np.ascontiguousarray(scales.T))  # (k_groups, N)
    z = torch.from_numpy(np.ascontiguousarray(zero_points.T))  # (k_groups, N)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (M, K)
    want = x.float().numpy() @ dequantize(codes, scales, zero_points, group).T  # (M, N)
    return (codes, scales, zero_points), planes, s, z, x, want


def _assert_close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    err = np.abs(got.float().numpy() - want).max() / np.abs(want).max()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m, group, split_k", [(1, 32, 3), (4, 64, 2), (1, 200, 1)])
def test_gemv(bits: int, m: int, group: int, split_k: int, dtype: torch.dtype) -> None:
    """K = 200 is not a multiple of the K block or of 32; per-channel group 200 gathers scales per k."""
    _, planes, s, z, x, want = _case(bits, 80, 200, group, m, dtype, seed=bits + m)
    got = quant_gemv(x, planes, s, z, bits, group, split_k=split_k)
    assert got.dtype == dtype
    np.testing.assert_allclose(got.float().numpy(), want, rtol=ULP[dtype], atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m, group", [(16, 32), (33, 128), (80, 200)])
def test_gemm(bits: int, m: int, group: int, dtype: torch.dtype) -> None:
    """Both tile configs (M <= 64 and M > 64); groups of 32 and 128 fit a K tile, per-channel 200 gathers."""
    _, planes, s, z, x, want = _case(bits, 80, 200, group, m, dtype, seed=bits * 3 + m)
    _assert_close(quant_gemm(x, planes, s, z, bits, group), want, dtype)


@pytest.mark.parametrize("m", [1, 20])
def test_quant_linear_dispatch(m: int) -> None:
    """The module runs the GEMV (M <= 8) or the GEMM on (batch, seq, K) input and adds the bias."""
    (codes, scales, zero_points), _, _, _, x, want = _case(3, 48, 96, 32, m, torch.float16, seed=m)
    bias = torch.randn(48)
    layer = TritonQuantLinear(codes, scales, zero_points, 3, 32, bias=bias)
    got = layer(x.reshape(1, m, 96))
    assert got.shape == (1, m, 48)
    _assert_close(got.reshape(m, 48), want + bias.numpy(), torch.float16)


def test_kernel_rejects_fp32_activations() -> None:
    _, planes, s, z, x, _ = _case(4, 16, 32, 32, 1, torch.float16, seed=0)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        quant_gemv(x.float(), planes, s, z, 4, 32)


def test_fit_block_k() -> None:
    assert _fit_block_k(128, 32) == 32  # one group per K tile
    assert _fit_block_k(64, 128) == 64
    assert _fit_block_k(128, 200) == 128  # no power of 2 >= 16 divides 200: keep the tile, gather scales
