"""The app hand-off: genai_config, BOS handling, the shared .ort weight, quality vs the original, the README."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from edgepack.cli import cli
from edgepack.errors import EdgepackError
from edgepack.model import load_model
from edgepack.pipeline import SEARCH_DEFAULTS, KVFacts, kv_facts, kv_line, search_config, token_facts

og = pytest.importorskip("onnxruntime_genai")
PROMPT = "Once upon a time, there was a little"
STUBS = Path(__file__).resolve().parent / "kotlin_ort_stubs"  # signature stubs of the ORT Java API


def export(out: Path, *args: str) -> Path:
    result = CliRunner().invoke(cli, ["export", "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def w4_android(tmp_path_factory, stories: Path, shakespeare: Path) -> Path:
    """stories260k, W4 (tied head + embedding share one packed weight), Android bundle, quality measured."""
    out = tmp_path_factory.mktemp("bundle") / "w4"
    return export(
        out, "--model", str(stories), "--target", "android", "--wbits", "4", "--eval", str(shakespeare)
    )


def test_search_takes_the_source_values_over_the_builder_defaults() -> None:
    search = search_config({"do_sample": True, "temperature": 0.7, "top_k": None, "bos_token_id": 1}, 256)
    assert set(SEARCH_DEFAULTS) | {"max_length"} == set(search)
    assert search["do_sample"] is True and search["temperature"] == 0.7 and search["top_k"] == 50
    assert search["max_length"] == 256


def test_android_genai_config_names_the_ort_and_samples(w4_android: Path) -> None:
    config = json.loads((w4_android / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.ort"
    assert config["search"]["top_k"] == 50  # stories260k's generation_config sets no sampling field
    model = og.Model(str(w4_android))  # onnxruntime-genai loads the .ort
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")
    outputs = set()
    for seed in range(4):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=True, max_length=24, random_seed=seed)
        generator = og.Generator(model, params)
        generator.append_tokens(tokenizer.encode(PROMPT))
        while not generator.is_done():
            generator.generate_next_token()
        outputs.add(tuple(generator.get_sequence(0)))
    assert len(outputs) > 1  # sampling is on: top_k 50, not 1


@pytest.mark.parametrize("which", ["stories", "mix"])
def test_genai_greedy_equals_transformers(which: str, request, tmp_path: Path) -> None:
    source = request.getfixturevalue(which)
    art = export(tmp_path / which, "--model", str(source), "--no-parity")
    model = og.Model(str(art))
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")  # the README's BOS rule for onnxruntime-genai
    ids = [int(i) for i in tokenizer.encode(PROMPT)]
    from transformers import AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(str(art))(PROMPT)["input_ids"]
    assert ids == hf_ids
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 40)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    genai = [int(t) for t in generator.get_sequence(0)]
    hf = load_model(source).generate(torch.tensor([hf_ids]), max_new_tokens=40, do_sample=False)[0].tolist()
    n = min(len(genai), len(hf))  # both stop at EOS
    assert genai[:n] == hf[:n] and n > len(ids)


def test_ort_keeps_the_tied_weight_once(w4_android: Path) -> None:
    graph = onnx.load(str(w4_android / "model.onnx")).graph
    blob = (w4_android / "model.ort").read_bytes()
    big = [i for i in graph.initializer if numpy_helper.to_array(i).nbytes >= 1024]
    assert any(i.name.startswith("lm_head") for i in big)
    copies = {i.name: blob.count(numpy_helper.to_array(i).tobytes()[:512]) for i in big}
    assert set(copies.values()) == {1}, copies


def test_quality_vs_original_in_manifest(w4_android: Path) -> None:
    quality = json.loads((w4_android / "manifest.json").read_text())["quality"]
    assert quality["measured"] and quality["tokens"] >= 1024
    assert 0.3 < quality["top1_agreement"] < 1.0  # W4 moves some argmaxes on a 260k model
    assert quality["perplexity_delta"] == pytest.approx(
        quality["perplexity"] - quality["perplexity_original"], abs=1e-3
    )


def test_readme_has_every_integration_item(w4_android: Path) -> None:
    readme = (w4_android / "README.md").read_text()
    assert "Logits are float32 over the vocabulary" in readme  # what the Kotlin loop's floatBuffer reads
    manifest = json.loads((w4_android / "manifest.json").read_text())
    genai = json.loads((w4_android / "genai_config.json").read_text())
    facts = token_facts(w4_android)
    session = ort.InferenceSession(str(w4_android / "model.ort"), providers=["CPUExecutionProvider"])
    kv = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    per_token = sum(i.shape[1] * i.shape[3] * 4 for i in kv)  # float32 KV, [B, H, past, D]
    assert kv_facts(manifest["io"]["inputs"]).per_token == per_token
    assert f"{len(kv)} KV inputs (`past_key_values.*`, float32): {per_token:,} bytes per token." in readme
    q = manifest["quality"]
    required = {
        "tokenizer files": "`tokenizer.json`",
        "tokenizer on Android": "onnxruntime-extensions",
        "genai tokenizer": "ai.onnxruntime.genai.Tokenizer",
        "BOS id": f"BOS id {facts.bos_id};",
        "genai BOS rule": 'update_options(add_special_tokens="true")',
        "EOS ids": f"EOS id(s) {', '.join(map(str, facts.eos_ids))}: stop when",
        "context length": f"{facts.context_length} positions",
        "KV bytes per token": f"{per_token:,} bytes per token",
        "memory at 1k": f"| 1,024 tokens (beyond this model) | {per_token * 1024 / 2**20:.2f} MiB",
        "memory at 4k": f"| 4,096 tokens (beyond this model) | {per_token * 4096 / 2**20:.2f} MiB",
        "threads": "setIntraOpNumThreads(4)",
        "sampling defaults": f"`top_k` {genai['search']['top_k']}, `top_p` {genai['search']['top_p']}",
        "quality": f"top-1 agreement with the original {q['top1_agreement']:.3f}",
        "perplexity delta": f"(delta {q['perplexity_delta']:+.3f})",
        "reduced build": "--include_ops_by_config required_operators.config",
        "CPU EP": "use the CPU EP",
        "usability checker": "NNAPI could take",
        "Gradle": 'implementation("com.microsoft.onnxruntime:onnxruntime-android:',
    }
    missing = [item for item, needle in required.items() if needle not in readme]
    assert missing == []
    assert re.search(r"NNAPI could take \d+ of \d+ nodes, split into \d+ partitions", readme)


def test_kotlin_has_a_complete_generate_loop(w4_android: Path) -> None:
    kotlin = (w4_android / "EdgepackDecoder.kt").read_text()
    facts = token_facts(w4_android)
    for needle in ("fun generate(", "while (out.size < maxNewTokens", "if (next in EOS_IDS) break",
                   "previous.close()", f"val EOS_IDS = setOf({facts.eos_ids[0]}L)",
                   f"const val BOS_ID = {facts.bos_id}L", f"const val CONTEXT_LENGTH = {facts.context_length}",
                   'implementation("com.microsoft.onnxruntime:onnxruntime-android:'):  # fmt: skip
        assert needle in kotlin
    assert kotlin.count("{") == kotlin.count("}")


def test_kv_facts_counts_every_past_input() -> None:
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["b", "s"]}] + [
        {
            "name": f"past_key_values.{i}.{kind}",
            "dtype": "float16",
            "shape": ["b", "2", "past_sequence_length", "64"],
        }
        for i in range(3)
        for kind in ("key", "value")
    ]
    assert kv_facts(inputs) == KVFacts(6, 6 * 2 * 64 * 2, "float16", 0, 0)


def test_kv_facts_sizes_a_channel_group_layout() -> None:
    """4-bit codes per position, float16 scales per 32 positions, a float residual of at most 32 positions."""
    spec = [("codes", "uint8", "past_quantized_length", "4"), ("scale", "float16", "past_group_count", "8"),
            ("low", "float16", "past_group_count", "8"), ("residual", "float", "past_residual_length", "8")]  # fmt: skip
    inputs = [
        {"name": f"past_key_values.0.key.{kind}", "dtype": dtype, "shape": ["batch_size", "4", axis, d]}
        for kind, dtype, axis, d in spec
    ]
    facts = kv_facts(inputs, channel_group=32)
    assert facts == KVFacts(4, 4 * 4 + 2 * (4 * 8 * 2) / 32, "uint8, float16, float32", 4 * 8 * 4 * 32, 0)
    assert kv_line(facts).startswith(
        "4 KV inputs (`past_key_values.*`, uint8, float16, float32): 20 bytes per token"
    )
    with pytest.raises(EdgepackError, match="cache axis 'window' that the README's KV table cannot size"):
        kv_facts([dict(inputs[0], shape=["batch_size", "4", "window", "4"])])


def test_missing_eval_file_is_one_line_and_writes_nothing(tmp_path: Path, stories: Path) -> None:
    out = tmp_path / "out"
    args = [
        "export",
        "--model",
        str(stories),
        "--wbits",
        "4",
        "--eval",
        str(tmp_path / "nope.txt"),
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "nope.txt does not exist; pass a local UTF-8 text file to --eval" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_kotlin_compiles_against_the_ort_java_api(w4_android: Path, tmp_path: Path) -> None:
    kotlinc, javac = shutil.which("kotlinc"), shutil.which("javac")
    if kotlinc is None or javac is None:
        pytest.skip("kotlinc/javac not installed (apt-get install kotlin default-jdk-headless)")
    stubs = sorted((STUBS / "ai" / "onnxruntime").glob("*.java"))
    subprocess.run(
        [javac, "-d", str(tmp_path / "classes"), *map(str, stubs)], check=True, capture_output=True
    )
    done = subprocess.run(
        [
            kotlinc,
            str(w4_android / "EdgepackDecoder.kt"),
            "-cp",
            str(tmp_path / "classes"),
            "-d",
            str(tmp_path / "kt.jar"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "error:" not in done.stderr
    with zipfile.ZipFile(tmp_path / "kt.jar") as jar:
        assert "EdgepackDecoder.class" in jar.namelist()


def test_quality_without_held_out_text_is_on_the_models_own_samples(
    stories: Path, tmp_path: Path, monkeypatch
) -> None:
    """A data-free export (RTN, no --calib) measures quality on the original model's own samples, reproducibly
    (a seed no calibration draw uses); --eval none skips it; above OWN_QUALITY_LARGE parameters only
    --eval self draws them (fewer)."""
    reports = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            CliRunner()
            .invoke(cli, ["export", "--model", str(stories), "--wbits", "4", "-o", str(out)])
            .exit_code
            == 0
        )
        reports.append(json.loads((out / "manifest.json").read_text())["quality"])
    quality = reports[0]
    assert quality == reports[1]  # the same samples, the same figures
    assert quality["measured"] and quality["text"].startswith(
        "the original model's own samples (8 x 256 tokens"
    )
    assert quality["tokens"] == 8 * 256 and 0.3 < quality["top1_agreement"] < 1.0
    assert (
        quality["perplexity"] > quality["perplexity_original"] > 1.0
    )  # W4 moves a 260k model off its own text
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "not how it does on your domain: pass --eval FILE for that" in readme
    shown = (
        CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")]).output
    )  # the same figures, and the cache
    assert f"quality    top-1 {quality['top1_agreement']:.3f} vs the original, perplexity" in shown
    assert "WARNING" not in shown and "**Warning:**" not in readme  # W4 moves it, but not that far
    assert "kv cache   10 KV inputs (`past_key_values.*`, float32): 1,280 bytes per token." in shown
    out = tmp_path / "none"
    args = ["export", "--model", str(stories), "--wbits", "4", "--eval", "none", "-o", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["quality"] == {
        "measured": False,
        "reason": "skipped (--eval none)",
    }
    import edgepack.pipeline

    monkeypatch.setattr(edgepack.pipeline, "OWN_QUALITY_LARGE", 1000)  # stories260k as a "large" model
    for flags, expect in (([], None), (["--eval", "self"], 4 * 128)):
        out = tmp_path / f"large{len(flags)}"
        args = ["export", "--model", str(stories), "--wbits", "4", *flags, "-o", str(out)]
        assert CliRunner().invoke(cli, args).exit_code == 0
        quality = json.loads((out / "manifest.json").read_text())["quality"]
        if expect is None:
            assert not quality["measured"] and "pass --eval FILE, or --eval self" in quality["reason"]
        else:
            assert quality["measured"] and quality["tokens"] == expect


def test_a_collapsed_artifact_is_flagged_at_export_in_inspect_and_in_the_readme(
    stories: Path, tmp_path: Path
) -> None:
    """W2 with a 2-bit head leaves stories260k at about 90x its perplexity: the export still succeeds (the
    graph matches its PyTorch model) but says so on stderr, in `edgepack inspect` and in the app README, naming
    the levers; a W3 export (1.8x, top-1 0.63) is not flagged."""
    import subprocess
    import sys

    from edgepack.pipeline import COLLAPSE_PPL_RATIO, COLLAPSE_TOP1, quality_warning

    out = tmp_path / "w2"
    args = ["export", "--model", str(stories), "--wbits", "2", "--head-bits", "same", "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["perplexity"] > COLLAPSE_PPL_RATIO * quality["perplexity_original"]
    assert quality["top1_agreement"] < COLLAPSE_TOP1
    recipe = json.loads((out / "manifest.json").read_text())["recipe"]
    warning = quality_warning(quality, recipe)
    assert (
        warning and "--head-bits 8" in warning and "raise --wbits" in warning and "--kv-start" not in warning
    )
    # the levers follow the steps the recipe ran
    steps = {"steps": [{"kind": "fold"}, {"kind": "kv", "merge": "minicache", "bits": 4}]}
    warned = quality_warning(quality, steps)
    assert (
        "--remove" in warned
        and "--kv-start" in warned
        and "--kv-bits 8" in warned
        and "--wbits" not in warned
    )
    steps["steps"][1]["bits"] = 8  # already 8-bit: merging is the cache's only lever
    assert "--kv-bits" not in quality_warning(quality, steps)
    assert f"edgepack: warning: {warning}" in done.stderr.splitlines()
    assert "quality vs the original: top-1" in done.stdout
    # the parity line counts its top-1 flips and how many fell at near-ties (int8 activations flip a few)
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    line = next(x for x in done.stdout.splitlines() if x.startswith("parity vs PyTorch"))
    counted = f"; {parity['flips_at_ties']} of {parity['flips']} top-1 flips at near-ties"
    assert (counted in line) == bool(parity["flips"]) and ("flips" in line) == bool(parity["flips"])
    assert CliRunner().invoke(cli, ["inspect", str(out)]).output.count(counted) == bool(parity["flips"])
    assert f"**Warning:** {warning}." in (out / "README.md").read_text()
    assert f"WARNING    {warning}" in CliRunner().invoke(cli, ["inspect", str(out)]).output
    fine = {**quality, "perplexity": 1.8 * quality["perplexity_original"], "top1_agreement": 0.63}
    assert quality_warning(fine) is None
    assert quality_warning({"measured": False, "reason": "skipped (--eval none)"}) is None
