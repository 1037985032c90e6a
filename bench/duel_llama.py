"""An ONNX artifact through onnxruntime-genai against a llama.cpp GGUF through llama-bench, in adjacent processes.

    python bench/duel_llama.py ARTIFACT MODEL.gguf --threads 1 [--pairs 10] [--rounds 3] [--runs 3] \
        [--prompt-len 64] [--gen 32] [--names W4,Q4_0] [--json out.json]

bench/duel.py puts two ONNX artifacts in one process. llama.cpp cannot join that process, so this is the nearest
thing: each "pair" runs the two tools in two fresh processes back to back (bench/speed.py's ``measure``: the
genai driver, bench/genai_decode.py, and ``llama-bench -t T -p P -n N -r runs``), the one that goes first
alternating every pair. On this host the state a process meets drifts within seconds (speed.md: the same 8 MB
artifact at 1,356-2,504 tok/s within a run of under 80 s), and in a speed.py round the two files being compared
are up to ten processes apart; here they are one apart, so each pair's ratio is taken within the same few
seconds. Per round: each tool's median decode and prefill over its pairs and the ratio of the medians; per
pair: the ratio, whose quartiles show the noise left. Peak RSS is bench/speed.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import speed  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "artifact", type=Path, help="an ONNX artifact folder (genai_config.json beside model.onnx)"
    )
    p.add_argument("gguf", type=Path, help="a llama.cpp model file")
    p.add_argument("--names", default=None, help="two comma-separated labels (default: folder / file names)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=10, help="process pairs per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="timed sequences per process (median)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--aslr", action="store_true", help="keep address-space randomization in the measured processes"
    )
    return p.parse_args(argv)


def quartiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 25)), float(np.percentile(values, 75))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = speed.llama_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    for path in (args.artifact, args.gguf):
        if not path.exists():
            print(f"error: {path} does not exist: pass an artifact folder and a .gguf file", file=sys.stderr)
            return 2
    names = args.names.split(",") if args.names else [args.artifact.name, args.gguf.stem]
    layout = speed.fix_address_layout(args.aslr)
    onnx_art = speed.Artifact("model", "onnx", names[0], args.artifact)
    gguf_art = speed.Artifact("model", "llama.cpp", names[1], args.gguf)
    settings = speed.Settings(args.prompt_len, args.gen, args.runs, 1)
    jobs = {"onnx": (onnx_art, "onnxruntime-genai"), "llama": (gguf_art, "llama-bench")}
    loads, rounds = [], []
    for rnd in range(args.rounds):
        pairs = []
        for i in range(args.pairs):
            order = ["onnx", "llama"] if (rnd * args.pairs + i) % 2 == 0 else ["llama", "onnx"]
            loads.append(os.getloadavg()[0])
            got = {}
            for key in order:
                art, driver = jobs[key]
                m = speed.measure(art, driver, args.threads, rnd, settings)
                if m.error:
                    print(f"error: {art.label}: {m.error}", file=sys.stderr)
                    return 1
                got[key] = {"decode": m.decode_tok_s, "prefill": m.prefill_tok_s}
            pairs.append({"first": order[0], **got, "ratio": got["onnx"]["decode"] / got["llama"]["decode"]})
        med = {k: {m: statistics.median(p[k][m] for p in pairs) for m in ("decode", "prefill")} for k in jobs}
        rounds.append({
            "pairs": pairs,
            "median": med,
            "decode_ratio": med["onnx"]["decode"] / med["llama"]["decode"],
            "prefill_ratio": med["onnx"]["prefill"] / med["llama"]["prefill"],
            "pair_ratio_quartiles": quartiles([p["ratio"] for p in pairs]),
        })  # fmt: skip
    print(
        f"{names[0]} (onnxruntime-genai) against {names[1]} (llama-bench), {args.threads} thread(s), prompt "
        f"{args.prompt_len}, {args.gen} steps, {args.pairs} process pairs a round, {args.runs} sequences "
        f"each; host load {min(loads):.1f}-{max(loads):.1f}"
    )
    print(f"| round | {names[0]} decode tok/s | {names[1]} decode tok/s | {names[0]} / {names[1]} decode "
          f"(pairs p25-p75) | prefill ratio |")  # fmt: skip
    print("|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        lo, hi = r["pair_ratio_quartiles"]
        print(f"| {i} | {r['median']['onnx']['decode']:.1f} | {r['median']['llama']['decode']:.1f} | "
              f"{r['decode_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {r['prefill_ratio']:.2f} |")  # fmt: skip
    if args.json:
        result = {
            "command": "python bench/duel_llama.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "names": names,
            "threads": args.threads,
            "settings": vars(args) | {"artifact": str(args.artifact), "gguf": str(args.gguf), "json": None},
            "load_average": [min(loads), max(loads)],
            "address_layout": layout,
            "cpu": speed.cpu_facts(),
            "rounds": rounds,
            "versions": speed.versions(),
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
