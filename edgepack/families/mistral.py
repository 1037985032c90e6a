"""Mistral: Llama's layout with one sliding window (``config.sliding_window``) on every layer."""

from dataclasses import replace

from edgepack.families import llama, register

FAMILY = register(
    replace(llama.FAMILY, name="mistral", architectures=("MistralForCausalLM",), windows="global")
)
