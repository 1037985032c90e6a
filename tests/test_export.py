"""End-to-end export: real models through the CLI pipeline, checked against transformers and onnxruntime-genai."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import genai_greedy, make_random_model
from edgepack.exporter.parity import open_decoder, ort_greedy

from edgepack.model import load_model, load_tokenizer
from edgepack.pipeline import ExportRequest, export

PROMPT = "Once upon a time, there was a little"


def hf_greedy(model_dir: Path, prompt_ids: list[int], n: int = 32) -> list[int]:
    """transformers' own generate(), greedy, as the reference."""
    model = load_model(model_dir)
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def stories_artifact(tmp_path_factory, stories) -> Path:
    out = tmp_path_factory.mktemp("art") / "stories-cpu"
    r = run_cli("export", "--target", "cpu", "--model", str(stories), "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_cli_export_stories_matches_transformers_greedy(stories_artifact, stories):
    ids = load_tokenizer(stories)(PROMPT)["input_ids"]
    dec = open_decoder(stories_artifact / "model.onnx")
    assert ort_greedy(dec, ids, 32) == hf_greedy(stories, ids)


def test_artifact_contents_and_manifest(stories_artifact):
    names = {p.name for p in stories_artifact.iterdir()}
    assert {
        "model.onnx",
        "tokenizer.json",
        "genai_config.json",
        "manifest.json",
        "README.md",
        "config.json",
    } <= names
    m = json.loads((stories_artifact / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["parity"]["greedy"] == 1.0 and m["parity"]["max_abs_logit"] < 1e-3
    assert m["ir_version"] == 10 and m["opsets"]["ai.onnx"] == 21
    assert m["parameters"] == 260_032 == sum(p.numel() for p in load_model(m["source"]["path"]).parameters())
    assert m["model_bytes"] == (stories_artifact / "model.onnx").stat().st_size
    assert set(m["files"]) == {p.name for p in stories_artifact.iterdir()} - {"manifest.json"}
    names = [i["name"] for i in m["io"]["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"] and len(names) == 3 + 2 * 5
    assert [o["name"] for o in m["io"]["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    graph = onnx.load(stories_artifact / "model.onnx")
    assert graph.ir_version == 10
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)  # head_dim 8 works anywhere


def test_onnxruntime_genai_generates_the_same_tokens(stories_artifact, stories):
    pytest.importorskip("onnxruntime_genai")
    ids = load_tokenizer(stories)(PROMPT)["input_ids"]
    assert genai_greedy(stories_artifact, ids, 32) == hf_greedy(stories, ids)


def test_inspect_verifies_checksums(stories_artifact, tmp_path):
    r = run_cli("inspect", str(stories_artifact))
    assert r.returncode == 0 and "checksums OK" in r.stdout and "mlp" in r.stdout
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stories_artifact, bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    r = run_cli("inspect", str(bad))
    assert r.returncode == 2 and "checksum mismatch for model.onnx" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_default_model_exports_without_model_flag(tmp_path):
    r = run_cli("export", "-o", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["source"]["architecture"] == "LlamaForCausalLM" and m["parity"]["passed"]
    genai = json.loads((tmp_path / "d" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == []  # genai's CPU default


def test_parity_line_says_when_it_ran_off_the_targets_provider(tmp_path, stories):
    """A cuda artifact checked on the CPU EP has not met the CUDA kernels (on an H200 the CPU EP passed a
    quantized embedding that the CUDA EP misread, docs/results/cuda.md): the line says where parity ran."""
    import onnxruntime as ort

    r = run_cli("export", "--target", "cuda", "--model", str(stories), "-o", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("parity vs PyTorch"))
    off_device = "CUDAExecutionProvider" not in ort.get_available_providers()
    assert (
        line.endswith(
            "(on CPUExecutionProvider: this host has no CUDAExecutionProvider; check on the device)"
        )
        == off_device
    )
    # the app README states the logits' dtype as the graph has it (float16 on cuda, as the builder's)
    assert "Logits are float16 over the vocabulary" in (tmp_path / "c" / "README.md").read_text()
    # onnxruntime-genai opens a cuda artifact on its CUDA provider (as the builder's -e cuda config); with no
    # provider_options it would run the float16 graph on the CPU
    genai = json.loads((tmp_path / "c" / "genai_config.json").read_text())
    options = genai["model"]["decoder"]["session_options"]["provider_options"]
    assert options == [{"cuda": {"enable_cuda_graph": "0"}}]
    readme = (tmp_path / "c" / "README.md").read_text()
    assert (
        "onnxruntime-genai's `cuda` provider" in readme and '`providers=["CUDAExecutionProvider"]`' in readme
    )
    cpu = run_cli("export", "--target", "cpu", "--model", str(stories), "-o", str(tmp_path / "p"))
    assert cpu.returncode == 0 and "check on the device" not in cpu.stdout


def test_mix_llama_export_parity(mix, tmp_path):
    res = export(ExportRequest(model_dir=mix, out_dir=tmp_path / "mix"))
    p = res.manifest["parity"]
    assert p["passed"] and p["greedy"] == 1.0 and p["top1"] == 1.0 and p["max_abs_logit"] < 1e-3
    ids = load_tokenizer(mix)("To be, or not to be")["input_ids"]
    assert ort_greedy(open_decoder(tmp_path / "mix" / "model.onnx"), ids, 32) == hf_greedy(mix, ids)


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("Qwen2ForCausalLM", {}),  # q/k/v bias, untied
        ("MistralForCausalLM", {"sliding_window": 12}),  # window shorter than the parity prompts + 32 tokens
        ("LlamaForCausalLM", {"num_key_value_heads": 1, "head_dim": 24}),  # MQA, head_dim != hidden/heads
    ],
)
def test_architectures_parity(tmp_path, arch, extra):
    src = make_random_model(tmp_path / "src", arch, **extra)
    res = export(ExportRequest(model_dir=src, out_dir=tmp_path / "out"))
    p = res.manifest["parity"]
    assert p["passed"] and p["max_abs_logit"] < 1e-3 and p["top1"] == 1.0
    if arch == "Qwen2ForCausalLM":
        names = {t["name"] for t in res.manifest["tensors"]}
        qkv = "model.layers.0.self_attn.q_proj+k_proj+v_proj"  # the fused form stores q/k/v packed
        assert f"{qkv}.bias" in names and "lm_head.weight" in names
        assert res.manifest["packed"][qkv]["sizes"] == [64, 32, 32]  # 4 heads, 2 kv heads of 16


def test_left_padded_batch_matches_transformers(stories_artifact, stories):
    """Batch 2 with left padding: the mask handling agrees with transformers on the real tokens."""
    model = load_model(stories)
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dec = open_decoder(stories_artifact / "model.onnx")
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": mask.numpy(),
        "position_ids": pos.numpy(),
        **{k: np.repeat(v, 2, axis=0) for k, v in dec.empty_past.items()},
    }
    logits = dec.session.run(["logits"], feed)[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    assert np.abs(logits[0] - ref[0]).max() < 1e-4
    assert np.abs(logits[1, 4:] - ref[1, 4:]).max() < 1e-4


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing left


def assert_clean_failure(r: subprocess.CompletedProcess, needle: str, out: Path) -> None:
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_missing_model_folder(tmp_path):
    out = tmp_path / "o"
    r = run_cli("export", "--model", str(tmp_path / "nope"), "-o", str(out))
    assert_clean_failure(r, "does not exist", out)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    r = run_cli("export", "--model", str(tmp_path / "empty"), "-o", str(out))
    assert_clean_failure(r, "has no config.json", out)


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = tmp_path / "o"
    r = run_cli("export", "--model", str(src), "-o", str(out))
    assert_clean_failure(r, "unsupported architecture GPT2LMHeadModel; supported: Gemma2ForCausalLM", out)


def test_unwritable_output(tmp_path, stories):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "artifact"
    r = run_cli("export", "--model", str(stories), "-o", str(out))
    assert r.returncode == 2 and "cannot write to" in r.stderr and "Traceback" not in r.stderr
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(tmp_path, stories):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    r = run_cli("export", "--model", str(stories), "-o", str(ro / "a"))
    assert r.returncode == 2 and "cannot write to" in r.stderr


def test_existing_output_needs_force(tmp_path, stories):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("export", "--model", str(stories), "-o", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and (out / "keep.txt").read_text() == "mine"


def test_bad_target_lists_valid_names(tmp_path, stories):
    out = tmp_path / "o"
    r = run_cli("export", "--model", str(stories), "--target", "andriod", "-o", str(out))
    assert_clean_failure(r, "unknown target 'andriod'; valid targets: cpu, android, cuda", out)


def test_failed_parity_leaves_nothing(tmp_path, stories, monkeypatch):
    """A parity failure aborts the export and removes the staging folder."""
    from edgepack.exporter import parity

    from edgepack.errors import EdgepackError

    monkeypatch.setitem(parity.THRESHOLDS, "float32", parity.Thresholds(0.0, 1.1, 1.1))
    out = tmp_path / "o"
    with pytest.raises(EdgepackError, match="parity check failed"):
        export(ExportRequest(model_dir=stories, out_dir=out))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_large_artifact_weights_in_external_data(stories, tmp_path, monkeypatch):
    """Above pipeline.EXTERNAL_DATA_THRESHOLD the weights go to model.onnx.data (ONNX Runtime maps it instead
    of parsing them into its heap): the manifest lists and hashes it, the runner verifies and runs it, and the
    tokens equal a one-file export's."""
    from edgepack.runtime.runner import RunConfig, run_benchmark

    from edgepack import pipeline

    one = tmp_path / "one"
    export(ExportRequest(stories, one, parity=False))
    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 1024)
    ext = tmp_path / "ext"
    export(ExportRequest(stories, ext, parity=False))
    assert not (one / "model.onnx.data").exists() and (ext / "model.onnx.data").is_file()
    m = json.loads((ext / "manifest.json").read_text())
    assert "model.onnx.data" in m["files"] and (ext / "model.onnx").stat().st_size < 100_000
    assert m["model_bytes"] == sum(p.stat().st_size for p in ext.glob("model.onnx*"))
    config = RunConfig(threads=1, prompt_len=8, gen=8, runs=1, warmup=0)
    assert run_benchmark(ext, config)["generated_ids"] == run_benchmark(one, config)["generated_ids"]
