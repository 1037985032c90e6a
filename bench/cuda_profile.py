"""Where GPU time goes in a prefill and in decode steps, per CUDA kernel: ONNX Runtime's CUDA EP traced by CUPTI.

ONNX Runtime's own profiler times a CUDA node by its launch on the host, not by the kernel on the GPU; the
PyTorch profiler's CUPTI trace sees every kernel and copy the process runs, whichever library launched it. Each
artifact runs in this process with runtime/runner.py's own decoder on the CUDA EP (its declared KV layout,
IOBinding, the logits copied to the host as the runner does), after a warm-up sequence:
``--prefills`` prefills of ``--prompt-len`` tokens, then one sequence of ``--steps`` decode steps, each phase
traced on its own. Per artifact and phase: GPU microseconds per call by kernel (memcpy included), their sum,
and the host wall time of the same calls.

    python bench/cuda_profile.py ART_A ART_B --prompt-len 128 --steps 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
import runner  # noqa: E402  (runner.py is a single-file module shipped inside artifacts)

TOP = 12


GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # the GPU timeline in Kineto's trace


def kernel_times(prof, calls: int) -> dict[str, float]:
    """GPU microseconds per call by kernel or copy name, largest first, from the profiler's Chrome trace."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    per: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") in GPU_CATEGORIES and "dur" in e:
            per[e["name"]] += float(e["dur"]) / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def profile_artifact(folder: Path, prompt_len: int, prefills: int, steps: int, device: str = "cuda") -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    config = runner.RunConfig(device=device, prompt_len=prompt_len, gen=steps, runs=1, warmup=1)
    session = runner.make_session(runner.find_model_file(folder), config)
    genai = runner.read_genai_config(folder)
    io = runner.DecoderIO.from_session(session, genai)
    layout = runner.declared_kv_layout(genai, io)
    decoder = runner.KV_LAYOUTS[layout].decoder(session, io, config)
    prompt = runner.make_prompt(prompt_len, io.vocab_size)
    runner.generate(decoder, prompt, steps)  # warm-up: first-run allocations, kernel tuning
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report = {"artifact": str(folder), "kv_layout": layout}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(prefills):
            decoder.reset()
            logits = decoder.step(prompt)
        wall = (time.perf_counter() - start) / prefills
    report["prefill"] = {"wall_us": round(wall * 1e6, 1), "kernels_us": kernel_times(prof, prefills)}
    token = int(np.argmax(logits))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            token = int(np.argmax(decoder.step(np.array([[token]], np.int64))))
        wall = (time.perf_counter() - start) / steps
    report["decode"] = {"wall_us": round(wall * 1e6, 1), "kernels_us": kernel_times(prof, steps)}
    for phase in ("prefill", "decode"):
        kernels = report[phase]["kernels_us"]
        report[phase]["gpu_us"] = round(sum(kernels.values()), 1)
        report[phase]["kernels_us"] = {k: round(v, 1) for k, v in kernels.items() if v >= 0.05}
    return report


def table(reports: list[dict], phase: str) -> str:
    lines = [f"{phase}: GPU us per call (top {TOP} kernels each), host wall us per call"]
    for r in reports:
        p = r[phase]
        lines.append(f"  {Path(r['artifact']).name}: GPU {p['gpu_us']:.0f} us, wall {p['wall_us']:.0f} us")
        for name, us in list(p["kernels_us"].items())[:TOP]:
            lines.append(f"    {us:9.1f}  {name[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prefills", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run (no GPU timeline)"
    )
    args = p.parse_args(argv)
    reports = []
    for folder in args.artifacts:
        reports.append(profile_artifact(folder, args.prompt_len, args.prefills, args.steps, args.device))
        if args.json:  # after every artifact, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(reports, indent=1) + "\n")
    print(table(reports, "prefill"))
    print(table(reports, "decode"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
