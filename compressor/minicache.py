"""MiniCache (arXiv 2405.14366): merge the KV cache of adjacent layers across depth, plus int8/int4 KV.

From ``start_layer`` on, layers pair up as (s, s+1), (s+2, s+3), ... For each token and head, a pair's two key
(and value) vectors are split into magnitude and direction; the directions are SLERP-interpolated with ``t`` into
ONE shared direction, the magnitudes stay per layer. Tokens whose angular distance (arccos of the directions'
cosine, over pi) exceeds the pair's threshold keep their exact vectors ("retained"). Restoring layer l's past is
``magnitude_l * direction``, with the retained tokens' exact vectors put back at their positions.

KV quantization (``bits`` 8 or 4) stores a float stream as uint8 codes (int4: two per byte) with an fp16 scale
and fp16 low value per group, ``x ~ code * scale + low``:
- ``group="token"``: one group per token and head (over head_dim);
- ``group="channel"``: one group per channel over ``channel_group`` consecutive tokens (KIVI-style); the last
  incomplete group stays in float (the "residual") until it fills.
- ``group="static"``: symmetric, one fixed fp32 scale per layer, kv head and channel, calibrated (max |x| on the
  calibration text over the code range), ``x ~ code * scale``; int8 codes, or int4 stored as ``code + 8`` two per
  byte. This is the cache onnxruntime's GroupQueryAttention reads and writes itself (``k_quant_type``
  PER_CHANNEL), so the fused graph attends over it with no extra op; a token attends over its own key/value
  as stored (quantized), as that kernel does. Not combined with merging.
Under MiniCache the shared directions are quantized; magnitudes and retained vectors stay in float.

This module is the PyTorch reference: ``CompressedCache`` is a transformers ``DynamicCache`` that returns, for
each layer, its restored past plus its exact new tokens (a pair is merged once both layers have run), exactly as
the exported graph does (``exporter/kv_cache.py`` mirrors every function here op for op). ``decode_nll`` runs
text through it token by token, so the quality table does not depend on the export.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields

import torch
from transformers import DynamicCache

from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

MERGE_MODES = ("none", "minicache", "share")  # share = layer l+1 reuses layer l's KV (cross-layer baseline)
KV_BITS = (16, 8, 4)  # 16 = float (the activation dtype)
KV_GROUPS = ("token", "channel", "static")
T_GRID = (0.25, 0.5, 0.75)  # SLERP positions the plan tries when t is not given
DEFAULT_T = 0.5  # the paper's midpoint, used while searching the start layer
MIN_SCALE = 1e-5  # above fp16's smallest subnormal, so a constant group never divides by zero
SLERP_EPS = 1e-4  # below this sin(angle), SLERP falls back to linear interpolation
NORM_EPS = 1e-12


@dataclass
class KVCacheConfig:
    """Recipe step "kv": merge the cache across depth and/or quantize it; the plan is chosen on calibration text."""

    merge: str = "none"  # none | minicache | share
    start_layer: int | None = None  # first merged layer; None = the earliest within max_ppl_loss on calib
    t: float | None = None  # SLERP position between layer l (0) and l+1 (1); None = best of T_GRID on calib
    max_retained: float = 0.05  # fraction of calibration tokens per pair kept unmerged (sets the threshold)
    bits: int = 16  # 16 (float), 8 or 4
    group: str = "token"  # token | channel | static
    channel_group: int = 32  # tokens per group when group == "channel"
    max_ppl_loss: float = 0.02  # relative perplexity loss allowed when choosing start_layer
    n_samples: int = 4
    seq_len: int = 256
    version: int = 1

    kind = "kv"

    def __post_init__(self) -> None:
        if self.merge not in MERGE_MODES:
            raise EdgepackError(f"kv merge={self.merge!r} is unknown; choose one of {', '.join(MERGE_MODES)}")
        if self.bits not in KV_BITS:
            raise EdgepackError(f"kv bits={self.bits!r} is not supported; choose 8, 4 or 16 (float)")
        if self.group not in KV_GROUPS:
            raise EdgepackError(f"kv group={self.group!r} is unknown; choose token, channel or static")
        if self.group == "static" and self.merge != "none":
            raise EdgepackError(
                "kv group=static (fixed per-channel scales) is not combined with merging; use token"
            )
        if not isinstance(self.channel_group, int) or self.channel_group < 2:
            raise EdgepackError(f"kv channel_group={self.channel_group!r} must be an integer >= 2, e.g. 32")
        if self.t is not None and not 0.0 <= float(self.t) <= 1.0:
            raise EdgepackError(f"kv t={self.t!r} must lie in [0, 1] (0 = layer l's direction)")
        if not 0.0 <= float(self.max_retained) < 1.0:
            raise EdgepackError(f"kv max_retained={self.max_retained!r} must be a fraction in [0, 1)")
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise EdgepackError(f"kv start_layer={self.start_layer!r} must be a non-negative layer index")
        for name in ("n_samples", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EdgepackError(f"kv {name}={getattr(self, name)!r} must be a positive integer")

    @property
    def active(self) -> bool:
        return self.merge != "none" or self.bits != 16

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KVCacheConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EdgepackError(f"unknown kv keys {sorted(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class MiniCachePlan:
    """The resolved KV layout: merged pairs with their t and thresholds, and the KV quantization."""

    num_layers: int
    merge: str = "none"
    start_layer: int | None = None
    t: float = 0.5
    thresholds: list[float] = field(default_factory=list)  # one angular-distance threshold per pair
    bits: int = 16
    group: str = "token"
    channel_group: int = 32
    static_scales: list = field(default_factory=list)  # group "static": per layer [K, V] scales (kv, D)

    @property
    def active(self) -> bool:
        """Whether the cache differs from a float one (it merges or quantizes), as KVCacheConfig.active."""
        return self.merge != "none" or self.bits != 16

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Merged (l, l+1) pairs from start_layer on; an odd last layer stays unmerged."""
        if self.merge == "none" or self.start_layer is None:
            return []
        return [(a, a + 1) for a in range(self.start_layer, self.num_layers - 1, 2)]

    def role(self, layer: int) -> tuple[str, int]:
        """("plain", -1), ("first", pair) or ("second", pair) for a layer index."""
        for i, (a, b) in enumerate(self.pairs):
            if layer in (a, b):
                return ("first" if layer == a else "second"), i
        return "plain", -1

    def to_dict(self) -> dict:
        return {**asdict(self), "pairs": [list(p) for p in self.pairs]}


