"""Op counts of artifacts' graphs as written and as ONNX Runtime runs them (after its load-time fusions).

    python bench/graph_ops.py A B [C ...] [--json out.json]

ONNX Runtime rewrites a graph when it loads it (at the default ORT_ENABLE_ALL on the CPU EP: Sigmoid + Mul ->
QuickGelu, and more), so comparing two tools' graphs by the nodes they wrote can mislead. This loads each
artifact's model.onnx in a CPU session that saves its optimized graph to a temporary folder, and prints both
op histograms side by side.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def op_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(collections.Counter(node.op_type for node in graph.node))


def runtime_op_counts(model: Path) -> dict[str, int]:
    """The op histogram of the graph an ONNX Runtime CPU session runs for ``model``."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data"
        )
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        return op_counts(Path(tmp) / "optimized.onnx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path, help="artifact folders (each with model.onnx)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = {
        str(a): {"written": op_counts(a / "model.onnx"), "run": runtime_op_counts(a / "model.onnx")}
        for a in args.artifacts
    }
    ops = sorted({op for r in result.values() for counts in r.values() for op in counts})
    names = [a.name for a in args.artifacts]
    print("| op | " + " | ".join(f"{n} written | {n} run" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for op in [*ops, "all"]:
        cells = []
        for r in result.values():
            for counts in (r["written"], r["run"]):
                cells.append(str(sum(counts.values()) if op == "all" else counts.get(op, 0)))
        print(f"| {op} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"ort": ort.__version__, "artifacts": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
