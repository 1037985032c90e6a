"""Shared fixtures: the real models in ../shared/models and small random-weight configs for coverage."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `python -m pytest` from the checkout puts it first on sys.path, where its kernels/ would shadow the Hugging Face
# `kernels` package that transformers imports (as for `python -m edgepack`, see edgepack/__main__.py); the suite
# imports edgepack as installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
MIX = SHARED / "models" / "mix-llama-14m"
WIKITEXT = SHARED / "data" / "wikitext2-raw-test.txt"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"{path} is missing: tests need ../shared beside the project (see shared/models/README.md)"
        )
    return path


@pytest.fixture(scope="session")
def stories() -> Path:
    return _need(STORIES)


@pytest.fixture(scope="session")
def mix() -> Path:
    return _need(MIX)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return _need(SHAKESPEARE)


MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}


def make_random_model(folder: Path, arch: str, perturb_norms: bool = False, **overrides) -> Path:
    """A small random-weight model of architecture ``arch`` saved as safetensors, with stories260k's tokenizer.

    ``perturb_norms`` adds noise to every 1-D parameter (norm scales, biases), so a norm whose form is wrong
    (w vs 1 + w) or a dropped bias shows up in parity.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = MODEL_TYPES[arch]
    kwargs = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=[arch],
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is tiny; scale up so logits are not all ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
            elif perturb_norms:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(_need(STORIES) / name, folder / name)
    return folder


def kernel_attrs(path: Path) -> list[tuple[int, int]]:
    """(bits, accuracy_level) of every MatMulNBits node of a model file's main graph."""
    import onnx

    graph = onnx.load(path)
    return [
        (attrs["bits"], attrs["accuracy_level"])
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
        for attrs in [{a.name: a.i for a in n.attribute}]
    ]


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy continuation of ``prompt`` (ids) by the artifact in ``folder`` (stops at EOS)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt) :]
