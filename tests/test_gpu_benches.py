"""bench/ep_agreement.py and bench/cuda_runtime.py, the GPU session's tools, checked where no GPU is: the CPU EP
against itself, the missing-provider line, and the ratios and tables the runtime bench derives from its rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from edgepack.cli import cli


def load(name: str):
    """bench/NAME.py as a module (bench/ is scripts; cuda_runtime imports speed from beside it)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.fixture(scope="module")
def stories_w4_cuda(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """The cuda target's W4 (fp16; its embedding takes the standard-op lookup: 1 block a row)."""
    out = tmp_path_factory.mktemp("ep") / "w4"
    args = [
        "export",
        "--target",
        "cuda",
        "--wbits",
        "4",
        "--model",
        str(stories),
        "-o",
        str(out),
        "--no-parity",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def test_ep_agreement_cpu_against_itself(stories_w4_cuda: Path) -> None:
    ep = load("ep_agreement")
    result = ep.compare(stories_w4_cuda / "model.onnx", "CPUExecutionProvider", 0.05)
    assert result["first_mismatches"] == [] and result["logits_max_diff"] == 0.0


def test_ep_agreement_names_a_missing_provider(stories_w4_cuda: Path) -> None:
    args = [sys.executable, str(ROOT / "bench" / "ep_agreement.py"), str(stories_w4_cuda)]
    args += ["--provider", "NoSuchExecutionProvider"]
    done = subprocess.run(args, capture_output=True, text=True, cwd="/")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: this onnxruntime has no NoSuchExecutionProvider (install onnxruntime-gpu on a GPU host)"
    ]


def run_row(prefill: float, decode: float) -> dict:
    return {"runner": {"prefill_tok_s": {"median": prefill}, "decode_tok_s": {"median": decode},
                       "gpu_memory_mib": 1000.0, "peak_rss_mib": 800.0, "load_s": 0.5,
                       "generated_ids": [1, 2, 3]}, "error": None}  # fmt: skip


def test_cuda_runtime_ratios_are_taken_within_each_round() -> None:
    bench = load("cuda_runtime")
    result = {
        "settings": {"prompt_len": 128, "gen": 64, "runs": 5},
        "artifacts": {
            "builder int4": {"tool": "builder", "file_mib": 272.6},
            "edgepack fp16": {"tool": "edgepack", "file_mib": 947.8},
            "edgepack W4": {"tool": "edgepack", "file_mib": 254.3},
        },
        "ort": {
            "device": "cuda",
            "rounds": [
                {"builder int4": run_row(100, 300), "edgepack fp16": run_row(80, 200), "edgepack W4": run_row(60, 330)},
                {"builder int4": run_row(100, 200), "edgepack fp16": run_row(80, 100), "edgepack W4": {"runner": None, "error": "exit 1: x"}},
            ],
        },
    }  # fmt: skip
    ratios = {(r["ratio"], r["metric"]): r["per_round"] for r in bench.ratios(result)}
    assert ratios[("edgepack W4 / builder int4", "decode_tok_s")] == [1.1]  # round 2 has no W4 row
    assert ratios[("edgepack W4 / edgepack fp16", "prefill_tok_s")] == [0.75]
    assert ("edgepack W3 / builder int4", "decode_tok_s") not in ratios
    result["ratios"] = bench.ratios(result)
    table = bench.markdown(result)
    assert "| edgepack W4 | 254.3 | 1 | 60.0 | 330.0 | 1000.0 | 800.0 | 0.50 |" in table
    assert "| edgepack W4 | 254.3 | 2 | exit 1: x |||||" in table
    result["ort"]["env"] = {"ORT_FPA_INTB_GEMM": "1"}
    assert "(--device cuda); ORT_FPA_INTB_GEMM=1." in bench.markdown(result)


def test_cuda_runtime_plane_variants_export_their_own_kernel_width() -> None:
    bench = load("cuda_runtime")
    assert bench.width_flags("W2-planes") == ["--wbits", "2", "--lowering", "planes"]
    assert bench.width_flags("W2") == ["--wbits", "2"] and bench.width_flags("fp16") == []
    assert bench.parse_args(["--widths", "fp16,W2-planes"]).widths == ["fp16", "W2-planes"]
    assert bench.width_flags("W4-sym32") == ["--wbits", "4", "--symmetric", "--group-size", "32",
                                             "--mlp-group-size", "0"]  # fmt: skip
    with pytest.raises(SystemExit):
        bench.parse_args(["--widths", "W9"])


def test_cuda_profile_sums_the_gpu_timeline_per_call(tmp_path: Path) -> None:
    """bench/cuda_profile.py reads kernels and copies from the profiler's Chrome trace (the GPU timeline, whatever
    library launched them), per call; host-side events do not count."""
    bench = load("cuda_profile")

    class FakeProfile:
        def export_chrome_trace(self, path: str) -> None:
            events = [
                {"cat": "kernel", "name": "MatMulFloatInt4Kernel", "dur": 30.0},
                {"cat": "kernel", "name": "MatMulFloatInt4Kernel", "dur": 10.0},
                {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "dur": 50.0},
                {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "dur": 99.0},
                {"cat": "kernel", "name": "no duration"},
            ]
            Path(path).write_text(json.dumps({"traceEvents": events}))

    times = bench.kernel_times(FakeProfile(), calls=2)
    assert times == {"Memcpy DtoH (Device -> Pageable)": 25.0, "MatMulFloatInt4Kernel": 20.0}


def test_cuda_session_script_names_its_stages(tmp_path: Path) -> None:
    """bench/cuda_session.sh parses, and an unknown stage is one line and exit 2 (before touching anything)."""
    script = ROOT / "bench" / "cuda_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(
        ["bash", str(script), "9"], capture_output=True, text=True, env={"OUT": str(tmp_path)}
    )
    assert done.returncode == 2 and done.stderr.strip() == "unknown stage 9: prepare or 1..6"
