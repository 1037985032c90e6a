"""Gemma-3 (text): Gemma-2's block plus (1 + w) q/k norms, local/global rope bases per layer type
(``rope_parameters['sliding_attention' | 'full_attention']``) and a 5:1 sliding pattern (``layer_types``)."""

from edgepack.families import Family, register
from edgepack.families.gemma2 import GEMMA_NORMS, causal_only

FAMILY = register(
    Family(
        name="gemma3",
        architectures=("Gemma3ForCausalLM",),
        norms=GEMMA_NORMS,
        qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
        norm_offset=1.0,
        embedding_scale=True,
        activation_field="hidden_activation",
        windows="layer_types",
        rope_per_layer_type=True,
        attn_softcap_field="attn_logit_softcapping",
        final_softcap_field="final_logit_softcapping",
        checks=(causal_only,),
    )
)
