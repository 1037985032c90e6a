"""Which of ONNX Runtime's contrib fusions this onnxruntime can run, per execution provider.

    python bench/fused_ops.py [--providers CPUExecutionProvider,CUDAExecutionProvider] [--json out.json]

An op whose schema is registered may still have no kernel on a given execution provider: ONNX Runtime 1.32 lists
SwiGLU, MatMulNBitsMlp and MatMulNBitsQkv (a gate/up projection pair with its activation, and q/k/v with the
norm before them, in one node), and a CPU session refuses each with NOT_IMPLEMENTED. The exporter can only use a
fusion where the target's provider runs it. For each op this builds a one-node graph at the shapes of
mix-llama-14m's decode step (K = 320, N = 768, block 32, 4 bits), opens it on each provider and runs it once:
"runs" (with its output checked against numpy where the op is simple enough), "no kernel" (NOT_IMPLEMENTED at
session creation or run) or the first line of any other error. Rerun after an onnxruntime upgrade: an op that
starts to run on the CPU EP is a candidate for the fused graph (docs/results/speed.md, "Fused contrib ops").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, BLOCK = 320, 768, 32
MS = "com.microsoft"


def quantized(name: str, rng: np.random.Generator) -> list:
    """A random 4-bit MatMulNBits weight (N, K / BLOCK, BLOCK / 2) and its scales, as initializers."""
    blob = rng.integers(0, 255, (N, K // BLOCK, BLOCK // 2), dtype=np.uint8)
    scales = (rng.random(N * K // BLOCK, dtype=np.float32) * 0.01).astype(np.float32)
    return [numpy_helper.from_array(blob, f"{name}_B"), numpy_helper.from_array(scales, f"{name}_S")]


def silu_times_up(x: np.ndarray) -> np.ndarray:
    gate, up = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return gate / (1 + np.exp(-gate)) * up


def cases(rng: np.random.Generator) -> dict[str, tuple]:
    """op -> (nodes, inputs {name: array}, initializers, outputs, reference or None)."""
    x = rng.standard_normal((1, 1, K), dtype=np.float32)
    both = rng.standard_normal((1, 1, 2 * N), dtype=np.float32)
    gate, up, norm = (
        quantized("gate", rng),
        quantized("up", rng),
        [numpy_helper.from_array(np.ones(K, np.float32), "g")],
    )
    nbits = dict(K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=4)
    return {
        "SwiGLU (gate and up in one input)": (
            [helper.make_node("SwiGLU", ["x"], ["y"], domain=MS, activation_alpha=1.0)],
            {"x": both}, [], ["y"], silu_times_up(both),
        ),
        "MatMulNBitsMlp (gate, up, SiLU)": (
            [helper.make_node("MatMulNBitsMlp", ["x", "", "", "gate_B", "gate_S", "", "up_B", "up_S"], ["y"],
                              domain=MS, activation="silu", **nbits)],
            {"x": x}, gate + up, ["y"], None,
        ),
        "MatMulNBitsQkv (RMSNorm, q, k, v)": (
            [helper.make_node("MatMulNBitsQkv", ["x", "", "g", "gate_B", "gate_S", "", "up_B", "up_S", "", "up_B",
                                                 "up_S"], ["q", "k", "v"], domain=MS, K=K, Nq=N, Nkv=N, bits=4,
                              block_size=BLOCK, accuracy_level=4, epsilon=1e-6)],
            {"x": x}, gate + up + norm, ["q", "k", "v"], None,
        ),
        "MatMulNBits (reference: the op the fused graph uses)": (
            [helper.make_node("MatMulNBits", ["x", "gate_B", "gate_S"], ["y"], domain=MS, **nbits)],
            {"x": x}, gate, ["y"], None,
        ),
        "QuickGelu (ONNX Runtime's Sigmoid + Mul fusion)": (
            [helper.make_node("QuickGelu", ["x"], ["y"], domain=MS, alpha=1.0)],
            {"x": x}, [], ["y"], x / (1 + np.exp(-x)),
        ),
    }  # fmt: skip


def probe(nodes, feeds: dict, inits: list, outputs: list[str], reference, provider: str) -> str:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in feeds.items()]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    model = helper.make_model(
        helper.make_graph(nodes, "probe", inputs, outs, inits),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
        if session.get_providers()[0] != provider:
            return f"{provider} not usable here"
        result = session.run(None, feeds)[0]
    except Exception as e:  # noqa: BLE001 (report any failure as the row's text)
        text = str(e)
        return "no kernel" if "NOT_IMPLEMENTED" in text else text.splitlines()[0][:120]
    if reference is not None:
        return f"runs (max |err| vs numpy {float(np.abs(result - reference).max()):.1e})"
    return f"runs (output {tuple(result.shape)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", default="", help="comma-separated (default: every available one)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    available = ort.get_available_providers()
    providers = [x for x in args.providers.split(",") if x] or [
        x for x in available if x != "AzureExecutionProvider"
    ]
    rng = np.random.default_rng(0)
    rows = {op: {pv: probe(*case, pv) for pv in providers} for op, case in cases(rng).items()}
    print(f"onnxruntime {ort.__version__}; available providers: {', '.join(available)}\n")
    print("| op | " + " | ".join(providers) + " |")
    print("|---|" + "---|" * len(providers))
    for op, by in rows.items():
        print(f"| {op} | " + " | ".join(by[pv] for pv in providers) + " |")
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
