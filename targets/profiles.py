"""Deployment targets: what a target decides about an artifact (activation dtype, legal ops, file format,
bundle contents). One frozen dataclass per target in a registry; ``get_target`` names the valid ones on a typo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgepack.errors import EdgepackError

# Ops the decoder graph may contain on any ONNX Runtime build (standard domain).
STANDARD_OPS = frozenset(
    ("", op)
    for op in (
        "Add",
        "And",
        "Cast",
        "Concat",
        "Cos",
        "Div",
        "Gather",
        "Gelu",  # Gemma's gelu-tanh MLP (opset 20)
        "Gemm",
        "Greater",
        "Identity",
        "LessOrEqual",
        "MatMul",
        "Mul",
        "Neg",
        "Range",
        "ReduceMean",
        "Reshape",
        "Shape",
        "Sigmoid",
        "Sin",
        "Slice",
        "Softmax",
        "Scan",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",  # Gemma's soft-capping of attention scores (plain form) and final logits
        "Transpose",
        "Unsqueeze",
        "Where",
        "DequantizeLinear",
        "BitShift",
        "BitwiseAnd",
        "BitwiseOr",
        "ReduceSum",
        "SimplifiedLayerNormalization",  # registered by onnxruntime in the ONNX domain
        # compressed KV cache (exporter/kv_cache.py): quantize, pack int4, SLERP merge, retained tokens
        "Acos",
        "BitwiseOr",
        "Clip",
        "Expand",
        "Floor",  # int4 KV read: high nibbles as floor(c / 16)
        "Less",
        "Max",
        "NonZero",
        "ReduceMax",
        "ReduceMin",
        "Round",
        "ScatterElements",
        "Tile",  # attention over compressed KV: the mask repeated over a kv head's query heads
    )
)
# ONNX Runtime contrib ops we lower to; all ship in the default CPU, CUDA and Android (AAR) packages.
CONTRIB_OPS = frozenset(
    ("com.microsoft", op)
    for op in (
        "MatMulNBits",
        "GatherBlockQuantized",
        "GroupQueryAttention",
        "RotaryEmbedding",  # fused form with a compressed KV cache (attention in standard ops)
        "SkipSimplifiedLayerNormalization",
    )
)


@dataclass(frozen=True)
class Target:
    """A deployment profile."""

    name: str
    description: str
    dtype: str  # activation (and float weight) dtype
    file_format: str  # "onnx" or "ort" (the .ort is written beside the .onnx)
    execution_provider: str
    allowed_ops: frozenset[tuple[str, str]]
    android_bundle: bool = False  # .ort + required_operators.config + Kotlin snippet + on-device runner
    quantized_embedding: bool = True  # GatherBlockQuantized for a quantized tied embedding
    # how the EP's GatherBlockQuantized indexes zero points (BuildOptions): "per-row" or "flat"
    gather_zero_points: str = "per-row"
    activations: str = "int8"  # low-bit matmuls on int8 activations (accuracy_level 4) or "float" (level 0)
    # genai_config.json's provider_options: the execution provider onnxruntime-genai opens the model on (none:
    # its CPU default; the builder's -e cuda writes {"cuda": {"enable_cuda_graph": "0"}})
    genai_provider_options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def genai_providers(self) -> list[dict]:
        """genai_config.json's session_options.provider_options for this target."""
        return [{name: dict(options)} for name, options in self.genai_provider_options]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allowed_ops"] = sorted(f"{dom or 'ai.onnx'}::{op}" for dom, op in self.allowed_ops)
        return d


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "cpu",
            "x86/ARM servers and desktops, ONNX Runtime CPU EP, fp32 activations",
            dtype="float32",
            file_format="onnx",
            execution_provider="CPUExecutionProvider",
            allowed_ops=STANDARD_OPS | CONTRIB_OPS,
        ),
        Target(
            "android",
            "phones: ONNX Runtime Android (CPU/XNNPACK), fp32 activations, .ort + reduced-build config",
            dtype="float32",
            file_format="ort",
            execution_provider="CPUExecutionProvider",
            allowed_ops=STANDARD_OPS | CONTRIB_OPS,
            android_bundle=True,
        ),
        Target(
            "cuda",
            "NVIDIA GPUs: ONNX Runtime CUDA EP, fp16 activations",
            dtype="float16",
            file_format="onnx",
            execution_provider="CUDAExecutionProvider",
            allowed_ops=STANDARD_OPS | CONTRIB_OPS,
            activations="float",  # the CUDA kernels compute in fp16 whatever the accuracy level
            gather_zero_points="flat",  # ONNX Runtime's CUDA GatherBlockQuantized (docs/results/cuda.md)
            genai_provider_options=(("cuda", (("enable_cuda_graph", "0"),)),),
        ),
    )
}


def get_target(name: str) -> Target:
    """The target called ``name``, or an EdgepackError listing the valid names."""
    if name not in TARGETS:
        raise EdgepackError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]
