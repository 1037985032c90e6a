"""runtime/runner.py on a real stories260k artifact: KV-cache decoding, report, and one-line errors."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from edgepack.runtime import runner
from edgepack.runtime.manifest import update_manifest_files
from edgepack.runtime.runner import BindingDecoder, DecoderIO, RunDecoder, generate, make_prompt

from edgepack.cli import cli

QUICK = ["--prompt-len=8", "--gen=4", "--runs=2", "--warmup=1", "--threads=1"]


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """stories260k exported for the cpu target (parity is the exporter's test, so skipped here)."""
    out = tmp_path_factory.mktemp("runtime") / "stories260k-cpu"
    args = ["export", "--target", "cpu", "--model", str(stories), "-o", str(out), "--no-parity"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def artifact_copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / artifact.name))


def greedy_without_cache(
    session: ort.InferenceSession, io: DecoderIO, prompt: np.ndarray, steps: int
) -> list[int]:
    """Reference: recompute the whole sequence every step with an empty cache."""
    ids = prompt
    tokens = []
    for _ in range(steps + 1):
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
        }
        feeds.update({s.past: np.zeros((1, s.kv_heads, 0, s.head_dim), s.dtype) for s in io.kv})
        token = int(np.argmax(session.run(["logits"], feeds)[0][0, -1]))
        tokens.append(token)
        ids = np.concatenate([ids, [[token]]], axis=1)
    return tokens


@pytest.mark.parametrize("decoder", ["run", "binding"])
def test_kv_cache_decode_matches_full_recompute(artifact: Path, decoder: str) -> None:
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    io = DecoderIO.from_session(session)
    assert len(io.kv) == 10 and io.kv[0].kv_heads == 4 and io.kv[0].head_dim == 8  # 5 layers, GQA 8/4, dim 64
    dec = RunDecoder(session, io) if decoder == "run" else BindingDecoder(session, io, kv_device="cpu")
    prompt = make_prompt(12, io.vocab_size)
    tokens = generate(dec, prompt, 10).tokens
    assert tokens == generate(dec, prompt, 10).tokens  # reset() really starts over
    assert tokens == greedy_without_cache(session, io, prompt, 10)
    assert len(set(tokens)) > 3


