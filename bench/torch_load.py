"""Load time and peak RSS of ``load_artifact_torch`` (the torch-triton backend's loader), a fresh process per run.

The loader reads the artifact's ONNX initializers, recombines each quantized weight's stored planes into codes,
repacks them K-major for the Triton kernels and dequantizes a tied embedding: host work that a GPU does not
speed up, so ``--device cpu`` (float32, the loader's exact torch fallback) measures it on any machine.

    python bench/torch_load.py ARTIFACT [--device cpu] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from edgepack.runtime.torch_backend import load_artifact_torch
dtype = torch.float32 if sys.argv[2] == "cpu" else torch.float16
start = time.perf_counter()
load_artifact_torch(sys.argv[1], device=sys.argv[2], dtype=dtype)
print(json.dumps({"load_s": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    runs = []
    for _ in range(args.runs):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.artifact.resolve()), args.device],
            capture_output=True,
            text=True,
            cwd="/",  # outside the checkout, whose kernels/ would shadow the Hugging Face package
        )
        if done.returncode:
            print(done.stderr.strip().splitlines()[-1], file=sys.stderr)
            return 1
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {
        "artifact": str(args.artifact),
        "device": args.device,
        "runs": runs,
        "load_s_median": statistics.median(r["load_s"] for r in runs),
        "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in runs),
    }
    print("| artifact | device | load s (runs) | peak RSS MiB |\n|---|---|---|---|")
    loads = ", ".join(f"{r['load_s']:.2f}" for r in runs)
    print(f"| {args.artifact.name} | {args.device} | {loads} | {report['peak_rss_mib_median']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
