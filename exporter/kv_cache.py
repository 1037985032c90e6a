"""KV-cache layouts for the decoder graph: how past K/V enter as graph inputs and new K/V leave as outputs.

``build_decoder`` asks its layout for each layer's past K/V (B, kv, P, D) before the blocks run (``begin``) and
hands it every layer's present (restored past ++ exact new tokens) afterwards (``finish``); the layout turns
those into graph outputs. Attention itself (plain ops or a fused op) only ever sees ordinary past K/V tensors.

- ``PlainKV``: ``past_key_values.{i}.key/.value`` -> ``present.{i}.key/.value`` (optimum / onnxruntime-genai).
- ``CompressedKV``: a ``MiniCachePlan`` (compressor/minicache.py), mirrored op for op:

  per unmerged layer i, a *stream* ``past_key_values.{i}.key`` (and ``.value``):
    float:            ``...key``                              (B, kv, P, D) act dtype
    bits 8/4, token:  ``...key.codes`` uint8 (B, kv, P, D or D/2), ``.scale``/``.low`` fp16 (B, kv, P, 1)
    bits 8/4, channel:``...key.codes`` uint8 (B, kv, Pq, D or D/2), ``.scale``/``.low`` fp16 (B, kv, Pq/G, D),
                      ``.residual`` (B, kv, P - Pq, D) act dtype (the last incomplete group of G tokens)
  per merged pair (a, b):
    ``past_key_values.{a}_{b}.key.direction``[+ stream suffixes]  the shared SLERP direction, quantized if asked
    ``past_key_values.{a}.key.magnitude``, ``...{b}.key.magnitude`` (B, kv, P, 1) act dtype
    ``past_key_values.{a}_{b}.retained_index`` int64 (R,): positions kept unmerged (shared by K and V;
    R is ``past_retained_length_{a}_{b}``, one symbolic length per pair)
    ``past_key_values.{a}.key.retained``, ``...{b}.key.retained`` (B, kv, R, D): their exact vectors
  (and the same for ``value``). Every present is named ``present.`` + the input's suffix and grows along axis 2.
  ``share`` mode (the cross-layer baseline): the second layer of a pair has no KV I/O and attends over the
  first layer's past.

Bytes per token of a merged pair drop from 2 x 2 x kv x D to 2 x kv x (D + 2) (+ retained tokens); quantized
streams store D x bits / 8 bytes plus 4 bytes of fp16 scale/low per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from edgepack.compressor.minicache import MIN_SCALE, NORM_EPS, SLERP_EPS, MiniCachePlan

PAST, PRESENT = "past_key_values.", "present."
INT64_MAX = np.iinfo(np.int64).max


def retained_length(a: int, c: int) -> str:
    """The symbolic number of tokens merged pair (a, c) keeps unmerged."""
    return f"past_retained_length_{a}_{c}"


def graph_input(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    """A named graph input value."""
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


# Producers whose output becomes a present directly: GroupQueryAttention's (a shareable past/present buffer),
# a compressed stream's append (an Identity would copy the whole stored past again every step).
DIRECT_OUTPUTS = ("GroupQueryAttention", "Concat")


def name_output(b, value: ir.Value, name: str, like: ir.Value) -> ir.Value:
    """Give ``value`` the present name and ``like``'s type: a ``DIRECT_OUTPUTS`` producer's output directly,
    anything else through an Identity (its own producer, whatever a pass later rewires)."""
    producer = value.producer()
    direct = producer is not None and producer.op_type in DIRECT_OUTPUTS and not value.is_graph_output()
    out = value if direct else b.op("Identity", value)
    out.name = name
    out.type = like.type
    out.shape = ir.Shape([d if isinstance(d, int) else None for d in like.shape])
    return out


@dataclass
class PlainKV:
    """One float past/present pair per layer and kind: the layout every ONNX LLM runtime understands."""

    graph_inputs: list[ir.Value] = field(default_factory=list)
    compressed = False

    def begin(self, b, n_layers: int, dims) -> list[tuple[ir.Value, ir.Value]]:
        """Declare the past inputs; return each layer's past (K, V) (B, kv, P, D)."""
        shape = ["batch_size", dims.num_kv_heads, "past_sequence_length", dims.head_dim]
        pasts = []
        for i in range(n_layers):
            pair = tuple(graph_input(f"{PAST}{i}.{kind}", b.ir_dtype, shape) for kind in ("key", "value"))
            self.graph_inputs.extend(pair)
            pasts.append(pair)
        return pasts

    def finish(self, b, presents: list[tuple[ir.Value, ir.Value]]) -> list[ir.Value]:
        """Each layer's present K/V as graph outputs."""
        outs = []
        for i, kv in enumerate(presents):
            for value, kind, past in zip(
                kv, ("key", "value"), self.graph_inputs[2 * i : 2 * i + 2], strict=True
            ):
                outs.append(name_output(b, value, f"{PRESENT}{i}.{kind}", past))
                outs[-1].shape = ir.Shape(
                    ["batch_size", past.shape[1], "total_sequence_length", past.shape[3]]
                )
        return outs


