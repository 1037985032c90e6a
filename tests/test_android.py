"""targets/android.py: the Android hand-off bundle of a real stories260k artifact."""

from __future__ import annotations

import json
import re
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
from edgepack.targets.android import (
    ANDROID_OPS,
    check_android_ops,
    check_kotlin_cache_io,
    graph_ops,
    kotlin_empty_past,
    make_android_bundle,
)
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
    # --prompt reads tokenizer.json through the tokenizers package, which this venv lacks: one line naming it
    done = subprocess.run(
        [str(clean_venv), "runner.py", ".", "--prompt", "Once"], cwd=artifact, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: --prompt needs the tokenizers package to read tokenizer.json: pip install tokenizers"
    )
    # with it (still no edgepack, torch or transformers): the same continuation as in this process
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(clean_venv),
        "install",
        "-q",
        "--no-compile",
        "tokenizers",
    ]
    installed = subprocess.run(pip, capture_output=True, text=True)
    if installed.returncode != 0:
        if any(pattern in installed.stderr for pattern in NETWORK_ERRORS):
            pytest.skip("cannot install tokenizers into the clean venv (network)")
        pytest.fail(f"pip install tokenizers failed: {installed.stderr.strip().splitlines()[-1:]}")
    args = ["runner.py", ".", "--prompt", "Once upon a time", "--gen", "16", "--threads", "1"]
    done = subprocess.run(
        [str(clean_venv), *args, "--json", str(tmp_path / "p.json")],
        cwd=artifact,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    here = runner.run_prompt(artifact, "Once upon a time", runner.RunConfig(threads=1, gen=16))
    device = json.loads((tmp_path / "p.json").read_text())
    assert device["ids"] == here["ids"] and device["text"] == here["text"] and len(here["ids"]) > 3
    assert done.stdout.startswith("Once upon a time" + here["text"])


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


@pytest.fixture(scope="module")
def compressed_kv(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """stories260k for android with a MiniCache-merged 8-bit KV cache: uint8 codes, float16 scales, float
    magnitudes and retained tokens, int64 retained positions; onnxruntime-genai cannot run it (no genai_config)."""
    out = tmp_path_factory.mktemp("android-kv") / "kv"
    flags = ["--wbits", "4", "--kv-merge", "minicache", "--kv-start", "2", "--kv-bits", "8", "--eval", "none"]
    result = CliRunner().invoke(
        cli, ["export", "--target", "android", "--model", str(stories), *flags, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def kotlin_greedy(model: Path, prompt: list[int], steps: int) -> list[int]:
    """EdgepackDecoder.kt's generate loop, step for step, on the Python API: each cache input starts empty in its
    own dtype with kotlin_empty_past's shape (the Kotlin code sizes it the same way from TensorInfo), and each
    present.X comes back as past_key_values.X. No EOS stop (stories260k's samples stop early)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    past = {
        name: np.zeros(kotlin_empty_past(list(i.shape)), runner.ORT_DTYPES[i.type])
        for name, i in inputs.items()
        if name.startswith("past_key_values.")
    }
    ids, length, out = prompt, 0, []
    for _ in range(steps + 1):
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, length + len(ids)), np.int64),
            "position_ids": np.arange(length, length + len(ids), dtype=np.int64)[None],
            **past,
        }
        results = dict(
            zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in inputs}), strict=True)
        )
        past = {name: results[name.replace("past_key_values.", "present.")] for name in past}
        length += len(ids)
        ids = [int(np.argmax(results["logits"][0, -1]))]
        out += ids
    return out


def test_compressed_kv_bundle_decodes_like_the_runner(compressed_kv: Path, tmp_path: Path) -> None:
    """The android bundle of a compressed-KV artifact: every file checked, no genai_config.json, and the
    Kotlin loop's cache handling (typed empty caches, presents fed back) gives runner.py's greedy tokens."""
    manifest = runner.verify_artifact(compressed_kv)
    assert set(BUNDLE_FILES) <= set(manifest["files"]) and not (compressed_kv / "genai_config.json").exists()
    session = ort.InferenceSession(str(compressed_kv / "model.ort"), providers=["CPUExecutionProvider"])
    types = {i.type for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    assert types == {"tensor(uint8)", "tensor(float16)", "tensor(float)", "tensor(int64)"}
    kotlin = (compressed_kv / "EdgepackDecoder.kt").read_text()
    assert "ByteBuffer.allocateDirect(0), shape.toLongArray(), info.type" in kotlin
    out = tmp_path / "r.json"
    assert runner.main([str(compressed_kv), "--json", str(out), *QUICK[:1], "--gen=12", *QUICK[2:]]) == 0
    report = json.loads(out.read_text())
    prompt = runner.make_prompt(8, 512)[0].tolist()
    assert report["generated_ids"] == kotlin_greedy(compressed_kv / "model.ort", prompt, 12)


def test_compressed_kv_bundle_continues_a_prompt(compressed_kv: Path, tmp_path: Path) -> None:
    """runner.py --prompt in the bundle (no genai_config.json, so onnxruntime-genai cannot run it): the prompt's
    ids with BOS, then the same tokens as the Kotlin loop's cache handling gives from those ids."""
    out = tmp_path / "p.json"
    args = [
        str(compressed_kv),
        "--prompt",
        "Once upon a time",
        "--gen",
        "16",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    assert runner.main(args) == 0
    report = json.loads(out.read_text())
    assert report["prompt_ids"][0] == 1 and report["stop"] in ("max_new_tokens", "eos")
    steps = len(report["ids"]) - 1
    assert kotlin_greedy(compressed_kv / "model.ort", report["prompt_ids"], steps) == report["ids"]


def test_compressed_kv_readme_sizes_the_cache(compressed_kv: Path, tmp_path: Path) -> None:
    """README's bytes per token (codes + scales + merged directions and magnitudes) and per retained outlier
    token, against the cache runner.py holds after 256 positions: the rest is whole retained tokens."""
    readme = (compressed_kv / "README.md").read_text()
    assert "onnxruntime-genai: not this artifact" in readme and "genai_config.json's `search`" not in readme
    line = re.search(
        r"(\d+) KV inputs .*?: ([\d,]+) bytes per token, plus ([\d,]+) bytes per outlier token", readme
    )
    assert line is not None, readme
    per_token, per_retained = (int(line.group(i).replace(",", "")) for i in (2, 3))
    # 4 KV heads x head_dim 8, 8-bit codes + float16 scale and low per head: layers 0, 1, 4 keep their own K and V;
    # the merged pair 2-3 shares one direction per K and V and keeps a float magnitude per layer; a retained token
    # costs its int64 position and float K and V in both layers
    assert (per_token, per_retained) == (
        3 * 2 * 4 * (8 + 2 + 2) + 2 * 4 * (8 + 2 + 2) + 4 * 4 * 4,
        8 + 4 * 4 * 8 * 4,
    )
    out = tmp_path / "ctx.json"
    assert runner.main([str(compressed_kv), "--json", str(out), *QUICK, "--context=256"]) == 0
    kv_bytes = json.loads(out.read_text())["contexts"][0]["kv_bytes"]
    retained, rest = divmod(kv_bytes - per_token * 256, per_retained)
    assert rest == 0 and 0 <= retained < 256


def test_cache_the_kotlin_loop_cannot_feed_is_refused(tmp_path: Path) -> None:
    """A past input without its present, or with the batch on another axis, is named before anything is written."""
    x = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [4, "batch_size", "p", 8])
    y = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", [x.name], [y.name])], "g", [x], [y])
    )
    with pytest.raises(
        EdgepackError, match=r"key \(shape \[4, 'batch_size', 'p', 8\]\) has its batch axis where"
    ):
        check_kotlin_cache_io(model)
    x.type.tensor_type.shape.dim[0].dim_param = "batch_size"
    x.type.tensor_type.shape.dim[1].dim_value = 4
    y.name = "present.1.key"
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", [x.name], [y.name])], "g", [x], [y])
    )
    with pytest.raises(EdgepackError, match=r"past_key_values\.0\.key has no present\.0\.key output"):
        check_kotlin_cache_io(model)
    model.graph.output[0].name = model.graph.node[0].output[0] = "present.0.key"
    check_kotlin_cache_io(model)  # batch first, its present there: accepted
    assert kotlin_empty_past(["batch_size", 4, "past_sequence_length", 8]) == [1, 4, 0, 8]
    assert kotlin_empty_past(["past_retained_length_2_3"]) == [0]
