"""Reproduce docs/results/runtime.md: export the shared models, then `edgepack bench` them side by side.

    python bench/runtime_results.py [--threads 2] [--out bench/out]

Artifacts are exported once into OUT (kept between runs); each comparison is one `edgepack bench --compare`
invocation, so its ratios come from one run. The host's load average is printed before and after, because
on a shared machine it moves the numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"
ARTIFACTS = {  # artifact name -> export arguments
    "stories260k-fp32": ["--model", str(MODELS / "stories260k")],
    "mix-llama-14m-fp32": ["--model", str(MODELS / "mix-llama-14m")],
    "mix-llama-14m-int4": ["--model", str(MODELS / "mix-llama-14m"), "--wbits", "4"],
}
COMPARISONS = (  # (A, B, device profile)
    ("stories260k-fp32", "mix-llama-14m-fp32", "pixel-8"),
    ("mix-llama-14m-fp32", "mix-llama-14m-int4", "raspberry-pi-5"),
)


def edgepack(*args: str) -> None:
    click.echo("$ edgepack " + " ".join(args))
    subprocess.run([sys.executable, "-m", "edgepack", *args], check=True)


@click.command()
@click.option("--threads", default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "bench" / "out", show_default=True)
def main(threads: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, args in ARTIFACTS.items():
        if not (out / name / "manifest.json").is_file():
            edgepack("export", "--target", "cpu", *args, "-o", str(out / name), "--force")
    click.echo(f"load average before: {os.getloadavg()}")
    for a, b, profile in COMPARISONS:
        stem = out / f"bench-{a}-vs-{b}"
        edgepack(
            "bench", str(out / a), "--compare", str(out / b), "--threads", str(threads), "--runs", "10", "--profile", profile,
            "--json", f"{stem}.json", "--plot", f"{stem}.png",
        )  # fmt: skip
    click.echo(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