# ----------------------------------------------------------------------------- quantizer ops (mirror minicache.py)


def to_float(b, x: ir.Value) -> ir.Value:
    return x if b.opts.dtype == "float32" else b.op("Cast", x, to=ir.DataType.FLOAT)


def to_act(b, x: ir.Value) -> ir.Value:
    return x if b.opts.dtype == "float32" else b.op("Cast", x, to=b.ir_dtype)


def quantize_groups(b, x: ir.Value, bits: int, axis: int) -> tuple[ir.Value, ir.Value, ir.Value]:
    """float32 x -> uint8 codes, fp16 scale and low over ``axis`` (keepdims), as minicache.quantize_groups."""
    f16, f32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    low = b.op("Cast", b.op("ReduceMin", x, b.ints(axis), keepdims=1), to=f16)
    low_f = b.op("Cast", low, to=f32)
    hi = b.op("ReduceMax", x, b.ints(axis), keepdims=1)
    span = b.op("Div", b.op("Sub", hi, low_f), b.const(np.float32(2**bits - 1)))
    scale = b.op("Cast", b.op("Max", span, b.const(np.float32(MIN_SCALE))), to=f16)
    q = b.op("Round", b.op("Div", b.op("Sub", x, low_f), b.op("Cast", scale, to=f32)))
    q = b.op("Clip", q, b.const(np.float32(0)), b.const(np.float32(2**bits - 1)))
    return b.op("Cast", q, to=ir.DataType.UINT8), scale, low


def dequantize_groups(b, codes: ir.Value, scale: ir.Value, low: ir.Value) -> ir.Value:
    """code * scale + low in float32 (``codes`` already float, from codes_to_float)."""
    f32 = ir.DataType.FLOAT
    return b.op("Add", b.op("Mul", codes, b.op("Cast", scale, to=f32)), b.op("Cast", low, to=f32))


# byte -> (low nibble, high nibble) as floats: int4 unpack + cast as one Gather
INT4_TABLE = np.array([[i & 15, i >> 4] for i in range(256)], np.float32)


def codes_to_float(b, codes: ir.Value, bits: int, dim: int) -> ir.Value:
    """uint8 codes (..., D or D/2 packed) -> float32 (..., D); int4 unpacks through a 256x2 table."""
    if bits == 8:
        return b.op("Cast", codes, to=ir.DataType.FLOAT)
    table = b.weight("kv_cache.int4_table", INT4_TABLE, key="kv_cache.int4_table")
    pairs = b.op("Gather", table, b.op("Cast", codes, to=ir.DataType.INT32))  # Gather indexes int32/int64
    return b.op("Reshape", pairs, b.ints(0, 0, 0, dim))  # (..., D/2, 2) -> (..., D), even index first


def pack_int4(b, codes: ir.Value, dim: int) -> ir.Value:
    """Two codes per byte along the last axis (even index in the low nibble)."""
    even = b.op("Slice", codes, b.ints(0), b.ints(dim), b.ints(-1), b.ints(2))
    odd = b.op("Slice", codes, b.ints(1), b.ints(dim), b.ints(-1), b.ints(2))
    return b.op("BitwiseOr", even, b.op("BitShift", odd, b.const(np.uint8(4)), direction="LEFT"))


def read_codes(b, codes: ir.Value, bits: int) -> tuple[ir.Value, ir.Value | None]:
    """uint8/int8 codes as float32 for a direct read: int8 (..., D); int4 the bytes c (..., D/2) and their high
    nibbles hi = floor(c / 16), so the low nibbles are c - 16 hi (all exact in float). Cast, scale and floor are
    the measured-fastest int4 read on the CPU EP (a 256 x 2 Gather table: 3.5x slower, BitwiseAnd/BitShift:
    1.4x; docs/results/kv.md)."""
    c = b.op("Cast", codes, to=ir.DataType.FLOAT)
    hi = b.op("Floor", b.op("Mul", c, b.const(np.float32(1 / 16)))) if bits == 4 else None
    return c, hi


