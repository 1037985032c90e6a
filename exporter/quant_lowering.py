"""Lower ``QuantLinear`` to ONNX Runtime low-bit ops: MatMulNBits, GatherBlockQuantized embeddings.

How a b-bit weight is stored and run is its lowering (kernels.packing.kernel_bits / storage_of), chosen per
width from bench/lowering.py's measurements:

- "widened" (the default): one MatMulNBits at the next kernel width (3 -> 4 bits, 5..7 -> 8 bits), the
  codes stored in that kernel's layout: nothing to do at load, RAM as the wider width.
- "compact": the same single kernel, but the file keeps the codes split into planes of logical width
  (PLANE_BITS: 3 = 2+1, 6 = 4+2, ...; a 1-bit plane packed 8 per byte) and uint8 nodes that read only
  initializers recombine them, which ONNX Runtime folds at session load: b bits a weight on disk, a higher
  transient RAM peak while loading.
- "planes": one MatMulNBits per plane with the plane's power of two on its scales, outputs summed.

Either way the result equals the b-bit dequantized matmul. Activations: int8 per block inside the kernel
(accuracy_level 4, the fast CPU path) unless the build asks for float activations (accuracy_level 0, exact
against the fake-quant model). A quantized lm_head tied to the embedding shares its packed weight with a
GatherBlockQuantized lookup (one copy on disk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from edgepack.compressor.quantize import QTensor, QuantLinear, lowering_block_size
from edgepack.exporter.builder import (
    EMBEDDING_LOWERINGS,
    JOIN_MODULES,
    KERNEL_WEIGHTS,
    MS_DOMAIN,
    Builder,
    KernelWeight,
    matmuls_plus_bias,
    register_lowering,
    to_numpy,
)
from edgepack.kernels.packing import (
    Plane,
    kernel_bits,
    pack_nbits,
    pack_zero_points,
    split_planes,
    storage_of,
)

from edgepack.artifact import bias_name, qweight_name, qzeros_name, scales_name

ACCURACY_LEVEL = {"int8": 4, "float": 0}


@dataclass
class StoredPlane:
    raw: ir.Value  # uint8: (N, k_blocks, block / 8) for a 1-bit plane, else MatMulNBits layout
    zero_points: ir.Value | None  # packed at the plane's storage width; None = kernel default (or widened)
    bits: int  # logical width
    shift: int


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


def unpack_codes(b: Builder, raw: ir.Value, bits: int, n: int, k_blocks: int, block: int) -> ir.Value:
    """Packed plane -> one uint8 code per weight (N, k_blocks, block), with uint8 ops only (folded at load)."""
    if bits == 8:
        return raw
    shifts = b.const(np.arange(0, 8, bits, dtype=np.uint8))
    codes = b.prep(
        "BitwiseAnd",
        b.prep("BitShift", b.prep("Unsqueeze", raw, b.ints(-1)), shifts, direction="RIGHT"),
        b.const(np.array((1 << bits) - 1, np.uint8)),
    )  # (N, kb, block / per_byte, per_byte): element per_byte*j + i is field i of byte j
    return b.prep("Reshape", codes, b.ints(n, k_blocks, block))


def pack_codes(b: Builder, codes: ir.Value, bits: int, n: int, k_blocks: int, block: int) -> ir.Value:
    """uint8 codes (N, k_blocks, block) -> MatMulNBits layout at ``bits`` (2, 4 or 8), low bits first."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    fields = b.prep("Reshape", codes, b.ints(n, k_blocks, block // per_byte, per_byte))
    out = None
    for i in range(per_byte):
        part = b.prep("Slice", fields, b.ints(i), b.ints(i + 1), b.ints(-1))
        if i:
            part = b.prep("BitShift", part, b.const(np.array(i * bits, np.uint8)), direction="LEFT")
        out = part if out is None else b.prep("BitwiseOr", out, part)
    return b.prep("Squeeze", out, b.ints(-1))


