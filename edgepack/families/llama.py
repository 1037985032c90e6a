"""Llama (Llama-2/3, Llama-3.2, SmolLM2, TinyLlama, stories): the reference layout every other family varies.

Rope scaling: default, linear, llama3 (static frequency smoothing) and yarn; optional attention/MLP biases are
read from the modules themselves.
"""

from edgepack.families import Family, register

FAMILY = register(Family(name="llama", architectures=("LlamaForCausalLM",)))
