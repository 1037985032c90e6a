"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases; sliding windows per ``layer_types`` (``use_sliding_window``
and ``max_window_layers`` decide which layers slide)."""

from dataclasses import replace

from edgepack.families import llama, register

FAMILY = register(
    replace(llama.FAMILY, name="qwen2", architectures=("Qwen2ForCausalLM",), windows="layer_types")
)