# ----------------------------------------------------------------------------- tensor math (mirrored in ONNX)


def quantize_groups(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization over ``dim``: uint8 codes and fp16 scale and low (keepdim)."""
    lo = x.amin(dim, keepdim=True).to(torch.float16)
    hi = x.amax(dim, keepdim=True)
    scale = ((hi - lo.float()) / (2**bits - 1)).clamp_min(MIN_SCALE).to(torch.float16)
    codes = torch.round((x - lo.float()) / scale.float()).clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """x ~ code * scale + low, in float32."""
    return codes.float() * scale.float() + low.float()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last axis: even index in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def slerp_merge(
    a: torch.Tensor, b: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, kv, S, D) pair -> shared direction (B, kv, S, D), magnitudes (B, kv, S, 1) each, angular distance (B, kv, S)."""
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(NORM_EPS), b / nb.clamp_min(NORM_EPS)
    omega = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    small = so < SLERP_EPS
    safe = torch.where(small, torch.ones_like(so), so)
    wa = torch.where(small, torch.full_like(so, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(small, torch.full_like(so, t), torch.sin(t * omega) / safe)
    return wa * ua + wb * ub, na, nb, (omega / math.pi).squeeze(-1)


def token_scores(dist_k: torch.Tensor, dist_v: torch.Tensor) -> torch.Tensor:
    """Per-position retention score (S,): the largest angular distance over batch, heads, keys and values."""
    return torch.maximum(dist_k, dist_v).amax(dim=(0, 1))


# ----------------------------------------------------------------------------- streams (one stored tensor each)


class FloatStream:
    """A float KV stream (B, kv, P, D), stored as is."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def decode(self, like: torch.Tensor) -> torch.Tensor:
        return self.x if self.x is not None else like[:, :, :0]

    def append(self, new: torch.Tensor) -> None:
        self.x = new if self.x is None else torch.cat([self.x, new], dim=2)

    def tensors(self) -> list[torch.Tensor]:
        return [self.x] if self.x is not None else []


class TokenStream(FloatStream):
    """int8/int4 codes with one fp16 (scale, low) per token and head.

    ``x`` keeps the dequantized values beside the codes (a token's values never change once it is quantized),
    so decoding a long past costs no per-step dequantization; only ``tensors()`` (the layout) counts as stored.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.state: list[torch.Tensor] | None = None  # codes (B,kv,P,D or D/2), scale, low (B,kv,P,1)

    def decode(self, like: torch.Tensor) -> torch.Tensor:
        return super().decode(like).to(like.dtype)

    def append(self, new: torch.Tensor) -> None:
        codes, scale, low = quantize_groups(new.float(), self.bits, dim=-1)
        self._store(codes, scale, low, dequantize_groups(codes, scale, low))

    def _store(self, codes, scale, low, values: torch.Tensor) -> None:
        """Append codes (packed if int4), scale and low to the layout and ``values`` to the decoded past."""
        parts = [pack_int4(codes) if self.bits == 4 else codes, scale, low]
        if self.state is None:
            self.state = parts
        else:
            self.state = [torch.cat([o, n], 2) for o, n in zip(self.state, parts, strict=True)]
        super().append(values)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.state or [])


class ChannelStream(TokenStream):
    """int8/int4 codes with one fp16 (scale, low) per channel over ``group`` tokens; a float residual < group."""

    def __init__(self, bits: int, group: int) -> None:
        super().__init__(bits)
        self.group = group
        self.residual: torch.Tensor | None = None

    def decode(self, like: torch.Tensor) -> torch.Tensor:
        parts = [super().decode(like)] + ([self.residual] if self.residual is not None else [])
        return torch.cat(parts, dim=2)

    def append(self, new: torch.Tensor) -> None:
        x = new if self.residual is None else torch.cat([self.residual, new], dim=2)
        full = x.shape[2] // self.group * self.group
        self.residual = x[:, :, full:]
        if full == 0:
            return
        b, h, _, d = x.shape
        grouped = x[:, :, :full].float().reshape(b, h, full // self.group, self.group, d)
        codes, scale, low = quantize_groups(grouped, self.bits, dim=3)  # scale/low (B,kv,G,1,D)
        values = dequantize_groups(codes, scale, low).reshape(b, h, full, d)
        self._store(codes.reshape(b, h, full, d), scale.squeeze(3), low.squeeze(3), values)

    def tensors(self) -> list[torch.Tensor]:
        return [*super().tensors(), *([self.residual] if self.residual is not None else [])]


class StaticStream(FloatStream):
    """Symmetric codes with fixed per-channel scales (group "static"): int8, or int4 as ``code + 8`` packed two
    per byte, exactly as GroupQueryAttention's quantized cache (PER_CHANNEL) stores them."""

    def __init__(self, bits: int, scale: torch.Tensor) -> None:
        super().__init__()
        self.bits, self.scale = bits, scale[None, :, None, :]  # (1, kv, 1, D)
        self.codes: torch.Tensor | None = None

    def quantize(self, new: torch.Tensor) -> torch.Tensor:
        """The stored (dequantized) values of ``new``: what attention reads, the new tokens included."""
        q = static_codes(new.float(), self.scale, self.bits)
        parts = q.to(torch.int8) if self.bits == 8 else pack_int4((q + 8).to(torch.uint8))
        self.codes = parts if self.codes is None else torch.cat([self.codes, parts], 2)
        return (q * self.scale).to(new.dtype)

    def decode(self, like: torch.Tensor) -> torch.Tensor:
        return super().decode(like).to(like.dtype)

    def append(self, new: torch.Tensor) -> None:
        super().append(self.quantize(new))

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes] if self.codes is not None else []


def static_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """round(x / scale) clamped to the signed code range (float, integral)."""
    top = 2 ** (bits - 1)
    return torch.round(x / scale).clamp(-top, top - 1)


def static_scales(kv: list, bits: int) -> list[list[list[list[float]]]]:
    """Per layer, [K, V] symmetric per-channel scales (kv, D): max |x| over calibration tokens / the largest code."""
    top = 2 ** (bits - 1) - 1
    return [[(x.abs().amax(dim=(0, 2)) / top).clamp_min(MIN_SCALE).tolist() for x in pair] for pair in kv]


def make_stream(plan: MiniCachePlan, layer: int | None = None, kind: int = 0) -> FloatStream:
    """The stream type the plan's quantization asks for (``layer``/``kind`` pick a static stream's scales)."""
    if plan.bits == 16:
        return FloatStream()
    if plan.group == "static":
        return StaticStream(plan.bits, torch.tensor(plan.static_scales[layer][kind], dtype=torch.float32))
    if plan.group == "token":
        return TokenStream(plan.bits)
    return ChannelStream(plan.bits, plan.channel_group)


class MergedPair:
    """One merged (l, l+1) pair's stored K or V: shared direction stream, two magnitudes, retained vectors."""

    def __init__(self, plan: MiniCachePlan) -> None:
        self.direction = make_stream(plan)
        self.magnitude: list[torch.Tensor | None] = [None, None]
        self.retained: list[torch.Tensor | None] = [None, None]

    def restore(self, which: int, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Layer ``which``'s past (B, kv, P, D): magnitude * direction, retained tokens exact."""
        if self.magnitude[which] is None:
            return like[:, :, :0]
        x = self.magnitude[which] * self.direction.decode(like)
        if index.numel():
            x = x.clone()
            x[:, :, index] = self.retained[which]
        return x

    def append(self, direction, mags, keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Store new tokens' shared direction, magnitudes and (for ``keep``) exact vectors."""
        self.direction.append(direction)
        for i, (m, x) in enumerate(zip(mags, (a, b), strict=True)):
            kept = x[:, :, keep]
            self.magnitude[i] = m if self.magnitude[i] is None else torch.cat([self.magnitude[i], m], 2)
            self.retained[i] = kept if self.retained[i] is None else torch.cat([self.retained[i], kept], 2)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.direction.tensors(), *(t for t in self.magnitude + self.retained if t is not None)]


class CompressedCache(DynamicCache):
    """A transformers cache returning each layer's restored past plus its exact new tokens (the export's semantics).

    The parent DynamicCache still receives the exact states, only for sequence-length bookkeeping (positions and
    masks); attention never reads them. ``stored_bytes`` counts what the compressed layout really holds.
    """

    def __init__(self, plan: MiniCachePlan) -> None:
        super().__init__()
        self.plan = plan
        self.plain = {i: (make_stream(plan, i, 0), make_stream(plan, i, 1)) for i in range(plan.num_layers)}
        self.merged = [(MergedPair(plan), MergedPair(plan)) for _ in plan.pairs]
        self.index: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long) for _ in plan.pairs]
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Return (restored past ++ new keys, restored past ++ new values) for ``layer_idx``; store compressed."""
        super().update(key_states, value_states, layer_idx, *args, **kwargs)
        role, pair = self.plan.role(layer_idx)
        if role == "plain":
            ks, vs = self.plain[layer_idx]
            past_k, past_v = ks.decode(key_states), vs.decode(value_states)
            ks.append(key_states)
            vs.append(value_states)
            if self.plan.group == "static" and self.plan.bits != 16:  # attends over its new tokens as stored
                key_states, value_states = ks.x[:, :, past_k.shape[2] :], vs.x[:, :, past_v.shape[2] :]
        elif self.plan.merge == "share":
            past_k, past_v = self._share(role, layer_idx, key_states, value_states)
        else:
            which = 0 if role == "first" else 1
            mk, mv = self.merged[pair]
            past_k = mk.restore(which, self.index[pair], key_states)
            past_v = mv.restore(which, self.index[pair], value_states)
            if role == "first":
                self.pending[pair] = (key_states, value_states, past_k, past_v)
            else:
                self._merge(pair, key_states, value_states)
        if layer_idx == self.plan.num_layers - 1:
            self.length += key_states.shape[2]
        return torch.cat([past_k, key_states], 2), torch.cat([past_v, value_states], 2)

    def _share(self, role: str, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Cross-layer baseline: the second layer of a pair attends over the first layer's stored past."""
        first = layer if role == "first" else layer - 1
        ks, vs = self.plain[first]
        if role == "first":
            past = ks.decode(k), vs.decode(v)
            ks.append(k)
            vs.append(v)
            self.pending[layer] = past
            return past
        return self.pending.pop(first)

    def _merge(self, pair: int, kb: torch.Tensor, vb: torch.Tensor) -> None:
        """Both layers of ``pair`` have run on the new tokens: merge them into the pair's store."""
        ka, va, _, _ = self.pending.pop(pair)
        t, threshold = self.plan.t, self.plan.thresholds[pair]
        dk, mka, mkb, dist_k = slerp_merge(ka, kb, t)
        dv, mva, mvb, dist_v = slerp_merge(va, vb, t)
        keep = token_scores(dist_k, dist_v) > threshold  # (S,)
        past = self.merged[pair][0].magnitude[0]
        offset = 0 if past is None else past.shape[2]
        self.index[pair] = torch.cat([self.index[pair], torch.nonzero(keep).flatten() + offset])
        self.merged[pair][0].append(dk, (mka, mkb), keep, ka, kb)
        self.merged[pair][1].append(dv, (mva, mvb), keep, va, vb)

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor the compressed layout holds (what the exported graph's KV inputs would carry)."""
        out = [t for ks, vs in self.plain.values() for t in ks.tensors() + vs.tensors()]
        out += [t for mk, mv in self.merged for t in mk.tensors() + mv.tensors()]
        return out + [i for i in self.index if i.numel()]

    def stored_bytes(self, float_bytes: int = 4) -> int:
        """Bytes of the compressed layout, counting float32 elements at ``float_bytes`` (2 = an fp16 artifact)."""
        return sum(
            t.numel() * (float_bytes if t.dtype == torch.float32 else t.element_size())
            for t in self.stored_tensors()
        )

    def retained_fraction(self) -> float:
        """Fraction of tokens kept unmerged, over all pairs."""
        if not self.index or self.length == 0:
            return 0.0
        return sum(i.numel() for i in self.index) / (len(self.index) * self.length)


def plain_bytes_per_token(config, float_bytes: int = 4) -> int:
    """Bytes one token adds to an uncompressed cache: layers x (K, V) x kv_heads x head_dim x dtype."""
    from edgepack.model import DecoderDims

    d = DecoderDims.from_config(config)
    return d.num_layers * 2 * d.num_kv_heads * d.head_dim * float_bytes


# ----------------------------------------------------------------------------- evaluation through the reference


@torch.no_grad()
def decode_nll(
    model, ids: torch.Tensor, plan: MiniCachePlan | None, chunk: int = 1
) -> tuple[float, int, dict]:
    """Summed next-token NLL of each row of ``ids`` (N, T), fed ``chunk`` tokens per step through the cache.

    With ``chunk`` = 1 every token attends over the compressed past plus itself (decode-mode, the strictest
    reading). ``plan`` None runs the plain transformers cache. Returns (nll, tokens, layout stats of the last row).
    """
    total, count, stats = 0.0, 0, {}
    for row in ids:
        cache = CompressedCache(plan) if plan is not None else DynamicCache()
        logits = cached_logits(model, row[:-1], cache, chunk)
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
        if plan is not None:
            n = row.numel() - 1
            stats = {
                "bytes_per_token": cache.stored_bytes(4) / n,
                "bytes_per_token_fp16": cache.stored_bytes(2) / n,
                "retained_fraction": cache.retained_fraction(),
            }
    return total, count, stats


def cached_logits(model, row: torch.Tensor, cache, chunk: int = 1) -> torch.Tensor:
    """(T, V) float logits of the 1-D ``row`` fed ``chunk`` tokens per step through ``cache``."""
    logits = []
    for s in range(0, row.numel(), chunk):
        step = row[s : s + chunk][None]
        logits.append(model(input_ids=step, past_key_values=cache, use_cache=True).logits[0].float())
    return torch.cat(logits)


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor, plan: MiniCachePlan, chunk: int = 1) -> torch.Tensor:
    """(N, T, V) logits of ``ids`` (N, T), each row decoded ``chunk`` tokens per step through its own
    CompressedCache: what the artifact computes when it generates (quality vs the original uses it)."""
    return torch.stack([cached_logits(model, row, CompressedCache(plan), chunk) for row in ids])


def decode_perplexity(
    model, ids: torch.Tensor, plan: MiniCachePlan | None, chunk: int = 1
) -> tuple[float, dict]:
    """exp(mean NLL) of ``decode_nll``, with its layout stats."""
    nll, n, stats = decode_nll(model, ids, plan, chunk)
    return math.exp(nll / n), stats


@torch.no_grad()
def layer_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE keys and values of every layer for ``ids`` (N, T): [(K, V)] of (N, kv, T, D)."""
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def pair_thresholds(kv: list, pairs: list[tuple[int, int]], t: float, max_retained: float) -> list[float]:
    """Per pair, the angular-distance quantile that leaves ``max_retained`` of calibration tokens unmerged."""
    out = []
    for a, b in pairs:
        scores = []
        for n in range(kv[a][0].shape[0]):  # per sample, as the runtime decides per sequence
            _, _, _, dk = slerp_merge(kv[a][0][n : n + 1], kv[b][0][n : n + 1], t)
            _, _, _, dv = slerp_merge(kv[a][1][n : n + 1], kv[b][1][n : n + 1], t)
            scores.append(token_scores(dk, dv))
        scores = torch.cat(scores)
        out.append(float(torch.quantile(scores, 1.0 - max_retained)) if max_retained > 0 else 1.0)
    return out


def make_plan(
    model, cfg: KVCacheConfig, kv: list | None, start: int | None, t: float | None = None
) -> MiniCachePlan:
    """A plan for ``start`` and ``t`` (default: the config's, else DEFAULT_T); thresholds from calibration ``kv``."""
    n = model.config.num_hidden_layers
    t = t if t is not None else (cfg.t if cfg.t is not None else DEFAULT_T)
    plan = MiniCachePlan(n, cfg.merge, start, t, [], cfg.bits, cfg.group, cfg.channel_group)
    if cfg.merge == "minicache" and plan.pairs:
        plan.thresholds = pair_thresholds(kv, plan.pairs, t, cfg.max_retained)
    if cfg.group == "static" and cfg.bits != 16:
        plan.static_scales = static_scales(kv, cfg.bits)
    return plan


def choose_t(model, cfg: KVCacheConfig, kv: list, start: int, calib_ids: torch.Tensor) -> tuple[float, list]:
    """The SLERP position of T_GRID with the lowest calibration perplexity at ``start`` (float KV)."""
    float_cfg = KVCacheConfig(**{**cfg.to_dict(), "bits": 16})
    trials = [
        (decode_perplexity(model, calib_ids, make_plan(model, float_cfg, kv, start, t))[0], t) for t in T_GRID
    ]
    log.info("kv plan: t -> calib ppl %s", trials)
    return min(trials)[1], [{"t": t, "ppl": ppl} for ppl, t in trials]


def check_start_layer(cfg: KVCacheConfig, depth: int, where: str = "") -> None:
    """Refuse a merge start that leaves no (l, l+1) pair in a ``depth``-layer model (``where``: e.g. after a fold)."""
    if cfg.merge != "none" and cfg.start_layer is not None and cfg.start_layer >= depth - 1:
        raise EdgepackError(
            f"kv start_layer={cfg.start_layer} leaves no pair to merge in a {depth}-layer model{where}; "
            f"pass --kv-start {max(depth - 2, 0)} or less"
        )


def plan_kv_cache(model, cfg: KVCacheConfig, calib_ids: torch.Tensor | None) -> tuple[MiniCachePlan, dict]:
    """Resolve a KVCacheConfig on calibration ids (N, T): start layer by perplexity budget, per-pair thresholds."""
    n = model.config.num_hidden_layers
    check_start_layer(cfg, n)
    static = cfg.group == "static" and cfg.bits != 16
    if (cfg.merge != "none" or static) and calib_ids is None:
        raise EdgepackError(
            "KV merging and static KV scales need calibration text; pass --calib FILE (any local UTF-8 text file)"
        )
    if cfg.merge == "none":
        return make_plan(model, cfg, layer_kv(model, calib_ids) if static else None, None), {}
    kv = layer_kv(model, calib_ids)
    if cfg.start_layer is not None:
        if cfg.merge != "minicache" or cfg.t is not None:
            return make_plan(model, cfg, kv, cfg.start_layer), {}
        t, t_trials = choose_t(model, cfg, kv, cfg.start_layer, calib_ids)
        return make_plan(model, cfg, kv, cfg.start_layer, t), {"t_trials": t_trials}
    base, _ = decode_perplexity(model, calib_ids, None, chunk=calib_ids.shape[1])
    float_cfg = KVCacheConfig(**{**cfg.to_dict(), "bits": 16})
    chosen, trials = None, []
    for start in range(n - 2, 0, -1):  # from the last pair towards the input while quality allows
        plan = make_plan(model, float_cfg, kv, start)
        ppl, _ = decode_perplexity(model, calib_ids, plan)
        trials.append({"start_layer": start, "ppl": ppl, "loss": ppl / base - 1})
        log.info("kv plan: start %d -> calib ppl %.3f (base %.3f)", start, ppl, base)
        if ppl / base - 1 > cfg.max_ppl_loss:
            break
        chosen = start
    if chosen is None:
        chosen = n - 2
        log.warning(
            "kv plan: even merging only the last pair costs %.1f%% perplexity on the calibration text "
            "(max_ppl_loss %.1f%%); merging from layer %d anyway: pass start_layer (--kv-start) to choose",
            100 * trials[0]["loss"],
            100 * cfg.max_ppl_loss,
            chosen,
        )
    search = {"calib_ppl": base, "trials": trials}
    if cfg.merge != "minicache" or cfg.t is not None:
        return make_plan(model, cfg, kv, chosen), search
    t, search["t_trials"] = choose_t(model, cfg, kv, chosen, calib_ids)
    return make_plan(model, cfg, kv, chosen, t), search
