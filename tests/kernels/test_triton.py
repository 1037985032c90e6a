"""Triton kernels in the interpreter (TRITON_INTERPRET=1, CPU) against the NumPy reference, small shapes."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are built for the interpreter

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be checked")

from edgepack.kernels import triton_matmul  # noqa: E402
from edgepack.kernels.packing import pack_for_triton  # noqa: E402
from edgepack.kernels.reference import dequantize  # noqa: E402
from edgepack.kernels.torch_backend import TritonQuantLinear  # noqa: E402
from edgepack.kernels.triton_matmul import (  # noqa: E402
    GEMV_CANDIDATES,
    GemvConfig,
    _fit_block_k,
    gemm_candidates,
    gemv_candidates,
    quant_gemm,
    quant_gemv,
    tuned_configs,
)

CPU = torch.device("cpu")

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


def _assert_gemv_exact(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got.float().numpy(), want, rtol=ULP[dtype], atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m, group, dtype", [(1, 64, torch.float16), (3, 200, torch.bfloat16)])
def test_gemv_every_candidate(bits: int, m: int, group: int, dtype: torch.dtype) -> None:
    """Every candidate config, one-launch and split-K, is exact; K = 200 is not a multiple of the K tile or
    of 32, N = 80 not of the N tile; per-channel group 200 gathers scales per k."""
    _, planes, s, z, x, want = _case(bits, 80, 200, group, m, dtype, seed=bits + m)
    configs = gemv_candidates(m, 80, 200, group, CPU)
    assert len(configs) > 6 and any(c.split_k > 1 for c in configs) and any(c.split_k == 1 for c in configs)
    for config in configs:
        _assert_gemv_exact(quant_gemv(x, planes, s, z, bits, group, config=config), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m, group", [(1, 32), (2, 128), (5, 64), (8, 200)])
def test_gemv(bits: int, m: int, group: int, dtype: torch.dtype) -> None:
    """The default config for M = 1..8 (K tiles shrink as M grows) and groups of 32, 64, 128, per-channel."""
    _, planes, s, z, x, want = _case(bits, 40, 200, group, m, dtype, seed=bits * 5 + m)
    _assert_gemv_exact(quant_gemv(x, planes, s, z, bits, group), want, dtype)


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_launches(split_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One K split is one launch and allocates only the output; K splits add one launch that sums them."""
    _, planes, s, z, x, want = _case(4, 40, 200, 64, 2, torch.float16, seed=3)
    launches, allocs = [], []
    for name in ("_gemv_kernel", "_sum_splits_kernel"):

        class Counted:
            def __init__(self, kernel, name=name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(triton_matmul, name, Counted(getattr(triton_matmul, name)))
    empty = torch.empty

    def counted_empty(*args, **kwargs):
        allocs.append(kwargs.get("dtype"))
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", counted_empty)
    monkeypatch.setattr(torch.Tensor, "sum", lambda *a, **k: pytest.fail("torch sum in the GEMV"))
    got = quant_gemv(x, planes, s, z, 4, 64, config=GemvConfig(16, 64, 4, 2, split_k))
    monkeypatch.undo()
    _assert_gemv_exact(got, want, torch.float16)
    if split_k == 1:
        assert launches == ["_gemv_kernel"] and allocs == [torch.float16]
    else:
        assert launches == ["_gemv_kernel", "_sum_splits_kernel"] and allocs == [torch.float16, torch.float32]


def test_gemv_candidates_fit_m_and_group() -> None:
    assert len(GEMV_CANDIDATES) <= 12
    one = gemv_candidates(1, 4096, 4096, 4096, CPU)
    assert one[0] == GemvConfig(*GEMV_CANDIDATES[0])
    assert len(one) == len(GEMV_CANDIDATES) - 3  # N = 4096 fills 4 "SMs": the 3 FILL ones need no split
    assert {c.block_k for c in one} == {128, 256, 512}
    assert max(c.block_k for c in gemv_candidates(4, 4096, 4096, 4096, CPU)) == 128  # 512 / 4 rows
    assert max(c.block_k for c in gemv_candidates(1, 4096, 4096, 128, CPU)) == 128  # within one group
    # FILL: 4 "SMs" on CPU want 8 programs; N = 64 gives 1 or 2 N tiles, so K splits make up the rest
    assert {c.split_k for c in gemv_candidates(1, 64, 4096, 4096, CPU)} == {1, 4, 8}


def test_tuner_picks_fastest_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """With timing allowed, the first call per key times every candidate once and keeps the fastest; later
    calls of that key reuse it; another M bucket is another key. Without it (CPU) the default runs."""
    _, planes, s, z, x, want = _case(4, 40, 96, 32, 1, torch.float16, seed=5)
    monkeypatch.setattr(triton_matmul, "_TUNED", {})
    timed, ran = [], []
    launch = triton_matmul._gemv_kernel.run

    def timer(fn, device):
        before = len(ran)
        fn()
        config = ran[before]
        timed.append(config)
        return 10.0 if config == fastest else 20.0 + len(timed)

    def run(*args, **kwargs):
        ran.append(
            GemvConfig(kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_warps"], kwargs["num_stages"], 0)
        )
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_matmul._gemv_kernel, "run", run)
    quant_gemv(x, planes, s, z, 4, 32)  # CPU: no timing, nothing cached
    assert timed == [] and tuned_configs() == []
    candidates = gemv_candidates(1, 40, 96, 32, CPU)
    fastest = GemvConfig(
        candidates[3].block_n, candidates[3].block_k, candidates[3].num_warps, candidates[3].num_stages, 0
    )
    monkeypatch.setattr(triton_matmul, "_can_tune", lambda x: True)
    monkeypatch.setattr(triton_matmul, "_time_us", timer)
    _assert_gemv_exact(quant_gemv(x, planes, s, z, 4, 32), want, torch.float16)
    assert len(timed) == len(candidates)
    ran.clear()

    def rebuilt(*args):
        raise AssertionError("a cached key rebuilt its candidates (about 30 us a call)")

    with monkeypatch.context() as patch:
        patch.setattr(triton_matmul, "gemv_candidates", rebuilt)
        quant_gemv(x, planes, s, z, 4, 32)
    assert len(timed) == len(candidates) and ran == [fastest]  # cached: no timing, the fastest runs
    (row,) = tuned_configs()
    assert row["best"] == candidates[3].label and row["m_bucket"] == 1 and row["bits"] == 4
    assert row["candidates_us"][candidates[3].label] == 10.0 and len(row["candidates_us"]) == len(candidates)
    quant_gemv(x[:1].expand(2, -1).contiguous(), planes, s, z, 4, 32)  # M bucket 2: a new key
    assert len(timed) == 2 * len(candidates) and len(tuned_configs()) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m, group", [(16, 32), (33, 128), (80, 200)])
def test_gemm(bits: int, m: int, group: int, dtype: torch.dtype) -> None:
    """Both tile configs (M <= 64 and M > 64); groups of 32 and 128 fit a K tile, per-channel 200 gathers."""
    _, planes, s, z, x, want = _case(bits, 80, 200, group, m, dtype, seed=bits * 3 + m)
    _assert_close(quant_gemm(x, planes, s, z, bits, group), want, dtype)


@pytest.mark.parametrize("bits, dtype", [(3, torch.float16), (4, torch.bfloat16)])
def test_gemm_every_candidate(bits: int, dtype: torch.dtype) -> None:
    """Every GEMM candidate for M <= 64 (the tuner's choices) on a group of 128 and N, K off the tiles."""
    _, planes, s, z, x, want = _case(bits, 80, 200, 128, 20, dtype, seed=bits)
    configs = gemm_candidates(20, 128)
    assert len(configs) > 3 and {c.block_m for c in configs} == {32}
    for config in configs:
        _assert_close(quant_gemm(x, planes, s, z, bits, 128, config=config), want, dtype)


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
