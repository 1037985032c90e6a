"""Model families: one module per transformers decoder family declares what the rest of edgepack needs.

A :class:`Family` names the modules of a decoder (linears, packed or not; norms and their form; the layers
list; embedding and head) and how its config maps to the math (rope tables per layer type, sliding windows,
soft-capping, embedding scale, MLP activation). :func:`resolve` reads a model's config through its family into
a :class:`DecoderSpec` that the exporter, the compressors and the runtime consume. A config field whose value
changes the math in a way edgepack does not implement is refused with one line naming the field.

Adding a family = one module here that calls :func:`register`, plus its tests (tests/test_families.py).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError

FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")

# MLP activations the exporter lowers (exporter/builder.py ACTIVATION_LOWERINGS has one entry per name).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
# Rope variants whose tables are static (a function of the position only, or a switch on the total length).
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class BlockNorms:
    """The norms of one decoder block, by module name relative to the block (None = absent)."""

    attn_in: str  # before attention
    mlp_in: str  # before the MLP
    attn_out: str | None = None  # on the attention output, before the residual add (Gemma-2/3)
    mlp_out: str | None = None  # on the MLP output, before the residual add (Gemma-2/3)

    def names(self) -> tuple[str, ...]:
        """Every present norm, in execution order."""
        return tuple(n for n in (self.attn_in, self.attn_out, self.mlp_in, self.mlp_out) if n)


@dataclass(frozen=True)
class Family:
    """One transformers decoder family: module paths and the config fields that shape its math.

    Module paths have no defaults: each family module states them (families whose transformers code copies
    Llama's derive from ``edgepack.families.llama.FAMILY`` with ``dataclasses.replace``).
    """

    name: str
    architectures: tuple[str, ...]  # *ForCausalLM class names
    layers: str  # the decoder blocks (an nn.ModuleList)
    embed: str
    final_norm: str
    lm_head: str
    rotary: str  # the rotary-embedding module (its inv_freq buffers are the rope tables)
    attention: str  # relative to a block
    mlp: str
    qkv: tuple[str, ...]  # relative to a block; one entry = one packed module (rows q, k, v)
    o_proj: str
    gate_up: tuple[str, ...]  # one entry = one packed module (rows gate, up)
    down: str
    norms: BlockNorms
    qk_norm: tuple[str, str] | None = None  # per-head RMSNorm of q and k before rotary (Qwen3, Gemma-3)
    norm_offset: float = 0.0  # 1.0: norms scale by (1 + w) (Gemma)
    embedding_scale: bool = False  # embeddings * sqrt(hidden_size) (Gemma)
    activation_field: str = "hidden_act"
    windows: str = "global"  # "global": config.sliding_window on every layer; "layer_types": per layer type
    rope_per_layer_type: bool = False  # rope_parameters is {layer_type: {...}} (Gemma-3: local/global bases)
    attn_softcap_field: str | None = None
    final_softcap_field: str | None = None
    checks: tuple[Callable[[Any], str | None], ...] = ()  # family-specific refusals: a reason or None

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a block, relative to the block."""
        return (*self.qkv, self.o_proj, *self.gate_up, self.down)

    @property
    def block_norms(self) -> tuple[str, ...]:
        """Every per-position norm of a block (q/k norms included): what a folded position keeps its own."""
        return self.norms.names() + (self.qk_norm or ())

    @property
    def smooth_groups(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Norm -> the linears it feeds (SmoothQuant-style scale folding)."""
        return ((self.norms.attn_in, self.qkv), (self.norms.mlp_in, self.gate_up))

    def layer_name(self, index: int) -> str:
        """Module name of decoder block ``index``."""
        return f"{self.layers}.{index}"


FAMILIES: dict[str, Family] = {}
_BY_ARCH: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (each family module calls this once)."""
    FAMILIES[family.name] = family
    for arch in family.architectures:
        _BY_ARCH[arch] = family
    return family


def _load_all() -> None:
    for name in FAMILY_MODULES:
        importlib.import_module(f"edgepack.families.{name}")


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(_BY_ARCH)


def family_for(architectures: list[str] | str) -> Family | None:
    """The family of the first supported architecture name, or None."""
    _load_all()
    names = [architectures] if isinstance(architectures, str) else list(architectures)
    return next((_BY_ARCH[a] for a in names if a in _BY_ARCH), None)


def family_of(model: Any) -> Family:
    """The family of a loaded transformers model (by class, then config.architectures), or a one-line error."""
    fam = family_for([type(model).__name__, *(getattr(model.config, "architectures", None) or [])])
    if fam is None:
        raise EdgepackError(
            f"unsupported architecture {type(model).__name__}; supported: {', '.join(supported_architectures())}"
        )
    return fam


def decoder_layers(model: Any):
    """The decoder blocks (an nn.ModuleList) of a model of a registered family."""
    return model.get_submodule(family_of(model).layers)


# ---------------------------------------------------------------------------------------------- resolved spec


@dataclass(frozen=True)
class Rope:
    """Static rotary tables of one layer type: cos/sin = angle(pos * inv_freq) * scaling.

    longrope: ``long_inv_freq`` replaces ``inv_freq`` for every position once the total length exceeds
    ``switch_len`` (transformers' rule), so an exporter keeps both tables and selects on the total length.
    """

    inv_freq: np.ndarray  # (rotary_dim / 2,) float32
    scaling: float = 1.0
    long_inv_freq: np.ndarray | None = None
    switch_len: int = 0

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def tables(self, positions: int, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin caches (positions, rotary_dim / 2) in float32."""
        freq = self.long_inv_freq if long else self.inv_freq
        angles = np.outer(np.arange(positions, dtype=np.float32), freq.astype(np.float32))
        return (np.cos(angles) * self.scaling).astype(np.float32), (np.sin(angles) * self.scaling).astype(
            np.float32
        )


@dataclass(frozen=True)
class LayerSpec:
    """How one depth position attends: its sliding window (None = full) and which rope tables it uses."""

    window: int | None
    rope: str  # key into DecoderSpec.ropes


@dataclass(frozen=True)
class DecoderSpec:
    """A model's math, read through its family: shapes, per-layer attention, rope tables, scalars."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float | None
    activation: str
    layers: tuple[LayerSpec, ...]
    ropes: dict[str, Rope]

    @property
    def rotary_dim(self) -> int:
        return next(iter(self.ropes.values())).rotary_dim


def _rope_params(config: Any, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    return params


def rope_type_of(config: Any, layer_type: str | None = None) -> str:
    params = _rope_params(config, layer_type)
    return params.get("rope_type", params.get("type", "default")) or "default"


def check_config(family: Family, config: Any) -> None:
    """Refuse config values that change the math in ways edgepack does not implement (one line each)."""
    for lt in _rope_keys(family, config):
        rope_type = rope_type_of(config, lt)
        if rope_type not in ROPE_TYPES:
            where = f"rope_parameters[{lt!r}]" if lt else "rope_parameters"
            raise EdgepackError(
                f"unsupported {where}.rope_type {rope_type!r} (it changes the rotary math); "
                f"edgepack exports {', '.join(ROPE_TYPES)}"
            )
    act = getattr(config, family.activation_field, None)
    if act not in ACTIVATIONS:
        raise EdgepackError(
            f"unsupported {family.activation_field} {act!r}; edgepack exports {', '.join(ACTIVATIONS)}"
        )
    for check in family.checks:
        reason = check(config)
        if reason:
            raise EdgepackError(reason)


def _rope_keys(family: Family, config: Any) -> list[str | None]:
    return sorted(set(config.layer_types)) if family.rope_per_layer_type else [None]


def _rope_of(model: Any, family: Family, layer_type: str | None) -> Rope:
    """The rope tables of one layer type, from the model's own rotary module (its exact math)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary = model.get_submodule(family.rotary)
    prefix = f"{layer_type}_" if layer_type else ""
    inv = getattr(rotary, f"{prefix}original_inv_freq", None)
    if inv is None:
        inv = getattr(rotary, f"{prefix}inv_freq")
    scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    config = model.config
    if rope_type_of(config, layer_type) != "longrope":
        return Rope(inv.detach().float().cpu().numpy(), scaling)
    params = _rope_params(config, layer_type)
    switch = int(
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )
    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=switch + 1)
    return Rope(inv.detach().float().cpu().numpy(), scaling, long_inv.float().cpu().numpy(), switch)


def _layer_types(family: Family, config: Any) -> list[str]:
    types = getattr(config, "layer_types", None)
    if family.windows == "layer_types" and types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def _window(family: Family, config: Any, layer_type: str) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or layer_type != "sliding_attention":
        return None
    return int(window) if window < config.max_position_embeddings else None


def _softcap(config: Any, field_name: str | None) -> float | None:
    value = getattr(config, field_name, None) if field_name else None
    return float(value) if value else None


def resolve(model: Any) -> DecoderSpec:
    """The :class:`DecoderSpec` of a loaded (possibly folded) model, or a one-line EdgepackError."""
    family = family_of(model)
    config = model.config
    check_config(family, config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attn = model.get_submodule(f"{family.layer_name(0)}.{family.attention}")
    types = _layer_types(family, config)
    rope_keys = _rope_keys(family, config)
    ropes = {k or "default": _rope_of(model, family, k) for k in rope_keys}
    layers = tuple(
        LayerSpec(_window(family, config, t), t if family.rope_per_layer_type else "default") for t in types
    )
    return DecoderSpec(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=len(decoder_layers(model)),
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.rms_norm_eps),
        max_positions=int(getattr(config, "max_position_embeddings", 2048)),
        attn_scale=float(getattr(attn, "scaling", head_dim**-0.5)),
        attn_softcap=_softcap(config, family.attn_softcap_field),
        final_softcap=_softcap(config, family.final_softcap_field),
        embed_scale=math.sqrt(config.hidden_size) if family.embedding_scale else None,
        activation=getattr(config, family.activation_field),
        layers=layers,
        ropes=ropes,
    )


_load_all()  # after the definitions above: each family module imports Family and register from here
