"""Decode-step cost of MatMulNBits weight layouts at a model's shapes: block size, zero points, packed gate/up.

Each variant is a small ONNX graph with random 4-bit weights at the shapes of one model (default: the
Qwen2.5-0.5B config), M = 1 (one decode token), accuracy_level 4, run by ONNX Runtime on ``--threads``:

- ``mlp``: the model's whole stack of MLPs chained (x -> gate/up -> SiLU(gate) * up -> down -> next layer),
  with gate/up either packed (one MatMulNBits of N = 2 I, then Split) or separate (two MatMulNBits), or the
  whole MLP as one ``QMoE`` node with a single expert (ONNX Runtime's only CPU op that fuses SwiGLU: gate/up
  interleaved in FC1, ``accuracy_level`` 4, ``k`` = 1, a constant router input; its block size must divide
  both H and I);
- ``attn``: q/k/v (packed) and o projections of every layer, chained;
- ``lm_head``: the (V, H) head once.

With one thread the time is the calling thread's CPU time (robust on a loaded host), else wall time.

Distinct weights per layer, so the weights stream from memory as in the model. Variants are interleaved
round by round; the table gives per-variant medians of the rounds and each round's ratio to the first
variant of its part. Only ratios within this run mean anything on a shared host.

    python bench/matmul_layout.py --threads 2 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepack.kernels.packing import pack_nbits, pack_zero_points
from onnx import TensorProto, helper, numpy_helper

SHAPES = {  # hidden, intermediate, layers, q/k/v out, vocab
    "qwen2.5-0.5b": (896, 4864, 24, 1152, 151936),
    "mix-llama-14m": (320, 768, 12, 448, 8192),
}


def draw(rng, k: int, n: int, block: int, zp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One random 4-bit (N, K) weight: codes (N, K), scales (N, K blocks), zero points (N, K blocks) or None.
    Every variant draws through here, in this order, so graphs built from one seed hold the same weights."""
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    k_blocks = -(-k // block)
    scales = rng.random((n, k_blocks), dtype=np.float32) * 0.01 + 0.001
    zps = rng.integers(6, 10, (n, k_blocks), dtype=np.uint8) if zp else None
    return codes, scales, zps


def weight(rng, name: str, k: int, n: int, block: int, zp: bool) -> tuple[list, list[str]]:
    """Initializers of one random 4-bit (N, K) weight and the node's weight input names."""
    codes, scales, zps = draw(rng, k, n, block, zp)
    inits = [numpy_helper.from_array(pack_nbits(codes, 4, block), f"{name}.q"),
             numpy_helper.from_array(scales.reshape(-1), f"{name}.s")]  # fmt: skip
    names = [f"{name}.q", f"{name}.s"]
    if zp:
        inits.append(numpy_helper.from_array(pack_zero_points(zps, 4), f"{name}.z"))
        names.append(f"{name}.z")
    return inits, names


def matmul(x: str, y: str, names: list[str], k: int, n: int, block: int):
    return helper.make_node("MatMulNBits", [x, *names], [y], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=4)  # fmt: skip


def qmoe_weight(
    rng, name: str, k: int, n: int, block: int, zp: bool, interleave: bool
) -> tuple[list, list[str], str]:
    """One expert's (N, K) 4-bit weight in QMoE's layout: (1, N, K / 2) bytes, scales (1, N, K / block), zero
    points (1, N, ceil(K / block / 2)); ``interleave``: N = 2 I rows ordered gate 0, up 0, gate 1, ...
    Returns (initializers, QMoE's weight / scales / bias input names, its zero-point input name or "")."""
    codes, scales, zps = draw(rng, k, n, block, zp)  # the packed graph of the same seed holds these weights
    zps = np.zeros_like(scales, np.uint8) if zps is None else zps
    if interleave:  # draw gate and up as the packed variant does, then interleave their rows
        order = np.stack([np.arange(n // 2), np.arange(n // 2) + n // 2], 1).reshape(-1)
        codes, scales, zps = codes[order], scales[order], zps[order]
    inits = [numpy_helper.from_array(pack_nbits(codes, 4, block).reshape(1, n, -1), f"{name}.q"),
             numpy_helper.from_array(scales[None], f"{name}.s")]  # fmt: skip
    names = [f"{name}.q", f"{name}.s", ""]
    zname = ""
    if zp:
        inits.append(numpy_helper.from_array(pack_zero_points(zps, 4).reshape(1, n, -1), f"{name}.z"))
        zname = f"{name}.z"
    return inits, names, zname


def build(part: str, dims: tuple, block: int, zp: bool, packed: bool | str, seed: int = 0) -> bytes:
    h, inter, layers, qkv, vocab = dims
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    if part == "lm_head":
        w, names = weight(rng, "head", h, vocab, block, zp)
        inits += w
        nodes.append(matmul(x, "y", names, h, vocab, block))
    for i in range(layers if part != "lm_head" else 0):
        p = f"l{i}"
        if part == "attn":
            w, names = weight(rng, f"{p}.qkv", h, qkv, block, zp)
            w2, names2 = weight(rng, f"{p}.o", h, h, block, zp)
            inits += w + w2
            nodes.append(matmul(x, f"{p}.qkv_out", names, h, qkv, block))
            nodes.append(helper.make_node("Slice", [f"{p}.qkv_out", "zero", "hidden", "last"], [f"{p}.q"]))
            nodes.append(matmul(f"{p}.q", f"{p}.y", names2, h, h, block))
        elif packed == "qmoe":
            w1, n1, z1 = qmoe_weight(rng, f"{p}.fc1", h, 2 * inter, block, zp, interleave=True)
            w2, n2, z2 = qmoe_weight(rng, f"{p}.fc2", inter, h, block, zp, interleave=False)
            inits += w1 + w2
            nodes.append(helper.make_node(
                "QMoE", [x, "router", *n1, *n2, "", "", "", z1, z2], [f"{p}.y"], domain="com.microsoft", k=1,
                activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                expert_weight_bits=4, block_size=block, accuracy_level=4, normalize_routing_weights=1,
            ))  # fmt: skip
        else:
            if packed:
                w, names = weight(rng, f"{p}.gu", h, 2 * inter, block, zp)
                inits += w
                nodes.append(matmul(x, f"{p}.gu_out", names, h, 2 * inter, block))
                nodes.append(helper.make_node("Split", [f"{p}.gu_out"], [f"{p}.g", f"{p}.u"], axis=-1,
                                              num_outputs=2))  # fmt: skip
            else:
                wg, ng = weight(rng, f"{p}.gate", h, inter, block, zp)
                wu, nu = weight(rng, f"{p}.up", h, inter, block, zp)
                inits += wg + wu
                nodes.append(matmul(x, f"{p}.g", ng, h, inter, block))
                nodes.append(matmul(x, f"{p}.u", nu, h, inter, block))
            nodes.append(helper.make_node("Sigmoid", [f"{p}.g"], [f"{p}.sg"]))
            nodes.append(helper.make_node("Mul", [f"{p}.g", f"{p}.sg"], [f"{p}.act"]))
            nodes.append(helper.make_node("Mul", [f"{p}.act", f"{p}.u"], [f"{p}.m"]))
            wd, nd = weight(rng, f"{p}.down", inter, h, block, zp)
            inits += wd
            nodes.append(matmul(f"{p}.m", f"{p}.y", nd, inter, h, block))
        x = f"{p}.y"
    out = "y" if part == "lm_head" else x
    inits += [numpy_helper.from_array(np.array([v], np.int64), n)
              for n, v in (("zero", 0), ("hidden", h), ("last", -1))]  # fmt: skip
    inits.append(numpy_helper.from_array(np.zeros((1, 1), np.float32), "router"))  # one token, one expert
    n_out = vocab if part == "lm_head" else h
    graph = helper.make_graph(
        nodes, part, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, h])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 1, n_out])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def variants(dims: tuple) -> list[tuple[str, str, int, bool, bool | str]]:
    """(label, part, block, zero points, gate/up: packed True, separate False, or "qmoe"); the first of each
    part is its reference."""
    rows = []
    for block in (64, 32, 128):
        for zp in (True, False):
            rows.append((f"mlp packed b{block}{' zp' if zp else ''}", "mlp", block, zp, True))
            rows.append((f"mlp separate b{block}{' zp' if zp else ''}", "mlp", block, zp, False))
            if dims[0] % block == 0 and dims[1] % block == 0:
                rows.append((f"mlp qmoe b{block}{' zp' if zp else ''}", "mlp", block, zp, "qmoe"))
    for block in (64, 32, 128):
        for zp in (True, False):
            rows.append((f"attn b{block}{' zp' if zp else ''}", "attn", block, zp, True))
            rows.append((f"lm_head b{block}{' zp' if zp else ''}", "lm_head", block, zp, True))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b", choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="timed calls per variant per round (median)")
    p.add_argument("--only", default="", help="comma-separated parts: mlp, attn, lm_head")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    dims = SHAPES[args.model]
    rows = [r for r in variants(dims) if not args.only or r[1] in args.only.split(",")]
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # the parts share one initializer list: unused ones are expected
    x = np.random.default_rng(1).standard_normal((1, 1, dims[0])).astype(np.float32)
    sessions = {}
    for label, part, block, zp, packed in rows:
        sessions[label] = ort.InferenceSession(build(part, dims, block, zp, packed), options,
                                               providers=["CPUExecutionProvider"])  # fmt: skip
    agreement = {}  # one layer of a qmoe graph holds the packed graph's weights: their outputs must agree
    one_layer = (*dims[:2], 1, *dims[3:])  # (random weights without residuals overflow over the whole stack)
    for label, part, block, zp, packed in rows:
        if packed == "qmoe":
            a, b = (ort.InferenceSession(build(part, one_layer, block, zp, mode), options,
                                         providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                    for mode in ("qmoe", True))  # fmt: skip
            agreement[label] = float(np.abs(a - b).max() / np.abs(b).max())
            print(f"{label}: max |qmoe - packed| / max |packed| = {agreement[label]:.1e}")
    times: dict[str, list[float]] = {r[0]: [] for r in rows}
    # One thread runs on the calling thread: its CPU time is the kernels' own cost, which other processes on
    # a shared host barely change (wall time there is mostly their scheduling). More threads: wall time.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for label, *_ in rows:
            s = sessions[label]
            s.run(None, {"x": x})
            per = []
            for _ in range(args.calls):
                start = clock()
                s.run(None, {"x": x})
                per.append(clock() - start)
            times[label].append(float(np.median(per)) * 1e6)
        loads.append(os.getloadavg()[0])
    refs = {}
    metric = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"{args.model}, {args.threads} threads ({metric}), M = 1, accuracy_level 4; "
          f"host load {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print("| variant | us per decode step (median of rounds) | / reference, per round |")
    print("|---|---|---|")
    result = []
    for label, part, block, zp, packed in rows:
        refs.setdefault(part, label)
        ratio = [t / r for t, r in zip(times[label], times[refs[part]], strict=True)]
        print(f"| {label} | {np.median(times[label]):.0f} | {' / '.join(f'{v:.2f}' for v in ratio)} |")
        result.append({"variant": label, "part": part, "block": block, "zero_points": zp, "packed": packed,
                       "us": times[label], "ratio_to_reference": ratio,
                       **({"max_rel_diff_to_packed": agreement[label]} if label in agreement else {})})  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "threads": args.threads, "metric": metric, "load": loads,
                                         "rows": result}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
