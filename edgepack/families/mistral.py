"""Mistral: Llama's layout with one sliding window (``config.sliding_window``) on every layer."""

from edgepack.families import Family, register

FAMILY = register(Family(name="mistral", architectures=("MistralForCausalLM",), windows="global"))
