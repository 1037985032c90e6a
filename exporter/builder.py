"""Build the ONNX decoder graph (prefill + decode with a KV cache) directly from a model's weights with onnx-ir.

The graph is written op by op from the weights, not traced, so we control every op (any head size, no fused
attention requirement), every dtype, and weight sharing: each unique weight tensor (by identity) becomes one
initializer, however many depth positions use it. Linear layers are lowered by ``LINEAR_LOWERINGS``, a registry
keyed by module type (float ``nn.Linear`` -> MatMul, ``QuantLinear`` -> MatMulNBits bit planes).

I/O (the names optimum's ORTModelForCausalLM and onnxruntime-genai use):
  input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
  past_key_values.{i}.key/.value (B, kv_heads, P, head_dim)  ->  logits (B, S, V) float32,
  present.{i}.key/.value (B, kv_heads, P+S, head_dim).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from edgepack.exporter.kv_cache import PlainKV
from torch import nn

from edgepack.model import DecoderDims

log = logging.getLogger(__name__)

OPSET = 21
IR_VERSION = 10  # onnxruntime 1.31 refuses IR 13 (facts.md)
MS_DOMAIN = "com.microsoft"

DTYPES = {"float32": (ir.DataType.FLOAT, np.float32), "float16": (ir.DataType.FLOAT16, np.float16)}


@dataclass
class BuildOptions:
    """What the target decides for the graph: activation dtype and how low-bit matmuls compute."""

    dtype: str = "float32"
    loop_shared_blocks: bool = True  # a folded group of positions sharing weights becomes one Scan
    quantized_embedding: bool = True  # share the packed lm_head with the embedding via GatherBlockQuantized
    kv_layout: object | None = None  # exporter.kv_cache layout (PlainKV when None)


@dataclass
class Builder:
    """Emits nodes with a Tape and owns initializers, deduplicated by the identity of their source tensor."""

    opts: BuildOptions
    tape: ir.tape.Tape = field(default_factory=ir.tape.Tape)
    initializers: dict[str, ir.Value] = field(default_factory=dict)
    _by_key: dict[object, object] = field(default_factory=dict)
    quant_layers: dict[str, dict] = field(default_factory=dict)  # per quantized layer: planes, block, bytes
    _const_count: int = 0

    @property
    def ir_dtype(self) -> ir.DataType:
        return DTYPES[self.opts.dtype][0]

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.opts.dtype][1]

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attrs) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attrs or None, domain=domain)

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
    w = b.weight(f"{name}.weight", to_numpy(module.weight, b.np_dtype).T, key=("wT", id(module.weight)))
    y = b.op("MatMul", x, w)
    if module.bias is not None:
        y = b.op("Add", y, b.weight(f"{name}.bias", to_numpy(module.bias, b.np_dtype), key=id(module.bias)))
    return y


def lower_linear(b: Builder, x: ir.Value, module: nn.Module, name: str) -> ir.Value:
    for cls in type(module).__mro__:
        if cls in LINEAR_LOWERINGS:
            return LINEAR_LOWERINGS[cls](b, x, module, name)
    raise TypeError(f"no ONNX lowering for {type(module).__name__} at {name}")


# ----------------------------------------------------------------------------- decoder graph


def rms_norm(b: Builder, x: ir.Value, weight: ir.Value, eps: float) -> ir.Value:
    """x / sqrt(mean(x^2) + eps) * w, computed in float32 (fp16 squares overflow); ORT fuses this pattern."""
    xf = x if b.opts.dtype == "float32" else b.op("Cast", x, to=ir.DataType.FLOAT)
    var = b.op("ReduceMean", b.op("Mul", xf, xf), b.ints(-1), keepdims=1)
    y = b.op("Div", xf, b.op("Sqrt", b.op("Add", var, b.const(np.float32(eps)))))
    if b.opts.dtype != "float32":
        y = b.op("Cast", y, to=b.ir_dtype)
    return b.op("Mul", y, weight)


def rotate(b: Builder, x: ir.Value, cos: ir.Value, sin: ir.Value, half: int) -> ir.Value:
    """RoPE: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). x: (B, H, S, D)."""
    x1 = b.op("Slice", x, b.ints(0), b.ints(half), b.ints(-1))
    x2 = b.op("Slice", x, b.ints(half), b.ints(2 * half), b.ints(-1))
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def norm_weight(b: Builder, module: nn.Module, name: str) -> ir.Value:
    return b.weight(f"{name}.weight", to_numpy(module.weight, b.np_dtype), key=id(module.weight))


def build_decoder(model: nn.Module, opts: BuildOptions) -> ir.Model:
    """The full decoder graph of a Llama-family ``*ForCausalLM`` (possibly folded and/or quantized)."""
    from edgepack.exporter import quant_lowering  # noqa: F401  (registers the QuantLinear lowerings)

    dims = DecoderDims.from_config(model.config)
    b = Builder(opts)
    act = b.ir_dtype
    n_layers = len(model.model.layers)
    hd = dims.head_dim

    batch, seq, total = (
        ir.SymbolicDim("batch_size"),
        ir.SymbolicDim("sequence_length"),
        ir.SymbolicDim("total_sequence_length"),
    )

    def graph_input(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    input_ids = graph_input("input_ids", ir.DataType.INT64, [batch, seq])
    attention_mask = graph_input("attention_mask", ir.DataType.INT64, [batch, total])
    position_ids = graph_input("position_ids", ir.DataType.INT64, [batch, seq])
    layout = opts.kv_layout if opts.kv_layout is not None else PlainKV()
    pasts = layout.begin(b, n_layers, dims)  # each layer's past (K, V) (B, kv, P, D), restored if compressed

    # Embedding lookup (a quantized tied embedding is lowered with the lm_head; see quant_lowering).
    h = lower_embedding(b, model, input_ids)  # (B, S, H)

    # Rotary tables from position_ids, shared by all layers: (B, 1, S, D).
    inv_freq = 1.0 / (dims.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    pos = b.op("Unsqueeze", b.op("Cast", position_ids, to=ir.DataType.FLOAT), b.ints(-1))  # (B, S, 1)
    freqs = b.op("Mul", pos, b.const(inv_freq.astype(np.float32)))  # (B, S, D/2)
    emb = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.ints(1))  # (B, 1, S, D)
    cos, sin = b.op("Cos", emb), b.op("Sin", emb)
    if act != ir.DataType.FLOAT:
        cos, sin = b.op("Cast", cos, to=act), b.op("Cast", sin, to=act)

    # Additive attention mask (B, 1, 1, S, T) in float32: causal within the window, and attention_mask.
    seq_len = b.op("Squeeze", b.op("Shape", input_ids, start=1, end=2), b.ints(0))
    tot_len = b.op("Squeeze", b.op("Shape", attention_mask, start=1, end=2), b.ints(0))
    one = b.const(np.array(1, np.int64))
    q_pos = b.op("Range", b.op("Sub", tot_len, seq_len), tot_len, one)  # (S,) absolute query positions
    k_pos = b.op("Range", b.const(np.array(0, np.int64)), tot_len, one)  # (T,)
    q_col = b.op("Unsqueeze", q_pos, b.ints(1))  # (S, 1)
    k_row = b.op("Unsqueeze", k_pos, b.ints(0))  # (1, T)
    allowed = b.op("LessOrEqual", k_row, q_col)  # (S, T)
    if dims.sliding_window and dims.sliding_window < dims.max_positions:
        in_window = b.op(
            "Greater", k_row, b.op("Sub", q_col, b.const(np.array(dims.sliding_window, np.int64)))
        )
        allowed = b.op("And", allowed, in_window)
    keep = b.op(
        "Unsqueeze", b.op("Cast", attention_mask, to=ir.DataType.BOOL), b.ints(1, 2, 3)
    )  # (B,1,1,1,T)
    allowed = b.op("And", allowed, keep)  # (B, 1, 1, S, T)
    mask = b.op("Where", allowed, b.const(np.float32(0)), b.const(np.float32(np.finfo(np.float32).min)))

    ctx = BlockContext(dims, cos, sin, mask, b.scalar(1.0 / np.sqrt(hd)))
    layers = list(model.model.layers)
    presents: list[tuple[ir.Value, ir.Value]] = []
    i = 0
    while i < n_layers:
        j = i + 1
        while opts.loop_shared_blocks and j < n_layers and shares_weights(layers[i], layers[j]):
            j += 1
        if j - i > 1:
            h, group_presents = emit_shared_group(b, ctx, h, layers[i:j], i, pasts[i:j])
            presents.extend(group_presents)
        else:
            ln1 = norm_weight(b, layers[i].input_layernorm, f"model.layers.{i}.input_layernorm")
            ln2 = norm_weight(
                b, layers[i].post_attention_layernorm, f"model.layers.{i}.post_attention_layernorm"
            )
            h, k, v = emit_block(b, ctx, h, layers[i], f"model.layers.{i}", ln1, ln2, *pasts[i])
            presents.append((k, v))
        i = j

    h = rms_norm(b, h, norm_weight(b, model.model.norm, "model.norm"), dims.rms_norm_eps)
    logits = lower_lm_head(b, model, h)
    if act != ir.DataType.FLOAT:
        logits = b.op("Cast", logits, to=ir.DataType.FLOAT)

    outputs = [logits]
    logits.name = "logits"
    logits.type, logits.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, seq, dims.vocab_size])
    outputs.extend(layout.finish(b, presents))  # the layout names (and, if compressed, stores) the presents

    inputs = [input_ids, attention_mask, position_ids] + layout.graph_inputs
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
    return model_ir


@dataclass
class BlockContext:
    """Values every decoder block reads: shapes, rotary tables, the additive mask, the attention scale."""

    dims: DecoderDims
    cos: ir.Value
    sin: ir.Value
    mask: ir.Value
    scale: ir.Value


LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def emit_block(
    b: Builder,
    c: BlockContext,
    h: ir.Value,
    layer: nn.Module,
    p: str,
    ln1: ir.Value,
    ln2: ir.Value,
    past_k: ir.Value,
    past_v: ir.Value,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One decoder block: returns the new hidden state (B, S, H) and the present key/value (B, kv, T, D)."""
    d = c.dims
    hd, nh, nkv = d.head_dim, d.num_heads, d.num_kv_heads
    act = b.ir_dtype
    attn, mlp = layer.self_attn, layer.mlp
    x = rms_norm(b, h, ln1, d.rms_norm_eps)
    q = lower_linear(b, x, attn.q_proj, f"{p}.self_attn.q_proj")
    k = lower_linear(b, x, attn.k_proj, f"{p}.self_attn.k_proj")
    v = lower_linear(b, x, attn.v_proj, f"{p}.self_attn.v_proj")
    q = b.op("Transpose", b.op("Reshape", q, b.ints(0, 0, nh, hd)), perm=[0, 2, 1, 3])  # (B, nh, S, D)
    k = b.op("Transpose", b.op("Reshape", k, b.ints(0, 0, nkv, hd)), perm=[0, 2, 1, 3])  # (B, nkv, S, D)
    v = b.op("Transpose", b.op("Reshape", v, b.ints(0, 0, nkv, hd)), perm=[0, 2, 1, 3])
    q = rotate(b, q, c.cos, c.sin, hd // 2)
    k = rotate(b, k, c.cos, c.sin, hd // 2)
    k = b.op("Concat", past_k, k, axis=2)  # (B, nkv, T, D)
    v = b.op("Concat", past_v, v, axis=2)
    # Grouped-query attention without repeating K/V: queries as (B, nkv, rep, S, D).
    qg = b.op("Reshape", b.op("Mul", q, c.scale), b.ints(0, nkv, nh // nkv, -1, hd))
    kt = b.op("Unsqueeze", b.op("Transpose", k, perm=[0, 1, 3, 2]), b.ints(2))  # (B, nkv, 1, D, T)
    scores = b.op("MatMul", qg, kt)  # (B, nkv, rep, S, T)
    if act != ir.DataType.FLOAT:
        scores = b.op("Cast", scores, to=ir.DataType.FLOAT)
    probs = b.op("Softmax", b.op("Add", scores, c.mask), axis=-1)
    if act != ir.DataType.FLOAT:
        probs = b.op("Cast", probs, to=act)
    out = b.op("MatMul", probs, b.op("Unsqueeze", v, b.ints(2)))  # (B, nkv, rep, S, D)
    out = b.op("Reshape", out, b.ints(0, nh, -1, hd))  # (B, nh, S, D)
    out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.ints(0, 0, nh * hd))  # (B, S, nh*D)
    h = b.op("Add", h, lower_linear(b, out, attn.o_proj, f"{p}.self_attn.o_proj"))
    x = rms_norm(b, h, ln2, d.rms_norm_eps)
    gate = lower_linear(b, x, mlp.gate_proj, f"{p}.mlp.gate_proj")
    up = lower_linear(b, x, mlp.up_proj, f"{p}.mlp.up_proj")
    act_out = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # SiLU(gate) * up
    h = b.op("Add", h, lower_linear(b, act_out, mlp.down_proj, f"{p}.mlp.down_proj"))
    return h, k, v


def linear_key(module: nn.Module) -> int:
    """Identity of what a linear stores: the QuantLinear itself, or a float Linear's weight Parameter."""
    return id(module) if not isinstance(module, nn.Linear) else id(module.weight)


def shares_weights(a: nn.Module, b_: nn.Module) -> bool:
    """True when two blocks use the very same weights for all seven linears (a FoldGPT shared group)."""
    return all(linear_key(a.get_submodule(n)) == linear_key(b_.get_submodule(n)) for n in LINEARS)


PREPARERS: dict[type, Callable[[Builder, nn.Module, str], object]] = {}


def emit_shared_group(
    b: Builder,
    c: BlockContext,
    h: ir.Value,
    layers: list[nn.Module],
    first: int,
    pasts: list[tuple[ir.Value, ir.Value]],
) -> tuple[ir.Value, list[tuple[ir.Value, ir.Value]]]:
    """Consecutive positions sharing one block's weights as ONE Scan over the positions.

    ONNX Runtime pre-packs a weight once per node that uses it, so L nodes sharing a weight still cost L packed
    copies in RAM; a Scan holds one node per weight (bench/shared_prepack.py measures both). The Scan iterates
    over the positions' own norms and KV caches; its state is the hidden state.
    """
    p, g = f"model.layers.{first}", len(layers)
    for name in LINEARS:  # weight preparation (e.g. widening 1-bit planes) belongs in the main graph
        module = layers[0].get_submodule(name)
        for cls in type(module).__mro__:
            if cls in PREPARERS:
                PREPARERS[cls](b, module, f"{p}.{name}")
                break
    stack = {
        key: b.weight(
            f"{p}.{key}.weight.stacked",
            np.stack([to_numpy(getattr(layer, key).weight, b.np_dtype) for layer in layers]),
        )
        for key in ("input_layernorm", "post_attention_layernorm")
    }  # (g, H): each position keeps its own norms
    past_k = b.op(
        "Concat", *[b.op("Unsqueeze", pk, b.ints(0)) for pk, _ in pasts], axis=0
    )  # (g, B, kv, P, D)
    past_v = b.op("Concat", *[b.op("Unsqueeze", pv, b.ints(0)) for _, pv in pasts], axis=0)

    def body_input(name: str, shape: list) -> ir.Value:
        return ir.Value(name=f"{p}.scan.{name}", type=ir.TensorType(b.ir_dtype), shape=ir.Shape(shape))

    hidden = c.dims.hidden_size
    h_in = body_input("h", [None, None, hidden])
    ln1, ln2 = body_input("ln1", [hidden]), body_input("ln2", [hidden])
    pk, pv = (body_input(n, [None, c.dims.num_kv_heads, None, c.dims.head_dim]) for n in ("past_k", "past_v"))
    outer = b.tape
    b.tape = ir.tape.Tape()
    try:
        h_out, k, v = emit_block(b, c, h_in, layers[0], p, ln1, ln2, pk, pv)
        body_nodes = b.tape.nodes
    finally:
        b.tape = outer
    for n, node in enumerate(body_nodes):  # names unique across the model: ONNX Runtime wants global SSA
        node.name = f"{p}.scan.node{n}"
        for m, out in enumerate(node.outputs):
            out.name = f"{p}.scan.v{n}_{m}"
    body = ir.Graph([h_in, ln1, ln2, pk, pv], [h_out, k, v], nodes=body_nodes, name=f"{p}.shared_block")
    h, keys, values = b.tape.op_multi_out(
        "Scan",
        [h, stack["input_layernorm"], stack["post_attention_layernorm"], past_k, past_v],
        {"body": body, "num_scan_inputs": 4},
        num_outputs=3,
    )  # keys/values: (g, B, kv, T, D)
    ks = b.tape.op_multi_out("Split", [keys], {"axis": 0, "num_outputs": g}, num_outputs=g)
    vs = b.tape.op_multi_out("Split", [values], {"axis": 0, "num_outputs": g}, num_outputs=g)
    zero = b.ints(0)
    return h, [(b.op("Squeeze", k_, zero), b.op("Squeeze", v_, zero)) for k_, v_ in zip(ks, vs, strict=True)]


def lower_embedding(b: Builder, model: nn.Module, input_ids: ir.Value) -> ir.Value:
    """Token embedding: a quantized tied lm_head shares its packed weight (registry hook), else a float Gather."""
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for cls in type(head).__mro__:
        if tied and cls in EMBEDDING_LOWERINGS and b.opts.quantized_embedding:
            return EMBEDDING_LOWERINGS[cls](b, head, input_ids, "lm_head")
    emb = model.get_input_embeddings()
    table = b.weight("model.embed_tokens.weight", to_numpy(emb.weight, b.np_dtype), key=id(emb.weight))
    return b.op("Gather", table, input_ids)


EmbeddingLowering = Callable[[Builder, nn.Module, ir.Value, str], ir.Value]
EMBEDDING_LOWERINGS: dict[type, EmbeddingLowering] = {}


def lower_lm_head(b: Builder, model: nn.Module, h: ir.Value) -> ir.Value:
    """Logits. A float lm_head tied to the embedding reuses the embedding table via Gemm(transB=1)."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if isinstance(head, nn.Linear) and head.weight is emb.weight:
        table = b.weight("model.embed_tokens.weight", to_numpy(emb.weight, b.np_dtype), key=id(emb.weight))
        flat = b.op("Reshape", h, b.ints(-1, head.in_features))  # (B*S, H)
        logits = b.op("Gemm", flat, table, transB=1)  # (B*S, V)
        shape = b.op("Concat", b.op("Shape", h, start=0, end=2), b.ints(-1), axis=0)
        return b.op("Reshape", logits, shape)
    return lower_linear(b, h, head, "lm_head")
