"""Phi-3 / Phi-3.5 / Phi-4-mini: packed ``qkv_proj`` (rows q, k, v) and ``gate_up_proj`` (rows gate, up) modules,
longrope ("su") scaling, an optional global sliding window, partial rotary (Phi-4-mini: 0.75)."""

from dataclasses import replace

from edgepack.families import llama, register

FAMILY = register(
    replace(
        llama.FAMILY,
        name="phi3",
        architectures=("Phi3ForCausalLM",),
        qkv=("self_attn.qkv_proj",),
        gate_up=("mlp.gate_up_proj",),
        windows="global",
    )
)
