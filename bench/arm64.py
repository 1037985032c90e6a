#!/usr/bin/env python3
"""ARM64 proof: run Android bundles on an emulated aarch64 CPU and compare with the x86 run.

Builds once (cached outside the repo, default ~/.cache/edgepack/arm64-root) an arm64 Debian bookworm root with
debootstrap, and installs the aarch64 onnxruntime wheel (this host's onnxruntime version) + numpy in it. Each
artifact variant (a list of `edgepack export` flag sets, --variants FILE to change it) is exported here for the
android target; then, inside the root under qemu-user-static (QEMU_CPU=neoverse-n1, a phone-class ARMv8.2 core
with dot-product; one intra-op thread; no /sys), the bundle's own runner.py runs and bench/arm64_probe.py
records logits and greedy tokens, which are compared with the same probe on x86.

Needs root (chroot, binfmt_misc) and `apt-get install qemu-user-static debootstrap`. Emulated timings are not
speed claims. Usage:
    python bench/arm64.py [--model DIR] [--variants FILE] [--json docs/results/arm64.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT_DIR = Path(os.environ.get("EDGEPACK_ARM64_ROOT", Path.home() / ".cache" / "edgepack" / "arm64-root"))
MIRROR = "http://deb.debian.org/debian"
QEMU = Path("/usr/bin/qemu-aarch64-static")
QEMU_CPU = "neoverse-n1"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_LINE = (
    r":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    f":{QEMU}:F"
)
ARM_PYTHON = "/opt/ort/bin/python"
HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
PROMPTS = (  # held-out, story-like text: every position's logits are compared (same inputs everywhere)
    "Once upon a time, there was a little girl named Lily. She loved to play in the park with her red ball. "
    "One day, she saw a big dog",
    "Tom had a small boat. Every morning he took it to the lake and looked at the fish. His mom said, "
    "\"Be careful, Tom!\" He smiled and",
    "The sun was hot and the birds were singing. Sam and his friend Mia wanted to build a sand castle, "
    "so they ran to the beach and",
)
# Export flag sets, one per artifact. Level 0 = float activations (--abits 16), level 4 = int8 activations
# (--abits 8); the table reads the real accuracy_level from each graph, so new default lowerings show up.
VARIANTS: list[dict] = [
    {"name": "fp32", "flags": []},
    {"name": "W8", "flags": ["--wbits", "8"]},
    {"name": "W4", "flags": ["--wbits", "4"]},
    {"name": "W4 int8-act", "flags": ["--wbits", "4", "--abits", "8"]},
    {"name": "W3", "flags": ["--wbits", "3"]},
    {"name": "W2 g32", "flags": ["--wbits", "2", "--group-size", "32"]},
    {"name": "folded W4", "flags": ["--remove", "0.25", "--share-groups", "2", "--wbits", "4", "--calib", "{calib}"]},
]
log = logging.getLogger("arm64")


class SetupError(Exception):
    """The emulated ARM64 environment cannot be made here (one line, with the fix)."""


def emulation_ready() -> str | None:
    """None when an aarch64 binary can run here through qemu, else the reason it cannot."""
    if not QEMU.is_file():
        return f"{QEMU} missing: apt-get install qemu-user-static debootstrap"
    if not (BINFMT / "qemu-aarch64").is_file():
        return "aarch64 is not registered in binfmt_misc (run bench/arm64.py as root once)"
    if not (ROOT_DIR / ARM_PYTHON.lstrip("/")).exists():
        return f"no arm64 root with onnxruntime at {ROOT_DIR} (run bench/arm64.py as root once)"
    return None


def ensure_binfmt() -> None:
    """Mount binfmt_misc and register qemu-aarch64-static with flag F (update-binfmts is not installed)."""
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "binfmt_misc", "-t", "binfmt_misc", str(BINFMT)], check=True)
    if not (BINFMT / "qemu-aarch64").exists():
        (BINFMT / "register").write_text(BINFMT_LINE)


def ensure_root() -> None:
    """Debootstrap the arm64 root and install the aarch64 onnxruntime + numpy wheels into /opt/ort (once)."""
    if (ROOT_DIR / ARM_PYTHON.lstrip("/")).exists():
        return
    if os.geteuid() != 0:
        raise SetupError("building the arm64 root needs root (debootstrap, chroot); rerun as root")
    if shutil.which("debootstrap") is None or not QEMU.is_file():
        raise SetupError("apt-get install qemu-user-static debootstrap, then rerun")
    ensure_binfmt()
    partial = ROOT_DIR.with_name(ROOT_DIR.name + ".partial")
    if not (partial / "usr" / "bin" / "python3").exists():
        log.warning("debootstrap arm64 bookworm into %s (several minutes)", partial)
        subprocess.run(
            ["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,python3-pip",
             "bookworm", str(partial), MIRROR],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    wheels = partial / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
         "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64", "-d", str(wheels),
         f"onnxruntime=={ort.__version__}", "numpy"],
        check=True,
    )  # fmt: skip
    chroot(partial, ["python3", "-m", "venv", "/opt/ort"])
    chroot(partial, [ARM_PYTHON, "-m", "pip", "install", "-q", "--no-index", "--find-links", "/wheels",
                     "onnxruntime", "numpy"])  # fmt: skip
    partial.rename(ROOT_DIR)


def chroot(root: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the arm64 root under qemu (no /sys: session creation segfaulted with it)."""
    env = {"QEMU_CPU": QEMU_CPU, "PATH": "/usr/bin:/bin", "HOME": "/root", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([CHROOT, str(root), *cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"arm64 {' '.join(cmd[:3])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done


@dataclass
class Row:
    """One artifact: its graph facts, ARM64 vs x86 agreement, and both against the float artifact."""

    name: str
    flags: str
    mb: float
    accuracy_levels: str
    arm_max_abs_dlogit: float
    arm_top1_vs_x86: float
    arm_greedy_vs_x86: float
    x86_top1_vs_fp32: float
    arm_top1_vs_fp32: float
    x86_greedy_vs_fp32: float
    arm_greedy_vs_fp32: float
    runner_ok: bool
    runner_ids_equal_x86: bool
    arm_decode_tok_s_emulated: float


def accuracy_levels(model_file: Path) -> str:
    """The accuracy_level attributes of the graph's MatMulNBits nodes ('-' when it has none)."""
    graph = onnx.load(str(model_file), load_external_data=False)
    levels = {
        a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"
    }
    return ",".join(map(str, sorted(levels))) or "-"


def agreement(a: dict, b: dict, n: int) -> tuple[float, float, float]:
    """(max |dlogit|, top-1 agreement, leading greedy agreement) of two probe results over n prompts."""
    worst, top1, greedy = 0.0, [], []
    for p in range(n):
        la, lb = a[f"logits_{p}"], b[f"logits_{p}"]
        worst = max(worst, float(np.abs(la - lb).max()))
        top1.append(float((la.argmax(-1) == lb.argmax(-1)).mean()))
        ga, gb = a[f"greedy_{p}"], b[f"greedy_{p}"]
        same = np.cumprod(ga == gb)
        greedy.append(float(same.sum() / len(ga)))
    return worst, float(np.mean(top1)), float(np.mean(greedy))


def export(model: Path, out: Path, flags: list[str]) -> None:
    """`edgepack export --target android` of one variant (parity checked on x86 as usual)."""
    cmd = [sys.executable, "-m", "edgepack", "export", "--model", str(model), "--target", "android", "-o", str(out), *flags]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def runner_report(root: Path, rel: str, json_name: str) -> dict:
    """The bundle's runner.py inside the arm64 root (checksums verified, model.ort loaded); its report goes
    beside the artifact (an artifact folder holds only the files its manifest lists)."""
    parent = Path(rel).parent
    chroot(root, [ARM_PYTHON, f"/{rel}/runner.py", f"/{rel}", "--threads=1", "--prompt-len=8", "--gen=8",
                  "--runs=1", "--warmup=0", "--json", f"/{parent}/{json_name}"])  # fmt: skip
    return json.loads((root / parent / json_name).read_text())


def run_variant(model: Path, variant: dict, work: Path, prompts: Path, n_prompts: int, new_tokens: int) -> tuple:
    """Export, probe on x86 and ARM64, run runner.py on both; returns (x86 probe, arm probe, facts)."""
    art = work / variant["name"].replace(" ", "_")
    calib = str(SHARED / "data" / "tinyshakespeare.txt")
    export(model, art, [f.format(calib=calib) for f in variant["flags"]])
    x86_npz, arm_npz = art.parent / f"{art.name}.x86.npz", art.parent / f"{art.name}.arm.npz"
    probe = HERE / "arm64_probe.py"
    subprocess.run([sys.executable, str(probe), str(art / "model.ort"), str(prompts), str(x86_npz),
                    f"--new-tokens={new_tokens}"], check=True)  # fmt: skip
    rel = str(art.relative_to(ROOT_DIR))
    shutil.copyfile(probe, art / ".." / "arm64_probe.py")
    t0 = time.perf_counter()
    chroot(ROOT_DIR, [ARM_PYTHON, f"/{Path(rel).parent}/arm64_probe.py", f"/{rel}/model.ort",
                      f"/{Path(rel).parent}/{prompts.name}", f"/{rel}/../{arm_npz.name}",
                      f"--new-tokens={new_tokens}"])  # fmt: skip
    log.info("%s: arm64 probe %.1f s (emulated)", variant["name"], time.perf_counter() - t0)
    arm_run = runner_report(ROOT_DIR, rel, f"{art.name}.arm64-runner.json")
    x86_json = art.parent / f"{art.name}.x86-runner.json"
    subprocess.run([sys.executable, str(art / "runner.py"), str(art), "--threads=1", "--prompt-len=8", "--gen=8",
                    "--runs=1", "--warmup=0", "--json", str(x86_json)], check=True, capture_output=True)  # fmt: skip
    x86_run = json.loads(x86_json.read_text())
    facts = {
        "mb": (art / "model.ort").stat().st_size / 1e6,
        "levels": accuracy_levels(art / "model.onnx"),
        "runner_ok": arm_run.get("verified_files", 0) > 0,
        "runner_equal": arm_run["generated_ids"] == x86_run["generated_ids"],
        "tok_s": float(arm_run.get("decode_tok_s", {}).get("median", float("nan")))
        if isinstance(arm_run.get("decode_tok_s"), dict) else float(arm_run.get("decode_tok_s", float("nan"))),
    }
    return dict(np.load(x86_npz)), dict(np.load(arm_npz)), facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "stories260k")
    parser.add_argument("--variants", type=Path, help="JSON list of {name, flags} (default: the built-in list)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=HERE.parent / "docs" / "results" / "arm64.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ensure_root()
    except (SetupError, subprocess.CalledProcessError) as e:
        print(f"arm64: {e}", file=sys.stderr)
        return 2
    variants = json.loads(args.variants.read_text()) if args.variants else VARIANTS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    work = Path(tempfile.mkdtemp(prefix="edgepack-arm64-", dir=ROOT_DIR / "tmp"))
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps([tokenizer(p)["input_ids"] for p in PROMPTS]))
    rows, reference = [], None
    try:
        for variant in variants:
            x86, arm, facts = run_variant(args.model, variant, work, prompts, len(PROMPTS), args.new_tokens)
            assert str(arm["machine"]) == "aarch64", arm["machine"]
            reference = reference or (x86, arm)  # the first variant (fp32) is the float reference
            d, t1, g = agreement(x86, arm, len(PROMPTS))
            rows.append(Row(
                variant["name"], " ".join(variant["flags"]).replace("{calib}", "tinyshakespeare.txt"),
                round(facts["mb"], 3), facts["levels"], d, round(t1, 4), round(g, 4),
                round(agreement(reference[0], x86, len(PROMPTS))[1], 4),
                round(agreement(reference[1], arm, len(PROMPTS))[1], 4),
                round(agreement(reference[0], x86, len(PROMPTS))[2], 4),
                round(agreement(reference[1], arm, len(PROMPTS))[2], 4),
                facts["runner_ok"], facts["runner_equal"], round(facts["tok_s"], 1),
            ))  # fmt: skip
            log.info("%s", rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    args.json.write_text(json.dumps({
        "model": args.model.name, "onnxruntime": ort.__version__, "qemu_cpu": QEMU_CPU, "threads": 1,
        "prompts": len(PROMPTS), "new_tokens": args.new_tokens, "rows": [asdict(r) for r in rows],
    }, indent=2) + "\n")  # fmt: skip
    return 0


def print_table(rows: list[Row]) -> None:
    """Markdown table of the rows."""
    cols = list(asdict(rows[0])) if rows else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.2e}" if k == "arm_max_abs_dlogit" else str(v) for k, v in asdict(r).items()) + " |")


if __name__ == "__main__":
    sys.exit(main())
