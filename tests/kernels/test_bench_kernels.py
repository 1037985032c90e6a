"""bench/kernel_speed.py without a GPU: it refuses in one line, and its decode step and RTN are correct on CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from edgepack.kernels.reference import dequantize

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda(tmp_path: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "k.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("needs a CUDA GPU;") and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_rtn_quantize(bench) -> None:
    w = torch.randn(16, 256)
    codes, scales, zero_points = bench.rtn_quantize(w, 4, 128)
    assert codes.dtype == zero_points.dtype == np.uint8 and scales.shape == (16, 2)
    err = np.abs(dequantize(codes, scales, zero_points, 128) - w.numpy())
    assert (err <= scales.repeat(128, axis=1) / 2 + 1e-6).all()  # round to nearest: half a step at most


def test_static_decoder_matches_hf(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph-friendly decode step equals the HF model, fp32 and W4 (torch fallback), on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    cfg = dict(
        bench.E2E_CONFIG,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    prompt = torch.randint(0, 100, (1, 6))
    assert bench.check_decoder(bench.StaticDecoder(model, max_len=16), prompt) < 1e-5
    bench.quantize_linears(model, 4, 32)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "TritonQuantLinear"
    assert bench.check_decoder(bench.StaticDecoder(model, max_len=16), prompt) < 1e-5
