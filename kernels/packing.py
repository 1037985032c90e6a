"""Bit packing of quantized weight codes into ONNX Runtime's `com.microsoft.MatMulNBits` layout.

MatMulNBits only has 2-, 4- and 8-bit kernels. Other widths are split into bit planes (the ABQ-LLM
decomposition): a b-bit code q = sum_j plane_j * 2**shift_j, so A @ W = sum_j 2**shift_j * (A @ W_j),
and each plane runs as its own MatMulNBits node with its scales multiplied by 2**shift_j.

Conventions: codes are uint8 (N, K) in [0, 2**bits), scales float32 (N, k_groups) and zero points uint8
(N, k_groups), k_groups = ceil(K / group_size), dequantized as W[n, k] = (q - z) * s per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STORAGE_BITS = (2, 4, 8)

# Logical bits of each plane, most significant plane first; a 1-bit plane is stored as a 2-bit one.
PLANE_BITS: dict[int, tuple[int, ...]] = {
    2: (2,),
    3: (2, 1),
    4: (4,),
    5: (4, 1),
    6: (4, 2),
    7: (4, 2, 1),
    8: (8,),
}


def _check_storage_bits(bits: int) -> None:
    if bits not in STORAGE_BITS:
        raise ValueError(f"MatMulNBits stores 2, 4 or 8 bits per weight, got bits={bits}")


def _pack_rows(values: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Pack ``axis`` of uint8 `values` (length a multiple of 8 // bits) little-endian into bytes, in place of
    that axis (the last by default; `pack_for_triton` packs K-major planes along the first)."""
    per_byte = 8 // bits
    axis %= values.ndim
    shape = values.shape
    grouped = values.astype(np.uint8, copy=False).reshape(*shape[:axis], -1, per_byte, *shape[axis + 1 :])
    before = (slice(None),) * (axis + 1)  # (..., L/p, p, ...): slot j is a view at index j of the p axis
    out = grouped[(*before, 0)].copy()
    for j in range(1, per_byte):  # one shifted OR per slot: ~10x faster than a bitwise_or.reduce over slots
        out |= grouped[(*before, j)] << np.uint8(j * bits)
    return out


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `_pack_rows`: every byte of the last axis gives 8 // bits values, low bits first."""
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    values = np.empty((*packed.shape, per_byte), np.uint8)  # (..., L, per_byte)
    # one shift (and mask) per slot, written into its strided slice: ~6x faster than a broadcast shift
    for j in range(per_byte):
        np.right_shift(packed, np.uint8(j * bits), out=values[..., j])
        if j < per_byte - 1:
            values[..., j] &= mask
    return values.reshape(*packed.shape[:-1], -1)