def stored_planes(
    b: Builder, module: QuantLinear, name: str, kernel: int | None, storage: str
) -> list[StoredPlane]:
    """The module's stored planes as initializers (created once per module however many nodes use them).

    ``storage`` "kernel": one plane in the ``kernel``-bit layout. Otherwise each plane keeps its logical width
    and all planes share one scale tensor, so a b-bit weight costs b bits plus one scale (and zero point) per
    block; zero points per plane, or ("compact") once at the kernel width.
    """
    key = ("stored", id(module))
    if key in b._by_key:
        return b._by_key[key]
    n, k = module.codes.shape
    block = lowering_block_size(module.group_size, k)
    codes = module.codes.cpu().numpy()
    zps = expand_groups(module.zero_points.cpu().numpy(), module.group_size, block, k)
    base = expand_groups(module.scales.float().cpu().numpy(), module.group_size, block, k)
    scales = b.weight(scales_name(name), base.astype(b.np_dtype).reshape(-1))  # the target's dtype
    if storage == "kernel":
        split = [Plane(codes, zps, shift=0, bits=kernel, storage_bits=kernel)]
    else:
        split = split_planes(codes, zps, module.bits)
    widened = storage == "compact"
    planes, stored = [], [scales]
    for j, plane in enumerate(split):
        if plane.bits == 1:
            raw = b.weight(qweight_name(name, j, len(split)), pack_bits1(plane.codes, block))
        else:
            raw = b.weight(
                qweight_name(name, j, len(split)), pack_nbits(plane.codes, plane.storage_bits, block)
            )
        zp = None
        if not widened and not np.all(plane.zero_points == 2 ** (plane.storage_bits - 1)):
            zp = b.weight(
                qzeros_name(name, j, len(split)), pack_zero_points(plane.zero_points, plane.storage_bits)
            )
            stored.append(zp)
        stored.append(raw)
        planes.append(StoredPlane(raw, zp, plane.bits, plane.shift))
    if widened:
        stored.append(b.weight(qzeros_name(name), pack_zero_points(zps, kernel)))
    b._by_key[key] = planes
    b._by_key[("scales", id(module))] = scales
    b.quant_layers[name] = {
        "planes": [p.bits for p in split],
        "block": block,
        "kernel_bits": kernel,  # None: one MatMulNBits per plane
        "storage": storage,  # kernels.packing.storage_of
        "bytes": sum(v.const_value.nbytes for v in stored),
    }
    return planes