def dot_codes(b, q: ir.Value, c: ir.Value, hi: ir.Value | None, dim: int) -> ir.Value:
    """q (B, kv, M, D) . codes (B, kv, P, D) -> (B, kv, M, P); int4 (channel 2j in the low nibble, 2j+1 in the
    high one): q_even . c + (q_odd - 16 q_even) . hi."""
    if hi is None:
        return b.op("MatMul", q, b.op("Transpose", c, perm=[0, 1, 3, 2]))
    even = b.op("Slice", q, b.ints(0), b.ints(dim), b.ints(-1), b.ints(2))
    odd = b.op("Slice", q, b.ints(1), b.ints(dim), b.ints(-1), b.ints(2))
    odd = b.op("Sub", odd, b.op("Mul", even, b.const(np.float32(16))))
    return b.op(
        "Add",
        b.op("MatMul", even, b.op("Transpose", c, perm=[0, 1, 3, 2])),
        b.op("MatMul", odd, b.op("Transpose", hi, perm=[0, 1, 3, 2])),
    )


def weigh_codes(b, w: ir.Value, c: ir.Value, hi: ir.Value | None, dim: int) -> ir.Value:
    """w (B, kv, M, P) @ codes (B, kv, P, D) -> (B, kv, M, D); int4: channel 2j gets w @ c - 16 (w @ hi), channel
    2j+1 gets w @ hi, interleaved on the small (M, D) result."""
    out = b.op("MatMul", w, c)
    if hi is None:
        return out
    odd = b.op("MatMul", w, hi)  # (B, kv, M, D/2)
    even = b.op("Sub", out, b.op("Mul", odd, b.const(np.float32(16))))
    pairs = b.op("Concat", *(b.op("Unsqueeze", x, b.ints(-1)) for x in (even, odd)), axis=-1)
    return b.op("Reshape", pairs, b.ints(0, 0, 0, dim))


# ----------------------------------------------------------------------------- streams


