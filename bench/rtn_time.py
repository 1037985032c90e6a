"""Wall time of RTN quantization of a whole model, with and without the range search.

    python bench/rtn_time.py [--model /work/scale/qwen2.5-0.5b] [--rounds 2] [--json out.json]

Loads ``--model`` in its checkpoint dtype (as the export's lean load does for RTN recipes), then times
``quantize(model, QuantConfig(wbits=4, weight_range=R))`` for R in minmax and mse, a fresh load per timing,
alternating, ``--rounds`` times; prints each time and the host load average. bench/scale.py's Qwen2.5-0.5B
checkpoint (``--make-only``) is the model the numbers in docs/results/scale.md refer to.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("/work/scale/qwen2.5-0.5b"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} has no config.json: pass a model folder (bench/scale.py --make-only)")
        return 2
    from edgepack.compressor.quantize import QuantConfig, quantize

    from edgepack.model import load_model

    rows = []
    for rnd in range(args.rounds):
        for rng in ("minmax", "mse"):
            model = load_model(args.model, dtype="auto")
            load = os.getloadavg()[0]
            start = time.perf_counter()
            quantize(model, QuantConfig(wbits=4, weight_range=rng))
            seconds = time.perf_counter() - start
            rows.append(
                {"round": rnd, "weight_range": rng, "seconds": round(seconds, 2), "load": round(load, 2)}
            )
            print(f"round {rnd} {rng}: {seconds:.1f} s (load {load:.1f})", flush=True)
            del model
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
