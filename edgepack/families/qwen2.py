"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases; sliding windows per ``layer_types`` (``use_sliding_window``
and ``max_window_layers`` decide which layers slide)."""

from edgepack.families import Family, register

FAMILY = register(Family(name="qwen2", architectures=("Qwen2ForCausalLM",), windows="layer_types"))
