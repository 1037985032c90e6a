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


def test_markdown_tables_show_tuned_configs_and_sweep(bench) -> None:
    row = bench.Row(
        4096,
        4096,
        1,
        18.6,
        dict.fromkeys(bench.ORT_BITS),
        *({b: 1.0 for b in bench.OUR_BITS} for _ in range(4)),
    )
    tuned = [
        dict(
            kernel="gemv",
            k=4096,
            n=4096,
            m_bucket=1,
            bits=4,
            dtype="float16",
            best="n16_k128_w4_s2_split1",
            candidates_us={"n32_k128_w4_s2_split1": 12.0, "n16_k128_w4_s2_split1": 9.5},
        )
    ]
    sweep = [
        dict(k=4096, n=4096, m=1, bits=4, us={"b": 12.0, "a": 9.5}),
        dict(k=4096, n=4096, m=4, bits=4, us={"a": 7.0}),
    ]
    md = bench.markdown_tables([row], 4000.0, "GPU", 128, tuned, sweep)
    assert (
        "| gemv | 4096 | 4096 | 1 | 4 | float16 | n16_k128_w4_s2_split1 | 9.5 | n32_k128_w4_s2_split1 | 12.0 | 2 |"
        in md
    )
    assert "| 4096 | 4096 | 1 | 4 | a 9.5, b 12.0 |" in md and "| 4096 | 4096 | 4 | 4 | a 7.0 |" in md
    assert "chose" not in bench.markdown_tables([row], 4000.0, "GPU", 128)  # no tuning table without tuning
