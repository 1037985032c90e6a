"""The torch-triton backend: an artifact's model.onnx weights in transformers + TritonQuantLinear vs ONNX Runtime."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run in the interpreter on CPU

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from edgepack.compressor.fold import FoldConfig  # noqa: E402
from edgepack.compressor.quantize import QuantConfig  # noqa: E402
from edgepack.kernels import triton_matmul  # noqa: E402
from edgepack.kernels.torch_backend import TritonQuantLinear  # noqa: E402
from edgepack.runtime.bench import runner_args  # noqa: E402
from edgepack.runtime.runner import DecoderIO, RunConfig, RunDecoder, make_session, run_benchmark  # noqa: E402
from edgepack.runtime.torch_backend import TorchDecoder, load_artifact_torch, main  # noqa: E402
from torch import nn  # noqa: E402

from edgepack.cli import cli  # noqa: E402
from edgepack.errors import EdgepackError  # noqa: E402
from edgepack.pipeline import ExportRequest, export  # noqa: E402
from edgepack.recipe import Recipe  # noqa: E402

# tests/test_fold_export.py's fast fold: 5 blocks -> 4 positions sharing weights in groups [[0, 1], [2, 3]].
FAST_FOLD = dict(
    remove=0.2, share_group=2, importance="bi", cure_steps=4, n_samples=8, seq_len=64, batch_size=4
)
RECIPES = {
    "w4": Recipe([QuantConfig(wbits=4, group_size=32)]),
    "w3": Recipe([QuantConfig(wbits=3, group_size=32)]),
    # float linears too: a tied float lm_head (Gemm on the embedding) and shared float down_proj weights.
    "fold-w4": Recipe(
        [
            FoldConfig(**FAST_FOLD),
            QuantConfig(wbits=4, group_size=32, skip=["lm_head", "model.layers.*.mlp.down_proj"]),
        ]
    ),
}
PROMPT = np.array([[1, 403, 407, 261, 378, 30, 290, 281, 365, 279, 423, 303]], np.int64)  # 12 > GEMV rows
NEW_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls: one thread avoids OpenMP spinning, which costs seconds on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, stories, shakespeare) -> Callable[[str], Path]:
    """The artifact of a RECIPES entry, exported on first use (parity off: the tests compare themselves).

    Float activations: the torch backend computes the exact dequantized matmul, like accuracy_level 0."""
    root = tmp_path_factory.mktemp("torch")

    def get(name: str) -> Path:
        out = root / name
        if not out.exists():
            build = {"activations": "float"}
            export(
                ExportRequest(
                    stories, out, recipe=RECIPES[name], calib=shakespeare, parity=False, build=build
                )
            )
        return out

    return get


def greedy(decoder, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Prefill PROMPT then ``steps`` greedy steps: the tokens and the last-position logits of every call."""
    decoder.reset()
    logits = [decoder.step(PROMPT)]
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(steps):
        logits.append(decoder.step(np.array([[tokens[-1]]], np.int64)))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, logits


def ort_decoder(artifact: Path) -> RunDecoder:
    session = make_session(artifact / "model.onnx", RunConfig(threads=2))
    return RunDecoder(session, DecoderIO.from_session(session))


@pytest.mark.parametrize("name", list(RECIPES))
def test_float32_matches_onnxruntime(artifacts, name, monkeypatch):
    """Exact weights: without the interpreter TritonQuantLinear runs its float32 torch math."""
    monkeypatch.delenv("TRITON_INTERPRET")
    artifact = artifacts(name)
    model = load_artifact_torch(artifact, device="cpu", dtype=torch.float32)
    want_tokens, want = greedy(ort_decoder(artifact), NEW_TOKENS)
    got_tokens, got = greedy(TorchDecoder(model, "cpu"), NEW_TOKENS)
    assert got_tokens == want_tokens
    assert max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)) < 1e-3


def test_weights_stored_once_load_under_every_name(tmp_path, shakespeare, monkeypatch):
    """Identical tensors (a random model's all-ones norms, its zero q/k/v biases) are stored once; the manifest's
    aliases lead the loader from each module's name to the kept initializer (H200 session: the 0.5B random model's
    W4 failed to load with 'has no initializer model.layers.0.post_attention_layernorm.weight')."""
    from conftest import make_random_model

    from edgepack.artifact import Manifest

    monkeypatch.delenv("TRITON_INTERPRET")
    folder = make_random_model(tmp_path / "m", "Qwen2ForCausalLM", num_hidden_layers=3)
    out = tmp_path / "w4"
    export(ExportRequest(folder, out, recipe=RECIPES["w4"], calib=shakespeare, parity=False,
                         build={"activations": "float"}))  # fmt: skip
    aliases = Manifest.load(out).aliases
    assert (
        aliases["model.layers.2.post_attention_layernorm.weight"] == "model.layers.0.input_layernorm.weight"
    )
    assert aliases["model.norm.weight"] == "model.layers.0.input_layernorm.weight"
    model = load_artifact_torch(out, device="cpu", dtype=torch.float32)
    want_tokens, want = greedy(ort_decoder(out), NEW_TOKENS)
    got_tokens, got = greedy(TorchDecoder(model, "cpu"), NEW_TOKENS)
    assert got_tokens == want_tokens
    assert max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)) < 1e-3