def pack_nbits(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Pack codes (N, K) into MatMulNBits input B, uint8 (N, k_blocks, block_size * bits // 8).

    K is padded with zero codes up to k_blocks * block_size; within a byte, element order is low bits first.
    """
    _check_storage_bits(bits)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block_size must be a power of 2 >= 16, got {block_size}")
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {codes.shape}")
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(codes.max())})")
    n, k = codes.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.uint8)  # (N, k_blocks * block_size)
    padded[:, :k] = codes
    return _pack_rows(padded, bits).reshape(n, k_blocks, block_size * bits // 8)


def unpack_nbits(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack_nbits`: MatMulNBits B (N, k_blocks, blob) back to codes uint8 (N, K)."""
    _check_storage_bits(bits)
    n = packed.shape[0]
    return _unpack_rows(packed.reshape(n, -1), bits)[:, :k]


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Pack zero points (N, k_blocks) into the MatMulNBits zero_points input.

    Layout (ONNX Runtime contrib op spec): uint8 1-D of N * ceil(k_blocks * bits / 8); every row starts on a
    byte boundary and is packed low bits first, like B.
    """
    _check_storage_bits(bits)
    zero_points = np.asarray(zero_points)
    if zero_points.size and int(zero_points.max()) >= 1 << bits:
        raise ValueError(f"zero points exceed {bits} bits (max {int(zero_points.max())})")
    n, k_blocks = zero_points.shape
    per_byte = 8 // bits
    padded = np.zeros((n, -(-k_blocks // per_byte) * per_byte), dtype=np.uint8)  # (N, padded k_blocks)
    padded[:, :k_blocks] = zero_points
    return _pack_rows(padded, bits).reshape(-1)


@dataclass(frozen=True)
class Plane:
    """One bit plane of a quantized weight: its value counts `2**shift` times in the full code."""

    codes: np.ndarray  # (N, K) uint8 in [0, 2**bits)
    zero_points: np.ndarray  # (N, k_groups) uint8 in [0, 2**bits)
    shift: int
    bits: int
    storage_bits: int


def split_planes(codes: np.ndarray, zero_points: np.ndarray, bits: int) -> list[Plane]:
    """Split `bits`-bit codes and zero points into the planes of `PLANE_BITS[bits]`, most significant first.

    With z_j = (z >> shift_j) & mask_j, (q - z) * s == sum_j (plane_j - z_j) * (s * 2**shift_j) exactly.
    """
    if bits not in PLANE_BITS:
        raise ValueError(f"bits must be one of {sorted(PLANE_BITS)}, got {bits}")
    codes = np.asarray(codes, dtype=np.uint8)
    zero_points = np.asarray(zero_points, dtype=np.uint8)
    planes = []
    shift = bits
    for plane_bits in PLANE_BITS[bits]:
        shift -= plane_bits
        mask = np.uint8((1 << plane_bits) - 1)
        planes.append(
            Plane(
                codes=(codes >> np.uint8(shift)) & mask,
                zero_points=(zero_points >> np.uint8(shift)) & mask,
                shift=shift,
                bits=plane_bits,
                storage_bits=max(plane_bits, 2),
            )
        )
    return planes


# How a b-bit weight runs on ONNX Runtime's kernels (exporter/quant_lowering.py):
#   "widened": one MatMulNBits at the next kernel width (WIDENED_BITS): the b-bit codes are valid codes of
#              the wider kernel, so the result is the same; stored in the kernel's layout (no load-time work);
#   "compact": the same single kernel, but the file keeps the compact planes (b bits a weight) and
#              initializer-only nodes widen them when ONNX Runtime loads the model (constant folding: a
#              smaller file for a higher transient RAM peak at load, see bench/lowering.py);
#   "planes":  one MatMulNBits per bit plane of PLANE_BITS, outputs summed (compact file, more kernel calls).
LOWERINGS = ("auto", "widened", "compact", "planes")
WIDENED_BITS: dict[int, int] = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
# "auto" is "widened" at these kernel widths, chosen from bench/lowering.py's table (docs/results/lowering.md):
# with int8 activations (accuracy_level 4) every width runs fastest as one kernel; with float activations
# (accuracy_level 0) the 2-bit kernel is a slow fallback, so 2-bit weights run on the 4-bit kernel too.
AUTO_KERNEL_BITS: dict[str, dict[int, int]] = {
    "int8": dict(WIDENED_BITS),
    "float": {**WIDENED_BITS, 2: 4},
}


def kernel_bits(bits: int, lowering: str = "auto", activations: str = "int8") -> int | None:
    """The single kernel width a ``bits``-bit weight runs at, or None when it runs as bit planes."""
    if bits not in PLANE_BITS:
        raise ValueError(f"bits must be one of {sorted(PLANE_BITS)}, got {bits}")
    if lowering == "planes":
        return None if len(PLANE_BITS[bits]) > 1 else bits
    if lowering in ("widened", "compact"):
        return WIDENED_BITS[bits]
    if lowering == "auto":
        return AUTO_KERNEL_BITS[activations][bits]
    raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")


def storage_of(bits: int, lowering: str = "auto", activations: str = "int8") -> str:
    """How the file stores a ``bits``-bit weight: "kernel" (the kernel's layout), "compact" or "planes"."""
    kernel = kernel_bits(bits, lowering, activations)
    if kernel is None:
        return "planes"
    if kernel == bits:
        return "planes" if len(PLANE_BITS[bits]) == 1 else "kernel"
    return "compact" if lowering == "compact" else "kernel"


def lowered_bytes(
    n: int,
    k: int,
    bits: int,
    block: int,
    symmetric: bool = False,
    scale_bytes: int = 4,
    kernel: int | None = None,
    storage: str = "planes",
) -> int:
    """Exact bytes the exporter stores for one (N, K) weight (exporter/quant_lowering.py).

    One scale per block, K padded to whole blocks. ``storage`` "kernel": codes in the ``kernel``-bit layout
    and one set of zero points at that width. Otherwise each plane's codes at its logical width (a 1-bit
    plane packed 8 per byte); zero points packed per plane, each row padded to a whole byte, except where
    they equal the kernel default (the top plane of symmetric codes) — or, "compact" with a wider
    ``kernel``, one packed set at the kernel width.
    """
    if bits not in PLANE_BITS:
        raise ValueError(f"bits must be one of {sorted(PLANE_BITS)}, got {bits}")
    k_blocks = -(-k // block)
    total = n * k_blocks * scale_bytes
    if storage == "kernel" and kernel is not None and kernel != bits:
        return total + n * k_blocks * block * kernel // 8 + n * -(-k_blocks * kernel // 8)
    widened = storage == "compact" and kernel is not None and kernel != bits
    for index, plane_bits in enumerate(PLANE_BITS[bits]):
        total += n * k_blocks * block * plane_bits // 8
        if not widened and (not symmetric or index > 0):
            total += n * -(-k_blocks * max(plane_bits, 2) // 8)
    if widened:
        total += n * -(-k_blocks * kernel // 8)
    return total


def stored_bits_per_weight(
    bits: int,
    group_size: int,
    scale_bytes: int = 4,
    asymmetric: bool = True,
    kernel: int | None = None,
    storage: str = "planes",
) -> float:
    """Storage per weight in bits of the exporter's lowering in the large-K limit (see ``lowered_bytes``)."""
    k = 1 << 20
    return 8 * lowered_bytes(1, k, bits, group_size, not asymmetric, scale_bytes, kernel, storage) / k


# Planes of the GPU (Triton) layout, most significant first. Planes are packed at their logical width
# (a 1-bit plane 32 per int32), so 3-bit weights read exactly 3 bits each; the kernels take at most two planes.
TRITON_PLANE_BITS: dict[int, tuple[int, ...]] = {
    bits: planes for bits, planes in PLANE_BITS.items() if len(planes) <= 2
}


def pack_for_triton(codes: np.ndarray, bits: int) -> tuple[np.ndarray, ...]:
    """Pack codes (N, K) into K-major int32 words for the Triton kernels, one array per plane.

    Plane j of width b_j becomes int32 (K_pad * b_j // 32, N) with K_pad = K rounded up to 32: word [w, n]
    holds the plane's codes for k = w * (32 // b_j) + i at bits i * b_j (low bits first), so a program
    tile of consecutive k and n reads contiguous words. The code is q = (hi << b_lo) | lo.
    """
    if bits not in TRITON_PLANE_BITS:
        raise ValueError(f"the Triton kernels take bits in {sorted(TRITON_PLANE_BITS)}, got {bits}")
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(codes.max())})")
    n, k = codes.shape
    k_pad = -(-k // 32) * 32
    padded = np.zeros((k_pad, n), dtype=np.uint8)  # (K_pad, N)
    padded[:k] = codes.T
    words = []
    shift = bits
    for plane_bits in TRITON_PLANE_BITS[bits]:
        shift -= plane_bits
        plane = (
            padded if plane_bits == bits else (padded >> np.uint8(shift)) & np.uint8((1 << plane_bits) - 1)
        )
        # bytes along K, low bits first (K_pad * b / 8, N); word w of column n is bytes 4w..4w+3, little-endian
        packed = _pack_rows(plane, plane_bits, axis=0)
        quads = np.ascontiguousarray(packed.reshape(-1, 4, n).transpose(0, 2, 1))  # (K_pad * b / 32, N, 4)
        words.append(quads.view("<u4")[..., 0].astype(np.uint32).view(np.int32))
    return tuple(words)