@dataclass
class Stream:
    """One stored (B, kv, P, D) tensor: its graph inputs and how to decode and append to it."""

    name: str
    plan: MiniCachePlan
    dims: object
    inputs: list[ir.Value] = field(default_factory=list)

    def declare(self, b) -> None:
        """Create this stream's past inputs."""
        kv, d = self.dims.num_kv_heads, self.dims.head_dim
        dc = d // 2 if self.plan.bits == 4 else d
        u8, f16 = ir.DataType.UINT8, ir.DataType.FLOAT16
        if self.plan.bits == 16:
            specs = [("", b.ir_dtype, [kv, "past_sequence_length", d])]
        elif self.plan.group == "token":
            specs = [
                (".codes", u8, [kv, "past_sequence_length", dc]),
                (".scale", f16, [kv, "past_sequence_length", 1]),
                (".low", f16, [kv, "past_sequence_length", 1]),
            ]
        else:
            specs = [
                (".codes", u8, [kv, "past_quantized_length", dc]),
                (".scale", f16, [kv, "past_group_count", d]),
                (".low", f16, [kv, "past_group_count", d]),
                (".residual", b.ir_dtype, [kv, "past_residual_length", d]),
            ]
        self.inputs = [
            graph_input(f"{PAST}{self.name}{s}", t, ["batch_size", *shape]) for s, t, shape in specs
        ]

    def length(self, b) -> ir.Value:
        """P, the stored past's length, as a (1,) int64."""
        n = b.op("Shape", self.inputs[0], start=2, end=3)
        if self.plan.bits == 16 or self.plan.group == "token":
            return n
        return b.op("Add", n, b.op("Shape", self.inputs[3], start=2, end=3))  # quantized ++ residual

    def float_codes(self, b) -> tuple[ir.Value, ir.Value | None]:
        """``read_codes`` of this stream, built once (a MiniCache pair's two layers read the same direction)."""
        if getattr(self, "_codes", None) is None:
            self._codes = read_codes(b, self.inputs[0], self.plan.bits)
        return self._codes

    def token_factors(self, b) -> tuple[ir.Value, ir.Value]:
        """Per-token scale and low as (B, kv, 1, P) float32 rows (a free reshape of (P, 1))."""
        return tuple(
            b.op("Reshape", b.op("Cast", v, to=ir.DataType.FLOAT), b.ints(0, 0, 1, -1))
            for v in self.inputs[1:3]
        )

    def scores(self, b, q: ir.Value) -> ir.Value:
        """q (B, kv, M, D) float32 against the stored keys: (B, kv, M, P) float32 (fp16 dots of raw codes could
        overflow).

        Per-token codes: q . (c_t s_t + l_t) = s_t (q . c_t) + l_t sum(q), so the past is never restored;
        beyond the cast of the codes the work is O(P). int4 bytes c = lo + 16 hi hold channel 2j in lo and
        2j+1 in hi: q . codes = q_even . c + (q_odd - 16 q_even) . hi."""
        if self.plan.bits == 16 or self.plan.group != "token":
            return b.op("MatMul", q, b.op("Transpose", to_float(b, self.decode(b)), perm=[0, 1, 3, 2]))
        scale, low = self.token_factors(b)
        dots = dot_codes(b, q, *self.float_codes(b), self.dims.head_dim)
        qsum = b.op("ReduceSum", q, b.ints(-1), keepdims=1)  # (B, kv, M, 1)
        return b.op("Add", b.op("Mul", dots, scale), b.op("Mul", qsum, low))

    def weighted(self, b, p: ir.Value) -> ir.Value:
        """p (B, kv, M, P) float32 over the stored values: (B, kv, M, D) float32.

        Per-token codes: sum_t p_t (c_t s_t + l_t) = (p * s) @ C + sum_t p_t l_t; int4: with w = p * s,
        channel 2j gets w @ c - 16 (w @ hi) and channel 2j+1 gets w @ hi, interleaved on the (M, D) result."""
        if self.plan.bits == 16 or self.plan.group != "token":
            return b.op("MatMul", p, to_float(b, self.decode(b)))
        scale, low = self.token_factors(b)
        out = weigh_codes(b, b.op("Mul", p, scale), *self.float_codes(b), self.dims.head_dim)
        return b.op("Add", out, b.op("ReduceSum", b.op("Mul", p, low), b.ints(-1), keepdims=1))

    def decode(self, b) -> ir.Value:
        """The stored past as (B, kv, P, D) in the activation dtype (built once per stream)."""
        if self.plan.bits == 16:
            return self.inputs[0]
        if getattr(self, "_decoded", None) is None:
            self._decoded = self._restore(b)
        return self._decoded

    def _restore(self, b) -> ir.Value:
        d = self.dims.head_dim
        codes = codes_to_float(b, self.inputs[0], self.plan.bits, d)
        if self.plan.group == "token":
            return to_act(b, dequantize_groups(b, codes, self.inputs[1], self.inputs[2]))
        g = self.plan.channel_group
        grouped = b.op("Reshape", codes, b.ints(0, 0, -1, g, d))  # (B, kv, Pq/G, G, D)
        scale, low = (b.op("Unsqueeze", v, b.ints(3)) for v in self.inputs[1:3])
        x = b.op("Reshape", dequantize_groups(b, grouped, scale, low), b.ints(0, 0, -1, d))
        return b.op("Concat", to_act(b, x), self.inputs[3], axis=2)

    def append(self, b, new: ir.Value) -> list[ir.Value]:
        """Present tensors (one per input) after storing ``new`` (B, kv, S, D)."""
        if self.plan.bits == 16:
            return [b.op("Concat", self.inputs[0], new, axis=2)]
        d, bits = self.dims.head_dim, self.plan.bits
        if self.plan.group == "token":
            codes, scale, low = quantize_groups(b, to_float(b, new), bits, -1)
            codes = pack_int4(b, codes, d) if bits == 4 else codes
            return [
                b.op("Concat", old, v, axis=2)
                for old, v in zip(self.inputs, (codes, scale, low), strict=True)
            ]
        g = self.plan.channel_group
        x = b.op("Concat", self.inputs[3], new, axis=2)  # residual ++ new
        n = b.op("Shape", x, start=2, end=3)
        full = b.op("Mul", b.op("Div", n, b.ints(g)), b.ints(g))  # whole groups (integer division)
        head = b.op("Slice", x, b.ints(0), full, b.ints(2))
        rest = b.op("Slice", x, full, b.ints(INT64_MAX), b.ints(2))
        grouped = b.op("Reshape", to_float(b, head), b.ints(0, 0, -1, g, d))
        codes, scale, low = quantize_groups(b, grouped, bits, 3)  # scale/low (B, kv, G', 1, D)
        codes = b.op("Reshape", codes, b.ints(0, 0, -1, d))
        codes = pack_int4(b, codes, d) if bits == 4 else codes
        scale, low = (b.op("Squeeze", v, b.ints(3)) for v in (scale, low))
        presents = [
            b.op("Concat", old, v, axis=2)
            for old, v in zip(self.inputs[:3], (codes, scale, low), strict=True)
        ]
        return [*presents, rest]


