"""Lower ``QuantLinear`` to ONNX Runtime low-bit ops: MatMulNBits bit planes, GatherBlockQuantized embeddings.

A b-bit code is split into planes of 4/2/8 stored bits (kernels.packing.PLANE_BITS: 6 = 4+2, 3 = 2+1, ...);
each plane is one MatMulNBits whose scales carry the plane's power-of-two weight, and the planes' outputs are
summed. Dequantization is linear in the code, so the sum equals the b-bit matmul exactly. A quantized lm_head
tied to the embedding shares its packed planes with a GatherBlockQuantized lookup (one copy on disk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from edgepack.compressor.quantize import QuantLinear, lowering_block_size
from edgepack.exporter.builder import (
    EMBEDDING_LOWERINGS,
    MS_DOMAIN,
    PREPARERS,
    Builder,
    register_lowering,
    to_numpy,
)
from edgepack.kernels.packing import pack_nbits, pack_zero_points, split_planes


@dataclass
class PackedPlane:
    data: ir.Value  # uint8 (N, k_blocks, block * bits / 8), an initializer or folded from one
    scales: ir.Value  # (N * k_blocks,) activation dtype, times the plane's 2**shift
    zero_points: ir.Value | None  # packed uint8, None when all equal the kernel default 2**(bits-1)
    bits: int
    block: int


def expand_groups(a: np.ndarray, group: int, block: int, k: int) -> np.ndarray:
    """Per-group values (N, G) as per-block values (N, k_blocks): per-channel rows repeat their one value."""
    if group == block:
        return a
    k_blocks = -(-k // block)
    return np.repeat(a[:, :1], k_blocks, axis=1)


def pack_bits1(codes: np.ndarray, block: int) -> np.ndarray:
    """A 1-bit plane (N, K) packed 8 codes per byte, low bit first: uint8 (N, k_blocks, block / 8)."""
    n, k = codes.shape
    k_blocks = -(-k // block)
    padded = np.zeros((n, k_blocks * block), np.uint8)
    padded[:, :k] = codes
    return np.packbits(padded, axis=1, bitorder="little").reshape(n, k_blocks, block // 8)


def expand_bits1(b: Builder, packed: ir.Value, n: int, k_blocks: int, block: int) -> ir.Value:
    """1-bit packed plane -> MatMulNBits 2-bit layout (N, k_blocks, block / 4), from initializers only.

    Every input is constant, so ONNX Runtime folds this at session load: the file holds 1 bit per weight and
    the kernel gets the 2-bit layout it needs.
    """
    shifts = b.const(np.arange(8, dtype=np.uint8))
    bits = b.op(
        "BitwiseAnd",
        b.op("BitShift", b.op("Unsqueeze", packed, b.ints(-1)), shifts, direction="RIGHT"),
        b.const(np.array(1, np.uint8)),
    )  # (N, kb, block/8, 8): element 8j+i is bit i of byte j
    quads = b.op("Cast", b.op("Reshape", bits, b.ints(n, k_blocks, block // 4, 4)), to=ir.DataType.INT32)
    weights = b.const(np.array([1, 4, 16, 64], np.int32))
    packed2 = b.op("ReduceSum", b.op("Mul", quads, weights), b.ints(-1), keepdims=0)
    return b.op("Cast", packed2, to=ir.DataType.UINT8)


def packed_planes(b: Builder, module: QuantLinear, name: str) -> list[PackedPlane]:
    """The module's planes as initializers, created once per module however many nodes use them.

    On disk each plane keeps its logical width (a 1-bit plane is stored packed 8 per byte and widened to
    2 bits by constant-foldable ops) and all planes share one set of scales (each plane multiplies it by its
    power of two in the graph), so a b-bit weight costs b bits plus one scale and zero point per group.
    """
    key = ("planes", id(module))
    if key in b._by_key:
        return b._by_key[key]
    n, k = module.codes.shape
    block = lowering_block_size(module.group_size, k)
    k_blocks = -(-k // block)
    codes = module.codes.cpu().numpy()
    zps = expand_groups(module.zero_points.cpu().numpy(), module.group_size, block, k)
    base = expand_groups(module.scales.float().cpu().numpy(), module.group_size, block, k)
    base_v = b.weight(f"{name}.scales", base.astype(b.np_dtype).reshape(-1))
    split = split_planes(codes, zps, module.bits)
    planes, stored = [], [base_v]
    for j, plane in enumerate(split):
        suffix = "" if len(split) == 1 else f".plane{j}"
        if plane.bits == 1:
            raw = b.weight(f"{name}.qweight{suffix}", pack_bits1(plane.codes, block))
            data = expand_bits1(b, raw, n, k_blocks, block)
        else:
            raw = data = b.weight(
                f"{name}.qweight{suffix}", pack_nbits(plane.codes, plane.storage_bits, block)
            )
        scale_v = base_v if plane.shift == 0 else b.op("Mul", base_v, b.scalar(2.0**plane.shift))
        zp_v = None
        if not np.all(plane.zero_points == 2 ** (plane.storage_bits - 1)):
            zp_v = b.weight(f"{name}.qzeros{suffix}", pack_zero_points(plane.zero_points, plane.storage_bits))
            stored.append(zp_v)
        stored.append(raw)
        planes.append(PackedPlane(data, scale_v, zp_v, plane.storage_bits, block))
    b._by_key[key] = planes
    b.quant_layers[name] = {
        "planes": [p.bits for p in split],
        "block": block,
        "bytes": sum(v.const_value.nbytes for v in stored),
    }
    return planes


@register_lowering(QuantLinear)
def lower_quant_linear(b: Builder, x: ir.Value, module: QuantLinear, name: str) -> ir.Value:
    """y = sum over planes of MatMulNBits(x, plane) (+ bias)."""
    n, k = module.codes.shape
    y = None
    for p in packed_planes(b, module, name):
        inputs = [x, p.data, p.scales] + ([p.zero_points] if p.zero_points is not None else [])
        out = b.op(
            "MatMulNBits",
            *inputs,
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=p.bits,
            block_size=p.block,
            accuracy_level=4 if module.abits == 8 else 0,  # 4: int8 activations (W*A8 compute)
        )
        y = out if y is None else b.op("Add", y, out)
    if module.bias is not None:
        y = b.op("Add", y, b.weight(f"{name}.bias", to_numpy(module.bias, b.np_dtype), key=id(module.bias)))
    return y


def lower_quant_embedding(b: Builder, head: QuantLinear, input_ids: ir.Value, name: str) -> ir.Value:
    """Embedding rows straight from the packed lm_head planes: sum of GatherBlockQuantized per plane."""
    n, k = head.codes.shape
    y = None
    for p in packed_planes(b, head, name):
        data = b.op("Reshape", p.data, b.ints(n, -1))  # (V, k_blocks * blob): same bytes, 2-D view
        scales = b.op("Reshape", p.scales, b.ints(n, -1))
        inputs = [data, input_ids, scales]
        if p.zero_points is not None:
            inputs.append(b.op("Reshape", p.zero_points, b.ints(n, -1)))
        out = b.op(
            "GatherBlockQuantized",
            *inputs,
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=p.block,
            bits=p.bits,
        )  # (B, S, k_padded)
        y = out if y is None else b.op("Add", y, out)
    padded = -(-k // p.block) * p.block
    if padded != k:
        y = b.op("Slice", y, b.ints(0), b.ints(k), b.ints(-1))
    return y


EMBEDDING_LOWERINGS[QuantLinear] = lower_quant_embedding
PREPARERS[QuantLinear] = packed_planes
