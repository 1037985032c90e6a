"""RTN's range per group: the MSE search (the default) against the full [min, max] range, per width.

    python bench/weight_range.py [--model ../shared/models/mix-llama-14m] [--widths 8,4,3,2] \
        [--json docs/results/weight_range.json]

Each row is an RTN export (cpu target, fused form, int8 activations, parity off) of ``--model`` at one width
with the export defaults (group 64, MLP group 128 where it divides K) and ``--weight-range mse`` or ``minmax``,
plus group 128 at 3 bits. Perplexity through ONNX Runtime on 8192 tokens of WikiText-2 (test) and of the
last 10% of Tiny Shakespeare, as bench/lowering.py measures it; file MiB of the artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from lowering import add_perplexities  # noqa: E402


def rows_for(widths: list[int]) -> list[tuple[str, dict]]:
    rows = [(f"W{b}", {"wbits": b}) for b in widths]
    if 3 in widths:
        rows.append(("W3 g128", {"wbits": 3, "group_size": 128}))
    return rows


def export_row(model: Path, name: str, rng: str, config: dict, work: Path) -> Path:
    from edgepack.compressor.quantize import QuantConfig

    from edgepack.pipeline import ExportRequest, export
    from edgepack.recipe import Recipe

    folder = work / f"{name.replace(' ', '_')}_{rng}"
    if not (folder / "manifest.json").is_file():
        recipe = Recipe([QuantConfig(**config, weight_range=rng)])
        export(ExportRequest(model, folder, recipe=recipe, parity=False, eval_text=Path("none")))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "mix-llama-14m")
    p.add_argument("--widths", default="8,4,3,2")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgepack-weight-range"))
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for name, config in rows_for([int(w) for w in args.widths.split(",")]):
        for rng in ("minmax", "mse"):
            folder = export_row(args.model, name, rng, config, args.work)
            size = sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20
            rows.append({"name": name, "range": rng, "config": config, "artifact": str(folder),
                         "file_mib": round(size, 2), "activations": "int8", "lowering": "auto"})  # fmt: skip
    add_perplexities(rows, args.model, args.ppl_tokens, 1)
    print(f"{args.model.name}, RTN, perplexity through ONNX Runtime ({args.ppl_tokens} tokens per text)")
    print(
        "| width | file MiB | WikiText-2 minmax | WikiText-2 mse | Shakespeare tail minmax | Shakespeare tail mse |"
    )
    print("|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        print(f"| {a['name']} | {b['file_mib']:.2f} | {a['ppl_wiki']:.2f} | {b['ppl_wiki']:.2f} | "
              f"{a['ppl_shakespeare']:.2f} | {b['ppl_shakespeare']:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