def slerp_merge(b, a: ir.Value, c: ir.Value, t: float) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """Graph twin of minicache.slerp_merge on float32 (B, kv, S, D): direction, magnitudes, distance (B, kv, S, 1)."""

    def norm(x):
        return b.op("Sqrt", b.op("ReduceSum", b.op("Mul", x, x), b.ints(-1), keepdims=1))

    na, nc = norm(a), norm(c)
    eps = b.const(np.float32(NORM_EPS))
    ua, uc = b.op("Div", a, b.op("Max", na, eps)), b.op("Div", c, b.op("Max", nc, eps))
    cos = b.op("ReduceSum", b.op("Mul", ua, uc), b.ints(-1), keepdims=1)
    omega = b.op("Acos", b.op("Clip", cos, b.const(np.float32(-1)), b.const(np.float32(1))))
    so = b.op("Sin", omega)
    small = b.op("Less", so, b.const(np.float32(SLERP_EPS)))
    safe = b.op("Where", small, b.const(np.float32(1)), so)

    def weight(w: float) -> ir.Value:
        slerp = b.op("Div", b.op("Sin", b.op("Mul", omega, b.const(np.float32(w)))), safe)
        return b.op("Where", small, b.const(np.float32(w)), slerp)

    direction = b.op("Add", b.op("Mul", weight(1 - t), ua), b.op("Mul", weight(t), uc))
    return direction, na, nc, b.op("Div", omega, b.const(np.float32(math.pi)))


@dataclass
class StaticStream:
    """A group "static" stream: symmetric codes with fixed per-channel scales (minicache.StaticStream).

    The fused form hands ``codes`` and ``scale`` to GroupQueryAttention (its quantized cache, PER_CHANNEL);
    the plain form reads it here: the per-channel scale folds into q (keys) or into the output (values), so
    beyond the cast of the codes the read is O(D). int4 bytes hold ``code + 8``, channel 2j in the low nibble.
    """

    name: str
    plan: MiniCachePlan
    dims: object
    scale_values: list  # (kv, D)
    inputs: list[ir.Value] = field(default_factory=list)

    def declare(self, b) -> None:
        kv, d = self.dims.num_kv_heads, self.dims.head_dim
        dtype = ir.DataType.INT8 if self.plan.bits == 8 else ir.DataType.UINT8
        width = d if self.plan.bits == 8 else d // 2
        self.inputs = [
            graph_input(f"{PAST}{self.name}", dtype, ["batch_size", kv, "past_sequence_length", width])
        ]
        array = np.asarray(self.scale_values, np.float32).reshape(1, kv, 1, d)
        self.scale = b.weight(f"kv_cache.{self.name}.scale", array)  # (1, kv, 1, D)

    @property
    def codes(self) -> ir.Value:
        return self.inputs[0]

    def length(self, b) -> ir.Value:
        return b.op("Shape", self.codes, start=2, end=3)

    def _codes(self, b) -> tuple[ir.Value, ir.Value | None]:
        if getattr(self, "_float", None) is None:
            self._float = read_codes(b, self.codes, self.plan.bits)
        return self._float

    def scores(self, b, q: ir.Value) -> ir.Value:
        q = b.op("Mul", q, self.scale)  # q . (code * s) = (q * s) . code
        dots = dot_codes(b, q, *self._codes(b), self.dims.head_dim)
        if self.plan.bits == 8:
            return dots
        qsum = b.op("ReduceSum", q, b.ints(-1), keepdims=1)
        return b.op("Sub", dots, b.op("Mul", qsum, b.const(np.float32(8))))  # nibbles hold code + 8

    def weighted(self, b, p: ir.Value) -> ir.Value:
        out = weigh_codes(b, p, *self._codes(b), self.dims.head_dim)
        if self.plan.bits == 4:  # nibbles hold code + 8
            mass = b.op("ReduceSum", p, b.ints(-1), keepdims=1)
            out = b.op("Sub", out, b.op("Mul", mass, b.const(np.float32(8))))
        return b.op("Mul", out, self.scale)

    def quantize(self, b, new: ir.Value) -> tuple[ir.Value, ir.Value]:
        """New tokens (B, kv, S, D) -> (codes to store, the float32 values attention reads: code * scale);
        built once per value (attention and the append share it)."""
        memo = self.__dict__.setdefault("_quantized", {})
        if id(new) not in memo:
            memo[id(new)] = self._quantize(b, new)
        return memo[id(new)]

    def _quantize(self, b, new: ir.Value) -> tuple[ir.Value, ir.Value]:
        top = 2 ** (self.plan.bits - 1)
        q = b.op("Round", b.op("Div", to_float(b, new), self.scale))
        q = b.op("Clip", q, b.const(np.float32(-top)), b.const(np.float32(top - 1)))
        values = b.op("Mul", q, self.scale)
        if self.plan.bits == 8:
            return b.op("Cast", q, to=ir.DataType.INT8), values
        codes = b.op("Cast", b.op("Add", q, b.const(np.float32(8))), to=ir.DataType.UINT8)
        return pack_int4(b, codes, self.dims.head_dim), values

    def decode(self, b) -> ir.Value:
        """The stored past as (B, kv, P, D) in the activation dtype (a Scan of shared blocks reads it)."""
        if self.plan.bits == 8:
            return to_act(b, b.op("Mul", b.op("Cast", self.codes, to=ir.DataType.FLOAT), self.scale))
        codes = b.op("Sub", codes_to_float(b, self.codes, 4, self.dims.head_dim), b.const(np.float32(8)))
        return to_act(b, b.op("Mul", codes, self.scale))


