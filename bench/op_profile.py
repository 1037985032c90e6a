"""Where decode time goes, per op type: ONNX Runtime's profiler over the decode steps of one or more artifacts.

Each artifact runs in this process with runner.py's own decoder (the KV layout its genai_config declares,
so the builder's and ours both bind one shared past/present buffer), one prefill of ``--prompt-len`` tokens
and ``--steps`` greedy decode steps, with ``SessionOptions.enable_profiling``. Node events are assigned to the
``model_run`` that contains them; only decode runs are summed. Per artifact: microseconds per decode step by
op type (node kernels), their sum, and the ``model_run`` wall time (the difference is the session's own cost
between kernels). Run the artifacts one at a time on a quiet host; the profiler itself adds a little per node.

    python bench/op_profile.py ART_A ART_B --threads 2 --steps 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
import runner  # noqa: E402  (runner.py is a single-file module shipped inside artifacts)


def matmul_shapes(model: Path) -> dict[str, str]:
    """Node name -> 'K x N bB' for every MatMulNBits of the main graph (weights not loaded)."""
    graph = onnx.load(str(model), load_external_data=False).graph
    shapes = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            zp = "" if len(node.input) < 4 or not node.input[3] else " zp"
            shapes[node.name] = f"{a['K']}x{a['N']} b{a['block_size']} l{a.get('accuracy_level', 0)}{zp}"
    return shapes


def profile_artifact(folder: Path, threads: int, prompt_len: int, steps: int) -> dict:
    """Per-op-type microseconds per decode step, the kernels' sum and the run's wall time."""
    model = runner.find_model_file(folder)
    genai = runner.read_genai_config(folder) if (folder / runner.GENAI_CONFIG_NAME).is_file() else {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        io = runner.DecoderIO.from_session(session, genai)
        if runner.declared_kv_layout(genai, io) == "shared":
            decoder = runner.SharedBufferDecoder(session, io, prompt_len + 2 * steps + 2, "cpu")
        else:
            decoder = runner.RunDecoder(session, io)
        prompt = runner.make_prompt(prompt_len, io.vocab_size)
        runner.generate(decoder, prompt, 4)  # warm-up sequence (first-run allocations)
        runner.generate(decoder, prompt, steps)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e["name"] == "model_run"
    )
    decode_runs = runs[-steps:]  # the last sequence: its prefill run precedes these
    shapes = matmul_shapes(model)
    per_op: dict[str, float] = defaultdict(float)
    per_shape: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if any(start <= e["ts"] <= end for start, end in decode_runs):
            per_op[e["args"]["op_name"]] += e["dur"]
            node = e["name"].removesuffix("_kernel_time")
            if node in shapes:
                per_shape[shapes[node]] += e["dur"]
    us = {op: round(t / steps, 1) for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}
    return {
        "artifact": str(folder),
        "threads": threads,
        "steps": steps,
        "ops_us_per_step": us,
        "matmul_us_per_step": {
            k: round(t / steps, 1) for k, t in sorted(per_shape.items(), key=lambda kv: -kv[1])
        },
        "kernels_us_per_step": round(sum(per_op.values()) / steps, 1),
        "run_us_per_step": round(float(np.mean([end - start for start, end in decode_runs])), 1),
    }


def decode_cpu_rounds(
    folders: list[Path], prompt_len: int, steps: int, rounds: int
) -> dict[str, list[float]]:
    """Median thread-CPU microseconds per decode step of each artifact on ONE thread, interleaved per round.

    One intra-op thread runs on the calling thread, so its CPU time is the model's own work; on a shared host
    it moves far less than wall time (other processes still compete for memory bandwidth and caches)."""
    decoders = {}
    for folder in folders:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        model = runner.find_model_file(folder)
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        genai = runner.read_genai_config(folder) if (folder / runner.GENAI_CONFIG_NAME).is_file() else {}
        io = runner.DecoderIO.from_session(session, genai)
        decoders[str(folder)] = (runner.SharedBufferDecoder(session, io, prompt_len + steps + 2, "cpu"), io)
    out: dict[str, list[float]] = {k: [] for k in decoders}
    for _ in range(rounds):
        for key, (decoder, io) in decoders.items():
            decoder.reset()
            token = int(np.argmax(decoder.step(runner.make_prompt(prompt_len, io.vocab_size))))
            per = []
            for _ in range(steps):
                start = time.thread_time()
                token = int(np.argmax(decoder.step(np.array([[token]], np.int64))))
                per.append(time.thread_time() - start)
            out[key].append(float(np.median(per)) * 1e6)
    return out


def table(reports: list[dict]) -> str:
    ops = sorted({op for r in reports for op in r["ops_us_per_step"]}, key=lambda o: -max(
        r["ops_us_per_step"].get(o, 0.0) for r in reports))  # fmt: skip
    head = "| op type | " + " | ".join(Path(r["artifact"]).name for r in reports) + " |"
    lines = [head, "|---|" + "---|" * len(reports)]
    for op in ops:
        lines.append(
            f"| {op} | " + " | ".join(f"{r['ops_us_per_step'].get(op, 0.0):.0f}" for r in reports) + " |"
        )
    lines.append("| **kernels** | " + " | ".join(f"{r['kernels_us_per_step']:.0f}" for r in reports) + " |")
    lines.append("| **model_run** | " + " | ".join(f"{r['run_us_per_step']:.0f}" for r in reports) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--cpu-rounds",
        type=int,
        default=0,
        help="instead: 1-thread CPU time per decode step, N interleaved rounds",
    )
    args = p.parse_args(argv)
    if args.cpu_rounds:
        loads = [os.getloadavg()[0]]
        cpu = decode_cpu_rounds(args.artifacts, args.prompt_len, args.steps, args.cpu_rounds)
        loads.append(os.getloadavg()[0])
        first = next(iter(cpu.values()))
        print(
            f"thread CPU us per decode step, 1 thread, {args.steps} steps; host load {min(loads):.1f}-{max(loads):.1f}"
        )
        for key, values in cpu.items():
            ratio = " / ".join(f"{v / f:.2f}" for v, f in zip(values, first, strict=True))
            print(f"  {Path(key).name:24s} {np.median(values):10.0f}   / first, per round: {ratio}")
        if args.json:
            args.json.write_text(json.dumps({"load": loads, "cpu_us": cpu}, indent=1) + "\n")
        return 0
    reports = [profile_artifact(a, args.threads, args.prompt_len, args.steps) for a in args.artifacts]
    print(f"microseconds per decode step ({args.threads} threads, {args.steps} steps)")
    print(table(reports))
    for r in reports:
        print(
            f"\nMatMulNBits by weight shape, {Path(r['artifact']).name} (us per decode step, all nodes of the shape)"
        )
        for shape, us in r["matmul_us_per_step"].items():
            print(f"  {shape:32s} {us:10.0f}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
