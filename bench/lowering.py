"""Which ONNX Runtime kernels each weight width should run on: decode speed, load and peak RSS, file size.

For every width 2..8, each lowering ("planes": one MatMulNBits per bit plane; "widened": one kernel at the next
2/4/8-bit width, planes recombined at load) and each activation mode ("int8": accuracy_level 4; "float":
level 0), export the model once (no parity) and run the bundled runner.py on it in a fresh process, with the
artifacts interleaved round by round so host noise hits every row alike. The table this prints is what
kernels.packing.AUTO_KERNEL_BITS encodes.

    python bench/lowering.py                          # mix-llama-14m, 1 thread, 3 rounds
    python bench/lowering.py --rounds 5 --threads 2 --json docs/results/lowering.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"


def variants(widths: list[int]) -> list[dict]:
    """Export settings to compare: fp32, then each width x lowering x activations (deduplicated)."""
    from edgepack.kernels.packing import kernel_bits

    rows, seen = [{"name": "fp32", "wbits": None, "lowering": "-", "activations": "-"}], set()
    for wbits in widths:
        for activations in ("int8", "float"):
            for lowering in ("widened", "planes"):
                kernel = kernel_bits(wbits, lowering, activations)
                key = (wbits, activations, kernel)
                if key in seen:
                    continue
                seen.add(key)
                rows.append(
                    {
                        "name": f"W{wbits}-{lowering}-{activations}",
                        "wbits": wbits,
                        "lowering": lowering,
                        "activations": activations,
                        "kernel_bits": kernel,
                    }
                )
    return rows


def export_variant(model: Path, row: dict, out: Path, group: int) -> Path:
    from edgepack.compressor.quantize import QuantConfig

    from edgepack.pipeline import ExportRequest, export
    from edgepack.recipe import Recipe

    folder = out / f"{model.name}-g{group}-{row['name']}"
    if (folder / "manifest.json").is_file():
        return folder
    steps = [] if row["wbits"] is None else [QuantConfig(wbits=row["wbits"], group_size=group)]
    build = {} if row["wbits"] is None else {"lowering": row["lowering"], "activations": row["activations"]}
    export(ExportRequest(model, folder, recipe=Recipe(steps), parity=False, build=build))
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODELS / "mix-llama-14m")
    ap.add_argument("--widths", default="2,3,4,5,6,7,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a fresh process each)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs inside each process")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "lowering")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from edgepack.runtime.bench import run_artifact
    from edgepack.runtime.runner import RunConfig

    rows = variants([int(w) for w in args.widths.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row["artifact"] = str(export_variant(args.model, row, args.out, args.group_size))
    config = RunConfig(threads=args.threads, prompt_len=64, gen=32, runs=args.runs, warmup=1)
    load0 = os.getloadavg()
    for r in range(args.rounds):
        for row in rows:
            rep = run_artifact(Path(row["artifact"]), config)
            row.setdefault("decode", []).append(rep["decode_tok_s"]["median"])
            row.setdefault("prefill", []).append(rep["prefill_tok_s"]["median"])
            row.setdefault("rss_load", []).append(rep["rss_after_load_mib"])
            row.setdefault("rss_peak", []).append(rep["peak_rss_mib"])
            row["file_mib"] = rep["model_bytes"] / 2**20
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    fp32 = statistics.median(rows[0]["decode"])
    lines = [
        f"model {args.model.name}, group {args.group_size}, {args.threads} thread(s), P=64 N=32, "
        f"{args.rounds} rounds x {args.runs} runs, host load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}",
        "| variant | kernel bits | file MiB | decode tok/s (median [min-max] of rounds) | x fp32 | "
        "prefill tok/s | RSS after load MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row["decode"]
        row["summary"] = {
            "decode_tok_s": statistics.median(d),
            "x_fp32": statistics.median(d) / fp32,
            "prefill_tok_s": statistics.median(row["prefill"]),
            "rss_load_mib": max(row["rss_load"]),
            "rss_peak_mib": max(row["rss_peak"]),
        }
        kb = row.get("kernel_bits") or ("planes" if row["wbits"] else "fp32")
        lines.append(
            f"| {row['name']} | {kb} | {row['file_mib']:.2f} | {statistics.median(d):.1f} "
            f"[{min(d):.1f}-{max(d):.1f}] | {statistics.median(d) / fp32:.2f} | "
            f"{statistics.median(row['prefill']):.0f} | {max(row['rss_load']):.1f} | {max(row['rss_peak']):.1f} |"
        )
    print("\n".join(lines))
    if args.json:
        payload = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "argv": sys.argv[1:],
            "load_average": [load0, os.getloadavg()],
            "rows": rows,
            "table": lines,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
