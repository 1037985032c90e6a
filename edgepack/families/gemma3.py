"""Gemma-3 (text): Gemma-2's block plus (1 + w) q/k norms, local/global rope bases per layer type
(``rope_parameters['sliding_attention' | 'full_attention']``) and a 5:1 sliding pattern (``layer_types``)."""

from dataclasses import replace

from edgepack.families import gemma2, register

FAMILY = register(
    replace(
        gemma2.FAMILY,
        name="gemma3",
        architectures=("Gemma3ForCausalLM",),
        qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
        rope_per_layer_type=True,
    )
)
