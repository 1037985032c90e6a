"""Where two ONNX Runtime execution providers part ways on one artifact: node by node, CPU EP vs another EP.

    python bench/ep_agreement.py ARTIFACT [--provider CUDAExecutionProvider] [--tolerance 0.05] [--json OUT]

Every node's first output becomes a graph output (a copy of the model in memory); both providers run the same
prefill (8 fixed token ids, empty KV cache) and the script prints the first nodes whose outputs differ by more
than ``--tolerance`` of the CPU output's magnitude, then the logits' max difference. This found, on an H200,
that ONNX Runtime's CUDA GatherBlockQuantized reads a cuda artifact's zero points differently from its CPU
kernel when a row's zero points do not fill whole bytes (docs/results/cuda.md).

Needs onnxruntime with the provider (onnxruntime-gpu for CUDA; see ../shared/docs/gpu.md); exits with status 2
and one line without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROMPT = np.array([[1, 5, 9, 200, 33, 7, 100, 64]], np.int64)


def feeds(session, ids: np.ndarray) -> dict[str, np.ndarray]:
    """input_ids, a full attention mask, positions 0.. and empty past tensors for ``session``'s inputs."""
    out = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            out[i.name] = ids
        elif i.name == "attention_mask":
            out[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            out[i.name] = np.arange(ids.shape[1])[None]
        else:  # past key/values: batch 1, no past positions
            shape = [
                1 if isinstance(d, str) and "batch" in d else (0 if isinstance(d, str) else d)
                for d in i.shape
            ]
            out[i.name] = np.zeros(shape, np.float16 if "float16" in i.type else np.float32)
    return out


def compare(path: Path, provider: str, tolerance: float, limit: int = 5) -> dict:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    listed = {o.name for o in model.graph.output}
    probes = [n.output[0] for n in model.graph.node if n.output and n.output[0] and n.output[0] not in listed]
    model.graph.output.extend([onnx.ValueInfoProto(name=name) for name in probes])  # untyped: ORT infers them
    blob = model.SerializeToString()
    runs = {}
    for p in ("CPUExecutionProvider", provider):
        session = ort.InferenceSession(blob, providers=[p])
        names = [o.name for o in session.get_outputs()]
        runs[p] = dict(zip(names, session.run(None, feeds(session, PROMPT)), strict=True))
    cpu, other = runs["CPUExecutionProvider"], runs[provider]
    producer = {n.output[0]: n for n in model.graph.node if n.output}
    mismatches = []
    for name in probes:
        a, b = np.asarray(cpu[name]), np.asarray(other[name])
        if a.dtype.kind != "f" or a.shape != b.shape or not a.size:
            continue
        diff = float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())
        scale = float(np.abs(a.astype(np.float32)).max())
        if diff > tolerance * max(scale, 1e-3):
            node = producer[name]
            mismatches.append(
                {"node": node.name, "op": node.op_type, "output": name, "max_diff": diff, "max_abs": scale}
            )
            if len(mismatches) >= limit:
                break
    logits = float(np.abs(cpu["logits"].astype(np.float32) - other["logits"].astype(np.float32)).max())
    return {
        "artifact": str(path),
        "provider": provider,
        "first_mismatches": mismatches,
        "logits_max_diff": logits,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path, help="artifact folder (its model.onnx) or an .onnx file")
    p.add_argument("--provider", default="CUDAExecutionProvider")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative to the CPU output's max |value|")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if args.provider not in ort.get_available_providers():
        print(
            f"error: this onnxruntime has no {args.provider} (install onnxruntime-gpu on a GPU host)",
            file=sys.stderr,
        )
        return 2
    path = args.artifact / "model.onnx" if args.artifact.is_dir() else args.artifact
    result = compare(path, args.provider, args.tolerance)
    for m in result["first_mismatches"]:
        print(
            f"{m['op']} {m['node']} -> {m['output']}: max |diff| {m['max_diff']:.4g} (max |cpu| {m['max_abs']:.4g})"
        )
    print(f"logits max |diff| {result['logits_max_diff']:.4g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
