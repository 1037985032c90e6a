"""NumPy reference dequantization: the ground truth every packed layout and kernel is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from edgepack.kernels.packing import Plane


def _expand_groups(values: np.ndarray, group_size: int, k: int) -> np.ndarray:
    """Repeat per-group values (N, k_groups) along K to (N, K)."""
    return np.repeat(values, group_size, axis=1)[:, :k]


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, group_size: int) -> np.ndarray:
    """W[n, k] = (codes[n, k] - zp[n, k // g]) * scale[n, k // g], float32 (N, K)."""
    n, k = codes.shape
    k_groups = np.shape(scales)[1]
    if k_groups * group_size == k:  # whole groups: broadcast per group instead of repeating (N, K) copies
        w = np.asarray(codes).reshape(n, k_groups, group_size).astype(np.float32)
        w -= np.asarray(zero_points, dtype=np.float32)[:, :, None]
        w *= np.asarray(scales, dtype=np.float32)[:, :, None]
        return w.reshape(n, k)
    scale = _expand_groups(np.asarray(scales, dtype=np.float32), group_size, k)  # (N, K)
    zero = _expand_groups(np.asarray(zero_points, dtype=np.float32), group_size, k)  # (N, K)
    return ((codes.astype(np.float32) - zero) * scale).astype(np.float32)


def dequantize_planes(planes: Sequence[Plane], scales: np.ndarray, group_size: int) -> np.ndarray:
    """Sum of the planes' dequantized weights, each plane scaled by scales * 2**shift, float32 (N, K)."""
    scales = np.asarray(scales, dtype=np.float32)
    return sum(
        dequantize(p.codes, scales * np.float32(2**p.shift), p.zero_points, group_size) for p in planes
    )
