"""Triton W{2,3,4,5,6,8}A16 matmul kernels on the `pack_for_triton` layout: y = x @ dequantize(W).T.

Two kernels: a split-K GEMV for decode (M <= 8: few rows, so it streams the weight once and spreads K over
programs to fill the GPU) and a tiled GEMM for prefill (tensor-core `tl.dot` on weights dequantized in
registers). Both dequantize exactly as `reference.dequantize`: w = (q - z) * s in float32. Activations are
fp16 or bf16; the output has the activation dtype. Block sizes were chosen without a GPU (none was available):
compiled ahead of time for sm_90, they use no register spills; their speed is what `bench/kernel_speed.py` measures.

The kernels also run in the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors, which is how the tests
check them without a GPU; the interpreter cannot `tl.dot` bf16, so there the GEMM's bf16 dot runs in fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from edgepack.kernels.packing import TRITON_PLANE_BITS

GEMV_MAX_M = 8


@triton.jit
def _load_codes(hi_ptr, lo_ptr, offs_k, offs_n, mask, N, HI_BITS: tl.constexpr, LO_BITS: tl.constexpr):
    """Codes (BLOCK_K, BLOCK_N) int32 of K-major packed planes: q = (hi << LO_BITS) | lo."""
    hi_per: tl.constexpr = 32 // HI_BITS
    words = tl.load(hi_ptr + (offs_k // hi_per)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    # Arithmetic shift of the int32 word, then the mask keeps only this element's bits.
    q = (words >> ((offs_k % hi_per) * HI_BITS)[:, None]) & ((1 << HI_BITS) - 1)
    if LO_BITS > 0:
        lo_per: tl.constexpr = 32 // LO_BITS
        words = tl.load(lo_ptr + (offs_k // lo_per)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (q << LO_BITS) | ((words >> ((offs_k % lo_per) * LO_BITS)[:, None]) & ((1 << LO_BITS) - 1))
    return q


@triton.jit
def _dequantize(
    q, s_ptr, z_ptr, k0, offs_k, offs_n, mask, n_mask, N, GROUP: tl.constexpr, EVEN_GROUPS: tl.constexpr
):
    """Weights (BLOCK_K, BLOCK_N) float32 = (q - z) * s, with scales and zero points stored (k_groups, N)."""
    if EVEN_GROUPS:  # the whole K tile lies in one group: one row of scales and zero points
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        w = (q.to(tl.float32) - z[None, :]) * s[None, :]
    else:
        g = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + g, mask=mask, other=0.0)
        z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s
    return w


@triton.jit
def _gemv_kernel(
    x_ptr,
    hi_ptr,
    lo_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    k_per_split,
    GROUP: tl.constexpr,
    HI_BITS: tl.constexpr,
    LO_BITS: tl.constexpr,
    EVEN_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (n tile, k split) writes partial sums out[split, :M, n tile] over its slice of K."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split  # a multiple of BLOCK_K
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_M, BLOCK_K)
        mask = k_mask[:, None] & n_mask[None, :]
        q = _load_codes(hi_ptr, lo_ptr, offs_k, offs_n, mask, N, HI_BITS, LO_BITS)
        w = _dequantize(q, s_ptr, z_ptr, k0, offs_k, offs_n, mask, n_mask, N, GROUP, EVEN_GROUPS)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)  # (BLOCK_M, BLOCK_N)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemm_kernel(
    x_ptr,
    hi_ptr,
    lo_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    GROUP: tl.constexpr,
    HI_BITS: tl.constexpr,
    LO_BITS: tl.constexpr,
    EVEN_GROUPS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Program computes one (BLOCK_M, BLOCK_N) output tile; tiles run GROUP_M rows at a time for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        mask = k_mask[:, None] & n_mask[None, :]
        q = _load_codes(hi_ptr, lo_ptr, offs_k, offs_n, mask, N, HI_BITS, LO_BITS)
        w = _dequantize(q, s_ptr, z_ptr, k0, offs_k, offs_n, mask, n_mask, N, GROUP, EVEN_GROUPS)
        if DOT_IN_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)  # (BLOCK_M, BLOCK_N), fp32 accumulation
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(
    x: torch.Tensor, planes: tuple[torch.Tensor, ...], scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> tuple[int, int, int, int]:
    """Validate shapes and dtypes; return (M, N, K, lo_bits)."""
    if bits not in TRITON_PLANE_BITS:
        raise ValueError(f"bits must be one of {sorted(TRITON_PLANE_BITS)}, got {bits}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be a 2-D (M, K) tensor, contiguous along K")
    plane_bits = TRITON_PLANE_BITS[bits]
    if len(planes) != len(plane_bits):
        raise ValueError(f"{bits}-bit weights have {len(plane_bits)} packed planes, got {len(planes)}")
    m, k = x.shape
    n = scales.shape[1]
    if scales.dtype != torch.float32 or zeros.dtype != torch.uint8 or zeros.shape != scales.shape:
        raise ValueError("scales must be float32 (k_groups, N) and zero points uint8 of the same shape")
    for p, b in zip(planes, plane_bits, strict=True):
        if p.dtype != torch.int32 or p.shape != (-(-k // 32) * b, n) or not p.is_contiguous():
            raise ValueError(f"a {b}-bit plane must be contiguous int32 ({-(-k // 32) * b}, {n})")
    return m, n, k, plane_bits[1] if len(plane_bits) == 2 else 0


def _fit_block_k(block_k: int, group_size: int) -> int:
    """Halve block_k (not below 16) until it divides group_size, so a K tile reads one row of scales;
    when none does (e.g. per-channel groups of odd K) keep block_k and gather scales per k."""
    fit = block_k
    while fit > 16 and group_size % fit:
        fit //= 2
    return fit if group_size % fit == 0 else block_k


def _default_split_k(k: int, block_k: int) -> int:
    """K splits for the GEMV: about 512 columns of K per program, at most 16 splits."""
    return max(1, min(16, k // 512, triton.cdiv(k, block_k)))


def quant_gemv(
    x: torch.Tensor,
    planes: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """Decode matmul: x (M <= 8, K) @ W.T -> (M, N) in x's dtype, with W given by `pack_for_triton` planes,
    scales float32 (k_groups, N) and zero points uint8 (k_groups, N). Split-K partials are summed in fp32."""
    m, n, k, lo_bits = _check(x, planes, scales, zeros, bits)
    if m > GEMV_MAX_M:
        raise ValueError(f"the GEMV takes at most {GEMV_MAX_M} rows, got {m}")
    block_m = triton.next_power_of_2(m)
    block_n = 32
    # (BLOCK_M, BLOCK_K, BLOCK_N) product: 32 values a thread, <= 80 registers on sm_90.
    block_k = _fit_block_k(max(16, 128 // block_m), group_size)
    split_k = split_k or _default_split_k(k, block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(
        (split_k, m, n), device=x.device, dtype=torch.float32 if split_k > 1 else x.dtype
    )  # (split_k, M, N)
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv_kernel[grid](
        x,
        planes[0],
        planes[-1],
        scales,
        zeros,
        out,
        m,
        n,
        k,
        x.stride(0),
        k_per_split,
        GROUP=group_size,
        HI_BITS=TRITON_PLANE_BITS[bits][0],
        LO_BITS=lo_bits,
        EVEN_GROUPS=group_size % block_k == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)


def quant_gemm(
    x: torch.Tensor,
    planes: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Prefill matmul: x (M, K) @ W.T -> (M, N) in x's dtype (arguments as `quant_gemv`), any M."""
    m, n, k, lo_bits = _check(x, planes, scales, zeros, bits)
    # Without spills on sm_90 for every width (ptxas -v): at most 184 registers for M <= 64, 252 above.
    block_m = 128 if m > 64 else max(16, triton.next_power_of_2(m))
    block_n = 128 if m > 64 else 64
    block_k = _fit_block_k(32 if m > 64 else 64, group_size)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)  # (M, N)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel[grid](
        x,
        planes[0],
        planes[-1],
        scales,
        zeros,
        out,
        m,
        n,
        k,
        x.stride(0),
        GROUP=group_size,
        HI_BITS=TRITON_PLANE_BITS[bits][0],
        LO_BITS=lo_bits,
        EVEN_GROUPS=group_size % block_k == 0,
        DOT_IN_FP32=_interpreting() and x.dtype == torch.bfloat16,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        num_warps=8,
        num_stages=4,
    )
    return out


def quant_matmul(
    x: torch.Tensor,
    planes: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """x (M, K) @ W.T: the GEMV for M <= 8 (decode), the GEMM otherwise (prefill)."""
    if x.shape[0] <= GEMV_MAX_M:
        return quant_gemv(x, planes, scales, zeros, bits, group_size)
    return quant_gemm(x, planes, scales, zeros, bits, group_size)
