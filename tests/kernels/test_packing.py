"""Packing round trips, exact bit-plane splits, and the layout pinned against ONNX Runtime's MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgepack.kernels.packing import (
    PLANE_BITS,
    Plane,
    lowered_bytes,
    pack_nbits,
    pack_zero_points,
    split_planes,
    stored_bits_per_weight,
    unpack_nbits,
)
from edgepack.kernels.reference import dequantize, dequantize_planes
from onnx import TensorProto, helper, numpy_helper


def _random_quant(rng: np.random.Generator, n: int, k: int, bits: int, group: int):
    """Random codes (N, K), positive scales and asymmetric zero points (N, k_groups)."""
    k_groups = -(-k // group)
    codes = rng.integers(0, 2**bits, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, k_groups)).astype(np.float32)
    zero_points = rng.integers(0, 2**bits, size=(n, k_groups), dtype=np.uint8)
    return codes, scales, zero_points


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("k", [16, 100, 256])
def test_pack_round_trip(bits: int, block_size: int, k: int) -> None:
    rng = np.random.default_rng(bits * 1000 + block_size + k)
    codes = rng.integers(0, 2**bits, size=(5, k), dtype=np.uint8)
    packed = pack_nbits(codes, bits, block_size)
    k_blocks = -(-k // block_size)
    assert packed.shape == (5, k_blocks, block_size * bits // 8)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_nbits(packed, bits, k), codes)


def test_pack_bit_order() -> None:
    codes = np.array([[1, 2, 3, 0] + [0] * 12], dtype=np.uint8)  # (1, 16)
    assert pack_nbits(codes, 4, 16)[0, 0, :2].tolist() == [0x21, 0x03]
    assert pack_nbits(codes, 2, 16)[0, 0, 0] == 1 | 2 << 2 | 3 << 4
    assert pack_zero_points(np.array([[1, 2, 3]], dtype=np.uint8), 4).tolist() == [0x21, 0x03]
    assert pack_zero_points(np.array([[1, 2, 3], [3, 0, 1]], dtype=np.uint8), 2).tolist() == [
        1 | 2 << 2 | 3 << 4,
        3 | 1 << 4,
    ]


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2, 4 or 8"):
        pack_nbits(np.zeros((2, 16), np.uint8), 3, 16)
    with pytest.raises(ValueError, match="power of 2"):
        pack_nbits(np.zeros((2, 16), np.uint8), 4, 24)
    with pytest.raises(ValueError, match="exceed"):
        pack_nbits(np.full((2, 16), 4, np.uint8), 2, 16)


@pytest.mark.parametrize("bits", sorted(PLANE_BITS))
@pytest.mark.parametrize("symmetric", [False, True])
def test_split_planes_exact(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(bits)
    group = 32
    codes, scales, zero_points = _random_quant(rng, 7, 96, bits, group)
    if symmetric:
        zero_points = np.full_like(zero_points, 2 ** (bits - 1))
    planes = split_planes(codes, zero_points, bits)
    assert tuple(p.bits for p in planes) == PLANE_BITS[bits]
    assert [p.shift for p in planes] == sorted((p.shift for p in planes), reverse=True)
    assert planes[-1].shift == 0
    for p in planes:
        assert p.storage_bits in (2, 4, 8)
        assert int(p.codes.max()) < 2**p.bits and int(p.zero_points.max()) < 2**p.bits
    # Integer identity first, then the float dequantization it implies.
    q = sum(p.codes.astype(np.int32) << p.shift for p in planes)
    z = sum(p.zero_points.astype(np.int32) << p.shift for p in planes)
    np.testing.assert_array_equal(q, codes)
    np.testing.assert_array_equal(z, zero_points)
    np.testing.assert_allclose(
        dequantize_planes(planes, scales, group), dequantize(codes, scales, zero_points, group), rtol=1e-6
    )


def test_stored_bits_per_weight() -> None:
    # 4-bit, group 128, fp32 scales, asymmetric: 4 + 32/128 + 4/128.
    assert stored_bits_per_weight(4, 128) == pytest.approx(4 + 0.25 + 4 / 128)
    # Symmetric 4-bit needs no zero points.
    assert stored_bits_per_weight(4, 128, asymmetric=False) == pytest.approx(4.25)
    # 3 bits = 2-bit plane + 1-bit plane packed 8 per byte, one shared (fp16) scale; the low plane keeps its zp.
    assert stored_bits_per_weight(3, 64, scale_bytes=2, asymmetric=False) == pytest.approx(
        2 + 1 + 16 / 64 + 2 / 64
    )
    # 6 bits = 4 + 2 planes, one fp32 scale, a zero point per plane.
    assert stored_bits_per_weight(6, 32) == pytest.approx(4 + 2 + 32 / 32 + 4 / 32 + 2 / 32)


def test_lowered_bytes_counts_row_padding() -> None:
    # K=64, block 32: 2 blocks per row; each plane's 2 zero points (2 bits each) pad to one byte per row.
    assert lowered_bytes(10, 64, 3, 32) == 10 * 2 * 4 + 10 * 64 * 3 // 8 + 10 * 1 + 10 * 1
    # K not a multiple of the block is padded to whole blocks.
    assert lowered_bytes(1, 100, 4, 64, symmetric=True) == 2 * 4 + 128 // 2


def _matmulnbits_model(planes: list[Plane], scales: np.ndarray, k: int, block: int, level: int) -> bytes:
    """One MatMulNBits node per plane, plane scales pre-multiplied by 2**shift, outputs summed."""
    n = planes[0].codes.shape[0]
    nodes, inits, outs = [], [], []
    for i, p in enumerate(planes):
        plane_scales = (scales * np.float32(2**p.shift)).astype(np.float32).reshape(-1)  # (N * k_blocks,)
        inits += [
            numpy_helper.from_array(pack_nbits(p.codes, p.storage_bits, block), f"B{i}"),
            numpy_helper.from_array(plane_scales, f"S{i}"),
            numpy_helper.from_array(pack_zero_points(p.zero_points, p.storage_bits), f"Z{i}"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["A", f"B{i}", f"S{i}", f"Z{i}"],
                [f"Y{i}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=p.storage_bits,
                block_size=block,
                accuracy_level=level,
            )
        )
        outs.append(f"Y{i}")
    nodes.append(helper.make_node("Sum", outs, ["Y"]))
    graph = helper.make_graph(
        nodes,
        "planes",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _run_ort(model: bytes, a: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


@pytest.mark.parametrize("bits", sorted(PLANE_BITS))
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_matmulnbits_matches_reference(bits: int, block: int) -> None:
    """Our packing, run by ORT's own kernel, equals A @ dequantize(...).T; K is not a multiple of block."""
    rng = np.random.default_rng(bits * 131 + block)
    n, k = 24, 3 * block + 8
    codes, scales, zero_points = _random_quant(rng, n, k, bits, block)
    a = rng.standard_normal((3, k)).astype(np.float32)
    planes = split_planes(codes, zero_points, bits)
    got = _run_ort(_matmulnbits_model(planes, scales, k, block, level=0), a)
    want = a @ dequantize(codes, scales, zero_points, block).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_matmulnbits_int8_activations_close(bits: int) -> None:
    """accuracy_level=4 quantizes activations to int8 on CPU: the result stays within about 1% of exact."""
    rng = np.random.default_rng(bits)
    n, k, block = 32, 256 + 32, 32
    codes, scales, zero_points = _random_quant(rng, n, k, bits, block)
    a = rng.standard_normal((4, k)).astype(np.float32)
    planes = split_planes(codes, zero_points, bits)
    got = _run_ort(_matmulnbits_model(planes, scales, k, block, level=4), a)
    want = a @ dequantize(codes, scales, zero_points, block).T
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 2e-2
