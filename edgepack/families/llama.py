"""Llama (Llama-2/3, Llama-3.2, SmolLM2, TinyLlama, stories): the module layout Mistral, Qwen2/3 and Gemma-2/3
copy in transformers, so they derive from this one.

Rope scaling: default, linear, llama3 (static frequency smoothing) and yarn; optional attention/MLP biases are
read from the modules themselves.
"""

from edgepack.families import BlockNorms, Family, register

FAMILY = register(
    Family(
        name="llama",
        architectures=("LlamaForCausalLM",),
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        rotary="model.rotary_emb",
        attention="self_attn",
        mlp="mlp",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        o_proj="self_attn.o_proj",
        gate_up=("mlp.gate_proj", "mlp.up_proj"),
        down="mlp.down_proj",
        norms=BlockNorms(attn_in="input_layernorm", mlp_in="post_attention_layernorm"),
    )
)
