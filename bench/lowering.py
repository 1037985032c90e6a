"""Which ONNX Runtime kernels each weight width should run on: decode speed, load and peak RSS, file size.

For every width 2..8, each lowering ("planes": one MatMulNBits per bit plane; "widened": one kernel at the next
2/4/8-bit width, planes recombined at load) and each activation mode ("int8": accuracy_level 4; "float":
level 0), export the model once (no parity) and run the bundled runner.py on it in a fresh process, with the
artifacts interleaved round by round so host noise hits every row alike. The table this prints is what
kernels.packing.AUTO_KERNEL_BITS encodes. Quality (perplexity through ONNX Runtime) is measured on the
int8-activation rows of the default storage; the weights are the same under every lowering.

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


def variants(widths: list[int], group: int, groups: list[int]) -> list[dict]:
    """Export settings to compare: fp32, each width x lowering x activations at ``group`` (deduplicated),
    then the default lowering of W4 and W3 at each other group size (the block-size choice)."""
    from edgepack.kernels.packing import kernel_bits, storage_of

    rows, seen = [{"name": "fp32", "wbits": None, "lowering": "-", "activations": "-", "group": 0}], set()
    for g in groups:
        if g == group:
            continue
        for wbits in (4, 3):
            rows.append(
                {
                    "name": f"W{wbits}-g{g}-default",
                    "wbits": wbits,
                    "lowering": "auto",
                    "activations": "int8",
                    "kernel_bits": kernel_bits(wbits),
                    "group": g,
                }
            )
    for wbits in widths:
        for activations in ("int8", "float"):
            for lowering in ("widened", "compact", "planes", "auto"):
                kernel = kernel_bits(wbits, lowering, activations)
                key = (wbits, activations, kernel, storage_of(wbits, lowering, activations))
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
                        "group": group,
                    }
                )
    return rows


def export_variant(model: Path, row: dict, out: Path) -> Path:
    from edgepack.compressor.quantize import QuantConfig

    from edgepack.pipeline import ExportRequest, export
    from edgepack.recipe import Recipe

    group = row["group"]
    folder = out / f"{model.name}-g{group}-{row['name']}"
    if (folder / "manifest.json").is_file():
        return folder
    steps = [] if row["wbits"] is None else [QuantConfig(wbits=row["wbits"], group_size=group)]
    build = {} if row["wbits"] is None else {"lowering": row["lowering"], "activations": row["activations"]}
    export(
        ExportRequest(model, folder, recipe=Recipe(steps), parity=False, build=build, eval_text=Path("none"))
    )
    return folder


def add_perplexities(rows: list[dict], model_dir: Path, tokens: int, threads: int) -> None:
    """Perplexity of every artifact through ONNX Runtime on WikiText-2 (test, first ``tokens``) and on the
    last 10% of Tiny Shakespeare (first ``tokens``), as bench/quant_quality.py measures them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from quant_quality import ort_perplexity
    from transformers import AutoConfig

    from edgepack.model import DecoderDims, load_tokenizer
    from edgepack.textdata import read_text, split_text, tokenize

    tok = load_tokenizer(model_dir)
    dims = DecoderDims.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    shared = ROOT.parent / "shared" / "data"
    texts = {
        "ppl_wiki": tokenize(tok, read_text(shared / "wikitext2-raw-test.txt"))[:tokens],
        "ppl_shakespeare": tokenize(tok, split_text(read_text(shared / "tinyshakespeare.txt"))[1])[:tokens],
    }
    for row in rows:
        if row["activations"] == "float" or row["lowering"] in ("compact", "planes"):
            continue  # quality is the weights' (and int8 activations'); measured on the default lowering only
        for key, ids in texts.items():
            row[key] = ort_perplexity(Path(row["artifact"]) / "model.onnx", ids, dims, threads)
        print(f"{row['name']}: ppl {row['ppl_wiki']:.2f} / {row['ppl_shakespeare']:.2f}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODELS / "mix-llama-14m")
    ap.add_argument("--widths", default="2,3,4,5,6,7,8")
    ap.add_argument("--group-size", type=int, default=64, help="group of the width x lowering rows")
    ap.add_argument("--groups", default="32,64,128", help="groups for the W4/W3 default-lowering rows")
    ap.add_argument("--ppl-tokens", type=int, default=8192, help="perplexity tokens per text (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a fresh process each)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs inside each process")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "lowering")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from edgepack.runtime.bench import run_artifact
    from edgepack.runtime.runner import RunConfig

    rows = variants(
        [int(w) for w in args.widths.split(",")], args.group_size, [int(g) for g in args.groups.split(",")]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row["artifact"] = str(export_variant(args.model, row, args.out))
    if args.ppl_tokens:
        add_perplexities(rows, args.model, args.ppl_tokens, args.threads)
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
        "| variant | group | kernel bits | file MiB | decode tok/s (median [min-max] of rounds) | x fp32 | "
        "prefill tok/s | RSS after load MiB | peak RSS MiB | ppl WikiText-2 | ppl Shakespeare tail |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
        ppl = [f"{row[k]:.2f}" if k in row else "" for k in ("ppl_wiki", "ppl_shakespeare")]
        lines.append(
            f"| {row['name']} | {row['group'] or '-'} | {kb} | {row['file_mib']:.2f} | {statistics.median(d):.1f} "
            f"[{min(d):.1f}-{max(d):.1f}] | {statistics.median(d) / fp32:.2f} | "
            f"{statistics.median(row['prefill']):.0f} | {max(row['rss_load']):.1f} | {max(row['rss_peak']):.1f} | "
            f"{ppl[0]} | {ppl[1]} |"
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
