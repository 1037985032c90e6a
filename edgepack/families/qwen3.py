"""Qwen3: Qwen2 without the biases, plus a per-head RMSNorm of q and k (over head_dim) before rotary."""

from edgepack.families import Family, register

FAMILY = register(
    Family(
        name="qwen3",
        architectures=("Qwen3ForCausalLM",),
        qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
        windows="layer_types",
    )
)
