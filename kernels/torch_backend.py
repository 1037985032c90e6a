"""PyTorch linear layer on low-bit weights: Triton kernels on CUDA, an exact pure-torch fallback elsewhere.

Usage (codes, scales, zero points as the quantizer produces them: uint8 (N, K), float32 (N, k_groups),
uint8 (N, k_groups), W = (codes - zp) * scale per group of `group_size` along K)::

    layer = TritonQuantLinear(codes, scales, zero_points, bits=4, group_size=128, bias=None).to("cuda")
    y = layer(x)  # x (..., K) float16 or bfloat16 -> (..., N) in x's dtype

It replaces an `nn.Linear(K, N)` in a model (e.g. every projection of a decoder block, see
`bench/kernel_speed.py --e2e`). On CUDA it runs the split-K GEMV for M <= 8 rows (decode) and the tiled GEMM
otherwise (prefill); with no CUDA device it computes the same math in torch (`quantized_linear_reference`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from edgepack.kernels.packing import TRITON_PLANE_BITS, pack_for_triton
from torch import nn


def _unpack_plane(words: torch.Tensor, plane_bits: int, k: int) -> torch.Tensor:
    """K-major int32 words (K_pad * b // 32, N) -> plane codes int32 (K, N)."""
    per_word = 32 // plane_bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * plane_bits
    values = (words[:, None, :] >> shifts[None, :, None]) & ((1 << plane_bits) - 1)  # (K_pad/per, per, N)
    return values.reshape(-1, words.shape[1])[:k]


def quantized_linear_reference(
    x: torch.Tensor,
    planes: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch x (..., K) @ W.T (+ bias) on the Triton packed layout, in float32, returned in x's dtype.

    The same dequantization as the kernels and `reference.dequantize`; the fallback without a CUDA device.
    """
    k = x.shape[-1]
    plane_bits = TRITON_PLANE_BITS[bits]
    q = _unpack_plane(planes[0], plane_bits[0], k)  # (K, N)
    if len(plane_bits) == 2:
        q = (q << plane_bits[1]) | _unpack_plane(planes[1], plane_bits[1], k)
    groups = torch.arange(k, device=x.device) // group_size  # (K,)
    w = (q.float() - zeros[groups].float()) * scales[groups]  # (K, N)
    y = x.float() @ w  # (..., N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class TritonQuantLinear(nn.Module):
    """`nn.Linear` replacement holding `bits`-bit weights in the `pack_for_triton` layout (see module doc)."""

    def __init__(
        self,
        codes: np.ndarray,
        scales: np.ndarray,
        zero_points: np.ndarray,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        codes = np.asarray(codes, dtype=np.uint8)
        self.out_features, self.in_features = codes.shape
        k_groups = -(-self.in_features // group_size)
        scales = np.asarray(scales, dtype=np.float32)
        zero_points = np.asarray(zero_points, dtype=np.uint8)
        if scales.shape != (self.out_features, k_groups) or zero_points.shape != scales.shape:
            raise ValueError(
                f"scales and zero points must be ({self.out_features}, {k_groups}) for K={self.in_features} "
                f"and group_size={group_size}, got {scales.shape} and {zero_points.shape}"
            )
        self.bits = bits
        self.group_size = group_size
        packed = pack_for_triton(codes, bits)
        self.num_planes = len(packed)
        for i, words in enumerate(packed):
            self.register_buffer(f"qweight{i}", torch.from_numpy(words))  # (K_pad * b_i // 32, N) int32
        self.register_buffer("scales", torch.from_numpy(np.ascontiguousarray(scales.T)))  # (k_groups, N)
        self.register_buffer("zeros", torch.from_numpy(np.ascontiguousarray(zero_points.T)))  # (k_groups, N)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (N,)

    @property
    def planes(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"qweight{i}") for i in range(self.num_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N). The Triton kernels run on CUDA tensors, or on CPU under TRITON_INTERPRET=1."""
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            return quantized_linear_reference(
                x, self.planes, self.scales, self.zeros, self.bits, self.group_size, self.bias
            )
        from edgepack.kernels.triton_matmul import quant_matmul

        x2 = x.reshape(-1, self.in_features).contiguous()  # (M, K)
        y = quant_matmul(x2, self.planes, self.scales, self.zeros, self.bits, self.group_size)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