def append_streams(b, streams: list[Stream], news: list[ir.Value]) -> dict[str, ir.Value]:
    """Every stream's present tensors by input name after storing its new tokens (B, kv, S, D).

    Per-token streams of one layer (or one pair's K and V directions) quantize in one pass over their heads
    stacked (B, n x kv, S, D), then split: the same groups and codes, a third of the nodes (a decode step's
    cost at these sizes is mostly per-node overhead)."""
    plan = streams[0].plan
    if plan.group == "static":  # the new tokens' codes (attention already read them as stored)
        return {
            s.codes.name: b.op("Concat", s.codes, s.quantize(b, x)[0], axis=2)
            for s, x in zip(streams, news, strict=True)
        }
    if plan.bits == 16 or plan.group != "token" or len(streams) == 1:
        out = {}
        for s, x in zip(streams, news, strict=True):
            out.update(zip((v.name for v in s.inputs), s.append(b, x), strict=True))
        return out
    n, d = len(streams), streams[0].dims.head_dim
    codes, scale, low = quantize_groups(b, to_float(b, b.op("Concat", *news, axis=1)), plan.bits, -1)
    codes = pack_int4(b, codes, d) if plan.bits == 4 else codes
    parts = [
        b.tape.op_multi_out("Split", [x], {"axis": 1, "num_outputs": n}, num_outputs=n)
        for x in (codes, scale, low)
    ]
    out = {}
    for i, s in enumerate(streams):
        for old, new in zip(s.inputs, (part[i] for part in parts), strict=True):
            out[old.name] = b.op("Concat", old, new, axis=2)
    return out


@dataclass
class MergedView:
    """One layer's past K or V in a MiniCache pair: ``magnitude * direction`` with the retained tokens exact.

    Attention reads it without restoring it: the direction stream gives q . dir_t (or p @ dir), the per-token
    magnitudes scale that along the sequence, and the R retained positions get their exact scores substituted
    (``ScatterElements``) and their exact values added, so the extra work is O(P + R x D).
    """

    direction: Stream
    magnitude: ir.Value  # (B, kv, P, 1)
    retained: ir.Value  # (B, kv, R, D)
    index: ir.Value  # (R,) int64

    def length(self, b) -> ir.Value:
        return b.op("Shape", self.magnitude, start=2, end=3)

    def _row(self, b) -> ir.Value:
        return b.op("Reshape", to_float(b, self.magnitude), b.ints(0, 0, 1, -1))  # (B, kv, 1, P)

    def _where(self, b, like: ir.Value) -> ir.Value:
        """The retained positions as (B, kv, M, R) indices along the last axis of ``like`` (B, kv, M, R)."""
        return b.op("Expand", b.op("Reshape", self.index, b.ints(1, 1, 1, -1)), b.op("Shape", like))

    def scores(self, b, q: ir.Value) -> ir.Value:
        merged = b.op("Mul", self.direction.scores(b, q), self._row(b))  # m_t (q . dir_t): (B, kv, M, P)
        kept = b.op("Transpose", to_float(b, self.retained), perm=[0, 1, 3, 2])
        exact = b.op("MatMul", q, kept)  # (B, kv, M, R)
        return b.op("ScatterElements", merged, self._where(b, exact), exact, axis=3)

    def weighted(self, b, p: ir.Value) -> ir.Value:
        kept = b.op("Gather", p, self.index, axis=3)  # the retained positions' probabilities (B, kv, M, R)
        zeros = b.op("Mul", kept, b.const(np.float32(0)))
        merged = b.op("ScatterElements", p, self._where(b, kept), zeros, axis=3)  # the merged part's share
        merged = b.op("Mul", merged, self._row(b))
        return b.op(
            "Add", self.direction.weighted(b, merged), b.op("MatMul", kept, to_float(b, self.retained))
        )

    def decode(self, b) -> ir.Value:
        """The restored past (B, kv, P, D), for a Scan of shared blocks."""
        x = b.op("Mul", self.magnitude, self.direction.decode(b))
        where = b.op("Expand", b.op("Reshape", self.index, b.ints(1, 1, -1, 1)), b.op("Shape", self.retained))
        return b.op("ScatterElements", x, where, self.retained, axis=2)


def new_tokens(b, present: ir.Value, past) -> ir.Value:
    """The new tokens of a present (restored past ++ new): everything after the stored past's length."""
    return b.op("Slice", present, past.length(b), b.ints(INT64_MAX), b.ints(2))