def test_runner_report(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert runner.main([str(artifact), "--json", str(out), "--sweep=4,16", *QUICK]) == 0
    report = json.loads(out.read_text())
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert report["verified_files"] == len(manifest["files"])
    assert report["model_file"] == "model.onnx" and report["provider"] == "CPUExecutionProvider"
    assert report["kv"] == {
        "layers": 5,
        "kv_heads": 4,
        "head_dim": 8,
        "dtype": "float32",
        "bytes_per_position": 1280,
    }
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s"):
        assert 0 < report[key]["min"] <= report[key]["median"] <= report[key]["max"]
    assert report["decode_token_ms"]["p10"] <= report["decode_token_ms"]["p90"]
    assert 0 < report["rss_before_load_mib"] <= report["rss_after_load_mib"] <= report["peak_rss_mib"]
    assert report["load_s"] > 0 and len(report["generated_ids"]) == 5
    assert [p["prompt_len"] for p in report["sweep"]] == [4, 16]


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert runner.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_tampered_file_is_refused(artifact_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = artifact_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    line = one_error_line(capsys, [str(artifact_copy), *QUICK])
    assert "checksum mismatch for model.onnx" in line and "re-export" in line


def test_missing_file_and_folder_are_refused(artifact_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (artifact_copy / "tokenizer.json").unlink()
    assert "missing tokenizer.json" in one_error_line(capsys, [str(artifact_copy)])
    assert "does not exist" in one_error_line(capsys, [str(artifact_copy / "nope")])


def test_context_overflow_is_refused(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(capsys, [str(artifact), "--prompt-len=500", "--gen=20"])
    assert "exceeds the model's context_length 512" in line


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_clear_line(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(capsys, [str(artifact), "--device", "cuda"])
    assert "--device cuda needs CUDAExecutionProvider" in line and "--device cpu" in line


def test_update_manifest_files_lists_added_files(artifact_copy: Path) -> None:
    (artifact_copy / "extra").mkdir()
    (artifact_copy / "extra" / "note.txt").write_text("added by a target\n")
    files = update_manifest_files(artifact_copy)
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    assert manifest["files"] == files and "extra/note.txt" in files and "manifest.json" not in files
    assert manifest["file_bytes"]["extra/note.txt"] == 18
    assert runner.verify_artifact(artifact_copy)["files"] == files


# ---------------------------------------------------------------------------------------------- edgepack bench


def bench_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["bench", *args])
    return result.exit_code, result.output


def test_bench_compare_profile_json_plot(artifact: Path, artifact_copy: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "latency.png"
    code, text = bench_cli(
        str(artifact), "--compare", str(artifact_copy), "--profile", "pixel-8", "--json", str(out), "--plot", str(png),
        *QUICK,
    )  # fmt: skip
    assert code == 0, text
    assert "stories260k-cpu / stories260k-cpu" in text and "ESTIMATE decode on pixel-8" in text
    assert "PASS" in text and "an upper bound, not a measurement" in text
    report = json.loads(out.read_text())
    assert report["config"]["threads"] == 1 and report["profile"]["name"] == "pixel-8"
    a, b = report["artifacts"]
    assert a["runner"]["generated_ids"] == b["runner"]["generated_ids"]
    assert a["budget"]["passed"] and a["budget"]["used_mib"] == a["runner"]["peak_rss_mib"]
    params_bytes = 260_032 * 4
    assert abs(a["weight_bytes_per_token"] - params_bytes) / params_bytes < 0.02
    assert report["ratios"]["model file (MiB)"] == 1.0
    assert [p["prompt_len"] for p in a["runner"]["sweep"]] == [16, 32]  # doubling up to 4x the prompt
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_profile_typo_lists_valid_names(artifact: Path) -> None:
    code, text = bench_cli(str(artifact), "--profile", "pixel8")
    assert code == 2 and len(text.strip().splitlines()) == 1
    assert "did you mean pixel-8?" in text and "galaxy-s24, iphone-15, raspberry-pi-5" in text


def test_bench_missing_artifact_names_the_ones_that_exist(artifact: Path) -> None:
    code, text = bench_cli(str(artifact.parent / "stories260k-cpux"))
    assert code == 2 and len(text.strip().splitlines()) == 1
    assert "does not exist" in text and "stories260k-cpu" in text.split("artifacts in")[1]


def test_bench_tampered_artifact_is_one_line(artifact_copy: Path) -> None:
    (artifact_copy / "config.json").write_text("{}")
    code, text = bench_cli(str(artifact_copy), *QUICK)
    assert code == 2 and len(text.strip().splitlines()) == 1 and "checksum mismatch for config.json" in text


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_bench_cuda_profile_without_cuda(artifact: Path) -> None:
    code, text = bench_cli(str(artifact), "--profile", "server-h100")
    assert code == 2 and "server-h100 profile's device" in text and "--device cpu" in text


def test_runner_imports_only_stdlib_numpy_onnxruntime() -> None:
    """runner.py is copied alone into device bundles: nothing from edgepack, torch or other packages (tokenizers
    only when --prompt asks for text)."""
    tree = ast.parse(Path(runner.__file__).read_text())
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert modules - set(sys.stdlib_module_names) == {"numpy", "onnxruntime", "tokenizers"}
    # tokenizers only inside load_tokenizer (--prompt): a bundle without it still benchmarks
    lazy = [
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        for node in ast.walk(f)
        if isinstance(node, ast.ImportFrom) and node.module == "tokenizers"
    ]
    assert lazy == ["load_tokenizer"]
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | {
        a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names
    }
    assert "tokenizers" not in top


def test_generate_continues_a_prompt_like_transformers(artifact: Path, stories: Path, tmp_path: Path) -> None:
    """`edgepack generate` and `runner.py --prompt` on the fp32 artifact: the same BOS rule, the same greedy
    tokens and text as transformers' generate on the original model; sampling is seeded; bad options are one
    line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = json.loads((artifact / "manifest.json").read_text())["tokens"]
    assert tokens == {"bos_id": 1, "add_bos": True, "eos_ids": [2], "context_length": 512}
    tokenizer = AutoTokenizer.from_pretrained(str(stories))
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(str(stories)).generate(
            ids, max_new_tokens=40, do_sample=False
        )
    expected = out[0, ids.shape[1] :].tolist()
    report = tmp_path / "g.json"
    args = ["generate", str(artifact), "--prompt", "Once upon a time", "--max-new-tokens", "40"]
    result = CliRunner().invoke(cli, [*args, "--json", str(report)])
    assert result.exit_code == 0, result.output
    got = json.loads(report.read_text())
    assert got["prompt_ids"] == ids[0].tolist() and got["ids"] == expected[: len(got["ids"])]
    assert got["stop"] == ("max_new_tokens" if len(got["ids"]) == 40 else "eos")
    assert got["text"] == tokenizer.decode(expected, skip_special_tokens=True)[: len(got["text"])]
    assert result.output.startswith("Once upon a time" + got["text"]) and "new tokens" in result.output
    assert (
        runner.main([str(artifact), "--prompt", "Once upon a time", "--gen", "40", "--json", str(report)])
        == 0
    )
    assert json.loads(report.read_text())["ids"] == got["ids"]
    sampled = [
        runner.run_prompt(artifact, "Once upon a time", runner.RunConfig(gen=24), 1.0, 0.9, seed)["ids"]
        for seed in (0, 0, 1)
    ]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded: the same seed, the same tokens
    pieces: list[str] = []  # streamed as decoded: the pieces add up to the continuation
    streamed = runner.run_prompt(artifact, "Once upon a time", runner.RunConfig(gen=24), stream=pieces.append)
    assert len(pieces) > 10 and "".join(pieces) == streamed["text"] == got["text"][: len(streamed["text"])]
    for flags, message in (
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--json", str(tmp_path / "missing" / "g.json")], "does not exist"),
    ):
        bad = CliRunner().invoke(cli, [*args[:4], *flags])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    long = CliRunner().invoke(cli, ["generate", str(artifact), "--prompt", "word " * 600])
    assert long.exit_code == 2 and "pass a shorter --prompt" in long.output and "Traceback" not in long.output


def test_generate_stops_at_the_context(artifact_copy: Path) -> None:
    """The stop rule at the end of the rotary tables: prompt + new tokens never exceed the context length."""
    rules = runner.TokenRules(bos_id=1, add_bos=True, eos_ids=(), context_length=20)
    session = ort.InferenceSession(str(artifact_copy / "model.onnx"), providers=["CPUExecutionProvider"])
    decoder = RunDecoder(session, DecoderIO.from_session(session))
    done = runner.complete(decoder, [1, 403, 407, 261, 378], rules, max_new=100)
    assert done.stop == "context" and len(done.prompt_ids) + len(done.ids) == 20
