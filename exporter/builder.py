"""Build the ONNX decoder graph (prefill + decode with a KV cache) directly from a model's weights with onnx-ir.

The graph is written op by op from the weights, not traced, so we control every op (any head size, no fused
attention requirement), every dtype, and weight sharing: each unique weight tensor (by identity) becomes one
initializer, however many depth positions use it. Linear layers are lowered by ``LINEAR_LOWERINGS``, a registry
keyed by module type (float ``nn.Linear`` -> MatMul, ``QuantLinear`` -> MatMulNBits bit planes).

Two forms of each decoder block, chosen per model (``attention_form``):
- "fused": the form ONNX Runtime's CPU kernels run fastest and onnxruntime-genai's builder emits: one packed
  q/k/v projection and one packed gate/up projection (concatenated at export and stored packed, see
  ``artifact.packed_name``), SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (the
  residual add fused into the next norm), and GroupQueryAttention with rotary embedding inside. It needs
  head_dim % 16 == 0 and assumes right-padded (or unpadded) batches, as onnxruntime-genai does.
- "plain": standard ops only (any head size, left padding, explicit position_ids).

I/O (the names optimum's ORTModelForCausalLM and onnxruntime-genai use):
  input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64 (plain form only),
  past_key_values.{i}.key/.value (B, kv_heads, P, head_dim)  ->  logits (B, S, V) in the activation dtype,
  present.{i}.key/.value (B, kv_heads, P+S, head_dim). The fused form's presents come straight from
  GroupQueryAttention, so onnxruntime-genai can bind past and present to one buffer (past_present_share_buffer).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import onnx_ir as ir
import torch
from edgepack.exporter.kv_cache import PlainKV, new_tokens, to_float
from torch import nn

from edgepack.artifact import Packed, bias_name, packed_name, stacked_name, weight_name
from edgepack.families import DecoderSpec, Family, LayerSpec, Rope, decoder_layers, family_of, resolve

log = logging.getLogger(__name__)

OPSET = 21
IR_VERSION = 10  # onnxruntime 1.31 refuses IR 13 (facts.md)
MS_DOMAIN = "com.microsoft"
INT64_MAX = np.iinfo(np.int64).max

DTYPES = {"float32": (ir.DataType.FLOAT, np.float32), "float16": (ir.DataType.FLOAT16, np.float16)}


ACTIVATIONS = ("int8", "float")
ATTENTION_FORMS = ("auto", "fused", "plain")


@dataclass
class BuildOptions:
    """What the target (and the user) decide for the graph: dtypes, low-bit kernels, the block form."""

    dtype: str = "float32"
    loop_shared_blocks: bool = True  # a folded group of positions sharing weights becomes one Scan
    quantized_embedding: bool = True  # share the packed lm_head with the embedding via GatherBlockQuantized
    # how the target EP's GatherBlockQuantized reads zero points: "per-row" (padded like MatMulNBits: CPU) or
    # "flat" (CUDA); with "flat", rows whose zero points do not fill whole bytes take standard ops instead
    gather_zero_points: str = "per-row"
    activations: str = "int8"  # low-bit matmuls: "int8" = accuracy_level 4 (fast), "float" = level 0 (exact)
    lowering: str = "auto"  # kernels.packing.LOWERINGS: how other widths map onto 2/4/8-bit kernels
    attention: str = "auto"  # ATTENTION_FORMS: "auto" = fused where the model allows it
    kv_layout: object | None = None  # exporter.kv_cache layout (PlainKV when None)

    def to_dict(self) -> dict:
        """The options a manifest records (the KV layout is recorded by the recipe's kv step)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kv_layout"}


@dataclass
class Builder:
    """Emits nodes with a Tape and owns initializers, deduplicated by the identity of their source tensor."""

    opts: BuildOptions
    tape: ir.tape.Tape = field(default_factory=ir.tape.Tape)
    initializers: dict[str, ir.Value] = field(default_factory=dict)
    _by_key: dict[object, object] = field(default_factory=dict)
    quant_layers: dict[str, dict] = field(default_factory=dict)  # per quantized layer: planes, block, bytes
    packed: dict[str, Packed] = field(default_factory=dict)  # projections stored as one tensor per kind
    _const_count: int = 0
    root: ir.tape.Tape | None = None  # the main graph's tape (``tape`` may be a Scan body's)

    def __post_init__(self) -> None:
        self.root = self.tape

    @property
    def ir_dtype(self) -> ir.DataType:
        return DTYPES[self.opts.dtype][0]

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.opts.dtype][1]

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attrs) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attrs or None, domain=domain)

    def prep(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attrs) -> ir.Value:
        """A weight-preparation node over initializers only, in the main graph: ONNX Runtime folds it at load."""
        return self.root.op(op_type, list(inputs), attrs or None, domain=domain)

    def weight(self, name: str, array: np.ndarray, key: object | None = None) -> ir.Value:
        """An initializer, stored once per ``key`` (the identity of the tensor it came from)."""
        if key is not None and key in self._by_key:
            return self._by_key[key]
        if name in self.initializers:
            raise ValueError(f"initializer name {name} used twice")
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        self.initializers[name] = value
        if key is not None:
            self._by_key[key] = value
        return value

    def const(self, array, dtype=None) -> ir.Value:
        """A small constant (shapes, scalars) as an initializer with a generated name."""
        self._const_count += 1
        return self.weight(f"const_{self._const_count}", np.asarray(array, dtype=dtype))

    def ints(self, *values: int) -> ir.Value:
        return self.const(list(values), np.int64)

    def scalar(self, value: float, dtype=None) -> ir.Value:
        return self.const(np.array(value, dtype=dtype or self.np_dtype))


def to_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().astype(dtype)


# ----------------------------------------------------------------------------- linear lowering

Lowering = Callable[[Builder, ir.Value, nn.Module, str], ir.Value]
LINEAR_LOWERINGS: dict[type, Lowering] = {}


def register_lowering(module_type: type) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        LINEAR_LOWERINGS[module_type] = fn
        return fn

    return deco


