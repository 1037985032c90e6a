"""bench/arm64.py: ARM64 (emulated aarch64, onnxruntime's ARM64 kernels) gives the x86 answers.

Slow, and skipped with the reason where qemu-user-static or the cached arm64 root is absent (CI has neither):
build the root once with `python bench/arm64.py` as root.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "arm64.py"
# One float-activation and one int8-activation quantized lowering beside the float reference: the two
# ARM64 MatMulNBits code paths. The full list (W8/W3/W2/folded) is the script's default run.
VARIANTS = [
    {"name": "fp32", "flags": []},
    {"name": "W3", "flags": ["--wbits", "3"]},
    {"name": "W4 int8-act", "flags": ["--wbits", "4", "--abits", "8"]},
]


@pytest.fixture(scope="module")
def arm64():
    spec = importlib.util.spec_from_file_location("bench_arm64", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    reason = module.emulation_ready()
    if reason is not None:
        pytest.skip(f"no emulated ARM64 here: {reason}")
    return module


@pytest.mark.slow
def test_arm64_parity_equals_x86(arm64, tmp_path: Path, stories: Path) -> None:
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps(VARIANTS))
    out = tmp_path / "arm64.json"
    assert arm64.main(["--model", str(stories), "--variants", str(variants), "--new-tokens", "8", "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for name, row in rows.items():
        assert row["runner_ok"], name  # the bundle's runner.py verified the files and ran model.ort on aarch64
        if row["accuracy_levels"] in ("-", "0"):  # float activations: the same numbers on both CPUs
            assert row["arm_max_abs_dlogit"] < 1e-3 and row["arm_top1_vs_x86"] == 1.0, row
            assert row["arm_greedy_vs_x86"] == 1.0 and row["runner_ids_equal_x86"], row
        else:  # int8 activations: platform kernels differ; quality against the float model must match
            assert row["arm_top1_vs_x86"] >= 0.9, row
            assert abs(row["arm_top1_vs_fp32"] - row["x86_top1_vs_fp32"]) <= 0.1, row