@dataclass
class CompressedKV:
    """The MiniCache / quantized layout of a ``MiniCachePlan`` (see the module docstring for the tensors).

    ``begin`` hands each layer its past as views (``Stream`` or ``MergedView``) that attention reads directly
    (``scores`` / ``weighted``, see ``builder.attend_compressed``); ``finish`` takes each layer's exact new tokens.
    """

    plan: MiniCachePlan
    graph_inputs: list[ir.Value] = field(default_factory=list)
    compressed = True
    form: str = "plain"  # the block form (set by build_decoder before ``begin``)

    @property
    def fused_reads(self) -> bool:
        """GroupQueryAttention reads and writes this cache itself (static per-channel codes, fused form): it gets
        each layer's codes and scales and returns the presents."""
        return self.plan.group == "static" and self.plan.bits != 16 and self.form == "fused"

    def begin(self, b, n_layers: int, dims) -> list[tuple]:
        """Declare inputs; return every layer's past (K, V) views."""
        self.dims, self.pasts = dims, []
        self.streams: dict[str, Stream] = {}
        kinds = ("key", "value")
        pasts: list = [None] * n_layers
        for i in range(n_layers):
            role, p = self.plan.role(i)
            if role == "plain" or (self.plan.merge == "share" and role == "first"):
                pasts[i] = tuple(self._stream(b, f"{i}.{k}") for k in kinds)
        for a, c in self.plan.pairs:
            if self.plan.merge == "share":
                pasts[c] = pasts[a]
                continue
            # Each pair keeps its own number of tokens: one symbolic length per pair (a name shared across
            # pairs tells onnxruntime the sizes are equal, and its allocator then reuses one pair's buffer for
            # the other's: "Shape mismatch attempting to re-use buffer" on the float16 graph).
            index = self._input(b, f"{a}_{c}.retained_index", ir.DataType.INT64, [retained_length(a, c)])
            for layer in (a, c):
                pasts[layer] = tuple(self._view(b, a, c, layer, k, index) for k in kinds)
        self.pasts = pasts
        return pasts

    def _input(self, b, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        value = graph_input(PAST + name, dtype, shape)
        self.graph_inputs.append(value)
        return value

    def _stream(self, b, name: str) -> Stream | StaticStream:
        if self.plan.group == "static" and self.plan.bits != 16:
            layer, kind = name.split(".")
            scales = self.plan.static_scales[int(layer)][("key", "value").index(kind)]
            s = StaticStream(name, self.plan, self.dims, scales)
        else:
            s = Stream(name, self.plan, self.dims)
        s.declare(b)
        self.graph_inputs.extend(s.inputs)
        self.streams[name] = s
        return s

    def _view(self, b, a: int, c: int, layer: int, kind: str, index: ir.Value) -> MergedView:
        """Layer ``layer``'s merged past: the pair's shared direction, its magnitudes and retained vectors."""
        kv, d = self.dims.num_kv_heads, self.dims.head_dim
        key = f"{a}_{c}.{kind}.direction"
        direction = self.streams[key] if key in self.streams else self._stream(b, key)
        shape = ["batch_size", kv, "past_sequence_length", 1]
        mag = self._input(b, f"{layer}.{kind}.magnitude", b.ir_dtype, shape)
        kept = self._input(
            b, f"{layer}.{kind}.retained", b.ir_dtype, ["batch_size", kv, retained_length(a, c), d]
        )
        return MergedView(direction, mag, kept, index)

    def finish(self, b, news: list[tuple[ir.Value, ir.Value] | None]) -> list[ir.Value]:
        """Store each layer's exact new tokens (B, kv, S, D) (merging pairs once both layers ran); name every
        present output."""
        if self.fused_reads:  # GroupQueryAttention's presents: past codes ++ new codes
            return [
                name_output(b, value, PRESENT + s.codes.name[len(PAST) :], s.codes)
                for i, kv in enumerate(news)
                for value, s in zip(kv, (self.streams[f"{i}.key"], self.streams[f"{i}.value"]), strict=True)
            ]
        outs: dict[str, ir.Value] = {}
        for i in range(len(news)):
            role, _ = self.plan.role(i)
            if role == "plain" or (self.plan.merge == "share" and role == "first"):
                outs.update(
                    append_streams(b, [self.streams[f"{i}.{k}"] for k in ("key", "value")], list(news[i]))
                )
        if self.plan.merge == "minicache":
            for p, (a, c) in enumerate(self.plan.pairs):
                outs.update(self._merge(b, p, a, c, news[a], news[c]))
        return [name_output(b, outs[v.name], PRESENT + v.name[len(PAST) :], v) for v in self.graph_inputs]

    def _merge(self, b, p: int, a: int, c: int, new_a, new_c) -> dict[str, ir.Value]:
        """Merge a pair's new tokens: shared directions, magnitudes, retained positions and vectors."""
        t, thr = self.plan.t, self.plan.thresholds[p]
        merged = {
            kind: slerp_merge(b, to_float(b, x), to_float(b, y), t)
            for kind, x, y in zip(("key", "value"), new_a, new_c, strict=True)
        }
        dist = b.op("Max", merged["key"][3], merged["value"][3])  # (B, kv, S, 1)
        score = b.op("ReduceMax", dist, b.ints(0, 1, 3), keepdims=0)  # (S,)
        keep = b.op("Reshape", b.op("NonZero", b.op("Greater", score, b.const(np.float32(thr)))), b.ints(-1))
        index_in = next(v for v in self.graph_inputs if v.name == f"{PAST}{a}_{c}.retained_index")
        offset = self.pasts[a][0].length(b)
        outs = {index_in.name: b.op("Concat", index_in, b.op("Add", keep, offset), axis=0)}
        kinds = ("key", "value")
        streams = [self.streams[f"{a}_{c}.{kind}.direction"] for kind in kinds]
        outs.update(append_streams(b, streams, [to_act(b, merged[kind][0]) for kind in kinds]))
        for ki, kind in enumerate(kinds):
            _, na, nc, _ = merged[kind]
            for layer, mag, x in ((a, na, new_a[ki]), (c, nc, new_c[ki])):
                for field_, value in (
                    ("magnitude", to_act(b, mag)),
                    ("retained", b.op("Gather", x, keep, axis=2)),
                ):
                    name = f"{PAST}{layer}.{kind}.{field_}"
                    past = next(v for v in self.graph_inputs if v.name == name)
                    outs[name] = b.op("Concat", past, value, axis=2)
        return outs


def genai_can_run(plan: MiniCachePlan | None, attention_form: str) -> bool:
    """onnxruntime-genai runs the layout: one float past/present per layer, or static codes that the fused form's
    GroupQueryAttention reads and writes itself (measured: onnxruntime-genai 0.18 on mix-llama-14m int8 and
    int4 static, shared past/present buffer, greedy tokens equal runner.py's)."""
    if not make_layout(plan).compressed:
        return True
    return plan.group == "static" and plan.bits != 16 and attention_form == "fused"


def make_layout(plan: MiniCachePlan | None):
    """PlainKV for no plan (or a plan that changes nothing), else CompressedKV."""
    if plan is None or (not plan.pairs and plan.bits == 16):
        return PlainKV()
    return CompressedKV(plan)


# ----------------------------------------------------------------------------- the reference's state as feeds


def stream_arrays(stream) -> list[tuple[str, object]]:
    """(input suffix, tensor or None) of one compressor/minicache stream, in CompressedKV's naming (``Stream``
    and ``StaticStream.declare``); None: nothing stored yet (the caller feeds the empty past)."""
    from edgepack.compressor.minicache import ChannelStream, StaticStream, TokenStream

    if isinstance(stream, TokenStream):
        parts = list(zip((".codes", ".scale", ".low"), stream.state or [None] * 3, strict=True))
        return parts + ([(".residual", stream.residual)] if isinstance(stream, ChannelStream) else [])
    if isinstance(stream, StaticStream):
        return [("", stream.codes)]
    return [("", stream.x)]


def reference_past(cache) -> dict[str, np.ndarray]:
    """The ``past_key_values.*`` feeds that hold a CompressedCache's state (compressor/minicache.py): the same
    streams, named as CompressedKV names its inputs, so the graph can take one decode step from exactly the
    reference's cache (exporter/parity.py). Streams with nothing stored yet are left out."""
    feeds: dict[str, object] = {}
    for layer, streams in cache.plain.items():
        for kind, stream in zip(("key", "value"), streams, strict=True):
            feeds.update({f"{PAST}{layer}.{kind}{s}": t for s, t in stream_arrays(stream)})
    if cache.plan.merge == "minicache":  # share: the second layer of a pair has no cache of its own
        for (a, c), pairs, index in zip(cache.plan.pairs, cache.merged, cache.index, strict=True):
            for kind, pair in zip(("key", "value"), pairs, strict=True):
                direction = stream_arrays(pair.direction)
                feeds.update({f"{PAST}{a}_{c}.{kind}.direction{s}": t for s, t in direction})
                for layer, magnitude, retained in zip((a, c), pair.magnitude, pair.retained, strict=True):
                    feeds[f"{PAST}{layer}.{kind}.magnitude"] = magnitude
                    feeds[f"{PAST}{layer}.{kind}.retained"] = retained
            feeds[f"{PAST}{a}_{c}.retained_index"] = index
    return {k: np.ascontiguousarray(t.numpy()) for k, t in feeds.items() if t is not None}