@register_lowering(nn.Linear)
def lower_float_linear(b: Builder, x: ir.Value, module: nn.Linear, name: str) -> ir.Value:
    """y = x @ W^T (+ bias), W^T stored (K, N) once per unique weight."""
    w = b.weight(weight_name(name), to_numpy(module.weight, b.np_dtype).T, key=("wT", id(module.weight)))
    y = b.op("MatMul", x, w)
    if module.bias is not None:
        y = b.op("Add", y, b.weight(bias_name(name), to_numpy(module.bias, b.np_dtype), key=id(module.bias)))
    return y


def lower_linear(b: Builder, x: ir.Value, module: nn.Module, name: str) -> ir.Value:
    for cls in type(module).__mro__:
        if cls in LINEAR_LOWERINGS:
            return LINEAR_LOWERINGS[cls](b, x, module, name)
    raise TypeError(f"no ONNX lowering for {type(module).__name__} at {name}")


@dataclass(frozen=True)
class KernelWeight:
    """One MatMulNBits weight: packed data (N, k_blocks, blob), scales, optional zero points, attributes."""

    data: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    bits: int
    block: int
    k: int
    n: int
    accuracy_level: int

    def matmul(self, b: Builder, x: ir.Value, bias: ir.Value | None = None) -> ir.Value:
        """x @ W^T, plus ``bias`` inside the kernel (its optional 6th input) when given."""
        inputs = [x, self.data, self.scales, self.zero_points]
        if bias is not None:
            inputs += [None, bias]  # no g_idx
        while inputs[-1] is None:
            inputs.pop()
        return b.op(
            "MatMulNBits",
            *inputs,
            domain=MS_DOMAIN,
            K=self.k,
            N=self.n,
            bits=self.bits,
            block_size=self.block,
            accuracy_level=self.accuracy_level,
        )

    def layout(self) -> tuple:
        return (self.bits, self.block, self.k, self.accuracy_level, self.zero_points is not None)


# Module type -> the MatMulNBits weights it runs as (registered by quant_lowering for QuantLinear).
KERNEL_WEIGHTS: dict[type, Callable[[Builder, nn.Module, str], list[KernelWeight]]] = {}


def kernel_weights(b: Builder, module: nn.Module, name: str) -> list[KernelWeight] | None:
    for cls in type(module).__mro__:
        if cls in KERNEL_WEIGHTS:
            return KERNEL_WEIGHTS[cls](b, module, name)
    return None


def packed_bias(b: Builder, modules: list[nn.Module], name: str) -> ir.Value | None:
    """The projections' biases concatenated (zeros for one without) under ``name``, or None when none has one."""
    if all(m.bias is None for m in modules):
        return None
    parts = [
        to_numpy(m.bias, b.np_dtype) if m.bias is not None else np.zeros(m.out_features, b.np_dtype)
        for m in modules
    ]
    return b.weight(bias_name(name), np.concatenate(parts))


def lower_packed(b: Builder, x: ir.Value, modules: list[nn.Module], names: list[str]) -> ir.Value:
    """x through several projections of the same input as ONE matmul: (B, S, sum N).

    The weights are concatenated along N at export and stored once under ``artifact.packed_name`` (nothing
    to fold at load). Projections of different formats (mixed precision) fall back to separate matmuls whose
    outputs are concatenated.
    """
    key = ("packed", *(linear_key(m) for m in modules))
    if key not in b._by_key:
        b._by_key[key] = packed_weights(b, modules, names)
    packed = b._by_key[key]
    if packed is None:
        return b.op(
            "Concat", *[lower_linear(b, x, m, n) for m, n in zip(modules, names, strict=True)], axis=-1
        )
    weights, bias = packed
    return matmuls_plus_bias(b, x, weights, bias)


def matmuls_plus_bias(b: Builder, x: ir.Value, weights: list, bias: ir.Value | None) -> ir.Value:
    """Sum of x through each weight (a KernelWeight or a float (K, N) initializer), plus the bias: inside the
    first MatMulNBits where the target's dtype is float32 (one node less per projection), else an Add."""
    fused = bias is not None and isinstance(weights[0], KernelWeight) and b.opts.dtype == "float32"
    y = None
    for i, w in enumerate(weights):
        if isinstance(w, KernelWeight):
            out = w.matmul(b, x, bias if fused and i == 0 else None)
        else:
            out = b.op("MatMul", x, w)
        y = out if y is None else b.op("Add", y, out)
    return y if bias is None or fused else b.op("Add", y, bias)


# Module type -> the one module of that type equal to its arguments stacked along N (None: they differ in
# format and cannot share a matmul). Registered by quant_lowering for QuantLinear.
JOIN_MODULES: dict[type, Callable[[list[nn.Module]], nn.Module | None]] = {}


