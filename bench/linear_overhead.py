"""Host-side Python cost of one cached `TritonQuantLinear` call, the kernel launch replaced by a no-op.

A decode step of the torch-triton backend calls every linear once (about 170 calls a token at 0.5B), so what
the wrapper spends in Python before the launch adds up per token. Runs anywhere: the Triton interpreter's CPU
path with the GEMV kernel object swapped for a no-op, a config already in the tuner's cache.

    TRITON_INTERPRET=1 python bench/linear_overhead.py [--calls 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import timeit
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1 (the CPU path that reaches the kernel wrapper)", file=sys.stderr)
        return 2
    from edgepack.kernels import triton_matmul as tm
    from edgepack.kernels.torch_backend import TritonQuantLinear

    class NoOpKernel:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    tm._gemv_kernel = NoOpKernel()
    rng = np.random.default_rng(0)
    rows = []
    for n, k, group in ((4864, 896, 64), (896, 4864, 128), (1152, 896, 64)):  # 0.5B gate/up, down, qkv
        codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
        scales = rng.random((n, k // group), dtype=np.float32)
        zeros = rng.integers(0, 16, (n, k // group), dtype=np.uint8)
        linear = TritonQuantLinear(codes, scales, zeros, 4, group)
        x = torch.zeros(1, 1, k, dtype=torch.float16)
        config = tm.gemv_candidates(1, n, k, group, x.device)[0]
        tm._TUNED[("gemv", 1, n, k, 4, group, x.dtype, x.device)] = (config, {config: 1.0})
        linear(x)
        us = timeit.timeit(lambda linear=linear, x=x: linear(x), number=args.calls) / args.calls * 1e6
        rows.append({"n": n, "k": k, "group": group, "us_per_call": round(us, 2)})
    print("| N | K | group | us per call (no kernel) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['k']} | {r['group']} | {r['us_per_call']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"calls": args.calls, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