@pytest.mark.parametrize("name", ["w4", "fold-w4"])
def test_packed_projections_load_per_module(tmp_path, shakespeare, name, monkeypatch):
    """A fused-form artifact (head_dim 16) stores q/k/v and gate/up packed (Qwen2: with biases); the loader
    reads every projection back under its own name (artifact.PackedView) and matches ONNX Runtime, folded
    Scan groups included."""
    from conftest import make_random_model

    from edgepack.artifact import Manifest

    monkeypatch.delenv("TRITON_INTERPRET")
    folder = make_random_model(tmp_path / "m", "Qwen2ForCausalLM", perturb_norms=True, num_hidden_layers=5)
    out = tmp_path / name
    build = {"activations": "float"}
    export(ExportRequest(folder, out, recipe=RECIPES[name], calib=shakespeare, parity=False, build=build))
    manifest = Manifest.load(out)
    assert manifest.raw["build"]["attention_form"] == "fused"
    assert {len(p.parts) for p in manifest.packed} == {2, 3}  # gate/up and q/k/v
    model = load_artifact_torch(out, device="cpu", dtype=torch.float32)
    want_tokens, want = greedy(ort_decoder(out), NEW_TOKENS)
    got_tokens, got = greedy(TorchDecoder(model, "cpu"), NEW_TOKENS)
    assert got_tokens == want_tokens
    assert max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)) < 1e-3


def test_folded_positions_share_linears_not_attention(artifacts):
    layers = load_artifact_torch(artifacts("fold-w4"), device="cpu").model.layers
    assert len(layers) == 4
    for a, b in ((0, 1), (2, 3)):  # the manifest's share groups
        assert isinstance(layers[a].self_attn.q_proj, TritonQuantLinear)
        assert layers[a].self_attn.q_proj is layers[b].self_attn.q_proj
        assert (
            type(layers[a].mlp.down_proj) is nn.Linear and layers[a].mlp.down_proj is layers[b].mlp.down_proj
        )
        assert layers[a].input_layernorm.weight is not layers[b].input_layernorm.weight
    assert layers[0].self_attn.q_proj is not layers[2].self_attn.q_proj
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]


def test_triton_kernels_match_onnxruntime(artifacts, monkeypatch):
    """float16 activations through the interpreted Triton GEMM (prefill) and GEMV (a decode step).

    The interpreter is slow (about 10 s here): W3 alone, whose two planes take the kernels' hi/lo path; the
    loader's layout for the other artifacts is pinned by the float32 test, the kernels by tests/kernels.
    """
    artifact = artifacts("w3")
    calls = {"quant_gemm": 0, "quant_gemv": 0}
    for name in calls:
        kernel = getattr(triton_matmul, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(triton_matmul, name, counted)
    model = load_artifact_torch(artifact, device="cpu", dtype=torch.float16)
    want_tokens, want = greedy(ort_decoder(artifact), 1)
    got_tokens, got = greedy(TorchDecoder(model, "cpu"), 1)
    blocks = 5 * 7  # per forward: 5 blocks of 7 quantized linears; the lm_head sees the last position only
    assert calls == {"quant_gemm": blocks, "quant_gemv": blocks + 2}
    assert got_tokens == want_tokens
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() < 5e-3 * np.abs(w).max()  # float16 activations


def test_float32_refused_where_the_kernels_run(artifacts):
    with pytest.raises(EdgepackError, match="float16 or bfloat16"):
        load_artifact_torch(artifacts("w4"), device="cpu", dtype=torch.float32)


def test_bench_entry_report_has_runner_fields(artifacts, monkeypatch, tmp_path):
    """The entry point `edgepack bench` runs per artifact (`runner_args` + --json), here in-process on CPU."""
    monkeypatch.delenv("TRITON_INTERPRET")
    artifact = artifacts("w4")
    config = RunConfig(threads=1, prompt_len=8, gen=4, runs=1, warmup=0, device="cpu")
    assert main([str(artifact), "--json", str(tmp_path / "r.json"), *runner_args(config)]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    reference = run_benchmark(artifact, config)
    assert set(reference) <= set(report)
    assert report["backend"] == "torch-triton" and report["kv"]["dtype"] == "float16"
    assert all(report["kv"][k] == reference["kv"][k] for k in ("layers", "kv_heads", "head_dim"))
    assert report["decode_tok_s"]["median"] > 0 and report["gpu_memory_mib"] is None


def test_cli_without_cuda_is_one_line_exit_2(artifacts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["bench", str(artifacts("w4")), "--backend", "torch-triton", "--device", "cuda"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "edgepack: error: --backend torch-triton needs a CUDA GPU (torch.cuda.is_available() is False); "
        "use --backend onnxruntime"
    ]