def packed_weights(b: Builder, modules: list[nn.Module], names: list[str]) -> tuple | None:
    """(weights, bias) of the projections stacked along N and stored packed, or None when they cannot share
    one matmul. Records the packing (parts, sizes) for the manifest and, for quantized parts, each part's
    share of the stored facts under its own name."""
    name = packed_name(names)
    sizes = [m.out_features for m in modules]
    kind = type(modules[0])
    if any(type(m) is not kind for m in modules):
        return None
    if kind is nn.Linear:
        w = np.concatenate([to_numpy(m.weight, b.np_dtype).T for m in modules], axis=1)  # (K, sum N)
        weights = [b.weight(weight_name(name), w)]
    elif kind in JOIN_MODULES:
        joined = JOIN_MODULES[kind](modules)
        if joined is None:
            return None
        b._by_key[("joined", id(joined))] = joined  # kept alive: the builder's caches key on id()
        weights = kernel_weights(b, joined, name)
        facts = b.quant_layers.pop(name)
        for part, n in zip(names, sizes, strict=True):
            b.quant_layers[part] = {**facts, "bytes": facts["bytes"] * n // sum(sizes), "packed": name}
    else:
        return None
    b.packed[name] = Packed(name, tuple(names), tuple(sizes))
    return weights, packed_bias(b, modules, name)


# ----------------------------------------------------------------------------- decoder graph


def rms_norm(b: Builder, x: ir.Value, weight: ir.Value, eps: float) -> ir.Value:
    """x / sqrt(mean(x^2) + eps) * w, computed in float32 (fp16 squares overflow); ORT fuses this pattern."""
    xf = x if b.opts.dtype == "float32" else b.op("Cast", x, to=ir.DataType.FLOAT)
    var = b.op("ReduceMean", b.op("Mul", xf, xf), b.ints(-1), keepdims=1)
    y = b.op("Div", xf, b.op("Sqrt", b.op("Add", var, b.const(np.float32(eps)))))
    if b.opts.dtype != "float32":
        y = b.op("Cast", y, to=b.ir_dtype)
    return b.op("Mul", y, weight)


def rotate(b: Builder, x: ir.Value, cos: ir.Value, sin: ir.Value, dim: int, head_dim: int) -> ir.Value:
    """RoPE on the first ``dim`` of ``head_dim`` dims: x * cos + rotate_half(x) * sin, rotate_half(x) =
    cat(-x2, x1); the rest passes through (partial rotary). x: (B, H, S, D)."""
    half = dim // 2
    rot = x if dim == head_dim else b.op("Slice", x, b.ints(0), b.ints(dim), b.ints(-1))
    x1 = b.op("Slice", rot, b.ints(0), b.ints(half), b.ints(-1))
    x2 = b.op("Slice", rot, b.ints(half), b.ints(2 * half), b.ints(-1))
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    out = b.op("Add", b.op("Mul", rot, cos), b.op("Mul", rotated, sin))
    if dim == head_dim:
        return out
    return b.op("Concat", out, b.op("Slice", x, b.ints(dim), b.ints(head_dim), b.ints(-1)), axis=-1)


def norm_weight(b: Builder, module: nn.Module, name: str, offset: float = 0.0) -> ir.Value:
    """A norm's effective scale (w, or 1 + w for Gemma's norms), stored once per source Parameter."""
    return b.weight(weight_name(name), to_numpy(module.weight, b.np_dtype) + offset, key=id(module.weight))


def fused_unsupported(spec: DecoderSpec) -> str | None:
    """Why the fused block form cannot run this model (ONNX Runtime kernel limits), or None."""
    if spec.head_dim % 16:
        return f"head_dim {spec.head_dim} is not a multiple of 16 (GroupQueryAttention's CPU kernel needs it)"
    if spec.rotary_dim != spec.head_dim:
        return f"partial rotary ({spec.rotary_dim} of {spec.head_dim} dims) is not in GroupQueryAttention"
    return None


def attention_form(spec: DecoderSpec, opts: BuildOptions) -> str:
    """ "fused" or "plain" for this model under ``opts.attention``."""
    from edgepack.errors import EdgepackError

    if opts.attention not in ATTENTION_FORMS:
        raise EdgepackError(
            f"--attention {opts.attention} is not valid; choose one of {', '.join(ATTENTION_FORMS)}"
        )
    if opts.attention == "plain":
        return "plain"
    reason = fused_unsupported(spec)
    if reason and opts.attention == "fused":
        raise EdgepackError(f"--attention fused cannot export this model: {reason}; use --attention auto")
    return "plain" if reason else "fused"


# A residual stream whose last residual add is still pending: (h, delta) means h + delta (delta may be
# None). The fused form hands the pending add to the next SkipSimplifiedLayerNormalization.
Stream = tuple[ir.Value, ir.Value | None]


def materialize(b: Builder, stream: Stream) -> ir.Value:
    h, delta = stream
    return h if delta is None else b.op("Add", h, delta)


def build_decoder(model: nn.Module, opts: BuildOptions) -> ir.Model:
    """The full decoder graph of a registered family's ``*ForCausalLM`` (possibly folded and/or quantized)."""
    from edgepack.exporter import quant_lowering  # noqa: F401  (registers the QuantLinear lowerings)

    spec = resolve(model)
    fam = spec.family
    b = Builder(opts)
    act = b.ir_dtype
    form = attention_form(spec, opts)
    layers = list(decoder_layers(model))
    n_layers = len(layers)

    batch, seq, total = (
        ir.SymbolicDim("batch_size"),
        ir.SymbolicDim("sequence_length"),
        ir.SymbolicDim("total_sequence_length"),
    )

    def graph_input(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    input_ids = graph_input("input_ids", ir.DataType.INT64, [batch, seq])
    attention_mask = graph_input("attention_mask", ir.DataType.INT64, [batch, total])
    position_ids = graph_input("position_ids", ir.DataType.INT64, [batch, seq]) if form == "plain" else None
    layout = opts.kv_layout if opts.kv_layout is not None else PlainKV()
    layout.form = form
    fused_reads = getattr(
        layout, "fused_reads", False
    )  # GroupQueryAttention reads the compressed cache itself
    pasts = layout.begin(b, n_layers, spec)  # each layer's past (K, V): (B, kv, P, D), or compressed views

    # Embedding lookup (a quantized tied embedding is lowered with the lm_head; see quant_lowering).
    h = lower_embedding(b, model, input_ids)  # (B, S, H)
    if spec.embed_scale is not None:
        h = b.op("Mul", h, b.scalar(spec.embed_scale))
    if form == "fused":
        ctx = fused_context(b, spec, attention_mask)
        if (
            layout.compressed and not fused_reads
        ):  # attention over compressed views: RotaryEmbedding and the plain form's masks
            ctx.position_ids = dense_positions(b, input_ids, attention_mask)
            ctx.masks = plain_context(b, spec, input_ids, attention_mask, ctx.position_ids).masks
    else:
        ctx = plain_context(b, spec, input_ids, attention_mask, position_ids)
    ctx.compressed = layout.compressed and not fused_reads

    presents: list[tuple[ir.Value, ir.Value]] = []
    stream: Stream = (h, None)
    i = 0
    while i < n_layers:
        j = i + 1
        while (
            opts.loop_shared_blocks
            and not fused_reads  # a Scan's body attends over restored float pasts
            and j < n_layers
            and spec.layers[j] == spec.layers[i]
            and shares_weights(fam, layers[i], layers[j])
        ):
            j += 1
        if j - i > 1:
            group = pasts[i:j]
            if (
                layout.compressed
            ):  # a Scan iterates over stacked float pasts: restore them, keep the new tokens
                group = [(k.decode(b), v.decode(b)) for k, v in group]
            scan_ctx = dataclasses.replace(ctx, compressed=False)  # the body attends over float pasts
            h, group_presents = emit_shared_group(b, scan_ctx, materialize(b, stream), layers[i:j], i, group)
            stream = (h, None)
            if layout.compressed:
                group_presents = [
                    (new_tokens(b, k, pk), new_tokens(b, v, pv))
                    for (k, v), (pk, pv) in zip(group_presents, pasts[i:j], strict=True)
                ]
            presents.extend(group_presents)
        else:
            p = fam.layer_name(i)
            norms = {
                n: norm_weight(b, layers[i].get_submodule(n), f"{p}.{n}", fam.norm_offset)
                for n in fam.block_norms
            }
            stream, k, v = emit_block(b, ctx, stream, layers[i], p, norms, spec.layers[i], *pasts[i])
            presents.append((k, v))
        i = j

    final = norm_weight(b, model.get_submodule(fam.final_norm), fam.final_norm, fam.norm_offset)
    if form == "fused":
        h = fused_norm(b, stream, final, spec.rms_norm_eps)[0]
    else:
        h = rms_norm(b, materialize(b, stream), final, spec.rms_norm_eps)
    # Logits stay in the activation dtype, as onnxruntime-genai's builder emits them: the lm_head computed them
    # in it, so a float32 Cast adds no information, and on the GPU it doubled the bytes every prefill hands the
    # host (151,936 x 128 positions: 78 MB against 39 MB; docs/results/cuda.md).
    logits = lower_lm_head(b, model, h)
    if spec.final_softcap is not None:
        logits = softcap(b, logits, spec.final_softcap)

    outputs = [logits]
    logits.name = "logits"
    logits.type, logits.shape = ir.TensorType(act), ir.Shape([batch, seq, spec.vocab_size])
    # the layout names the presents (plain: past ++ new), or stores the new tokens (compressed)
    outputs.extend(layout.finish(b, presents))

    inputs = [input_ids, attention_mask] + ([position_ids] if position_ids is not None else [])
    inputs += layout.graph_inputs
    opsets = {"": OPSET}
    if any(n.domain == MS_DOMAIN for n in b.tape.nodes):
        opsets[MS_DOMAIN] = 1
    graph = ir.Graph(
        inputs,
        outputs,
        nodes=b.tape.nodes,
        initializers=list(b.initializers.values()),
        opset_imports=opsets,
        name="edgepack_decoder",
    )
    model_ir = ir.Model(graph, ir_version=IR_VERSION, producer_name="edgepack")
    model_ir.meta["quant_layers"] = b.quant_layers
    model_ir.meta["packed"] = {name: p.to_dict() for name, p in b.packed.items()}
    model_ir.meta["attention"] = form
    return model_ir


def softcap(b: Builder, x: ir.Value, cap: float, dtype=None) -> ir.Value:
    """cap * tanh(x / cap): Gemma's soft-capping of attention scores and final logits."""
    c = b.scalar(cap, dtype)
    return b.op("Mul", b.op("Tanh", b.op("Div", x, c)), c)


@dataclass
class BlockContext:
    """Values every decoder block reads: the model's spec and the block form's shared inputs."""

    spec: DecoderSpec
    form: str  # "fused" or "plain"
    # plain form: rotary tables (B, 1, S, rotary_dim) per rope key, additive masks (B, 1, 1, S, T) per window
    rotary: dict[str, tuple[ir.Value, ir.Value]] = field(default_factory=dict)
    masks: dict[int | None, ir.Value] = field(default_factory=dict)
    # fused form: GroupQueryAttention's lengths and rotary caches (max_positions, D / 2) per rope key
    seqlens_k: ir.Value | None = None
    total_len: ir.Value | None = None
    caches: dict[str, tuple[ir.Value, ir.Value]] = field(default_factory=dict)
    compressed: bool = False  # the pasts are compressed KV views: attention reads them (attend_compressed)
    position_ids: ir.Value | None = None  # fused form + compressed KV: (B, S) for RotaryEmbedding
    flat_masks: dict[int | None, ir.Value] = field(default_factory=dict)  # masks as (B, 1, rep * S, T)


def dense_positions(b: Builder, input_ids: ir.Value, attention_mask: ir.Value) -> ir.Value:
    """position_ids (B, S) of right-padded rows (the fused form's assumption): past length + arange(S)."""
    total = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2), b.ints(0))
    seq = b.op("Squeeze", b.op("Shape", input_ids, start=1, end=2), b.ints(0))
    positions = b.op("Range", b.op("Sub", total, seq), total, b.const(np.array(1, np.int64)))
    return b.op("Expand", positions, b.op("Shape", input_ids))


