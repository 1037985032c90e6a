"""W4 layout levers on a real model: group size per matrix kind and zero points, quality x decode cost.

Each variant is an RTN W4 export of ``--model`` (fused form, int8 activations, parity off) differing only in
its QuantConfig (group size, per-pattern overrides, symmetric). Per variant: file size, perplexity through
ONNX Runtime on 8192 tokens of WikiText-2 (test) and of the last 10% of Tiny Shakespeare (as
bench/lowering.py), and the decode step's cost on one thread measured as the calling thread's CPU time
(runner.py's decoder, 64-token prompt, ``--steps`` steps), interleaved over ``--rounds`` with each round's
ratio to the first variant. A model this small is cache-resident, so on a loaded host its CPU time still
swings with the other processes (0.3-2.3x between rounds at load 5): read the ratios only when they hold in
every round; bench/matmul_layout.py measures the kernels in a way the load does not move.

    python bench/w4_levers.py --rounds 5 --json docs/results/w4_levers.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT / "bench"))
import runner  # noqa: E402

MLP = "model.layers.*.mlp.*"
VARIANTS: dict[str, dict] = {
    "g64 (default)": {"group_size": 64},
    "g32": {"group_size": 32},
    "g128": {"group_size": 128},
    "mlp g128, rest g64": {"group_size": 64, "overrides": {MLP: {"group_size": 128}}},
    "mlp g128, rest g32": {"group_size": 32, "overrides": {MLP: {"group_size": 128}}},
    "g64 lm_head g128": {"group_size": 64, "overrides": {"lm_head": {"group_size": 128}}},
    "g32 symmetric (builder-like)": {"group_size": 32, "symmetric": True},
    "g64 mlp_group_size 128": {"group_size": 64, "mlp_group_size": 128},
}


def export_variant(model: Path, name: str, config: dict, work: Path) -> Path:
    from edgepack.compressor.quantize import QuantConfig

    from edgepack.pipeline import ExportRequest, export
    from edgepack.recipe import Recipe

    folder = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    if not (folder / "manifest.json").is_file():
        recipe = Recipe([QuantConfig(wbits=4, **config)])
        export(ExportRequest(model, folder, recipe=recipe, parity=False, eval_text=Path("none")))
    return folder


def decode_cpu_us(folder: Path, steps: int) -> float:
    """Median thread CPU microseconds of one decode step (1 thread, the artifact's declared KV layout)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    genai = runner.read_genai_config(folder)
    io = runner.DecoderIO.from_session(session, genai)
    decoder = runner.SharedBufferDecoder(session, io, 64 + steps + 2, "cpu")
    prompt = runner.make_prompt(64, io.vocab_size)
    decoder.reset()
    token = int(np.argmax(decoder.step(prompt)))
    per = []
    for _ in range(steps):
        start = time.thread_time()
        token = int(np.argmax(decoder.step(np.array([[token]], np.int64))))
        per.append(time.thread_time() - start)
    return float(np.median(per)) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "mix-llama-14m")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgepack-w4-levers"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from lowering import add_perplexities

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, config in VARIANTS.items():
        folder = export_variant(args.model, name, config, args.work)
        size = sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20
        rows.append({"name": name, "config": config, "artifact": str(folder), "file_mib": round(size, 2),
                     "activations": "int8", "lowering": "auto", "cpu_us": []})  # fmt: skip
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for row in rows:
            row["cpu_us"].append(decode_cpu_us(Path(row["artifact"]), args.steps))
        loads.append(os.getloadavg()[0])
    if args.ppl_tokens:
        add_perplexities(rows, args.model, args.ppl_tokens, 1)
    ref = rows[0]["cpu_us"]
    print(f"{args.model.name}, W4 RTN, 1 thread (thread CPU time per decode step); host load "
          f"{min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print(
        "| variant | file MiB | decode us/step (median of rounds) | / g64, per round | ppl WikiText-2 | ppl Shakespeare tail |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        row["ratio"] = [a / b for a, b in zip(row["cpu_us"], ref, strict=True)]
        print(f"| {row['name']} | {row['file_mib']:.2f} | {np.median(row['cpu_us']):.0f} | "
              f"{' / '.join(f'{v:.2f}' for v in row['ratio'])} | {row.get('ppl_wiki', float('nan')):.2f} | "
              f"{row.get('ppl_shakespeare', float('nan')):.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"model": str(args.model), "load": loads, "rows": rows}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
