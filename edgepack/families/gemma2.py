"""Gemma-2: (1 + w) RMSNorms, norms before and after both attention and MLP, tanh soft-capping of attention
scores and final logits, sliding window on every other layer (``layer_types``), gelu-tanh MLP, embeddings
scaled by sqrt(hidden_size), attention scaled by ``query_pre_attn_scalar ** -0.5`` (read from the module)."""

from dataclasses import replace
from typing import Any

from edgepack.families import BlockNorms, llama, register

GEMMA_NORMS = BlockNorms(
    attn_in="input_layernorm",
    attn_out="post_attention_layernorm",
    mlp_in="pre_feedforward_layernorm",
    mlp_out="post_feedforward_layernorm",
)


def causal_only(config: Any) -> str | None:
    """EmbeddingGemma-style bidirectional attention is not a causal decoder: refuse it."""
    if getattr(config, "use_bidirectional_attention", False):
        return "unsupported use_bidirectional_attention true (edgepack exports causal decoders only)"
    return None


FAMILY = register(
    replace(
        llama.FAMILY,
        name="gemma2",
        architectures=("Gemma2ForCausalLM",),
        norms=GEMMA_NORMS,
        norm_offset=1.0,
        embedding_scale=True,
        activation_field="hidden_activation",
        windows="layer_types",
        attn_softcap_field="attn_logit_softcapping",
        final_softcap_field="final_logit_softcapping",
        checks=(causal_only,),
    )
)