def select_long(b: Builder, total: ir.Value, rope: Rope, short: ir.Value, long: ir.Value) -> ir.Value:
    """longrope: the long-factor value once the total length exceeds the switch length, else the short one."""
    use_long = b.op("Greater", total, b.const(np.array(rope.switch_len, np.int64)))
    return b.op("Where", use_long, long, short)


def plain_context(
    b: Builder,
    spec: DecoderSpec,
    input_ids: ir.Value,
    attention_mask: ir.Value,
    position_ids: ir.Value,
) -> BlockContext:
    """Rotary tables from position_ids and the additive causal/padding/window masks, shared by all layers."""
    act = b.ir_dtype
    tot_len = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2), b.ints(0))
    pos = b.op("Unsqueeze", b.op("Cast", position_ids, to=ir.DataType.FLOAT), b.ints(-1))  # (B, S, 1)
    rotary = {}
    for key, rope in spec.ropes.items():
        inv_freq = b.const(rope.inv_freq.astype(np.float32))
        if rope.long_inv_freq is not None:
            inv_freq = select_long(b, tot_len, rope, inv_freq, b.const(rope.long_inv_freq.astype(np.float32)))
        freqs = b.op("Mul", pos, inv_freq)  # (B, S, R/2)
        emb = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.ints(1))  # (B, 1, S, R)
        cos, sin = b.op("Cos", emb), b.op("Sin", emb)
        if rope.scaling != 1.0:
            cos, sin = (b.op("Mul", t, b.const(np.float32(rope.scaling))) for t in (cos, sin))
        if act != ir.DataType.FLOAT:
            cos, sin = b.op("Cast", cos, to=act), b.op("Cast", sin, to=act)
        rotary[key] = (cos, sin)

    # Additive attention masks (B, 1, 1, S, T) in float32: causal (within the window) and attention_mask.
    seq_len = b.op("Squeeze", b.op("Shape", input_ids, start=1, end=2), b.ints(0))
    one = b.const(np.array(1, np.int64))
    q_pos = b.op("Range", b.op("Sub", tot_len, seq_len), tot_len, one)  # (S,) absolute query positions
    k_pos = b.op("Range", b.const(np.array(0, np.int64)), tot_len, one)  # (T,)
    q_col = b.op("Unsqueeze", q_pos, b.ints(1))  # (S, 1)
    k_row = b.op("Unsqueeze", k_pos, b.ints(0))  # (1, T)
    causal = b.op("LessOrEqual", k_row, q_col)  # (S, T)
    keep = b.op(
        "Unsqueeze", b.op("Cast", attention_mask, to=ir.DataType.BOOL), b.ints(1, 2, 3)
    )  # (B,1,1,1,T)
    masks = {}
    for window in sorted({layer.window for layer in spec.layers}, key=lambda w: w or 0):
        allowed = causal
        if window:
            in_window = b.op("Greater", k_row, b.op("Sub", q_col, b.const(np.array(window, np.int64))))
            allowed = b.op("And", allowed, in_window)
        allowed = b.op("And", allowed, keep)  # (B, 1, 1, S, T)
        masks[window] = b.op(
            "Where", allowed, b.const(np.float32(0)), b.const(np.float32(np.finfo(np.float32).min))
        )
    return BlockContext(spec, "plain", rotary=rotary, masks=masks)


