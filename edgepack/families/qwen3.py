"""Qwen3: Qwen2 without the biases, plus a per-head RMSNorm of q and k (over head_dim) before rotary."""

from dataclasses import replace

from edgepack.families import llama, register

FAMILY = register(
    replace(
        llama.FAMILY,
        name="qwen3",
        architectures=("Qwen3ForCausalLM",),
        qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
        windows="layer_types",
    )
)
