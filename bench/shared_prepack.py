"""Does a weight shared by several MatMulNBits nodes keep its RAM saving in ONNX Runtime? (issue 4, item 6)

Builds three graphs of L chained 4-bit MatMulNBits (K = N = 2048): L separate weights, one weight used by L
nodes, and one node inside a Loop of L iterations that reads the weight from the outer scope; each with
accuracy_level 0 and 4, and with/without `session.disable_prepacking`. Each configuration runs in a fresh
process (peak RSS is per process) and reports the resident memory the session adds and the time per run.

    python bench/shared_prepack.py [--layers 8] [--json docs/results/shared_prepack.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from edgepack.kernels.packing import pack_nbits
from onnx import TensorProto, helper, numpy_helper

K = N = 2048
BLOCK = 64

PROBE = r"""
import json, sys, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
if sys.argv[2] == "1": so.add_session_config_entry("session.disable_prepacking", "1")
def rss():  # current resident set (ru_maxrss would carry the parent's peak over fork/exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
r0 = rss()
s = ort.InferenceSession(sys.argv[1], so)
x = np.random.rand(1, int(sys.argv[3])).astype(np.float32)
s.run(None, {"x": x}); t = time.perf_counter()
for _ in range(20): s.run(None, {"x": x})
ms = (time.perf_counter() - t) / 20 * 1e3
print(json.dumps({"rss_mb": (rss() - r0) / 1024, "ms": ms}))
"""


def weight(rng, j: int) -> list:
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    scales = rng.random(N * K // BLOCK, dtype=np.float32) * 0.01
    return [
        numpy_helper.from_array(pack_nbits(codes, 4, BLOCK), f"B{j}"),
        numpy_helper.from_array(scales, f"S{j}"),
    ]


def matmul(x: str, y: str, j: int, acc: int):
    return helper.make_node(
        "MatMulNBits",
        [x, f"B{j}", f"S{j}"],
        [y],
        domain="com.microsoft",
        K=K,
        N=N,
        bits=4,
        block_size=BLOCK,
        accuracy_level=acc,
    )


def build(form: str, layers: int, acc: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])
    if form == "loop":
        inits = weight(rng, 0) + [
            numpy_helper.from_array(np.array(layers, np.int64), "trip"),
            numpy_helper.from_array(np.array(True), "cond"),
        ]
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"]), matmul("h_in", "h_out", 0, acc)],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, K]),
            ],
            [
                helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, K]),
            ],
        )
        nodes, out = [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)], "y"
    else:
        inits, nodes, out = [], [], "x"
        for i in range(layers):
            j = 0 if form == "shared" else i
            if form == "separate" or i == 0:
                inits += weight(rng, j)
            nodes.append(matmul(out, f"y{i}", j, acc))
            out = f"y{i}"
    graph = helper.make_graph(
        nodes, form, [x_info], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )
    onnx.save(model, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("docs/results/shared_prepack.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for acc in (0, 4):
            for form in ("separate", "shared", "loop"):
                path = Path(tmp) / f"{form}_{acc}.onnx"
                build(form, args.layers, acc, path)
                for noprepack in ("0", "1"):
                    out = subprocess.run(
                        [sys.executable, "-c", PROBE, str(path), noprepack, str(K)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    r = json.loads(out.stdout)
                    rows.append(
                        {
                            "accuracy_level": acc,
                            "form": form,
                            "disable_prepacking": noprepack == "1",
                            "file_mb": path.stat().st_size / 1e6,
                            **r,
                        }
                    )
    print(f"{args.layers} x MatMulNBits 4-bit {K}x{N}, block {BLOCK}, 1 thread")
    print(f"{'acc':>3} {'form':9s} {'prepack':8s} {'file MB':>8s} {'+RSS MB':>8s} {'ms/run':>7s}")
    for r in rows:
        print(
            f"{r['accuracy_level']:>3} {r['form']:9s} {'off' if r['disable_prepacking'] else 'on':8s} "
            f"{r['file_mb']:8.1f} {r['rss_mb']:8.1f} {r['ms']:7.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"layers": args.layers, "K": K, "N": N, "block": BLOCK, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