def fused_context(b: Builder, spec: DecoderSpec, attention_mask: ir.Value) -> BlockContext:
    """GroupQueryAttention's inputs shared by all layers: per-row lengths - 1, total length, rotary caches."""
    lengths = b.op("ReduceSum", attention_mask, b.ints(1), keepdims=0)  # (B,) valid tokens, past included
    seqlens_k = b.op("Cast", b.op("Sub", lengths, b.const(np.array(1, np.int64))), to=ir.DataType.INT32)
    total = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2), b.ints(0))
    total_len = b.op("Cast", total, to=ir.DataType.INT32)
    caches = {}
    for key, rope in spec.ropes.items():
        suffix = "" if len(spec.ropes) == 1 else f".{key}"
        cos, sin = rope.tables(spec.max_positions)  # (max_positions, D/2)
        cos_v = b.weight(f"rotary{suffix}.cos_cache", cos.astype(b.np_dtype))
        sin_v = b.weight(f"rotary{suffix}.sin_cache", sin.astype(b.np_dtype))
        if rope.long_inv_freq is not None:
            cos_l, sin_l = rope.tables(spec.max_positions, long=True)
            cos_v = select_long(
                b, total, rope, cos_v, b.weight(f"rotary{suffix}.cos_cache_long", cos_l.astype(b.np_dtype))
            )
            sin_v = select_long(
                b, total, rope, sin_v, b.weight(f"rotary{suffix}.sin_cache_long", sin_l.astype(b.np_dtype))
            )
        caches[key] = (cos_v, sin_v)
    return BlockContext(spec, "fused", seqlens_k=seqlens_k, total_len=total_len, caches=caches)


def block_linears(fam: Family, layer: nn.Module) -> list[nn.Module]:
    """A block's linear modules in the family's order (packed q/k/v, o, packed gate/up, down)."""
    return [layer.get_submodule(n) for n in fam.linears]


def projections(
    b: Builder, c: BlockContext, x: ir.Value, layer: nn.Module, names: tuple[str, ...], p: str
) -> list[ir.Value]:
    """x through projections of the same input: one packed output in the fused form (or when the family
    stores them as one module), else one output per projection."""
    modules = [layer.get_submodule(n) for n in names]
    full = [f"{p}.{n}" for n in names]
    if len(modules) == 1:
        return [lower_linear(b, x, modules[0], full[0])]
    if c.form == "fused":
        return [lower_packed(b, x, modules, full)]
    return [lower_linear(b, x, m, n) for m, n in zip(modules, full, strict=True)]


def mlp_activation(b: Builder, kind: str, gate: ir.Value) -> ir.Value:
    """The MLP's gate activation (MLP_ACTIVATIONS registry)."""
    return MLP_ACTIVATIONS[kind](b, gate)


MLP_ACTIVATIONS: dict[str, Callable[[Builder, ir.Value], ir.Value]] = {
    "silu": lambda b, x: b.op("Mul", x, b.op("Sigmoid", x)),
    "gelu_pytorch_tanh": lambda b, x: b.op("Gelu", x, approximate="tanh"),
    "gelu": lambda b, x: b.op("Gelu", x),
}


def head_norm(b: Builder, c: BlockContext, x: ir.Value, weight: ir.Value, heads: int) -> ir.Value:
    """Per-head RMSNorm over head_dim of a (B, S, heads * D) projection (Qwen3 / Gemma-3 q/k norms)."""
    d = c.spec.head_dim
    x = b.op("Reshape", x, b.ints(0, 0, heads, d))  # (B, S, heads, D)
    if c.form == "fused":
        x = b.op(
            "SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=c.spec.rms_norm_eps, stash_type=1
        )
    else:
        x = rms_norm(b, x, weight, c.spec.rms_norm_eps)
    return b.op("Reshape", x, b.ints(0, 0, heads * d))


