"""bench/speed.py: its decode drivers on real artifacts, both KV layouts, and the JSON/table schema it writes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, make_random_model
from edgepack.runtime.runner import RunConfig, make_prompt, run_benchmark

from edgepack.cli import cli

SETTINGS = {"prompt_len": 8, "gen": 3, "runs": 1, "warmup": 0}


def load_speed():
    """bench/speed.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("speed", ROOT / "bench" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


speed = load_speed()


@pytest.fixture(scope="module")
def stories_fp32(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    out = tmp_path_factory.mktemp("speed") / "edgepack-fp32"
    args = ["export", "--target", "cpu", "--model", str(stories), "-o", str(out), "--no-parity"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def builder_gqa(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random Llama with head_dim 16 (GroupQueryAttention needs % 16) through the genai builder, fp32."""
    tmp = tmp_path_factory.mktemp("builder")
    model_dir = make_random_model(tmp / "hf", "LlamaForCausalLM", num_hidden_layers=2)
    out = tmp / "builder-fp32"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(tmp / "cache")]  # fmt: skip
    # not from the checkout, whose kernels/ shadows the Hugging Face package (see edgepack/__main__.py)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return model_dir, out


def torch_greedy(model_dir: Path, prompt, steps: int) -> list[int]:
    """Reference: transformers greedy decoding of the same prompt (first token + ``steps``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ids = torch.from_numpy(prompt)
    out = model.generate(ids, max_new_tokens=steps + 1, do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1] :].tolist()


def test_builder_shared_buffer_and_concat_decode_like_transformers(builder_gqa: tuple[Path, Path]) -> None:
    """The builder's graph declares a shared past/present buffer; both layouts must decode the same greedy tokens."""
    model_dir, artifact = builder_gqa
    reports = {
        layout: run_benchmark(artifact, RunConfig(threads=1, kv_layout=layout, **SETTINGS), verify=False)
        for layout in ("auto", "shared", "concat")
    }
    assert reports["auto"]["kv_layout"] == "shared"  # genai_config.json: past_present_share_buffer
    assert reports["concat"]["kv_layout"] == "concat"
    expected = torch_greedy(model_dir, make_prompt(SETTINGS["prompt_len"], 512), SETTINGS["gen"])
    assert len(set(expected)) > 1
    for report in reports.values():
        assert report["generated_ids"] == expected


def test_measure_rows_ratios_and_tables(stories_fp32: Path, builder_gqa: tuple[Path, Path]) -> None:
    """Both drivers through bench/speed.py's measure(): fresh processes, the row schema, ratios and the table."""
    settings = speed.Settings(**SETTINGS, timeout=120)
    arts = [
        speed.Artifact("m", "edgepack", "fp32", stories_fp32, file_mib=speed.folder_mib(stories_fp32)),
        speed.Artifact("m", "builder", "fp32", builder_gqa[1], file_mib=speed.folder_mib(builder_gqa[1])),
        speed.Artifact("m", "edgepack", "W3", None, error="exit 2: boom"),
    ]
    rows = [speed.measure(a, d, 1, 0, settings) for a in arts[:2] for d in speed.DRIVERS]
    rows.append(speed.measure(arts[2], "onnxruntime", 1, 0, settings))
    for row in rows[:4]:
        assert row.error is None, row.error
        assert row.decode_tok_s > 0 and row.prefill_tok_s > 0 and row.load_s > 0 and row.peak_rss_mib > 10
        assert len(row.generated_ids) == SETTINGS["gen"] + 1
    assert rows[0].generated_ids == rows[1].generated_ids  # runner.py and onnxruntime-genai agree
    assert rows[2].generated_ids == rows[3].generated_ids
    assert [r.kv_layout for r in rows[:4]] == ["concat", "concat", "shared", "shared"]
    assert rows[4].error == "build failed: exit 2: boom" and rows[4].decode_tok_s is None
    assert set(asdict(rows[0])) == {
        "model", "tool", "variant", "driver", "threads", "round", "file_mib", "load_s", "prefill_tok_s",
        "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "peak_rss_mib", "kv_layout", "load_average",
        "generated_ids", "error",
    }  # fmt: skip

    ratio = speed.Ratio("fp32 builder / edgepack", "decode_tok_s", ("builder", "fp32", "onnxruntime"),
                        ("edgepack", "fp32", "onnxruntime"))  # fmt: skip
    second_round = [speed.Measurement(**{**asdict(r), "round": 1}) for r in rows]
    ratios = speed.compute_ratios(rows + second_round, [ratio])
    assert len(ratios) == 1 and len(ratios[0]["per_round"]) == 2
    assert ratios[0]["per_round"][0] == pytest.approx(rows[2].decode_tok_s / rows[0].decode_tok_s)

    agreement = speed.driver_agreement(rows)
    assert [(a["artifact"], a["same_tokens"]) for a in agreement] == [
        ("edgepack fp32", True),
        ("builder fp32", True),
    ]
    result = {"measurements": [asdict(r) for r in rows], "ratios": ratios, "host": {"cpus": 2}}
    result["driver_agreement"] = agreement
    table = speed.markdown(result)
    assert "| builder fp32 | onnxruntime-genai |" in table and "failed: build failed" in table
    assert "| fp32 builder / edgepack |" in table and "identical for all 2 pairs" in table
    assert "| ratio (same round) | per round | median | rounds at goal | goal |" in table


def test_variant_option_and_llama_skip_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--variant NAME=FLAGS adds an export variant; a missing llama.cpp build is skipped with one clear line."""
    args = speed.parse_args(["--variant", "W3al0=--wbits 3 --accuracy-level 0", "--only", "W4,W3al0"])
    assert speed.selected_variants(args) == {"W4": "--wbits 4", "W3al0": "--wbits 3 --accuracy-level 0"}
    with pytest.raises(SystemExit):
        speed.parse_args(["--variant", "no-equals-sign"])
    monkeypatch.setattr(speed, "LLAMA_BIN", tmp_path / "bin")
    assert speed.llama_missing().startswith("llama.cpp skipped: ")
    assert speed.main(["--builder", "int8", "--work", str(tmp_path / "w"), "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "w").exists()  # refused before any work


def test_ratio_rows_count_the_rounds_at_goal() -> None:
    """A ratio near its goal is decided by noise round by round: the table gives the median and the count."""
    assert speed.at_goal([1.2, 1.05, None, 1.1], ">= 1.1") == "2 of 3"
    assert speed.at_goal([0.99, 1.0], "< 1") == "1 of 2" and speed.at_goal([1.0, 1.02], "<= 1") == "1 of 2"
    assert speed.at_goal([1.3], "") == "—" and speed.at_goal([None], ">= 2") == "—"
    assert speed.median_of([1.2, None, 1.0, 1.1]) == "1.100" and speed.median_of([None]) == "—"


def test_parse_llama_bench_json() -> None:
    """llama-bench -o json rows (pp64 then tg32, fields as tools/llama-bench writes them) -> prefill, decode."""
    rows = [
        {"n_prompt": 64, "n_gen": 0, "avg_ts": 1500.5, "samples_ts": [1490.0, 1511.0]},
        {"n_prompt": 0, "n_gen": 32, "avg_ts": 410.25, "samples_ts": [400.5, 420.0]},
    ]
    prefill, decode, samples = speed.parse_llama_bench(rows, speed.Settings(prompt_len=64, gen=32))
    assert (prefill, decode, samples) == (1500.5, 410.25, [400.5, 420.0])
    assert speed.parse_llama_bench(rows, speed.Settings(prompt_len=16, gen=32))[0] is None


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_peer_quality_maps_gguf_tensors_back(stories: Path) -> None:
    """bench/peer_quality.py: every GGUF tensor name of a llama model maps to one of its parameters, and the
    q/k rows come back from convert_hf_to_gguf.py's rotary permutation (written here as the converter does)."""
    from edgepack.model import load_model

    peer = load_bench("peer_quality")
    model = load_model(stories)
    params = {n for n, _ in model.named_parameters()}
    gguf_names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{g}.weight" for i in range(model.config.num_hidden_layers) for g in peer.BLOCK_NAMES
    ]
    assert {peer.hf_name(n) for n in gguf_names} == params

    def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, heads in (
        ("q_proj", model.config.num_attention_heads),
        ("k_proj", model.config.num_key_value_heads),
    ):
        w = getattr(model.model.layers[0].self_attn, name).weight.detach()
        assert not torch.equal(permute(w, heads), w)
        assert torch.equal(peer.unpermute(permute(w, heads), heads), w)


def test_child_peak_rss_is_the_childs_own(tmp_path: Path) -> None:
    """llama-bench's peak RSS: a child read directly by wait4 inherits this process's peak as its floor (Linux
    carries the forked copy's high-water mark across exec); through the launcher it is the child's own."""
    import os

    ballast = bytearray(256 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # this process now holds > 256 MiB
    cmd = [sys.executable, "-c", "pass"]
    direct = subprocess.Popen(cmd)
    _, _, usage = os.wait4(direct.pid, 0)
    assert usage.ru_maxrss / 1024 > 256  # the inherited floor the launcher avoids
    with open(tmp_path / "out", "w") as out:
        code, peak = speed.run_with_peak_rss(cmd, out, out, 60, tmp_path)
    assert code == 0 and 1 < peak < 64
    with open(tmp_path / "out", "w") as out:
        code, _ = speed.run_with_peak_rss(
            [sys.executable, "-c", "raise SystemExit(3)"], out, out, 60, tmp_path
        )
    assert code == 3
    del ballast


@pytest.mark.skipif(sys.platform != "linux", reason="the personality flag is Linux's")
def test_fixed_address_layout_repeats_across_children() -> None:
    """After fix_address_layout, every process the bench starts maps its heap and libraries at the same
    addresses (so a file's peak RSS repeats); without it, two children differ. Run in a child interpreter so
    this test process keeps its randomization."""
    probe = (
        "import ctypes, re, subprocess, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import speed\n"
        "libc = ctypes.CDLL(None)\n"  # randomized to start with, whatever this test process was left with
        "libc.personality(libc.personality(0xFFFFFFFF) & ~speed.ADDR_NO_RANDOMIZE)\n"
        "child = [sys.executable, '-c', \"print(open('/proc/self/maps').read().split('[heap]')[0].splitlines()[-1])\"]\n"
        "before = [subprocess.run(child, capture_output=True, text=True).stdout for _ in range(2)]\n"
        "print(speed.fix_address_layout())\n"
        "after = [subprocess.run(child, capture_output=True, text=True).stdout for _ in range(3)]\n"
        "print(before[0] != before[1], len(set(after)) == 1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT / "bench")], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    randomized, fixed = out[1].split()
    assert out[0] == "fixed (ADDR_NO_RANDOMIZE)" and fixed == "True"
    if Path("/proc/sys/kernel/randomize_va_space").read_text().strip() == "2":  # the heap is randomized too
        assert randomized == "True"


def test_duel_llama_pairs_adjacent_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stories_fp32: Path
) -> None:
    """bench/duel_llama.py: the ONNX side decodes for real through onnxruntime-genai in its own process, the
    llama.cpp side is a stand-in llama-bench (fixed JSON rows); the first process alternates pair by pair, each
    pair's ratio is ONNX decode / llama decode, rounds hold medians; bad paths are one line, exit 2."""
    duel = load_bench("duel_llama")
    bin_dir, tree = tmp_path / "build" / "bin", tmp_path
    bin_dir.mkdir(parents=True)
    rows = [
        {"n_prompt": 8, "n_gen": 0, "avg_ts": 4000.0, "samples_ts": [4000.0]},
        {"n_prompt": 0, "n_gen": 3, "avg_ts": 250.0, "samples_ts": [250.0]},
    ]
    fake = bin_dir / "llama-bench"
    fake.write_text(f"#!{sys.executable}\nimport json\nprint(json.dumps({rows!r}))\n")
    fake.chmod(0o755)
    (bin_dir / "llama-quantize").write_text("")
    (tree / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setattr(duel.speed, "LLAMA_BIN", bin_dir)
    monkeypatch.setattr(duel.speed, "LLAMA_TREE", tree)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "duel.json"
    args = [str(stories_fp32), str(gguf), "--pairs", "3", "--rounds", "2", "--runs", "1", "--prompt-len", "8"]
    # --aslr: leave this test process's address randomization as it is
    assert duel.main([*args, "--gen", "3", "--json", str(out), "--aslr"]) == 0
    result = json.loads(out.read_text())
    assert result["names"] == ["edgepack-fp32", "m"] and len(result["rounds"]) == 2
    pairs = [p for r in result["rounds"] for p in r["pairs"]]
    assert [p["first"] for p in pairs] == ["onnx", "llama"] * 3
    for p in pairs:
        assert p["llama"]["decode"] == 250.0 and p["onnx"]["decode"] > 0
        assert p["ratio"] == pytest.approx(p["onnx"]["decode"] / 250.0)
    for r in result["rounds"]:
        assert r["decode_ratio"] == pytest.approx(r["median"]["onnx"]["decode"] / 250.0)
        assert r["prefill_ratio"] == pytest.approx(r["median"]["onnx"]["prefill"] / 4000.0)
    assert duel.main([str(tmp_path / "missing"), str(gguf)]) == 2
    # a build that faults on this CPU (ggml's AMX kernels on a host that reports AMX): the row says how to rebuild
    fake.write_text(f"#!{sys.executable}\nimport os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    m = duel.speed.measure(duel.speed.Artifact("m", "llama.cpp", "Q4_0", gguf), "llama-bench", 1, 0,
                           duel.speed.Settings(8, 3, 1, 0, 60))  # fmt: skip
    assert m.decode_tok_s is None and "exit -4" in m.error and "SIGILL" in m.error and "speed.md" in m.error
    monkeypatch.setattr(duel.speed, "LLAMA_BIN", tmp_path / "nothing")
    assert duel.main([str(stories_fp32), str(gguf)]) == 2