def quant_kernel_weights(b: Builder, module: QuantLinear, name: str) -> list[KernelWeight]:
    """What MatMulNBits reads for this module: one weight when widened, one per plane otherwise."""
    key = ("kernel", id(module))
    if key in b._by_key:
        return b._by_key[key]
    n, k = module.codes.shape
    kernel = kernel_bits(module.bits, b.opts.lowering, b.opts.activations)
    storage = storage_of(module.bits, b.opts.lowering, b.opts.activations)
    planes = stored_planes(b, module, name, kernel, storage)
    scales = b._by_key[("scales", id(module))]
    block = lowering_block_size(module.group_size, k)
    k_blocks = -(-k // block)
    level = 4 if module.abits == 8 else ACCURACY_LEVEL[b.opts.activations]
    if storage == "kernel" or (kernel is not None and len(planes) == 1):
        weights = [KernelWeight(planes[0].raw, scales, planes[0].zero_points, kernel, block, k, n, level)]
    elif kernel is not None:  # compact: recombine the planes into the kernel layout (folded at load)
        codes = None
        for p in planes:
            plane = unpack_codes(b, p.raw, p.bits, n, k_blocks, block)
            if p.shift:
                plane = b.prep("BitShift", plane, b.const(np.array(p.shift, np.uint8)), direction="LEFT")
            codes = plane if codes is None else b.prep("BitwiseOr", codes, plane)
        data = pack_codes(b, codes, kernel, n, k_blocks, block)
        weights = [KernelWeight(data, scales, b.initializers[qzeros_name(name)], kernel, block, k, n, level)]
    else:
        weights = []
        for p in planes:
            data = p.raw
            if p.bits == 1:  # widen the 1-bit plane to the 2-bit kernel layout
                data = pack_codes(b, unpack_codes(b, p.raw, 1, n, k_blocks, block), 2, n, k_blocks, block)
            scale = scales if p.shift == 0 else b.prep("Mul", scales, b.scalar(2.0**p.shift))
            weights.append(KernelWeight(data, scale, p.zero_points, max(p.bits, 2), block, k, n, level))
    b._by_key[key] = weights
    return weights


KERNEL_WEIGHTS[QuantLinear] = quant_kernel_weights


def join_quant_linears(modules: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear whose codes, scales and zero points are the parts' stacked along N (its bias is not
    set: the packed bias is stored separately), or None when the parts differ in format (mixed precision)."""
    formats = {(m.bits, m.group_size, m.abits, m.symmetric, m.in_features) for m in modules}
    if len(formats) != 1:
        return None
    first = modules[0]
    q = QTensor(
        torch.cat([m.codes for m in modules]),
        torch.cat([m.scales for m in modules]),
        torch.cat([m.zero_points for m in modules]),
        first.bits,
        first.group_size,
    )
    return QuantLinear(q, None, first.abits, first.symmetric)


JOIN_MODULES[QuantLinear] = join_quant_linears


@register_lowering(QuantLinear)
def lower_quant_linear(b: Builder, x: ir.Value, module: QuantLinear, name: str) -> ir.Value:
    """y = sum over kernel weights of MatMulNBits(x, w) (+ bias)."""
    bias = None
    if module.bias is not None:
        bias = b.weight(bias_name(name), to_numpy(module.bias, b.np_dtype), key=id(module.bias))
    return matmuls_plus_bias(b, x, quant_kernel_weights(b, module, name), bias)


def unpack_rows(b: Builder, rows: ir.Value, bits: int) -> ir.Value:
    """(B, S, R) uint8 packed codes -> (B, S, R * 8 / bits) float32 codes, low bits first (MatMulNBits' order).

    Float arithmetic (c = floor(x / 2^(bits i)) - 2^bits floor(x / 2^(bits (i + 1)))) is exact on 0..255 and
    runs on every execution provider, unlike the bitwise ops."""
    x = b.op("Cast", rows, to=ir.DataType.FLOAT)
    per_byte = 8 // bits
    if per_byte == 1:
        return x
    parts, low = [], x
    for i in range(per_byte):
        high = b.op("Floor", b.op("Div", x, b.const(np.float32(2 ** (bits * (i + 1))))))
        parts.append(
            b.op("Unsqueeze", b.op("Sub", low, b.op("Mul", high, b.const(np.float32(2**bits)))), b.ints(-1))
        )
        low = high
    return b.op(
        "Reshape", b.op("Concat", *parts, axis=-1), b.ints(0, 0, -1)
    )  # (B, S, R, per) -> (B, S, R * per)


def zero_points_fill_bytes(w: KernelWeight) -> bool:
    """Whether a row's packed zero points fill whole bytes: then the per-row padded layout MatMulNBits uses and a
    flat array of all the rows' zero points are the same bytes."""
    return (-(-w.k // w.block) * w.bits) % 8 == 0


def gather_dequantized(b: Builder, w: KernelWeight, n: int, input_ids: ir.Value) -> ir.Value:
    """The rows of ``w`` for ``input_ids``, dequantized with standard ops from the same packed bytes: (B, S, k_pad).

    For execution providers whose GatherBlockQuantized reads zero points as one flat array (ONNX Runtime's CUDA
    kernel indexes zero point ``row * k_blocks + block``), where the rows' zero points do not fill whole bytes:
    measured on an H200 (docs/results/cuda.md), stories260k's W4 embedding (1 block per row) came out wrong on
    the CUDA EP and right on the CPU EP, which reads the padded per-row layout that MatMulNBits shares."""
    k_blocks = -(-w.k // w.block)
    data = b.prep("Reshape", w.data, b.ints(n, -1))  # (V, k_blocks * blob)
    codes = unpack_rows(b, b.op("Gather", data, input_ids, axis=0), w.bits)  # (B, S, k_pad)
    codes = b.op("Reshape", codes, b.ints(0, 0, k_blocks, w.block))
    zero_points = b.op("Gather", b.prep("Reshape", w.zero_points, b.ints(n, -1)), input_ids, axis=0)
    zero_points = b.op("Slice", unpack_rows(b, zero_points, w.bits), b.ints(0), b.ints(k_blocks), b.ints(-1))
    scales = b.op("Gather", b.prep("Reshape", w.scales, b.ints(n, -1)), input_ids, axis=0)  # (B, S, k_blocks)
    scales = b.op("Cast", scales, to=ir.DataType.FLOAT)
    y = b.op(
        "Mul",
        b.op("Sub", codes, b.op("Unsqueeze", zero_points, b.ints(-1))),
        b.op("Unsqueeze", scales, b.ints(-1)),
    )  # (B, S, k_blocks, block)
    return b.op("Cast", b.op("Reshape", y, b.ints(0, 0, -1)), to=b.ir_dtype)


def lower_quant_embedding(b: Builder, head: QuantLinear, input_ids: ir.Value, name: str) -> ir.Value:
    """Embedding rows straight from the packed lm_head: one GatherBlockQuantized per kernel weight, summed
    (standard ops instead where the target's GatherBlockQuantized would misread the zero points)."""
    n, k = head.codes.shape
    y = None
    for w in quant_kernel_weights(b, head, name):
        if (
            b.opts.gather_zero_points == "flat"
            and w.zero_points is not None
            and not zero_points_fill_bytes(w)
        ):
            out = gather_dequantized(b, w, n, input_ids)
            y = out if y is None else b.op("Add", y, out)
            continue
        data = b.prep("Reshape", w.data, b.ints(n, -1))  # (V, k_blocks * blob): same bytes, 2-D view
        scales = b.prep("Reshape", w.scales, b.ints(n, -1))
        inputs = [data, input_ids, scales]
        if w.zero_points is not None:
            inputs.append(b.prep("Reshape", w.zero_points, b.ints(n, -1)))
        out = b.op(
            "GatherBlockQuantized",
            *inputs,
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=w.block,
            bits=w.bits,
        )  # (B, S, k_padded)
        y = out if y is None else b.op("Add", y, out)
    padded = -(-k // w.block) * w.block
    if padded != k:
        y = b.op("Slice", y, b.ints(0), b.ints(k), b.ints(-1))
    return y


EMBEDDING_LOWERINGS[QuantLinear] = lower_quant_embedding