def split_qkv(b: Builder, c: BlockContext, qkv: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(B, S, (nh + 2 nkv) D) -> q (B, S, nh D), k, v (B, S, nkv D)."""
    d = c.spec
    sizes = b.ints(d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.num_kv_heads * d.head_dim)
    q, k, v = b.tape.op_multi_out("Split", [qkv, sizes], {"axis": -1}, num_outputs=3)
    return q, k, v


def emit_block(
    b: Builder,
    c: BlockContext,
    stream: Stream,
    layer: nn.Module,
    p: str,
    norms: dict[str, ir.Value],
    where: LayerSpec,
    past_k: ir.Value,
    past_v: ir.Value,
) -> tuple[Stream, ir.Value, ir.Value]:
    """One decoder block in the context's form: the new residual stream and the present key/value.

    The stream's last residual add stays pending (the fused form's next norm fuses it); ``norms`` holds the
    block's norm scales by module name (the family's ``block_norms``).
    """
    fam = c.spec.family
    attend = attend_compressed if c.compressed else attend_fused if c.form == "fused" else attend_plain
    x, h = pre_norm(b, c, stream, norms[fam.norms.attn_in])
    qkv = projections(b, c, x, layer, fam.qkv, p)  # packed (B, S, (nh + 2 nkv) * D) or q, k, v
    out, k, v = attend(b, c, qkv, norms, where, past_k, past_v)  # out (B, S, nh * D)
    o = lower_linear(b, out, layer.get_submodule(fam.o_proj), f"{p}.{fam.o_proj}")
    if fam.norms.attn_out:
        o = post_norm(b, c, o, norms[fam.norms.attn_out])
    x, h = pre_norm(b, c, (h, o), norms[fam.norms.mlp_in])
    gate_up = projections(b, c, x, layer, fam.gate_up, p)
    if len(gate_up) == 1:
        gate_up = b.tape.op_multi_out("Split", gate_up, {"axis": -1, "num_outputs": 2}, num_outputs=2)
    gate, up = gate_up
    act_out = b.op("Mul", mlp_activation(b, c.spec.activation, gate), up)  # act(gate) * up
    down = lower_linear(b, act_out, layer.get_submodule(fam.down), f"{p}.{fam.down}")
    if fam.norms.mlp_out:
        down = post_norm(b, c, down, norms[fam.norms.mlp_out])
    return (h, down), k, v


def pre_norm(b: Builder, c: BlockContext, stream: Stream, weight: ir.Value) -> tuple[ir.Value, ir.Value]:
    """RMSNorm of the stream (pending residual add included): (normalized, the summed stream)."""
    if c.form == "fused":
        return fused_norm(b, stream, weight, c.spec.rms_norm_eps)
    h = materialize(b, stream)
    return rms_norm(b, h, weight, c.spec.rms_norm_eps), h


def post_norm(b: Builder, c: BlockContext, x: ir.Value, weight: ir.Value) -> ir.Value:
    """RMSNorm of a branch output before its residual add (Gemma's post-attention / post-feedforward norms)."""
    return pre_norm(b, c, (x, None), weight)[0]


def fused_norm(b: Builder, stream: Stream, weight: ir.Value, eps: float) -> tuple[ir.Value, ir.Value]:
    """RMSNorm of the stream with its pending residual add fused in: (normalized, the summed stream)."""
    h, delta = stream
    if delta is None:
        return b.op("SimplifiedLayerNormalization", h, weight, axis=-1, epsilon=eps, stash_type=1), h
    out, _, _, summed = b.tape.op_multi_out(
        "SkipSimplifiedLayerNormalization",
        [h, delta, weight],
        {"epsilon": eps},
        domain=MS_DOMAIN,
        num_outputs=4,
    )
    return out, summed


def attend_fused(
    b: Builder,
    c: BlockContext,
    qkv: list[ir.Value],
    norms: dict[str, ir.Value],
    where: LayerSpec,
    past_k: ir.Value,
    past_v: ir.Value,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """GroupQueryAttention with rotary inside on the packed q/k/v (or separate q/k/v after q/k norms)."""
    d = c.spec
    inputs = [qkv[0], None, None]
    if d.family.qk_norm:
        q, k, v = split_qkv(b, c, qkv[0])
        qn, kn = d.family.qk_norm
        inputs = [
            head_norm(b, c, q, norms[qn], d.num_heads),
            head_norm(b, c, k, norms[kn], d.num_kv_heads),
            v,
        ]
    cos_cache, sin_cache = c.caches[where.rope]
    attrs = {
        "num_heads": d.num_heads,
        "kv_num_heads": d.num_kv_heads,
        "scale": float(d.attn_scale),
        "do_rotary": 1,
        "rotary_interleaved": 0,
        "local_window_size": where.window or -1,  # keys in (q - window, q], as transformers
    }
    if d.attn_softcap is not None:
        attrs["softcap"] = float(d.attn_softcap)
    scales = []
    if not isinstance(past_k, ir.Value):  # a static per-channel quantized cache the kernel reads and writes
        bits = past_k.plan.bits
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=bits)
        scales = [None, None, None, past_k.scale, past_v.scale]  # position_ids, bias, head_sink, k/v scales
        past_k, past_v = past_k.codes, past_v.codes
    out, k, v = b.tape.op_multi_out(
        "GroupQueryAttention",
        [*inputs, past_k, past_v, c.seqlens_k, c.total_len, cos_cache, sin_cache, *scales],
        attrs,
        domain=MS_DOMAIN,
        num_outputs=3,
    )  # out (B, S, nh * D); k, v (B, nkv, T, D)
    return out, k, v


def attend_plain(
    b: Builder,
    c: BlockContext,
    qkv: list[ir.Value],
    norms: dict[str, ir.Value],
    where: LayerSpec,
    past_k: ir.Value,
    past_v: ir.Value,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Attention in standard ops: out (B, S, nh * D) and the present key/value (B, kv, T, D)."""
    d = c.spec
    hd, nh, nkv = d.head_dim, d.num_heads, d.num_kv_heads
    act = b.ir_dtype
    q, k, v = heads_qkv(b, c, qkv, norms, where)
    k = b.op("Concat", past_k, k, axis=2)  # (B, nkv, T, D)
    v = b.op("Concat", past_v, v, axis=2)
    # Grouped-query attention without repeating K/V: queries as (B, nkv, rep, S, D).
    qg = b.op("Reshape", b.op("Mul", q, b.scalar(d.attn_scale)), b.ints(0, nkv, nh // nkv, -1, hd))
    kt = b.op("Unsqueeze", b.op("Transpose", k, perm=[0, 1, 3, 2]), b.ints(2))  # (B, nkv, 1, D, T)
    scores = b.op("MatMul", qg, kt)  # (B, nkv, rep, S, T)
    if act != ir.DataType.FLOAT:
        scores = b.op("Cast", scores, to=ir.DataType.FLOAT)
    if d.attn_softcap is not None:
        scores = softcap(b, scores, d.attn_softcap, np.float32)
    probs = b.op("Softmax", b.op("Add", scores, c.masks[where.window]), axis=-1)
    if act != ir.DataType.FLOAT:
        probs = b.op("Cast", probs, to=act)
    out = b.op("MatMul", probs, b.op("Unsqueeze", v, b.ints(2)))  # (B, nkv, rep, S, D)
    out = b.op("Reshape", out, b.ints(0, nh, -1, hd))  # (B, nh, S, D)
    out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.ints(0, 0, nh * hd))  # (B, S, nh*D)
    return out, k, v


def heads_qkv(
    b: Builder, c: BlockContext, qkv: list[ir.Value], norms: dict[str, ir.Value], where: LayerSpec
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Projections -> q (B, nh, S, D), k, v (B, nkv, S, D), q/k normalized (if the family does) and rotated."""
    d = c.spec
    hd, nh, nkv = d.head_dim, d.num_heads, d.num_kv_heads
    q, k, v = split_qkv(b, c, qkv[0]) if len(qkv) == 1 else qkv
    if d.family.qk_norm:
        qn, kn = d.family.qk_norm
        q, k = head_norm(b, c, q, norms[qn], nh), head_norm(b, c, k, norms[kn], nkv)
    if (
        c.form == "fused"
    ):  # one RotaryEmbedding node per tensor on (B, S, heads * D), GroupQueryAttention's caches
        cos_cache, sin_cache = c.caches[where.rope]
        q, k = (
            b.op("RotaryEmbedding", x, c.position_ids, cos_cache, sin_cache, domain=MS_DOMAIN, num_heads=n)
            for x, n in ((q, nh), (k, nkv))
        )
    q = b.op("Transpose", b.op("Reshape", q, b.ints(0, 0, nh, hd)), perm=[0, 2, 1, 3])  # (B, nh, S, D)
    k = b.op("Transpose", b.op("Reshape", k, b.ints(0, 0, nkv, hd)), perm=[0, 2, 1, 3])  # (B, nkv, S, D)
    v = b.op("Transpose", b.op("Reshape", v, b.ints(0, 0, nkv, hd)), perm=[0, 2, 1, 3])
    if c.form == "fused":
        return q, k, v
    cos, sin = c.rotary[where.rope]
    return rotate(b, q, cos, sin, d.rotary_dim, hd), rotate(b, k, cos, sin, d.rotary_dim, hd), v


def attend_compressed(
    b: Builder,
    c: BlockContext,
    qkv: list[ir.Value],
    norms: dict[str, ir.Value],
    where: LayerSpec,
    past_k,
    past_v,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Attention that reads a compressed past directly (exporter/kv_cache.py views: ``scores`` / ``weighted``)
    plus the exact new tokens: out (B, S, nh * D) and the new k, v (B, kv, S, D) for the layout to store.

    Scores over the past and over the new tokens are concatenated before one softmax (mask added over the
    whole length); the probabilities are split again, the past's go to the view, the new tokens' to v."""
    d = c.spec
    hd, nh, nkv = d.head_dim, d.num_heads, d.num_kv_heads
    act = b.ir_dtype
    q, k, v = heads_qkv(b, c, qkv, norms, where)
    kf, vf = to_float(b, k), to_float(b, v)  # attention in float32: fp16 dots of raw codes could overflow
    if hasattr(past_k, "quantize"):  # static codes: a token attends over its own key/value as stored
        kf, vf = past_k.quantize(b, k)[1], past_v.quantize(b, v)[1]
    # Grouped-query attention without repeating K/V: queries as (B, nkv, rep * S, D).
    qg = b.op(
        "Reshape", b.op("Mul", to_float(b, q), b.const(np.float32(d.attn_scale))), b.ints(0, nkv, -1, hd)
    )
    scores = b.op(
        "Concat",
        past_k.scores(b, qg),  # (B, nkv, rep * S, P)
        b.op("MatMul", qg, b.op("Transpose", kf, perm=[0, 1, 3, 2])),  # (B, nkv, rep * S, S)
        axis=-1,
    )
    if d.attn_softcap is not None:
        scores = softcap(b, scores, d.attn_softcap, np.float32)
    if where.window not in c.flat_masks:  # (B, 1, 1, S, T) -> (B, 1, rep * S, T), once per window
        mask = b.op("Squeeze", c.masks[where.window], b.ints(2))
        c.flat_masks[where.window] = b.op("Tile", mask, b.ints(1, 1, nh // nkv, 1))
    probs = b.op("Softmax", b.op("Add", scores, c.flat_masks[where.window]), axis=-1)
    p_len = past_k.length(b)
    p_past = b.op("Slice", probs, b.ints(0), p_len, b.ints(-1))
    p_new = b.op("Slice", probs, p_len, b.ints(INT64_MAX), b.ints(-1))
    out = b.op("Add", past_v.weighted(b, p_past), b.op("MatMul", p_new, vf))  # (B, nkv, rep * S, D)
    if act != ir.DataType.FLOAT:
        out = b.op("Cast", out, to=act)
    out = b.op("Reshape", out, b.ints(0, nh, -1, hd))  # (B, nh, S, D)
    out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.ints(0, 0, nh * hd))  # (B, S, nh*D)
    return out, k, v


def linear_key(module: nn.Module) -> int:
    """Identity of what a linear stores: the QuantLinear itself, or a float Linear's weight Parameter."""
    return id(module) if not isinstance(module, nn.Linear) else id(module.weight)


def shares_weights(fam: Family, a: nn.Module, b_: nn.Module) -> bool:
    """True when two blocks use the very same weights for all their linears (a FoldGPT shared group)."""
    return all(linear_key(a.get_submodule(n)) == linear_key(b_.get_submodule(n)) for n in fam.linears)


def emit_shared_group(
    b: Builder,
    c: BlockContext,
    h: ir.Value,
    layers: list[nn.Module],
    first: int,
    pasts: list[tuple[ir.Value, ir.Value]],
) -> tuple[ir.Value, list[tuple[ir.Value, ir.Value]]]:
    """Consecutive positions sharing one block's weights (and one attention kind) as ONE Scan over them.

    ONNX Runtime pre-packs a weight once per node that uses it, so L nodes sharing a weight still cost L packed
    copies in RAM; a Scan holds one node per weight (bench/shared_prepack.py measures both). The Scan iterates
    over the positions' own norms and KV caches; its state is the hidden state. Weight preparation (widening
    planes, packing projections) goes to the main graph through ``Builder.prep``.
    """
    fam = c.spec.family
    p, g = fam.layer_name(first), len(layers)
    stack = {
        key: b.weight(
            stacked_name(f"{p}.{key}"),
            np.stack(
                [to_numpy(layer.get_submodule(key).weight, b.np_dtype) + fam.norm_offset for layer in layers]
            ),
        )
        for key in fam.block_norms
    }  # (g, H) or (g, D): each position keeps its own norms
    past_k = b.op(
        "Concat", *[b.op("Unsqueeze", pk, b.ints(0)) for pk, _ in pasts], axis=0
    )  # (g, B, kv, P, D)
    past_v = b.op("Concat", *[b.op("Unsqueeze", pv, b.ints(0)) for _, pv in pasts], axis=0)

    def body_input(name: str, shape: list) -> ir.Value:
        return ir.Value(name=f"{p}.scan.{name}", type=ir.TensorType(b.ir_dtype), shape=ir.Shape(shape))

    spec = c.spec
    h_in = body_input("h", [None, None, spec.hidden_size])
    norms = {key: body_input(key, list(value.shape)[1:]) for key, value in stack.items()}
    pk, pv = (body_input(n, [None, spec.num_kv_heads, None, spec.head_dim]) for n in ("past_k", "past_v"))
    outer = b.tape
    b.tape = ir.tape.Tape()
    try:
        stream, k, v = emit_block(b, c, (h_in, None), layers[0], p, norms, spec.layers[first], pk, pv)
        h_out = materialize(b, stream)
        body_nodes = b.tape.nodes
    finally:
        b.tape = outer
    for n, node in enumerate(body_nodes):  # names unique across the model: ONNX Runtime wants global SSA
        node.name = f"{p}.scan.node{n}"
        for m, out in enumerate(node.outputs):
            out.name = f"{p}.scan.v{n}_{m}"
    body = ir.Graph(
        [h_in, *norms.values(), pk, pv], [h_out, k, v], nodes=body_nodes, name=f"{p}.shared_block"
    )
    h, keys, values = b.tape.op_multi_out(
        "Scan",
        [h, *stack.values(), past_k, past_v],
        {"body": body, "num_scan_inputs": len(stack) + 2},
        num_outputs=3,
    )  # keys/values: (g, B, kv, T, D)
    ks = b.tape.op_multi_out("Split", [keys], {"axis": 0, "num_outputs": g}, num_outputs=g)
    vs = b.tape.op_multi_out("Split", [values], {"axis": 0, "num_outputs": g}, num_outputs=g)
    zero = b.ints(0)
    return h, [(b.op("Squeeze", k_, zero), b.op("Squeeze", v_, zero)) for k_, v_ in zip(ks, vs, strict=True)]


def lower_embedding(b: Builder, model: nn.Module, input_ids: ir.Value) -> ir.Value:
    """Token embedding: a quantized tied lm_head shares its packed weight (registry hook), else a float Gather."""
    fam = family_of(model)
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for cls in type(head).__mro__:
        if tied and cls in EMBEDDING_LOWERINGS and b.opts.quantized_embedding:
            return EMBEDDING_LOWERINGS[cls](b, head, input_ids, fam.lm_head)
    emb = model.get_input_embeddings()
    table = b.weight(weight_name(fam.embed), to_numpy(emb.weight, b.np_dtype), key=id(emb.weight))
    return b.op("Gather", table, input_ids)


EmbeddingLowering = Callable[[Builder, nn.Module, ir.Value, str], ir.Value]
EMBEDDING_LOWERINGS: dict[type, EmbeddingLowering] = {}


def lower_lm_head(b: Builder, model: nn.Module, h: ir.Value) -> ir.Value:
    """Logits. A float lm_head tied to the embedding reuses the embedding table via Gemm(transB=1)."""
    fam = family_of(model)
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if isinstance(head, nn.Linear) and head.weight is emb.weight:
        table = b.weight(weight_name(fam.embed), to_numpy(emb.weight, b.np_dtype), key=id(emb.weight))
        flat = b.op("Reshape", h, b.ints(-1, head.in_features))  # (B*S, H)
        logits = b.op("Gemm", flat, table, transB=1)  # (B*S, V)
        shape = b.op("Concat", b.op("Shape", h, start=0, end=2), b.ints(-1), axis=0)
        return b.op("Reshape", logits, shape)
    return lower_linear(b, h, head, fam.lm_head)
