"""targets/android.py: the Android hand-off bundle of a real stories260k artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from edgepack.runtime import runner
from edgepack.targets.android import ANDROID_OPS, check_android_ops, graph_ops, make_android_bundle
from onnx import TensorProto, helper
from onnxruntime.capi import _pybind_state

from edgepack.cli import cli
from edgepack.errors import EdgepackError

BUNDLE_FILES = ("model.ort", "required_operators.config", "EdgepackDecoder.kt", "runner.py")
QUICK = ["--prompt-len=8", "--gen=6", "--runs=1", "--warmup=0", "--threads=1"]
NETWORK_ERRORS = ("No matching distribution", "Could not find a version", "NewConnectionError", "Network is unreachable",
                  "Temporary failure in name resolution", "ConnectTimeout", "ReadTimeout")  # fmt: skip


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """stories260k exported for the android target: the exporter calls make_android_bundle on its temp folder."""
    out = tmp_path_factory.mktemp("android") / "stories260k-android"
    args = ["export", "--target", "android", "--model", str(stories), "-o", str(out), "--no-parity"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with only onnxruntime (this version) and numpy: what a phone or board has, no edgepack, no torch."""
    venv = tmp_path_factory.mktemp("venv") / "runner-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True
    )
    python = venv / "bin" / "python"
    # This interpreter's pip installs into the venv: no ensurepip, and --no-compile skips sympy's .pyc (~20 s).
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
    pip += [f"onnxruntime=={ort.__version__}", "numpy"]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        if any(pattern in done.stderr for pattern in NETWORK_ERRORS):
            pytest.skip(f"cannot install onnxruntime + numpy into a clean venv (network): {lines[-1]}")
        pytest.fail(f"pip install into a clean venv failed: {lines[-1]}")
    return python


def test_bundle_files_and_manifest(artifact: Path) -> None:
    manifest = runner.verify_artifact(artifact)  # every file, bundle included, matches its checksum
    assert set(BUNDLE_FILES) <= set(manifest["files"])
    assert (artifact / "runner.py").read_bytes() == Path(runner.__file__).read_bytes()
    config = (artifact / "required_operators.config").read_text()
    assert "ai.onnx;" in config and "/tmp" not in config
    kotlin = (artifact / "EdgepackDecoder.kt").read_text()
    for needle in (
        "OrtEnvironment.getEnvironment()",
        "createSession",
        "past_key_values.",
        '"logits"',
        "model.ort",
    ):
        assert needle in kotlin


def feeds_for(session: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray] | None) -> dict:
    io = runner.DecoderIO.from_session(session)
    length = 0 if past is None else next(iter(past.values())).shape[2]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((1, length + ids.shape[1]), np.int64),
        "position_ids": np.arange(length, length + ids.shape[1], dtype=np.int64)[None],
    }
    feeds.update(past or {s.past: np.zeros((1, s.kv_heads, 0, s.head_dim), s.dtype) for s in io.kv})
    return feeds


def prefill_and_step(path: Path) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    logits, *presents = session.run(names, feeds_for(session, np.array([[1, 67, 300, 45, 9, 120]]), None))
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], presents, strict=True)}
    token = np.array([[int(np.argmax(logits[0, -1]))]])
    return logits, session.run(["logits"], feeds_for(session, token, past))[0]


def test_ort_gives_the_onnx_logits(artifact: Path) -> None:
    onnx_prefill, onnx_step = prefill_and_step(artifact / "model.onnx")
    ort_prefill, ort_step = prefill_and_step(artifact / "model.ort")
    np.testing.assert_allclose(ort_prefill, onnx_prefill, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ort_step, onnx_step, atol=1e-4, rtol=1e-4)


def test_runner_loads_the_ort(artifact: Path, tmp_path: Path) -> None:
    reports = {}
    for name in ("model.ort", "model.onnx"):
        out = tmp_path / f"{name}.json"
        assert runner.main([str(artifact), f"--model-file={name}", "--json", str(out), *QUICK]) == 0
        reports[name] = json.loads(out.read_text())
    assert runner.main([str(artifact), "--json", str(tmp_path / "default.json"), *QUICK]) == 0
    assert json.loads((tmp_path / "default.json").read_text())["model_file"] == "model.ort"
    assert reports["model.ort"]["generated_ids"] == reports["model.onnx"]["generated_ids"]


def test_bundle_runner_in_a_clean_venv(artifact: Path, clean_venv: Path, tmp_path: Path) -> None:
    isolated = subprocess.run([str(clean_venv), "-c", "import torch"], capture_output=True)
    assert isolated.returncode != 0, "the clean venv must not see torch"
    out = tmp_path / "device.json"
    cmd = [str(clean_venv), "runner.py", ".", "--json", str(out), *QUICK]
    done = subprocess.run(cmd, cwd=artifact, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["model_file"] == "model.ort" and report["verified_files"] == len(
        json.loads((artifact / "manifest.json").read_text())["files"]
    )
    local = tmp_path / "local.json"
    assert runner.main([str(artifact), "--json", str(local), *QUICK]) == 0
    assert report["generated_ids"] == json.loads(local.read_text())["generated_ids"]


def test_rebundling_keeps_the_manifest_consistent(artifact: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    (copy / "model.ort").unlink()
    make_android_bundle(copy)
    assert (
        runner.verify_artifact(copy)["files"].keys()
        == json.loads((artifact / "manifest.json").read_text())["files"].keys()
    )


def test_target_policy_narrows_the_allow_list(artifact: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    for name in BUNDLE_FILES:
        (copy / name).unlink()
    with pytest.raises(EdgepackError, match="uses MatMul, which the target's allowed ops exclude") as err:
        make_android_bundle(copy, ANDROID_OPS - {("", "MatMul")})
    assert "\n" not in str(err.value)
    assert not any((copy / name).exists() for name in BUNDLE_FILES)  # checked before anything is written


def test_unknown_op_is_named_even_inside_a_subgraph(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    branch = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="com.example")], "then", [], [y])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    model = helper.make_model(helper.make_graph([node], "g", [cond, x], [y]))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    assert graph_ops(model) == {("", "If"), ("com.example", "Foo")}
    with pytest.raises(EdgepackError, match=r"uses com\.example\.Foo, which ONNX Runtime Android"):
        check_android_ops(path)


def test_allow_list_matches_onnxruntime_cpu_kernels() -> None:
    kernels = {
        (k.domain, k.op_name)
        for k in _pybind_state.get_all_opkernel_def()
        if k.provider == "CPUExecutionProvider"
    }
    assert sorted(ANDROID_OPS - {("", "Constant")} - kernels) == []
    required = {"MatMulNBits", "GatherBlockQuantized", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                "GroupQueryAttention", "MultiHeadAttention"}  # fmt: skip
    assert {("com.microsoft", op) for op in required} <= ANDROID_OPS
    assert ("", "SimplifiedLayerNormalization") in ANDROID_OPS  # onnxruntime registers it in the ONNX domain
