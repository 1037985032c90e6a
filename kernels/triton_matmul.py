"""Triton W{2,3,4,5,6,8}A16 matmul kernels on the `pack_for_triton` layout: y = x @ dequantize(W).T.

Two kernels: a GEMV for decode (M <= 8: few rows, so it streams the weight once) and a tiled GEMM for prefill
(tensor-core `tl.dot` on weights dequantized in registers). Both dequantize exactly as `reference.dequantize`:
w = (q - z) * s in float32 (the integers go to float32 through the exponent bits of 2**23 instead of a
conversion instruction, which gives the same floats). Activations are fp16 or bf16; the output has the
activation dtype.

The GEMV accumulates products elementwise in fp32 registers and reduces over K once per program. With one
K split (the usual case) it is one launch that writes the output in the activation dtype; with several
(only where N is too small to give every SM programs) each split writes fp32 partials and a second launch
sums them in fp32 and casts.

Configs (tile sizes, warps, stages, K splits) are chosen by measurement: on a CUDA device, the first call
for a key (M bucket, N, K, bits, group, dtype, device) times every candidate with CUDA events on the call's
own inputs (L2 flushed) and keeps the fastest; `tuned_configs` returns the table. The candidate lists were
written without a GPU (none was available), so which ones win is only known from that measurement. On CPU
(the Triton interpreter) and while a CUDA graph is being captured nothing is timed: the first candidate runs.

The kernels also run in the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors, which is how the tests
check them without a GPU; the interpreter cannot `tl.dot` bf16, so there the GEMM's bf16 dot runs in fp32.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl
from edgepack.kernels.packing import TRITON_PLANE_BITS
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

log = logging.getLogger(__name__)

GEMV_MAX_M = 8
FILL = 0  # GemvConfig.split_k: split K until the grid has two programs per SM


@triton.jit
def _exact_float(q):
    """float32(q) of int32 0 <= q < 2**23, minus 2**23: the bits of 2**23 + q. Differences of two are exact."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


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
        z = _exact_float(tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32))
        w = (_exact_float(q) - z[None, :]) * s[None, :]
    else:
        g = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + g, mask=mask, other=0.0)
        z = _exact_float(tl.load(z_ptr + g, mask=mask, other=0).to(tl.int32))
        w = (_exact_float(q) - z) * s
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
    """Program (n tile, k split) writes out[split, :M, n tile], its slice of K's share of x @ W.T: the output
    in x's dtype when there is one split, fp32 partials otherwise. Products accumulate elementwise in a
    (BLOCK_M, BLOCK_K, BLOCK_N) fp32 tile, reduced over K once at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
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
        acc += x[:, :, None] * w[None, :, :]
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, size, split_k, BLOCK: tl.constexpr):
    """out (size,) = fp32 sum of part (split_k, size) over splits, in split order, cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(split_k):
        acc += tl.load(part_ptr + split * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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


@dataclass(frozen=True)
class GemvConfig:
    """GEMV launch: N and K tiles, warps, pipeline stages and K splits (FILL: enough to fill the GPU)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int

    @property
    def label(self) -> str:
        split = "fill" if self.split_k == FILL else str(self.split_k)
        return f"n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}_split{split}"


@dataclass(frozen=True)
class GemmConfig:
    """GEMM launch: M, N and K tiles, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"m{self.block_m}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"


# GEMV candidates (BLOCK_N, BLOCK_K at M = 1, num_warps, num_stages, split_k), the first one the default.
# BLOCK_K shrinks as M grows (the register tile is M x BLOCK_K x BLOCK_N) and to fit the quantization group
# (a tile within one group reads one row of scales). Narrow N tiles with long K tiles give many programs
# and long streams per program; wide N tiles coalesce better but need K splits when N is small.
GEMV_CANDIDATES = (
    (32, 256, 4, 2, 1),
    (8, 512, 4, 2, 1),
    (16, 256, 4, 2, 1),
    (16, 512, 8, 2, 1),
    (32, 256, 4, 4, 1),
    (64, 128, 4, 2, 1),
    (64, 256, 8, 2, 1),
    (128, 128, 8, 2, 1),
    (32, 256, 4, 2, FILL),
    (64, 128, 4, 2, FILL),
    (128, 128, 8, 2, FILL),
)
# GEMM candidates for M <= 64 (BLOCK_N, BLOCK_K, num_warps, num_stages; BLOCK_M is M rounded up to a power
# of 2, at least 16), the first one the default; above 64 rows one config, which fills the GPU by M tiles.
GEMM_CANDIDATES = (
    (64, 64, 8, 4),
    (32, 64, 4, 4),
    (32, 128, 4, 3),
    (64, 128, 4, 3),
    (128, 64, 8, 3),
    (16, 128, 4, 3),
)
GEMM_LARGE_M = GemmConfig(128, 128, 32, 8, 4)

_TUNED: dict[tuple, tuple[GemvConfig | GemmConfig, dict[GemvConfig | GemmConfig, float]]] = {}


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. Recent Triton makes `triton.cdiv` a constexpr function costing microseconds a
    call, paid by every linear of every decode step."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), on the host (see `_cdiv`)."""
    return 1 << (n - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _can_tune(x: torch.Tensor) -> bool:
    """Time candidates only on a CUDA device, outside the interpreter and outside CUDA graph capture."""
    return x.is_cuda and not _interpreting() and not torch.cuda.is_current_stream_capturing()


def _time_us(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median microseconds of fn (CUDA events) after one warm-up call, L2 flushed before each timed call."""
    flush = torch.empty(64 << 20, dtype=torch.int32, device=device)  # 256 MB, more than any L2
    fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _tuned(key: Hashable, make_candidates: Callable[[], Sequence], launch: Callable, x: torch.Tensor):
    """The cached config of key; else, when `_can_tune(x)`, time every candidate by `launch(config)` and
    cache the fastest; else the first candidate (not cached). The candidates are built on a miss only: a
    cached call costs a dict lookup (building them took about 30 us, paid by every linear of every step)."""
    hit = _TUNED.get(key)
    if hit is not None:
        return hit[0]
    candidates = make_candidates()
    if len(candidates) == 1 or not _can_tune(x):
        return candidates[0]
    times = {}
    for config in candidates:
        try:
            times[config] = _time_us(lambda config=config: launch(config), x.device)
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError) as err:
            log.warning("%s: %s does not run (%s)", key, config.label, err)
    if not times:
        raise RuntimeError(f"no candidate config runs for {key}")
    best = min(times, key=times.get)
    _TUNED[key] = (best, times)
    return best


def tuned_configs() -> list[dict]:
    """The tuning table: per key (kernel, M bucket, N, K, bits, group, dtype, device) the chosen config's label
    and fields, and every candidate's median microseconds."""
    table = []
    for (kernel, bucket, n, k, bits, group, dtype, device), (best, times) in _TUNED.items():
        table.append(
            dict(
                kernel=kernel,
                m_bucket=bucket,
                n=n,
                k=k,
                bits=bits,
                group_size=group,
                dtype=str(dtype).removeprefix("torch."),
                device=str(device),
                best=best.label,
                config=asdict(best),
                candidates_us={c.label: us for c, us in times.items()},
            )
        )
    return table


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


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 on CPU (the interpreter), so FILL still splits K there."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gemv_candidates(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[GemvConfig]:
    """`GEMV_CANDIDATES` for this shape, K tiles fitted to M and the group, FILL resolved, duplicates dropped;
    the first one is the default."""
    block_m = _pow2(m)
    configs = []
    for block_n, block_k, num_warps, num_stages, split_k in GEMV_CANDIDATES:
        block_k = _fit_block_k(max(16, block_k // block_m), group_size)
        if split_k == FILL:
            split_k = max(1, min(16, _cdiv(2 * _sm_count(device), _cdiv(n, block_n)), k // block_k))
        configs.append(GemvConfig(block_n, block_k, num_warps, num_stages, split_k))
    return list(dict.fromkeys(configs))


def gemm_candidates(m: int, group_size: int) -> list[GemmConfig]:
    """`GEMM_CANDIDATES` for M <= 64 (`GEMM_LARGE_M` above), K tiles fitted to the group; the first the default."""
    if m > 64:
        configs = [GEMM_LARGE_M]
    else:
        block_m = max(16, _pow2(m))
        configs = [GemmConfig(block_m, bn, bk, w, s) for bn, bk, w, s in GEMM_CANDIDATES]
    return list(
        dict.fromkeys(
            GemmConfig(c.block_m, c.block_n, _fit_block_k(c.block_k, group_size), c.num_warps, c.num_stages)
            for c in configs
        )
    )


def quant_gemv(
    x: torch.Tensor,
    planes: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Decode matmul: x (M <= 8, K) @ W.T -> (M, N) in x's dtype, with W given by `pack_for_triton` planes,
    scales float32 (k_groups, N) and zero points uint8 (k_groups, N). config: the launch (default: tuned)."""
    m, n, k, lo_bits = _check(x, planes, scales, zeros, bits)
    if m > GEMV_MAX_M:
        raise ValueError(f"the GEMV takes at most {GEMV_MAX_M} rows, got {m}")

    def launch(config: GemvConfig) -> torch.Tensor:
        k_per_split = _cdiv(_cdiv(k, config.split_k), config.block_k) * config.block_k
        split_k = _cdiv(k, k_per_split)
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)  # (M, N)
        part = out if split_k == 1 else torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
        _gemv_kernel[(_cdiv(n, config.block_n), split_k)](
            x,
            planes[0],
            planes[-1],
            scales,
            zeros,
            part,
            m,
            n,
            k,
            x.stride(0),
            k_per_split,
            GROUP=group_size,
            HI_BITS=TRITON_PLANE_BITS[bits][0],
            LO_BITS=lo_bits,
            EVEN_GROUPS=group_size % config.block_k == 0,
            BLOCK_M=_pow2(m),
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if split_k > 1:
            _sum_splits_kernel[(_cdiv(m * n, 1024),)](part, out, m * n, split_k, BLOCK=1024, num_warps=4)
        return out

    if config is None:
        key = ("gemv", _pow2(m), n, k, bits, group_size, x.dtype, x.device)
        config = _tuned(key, lambda: gemv_candidates(m, n, k, group_size, x.device), launch, x)
    return launch(config)


def quant_gemm(
    x: torch.Tensor,
    planes: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Prefill matmul: x (M, K) @ W.T -> (M, N) in x's dtype (arguments as `quant_gemv`), any M."""
    m, n, k, lo_bits = _check(x, planes, scales, zeros, bits)

    def launch(config: GemmConfig) -> torch.Tensor:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)  # (M, N)
        grid = (_cdiv(m, config.block_m) * _cdiv(n, config.block_n),)
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
            EVEN_GROUPS=group_size % config.block_k == 0,
            DOT_IN_FP32=_interpreting() and x.dtype == torch.bfloat16,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_M=8,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        return out

    if config is None:
        bucket = 128 if m > 64 else max(16, _pow2(m))
        key = ("gemm", bucket, n, k, bits, group_size, x.dtype, x.device)
        config = _tuned(key, lambda: gemm_candidates(m, group_size), launch, x)
    return launch(config)


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
