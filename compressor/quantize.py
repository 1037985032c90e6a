"""Weight quantization: format config, pure quantizer math, the fake-quant ``QuantLinear`` and ``quantize``.

A quantized weight is integer ``codes`` (N, K) in [0, 2**bits) with per-group ``scales`` and ``zero_points``
(N, ceil(K / group)), dequantized as ``(codes - zero_point) * scale``. The PyTorch model keeps exactly these
codes (``QuantLinear``), so the ONNX lowering and the PyTorch model compute the same function.

Quantizers ("methods") are registered in ``METHODS``; RTN lives here, calibrated ones register themselves
from their own modules and receive calibration token ids.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn

from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

VALID_BITS = range(2, 9)
VALID_GROUPS = (16, 32, 64, 128, 256, -1)  # -1 = one group per output channel
VALID_ABITS = (16, 8)
WEIGHT_RANGES = ("mse", "minmax")


@dataclass(frozen=True)
class QuantFormat:
    """How one linear layer is stored: bit width, group size (-1 = per channel), symmetric or not."""

    wbits: int = 4
    group_size: int = 64
    symmetric: bool = False

    def validate(self, where: str = "") -> None:
        at = f" for {where}" if where else ""
        if self.wbits not in VALID_BITS:
            raise EdgepackError(f"wbits={self.wbits}{at} is not supported; choose an integer from 2 to 8")
        if self.group_size not in VALID_GROUPS:
            raise EdgepackError(
                f"group_size={self.group_size}{at} is not supported; choose one of 16, 32, 64, 128, 256 or -1 (per channel)"
            )


DEFAULT_GROUP = 64
MLP_GROUP = 128  # the MLP projections' group when group_size is left at DEFAULT_GROUP
MLP_MODULES = "*.mlp.*"  # fnmatch over module names: every family's block MLP (families/*.py: mlp)
HEAD_AUTO = "auto"  # QuantConfig.head_bits: the width the default lowering stores the body at


@dataclass
class QuantConfig:
    """Recipe step: quantize the decoder's linear weights (and by default the tied lm_head/embedding)."""

    wbits: int = 4
    group_size: int = DEFAULT_GROUP
    symmetric: bool = False
    abits: int = 16
    method: str = "rtn"
    # Group of the block MLP projections (the largest matrices) wherever it divides their K. None (the default)
    # resolves to MLP_GROUP (128) when group_size is the default 64, else to group_size: 128 runs the MLP's
    # MatMulNBits 9-26% faster than 64 at the same perplexity (docs/results/speed.md), and a group size the user
    # chose is kept everywhere unless mlp_group_size is given too.
    mlp_group_size: int | None = None
    skip: list[str] = field(default_factory=list)  # fnmatch patterns over module names, e.g. "lm_head"
    # Width of the output head (lm_head, and the input embedding when tied to it). "auto" (the default): the width
    # the default (widened) lowering stores and runs the body's codes at anyway (kernels.packing.WIDENED_BITS:
    # 3 -> 4, 5..7 -> 8, else ``wbits``), so the head costs no byte and no time more than at the body's width;
    # at W3 it is the largest single cause of loss (mix-llama-14m's 8192-token tied head is 18% of its weights:
    # GPTQ W3 g128 calibrated on Shakespeare goes from +12.7% to +7.3% in-domain, generalization.md round 7).
    # The pipeline resolves "auto" to the body's width under the compact/planes lowerings, which store b bits.
    # None (CLI --head-bits same) = ``wbits``. 8 (--head-bits 8, like llama.cpp's Q4_K_M keeping the output at
    # Q6_K): RTN W3 g128 54.4 -> 49.6 Shakespeare perplexity on mix-llama-14m (fp32 42.8; cross_domain.md,
    # --part head8) for +17% bytes at W4; at equal bytes --size-budget does far better (+0.4% vs +6.1%;
    # generalization.md). Per-layer overrides and mixed-precision plans win over it.
    head_bits: int | str | None = HEAD_AUTO
    # How RTN sets each group's range: "mse" (default) searches a shrink of [min, max] that minimises the weight
    # error (calib_grid.search_range; no data), "minmax" keeps the full range.
    weight_range: str = "mse"
    overrides: dict[str, dict] = field(
        default_factory=dict
    )  # pattern -> {"wbits":..,"group_size":..,"symmetric":..}
    options: dict = field(default_factory=dict)  # method-specific settings (calibration steps, ...)
    budget_bpw: float | None = None  # mixed precision: average stored bits per quantized weight
    size_budget: int | None = None  # mixed precision: bytes of all weights (quantized as stored + the rest)
    version: int = 1

    def __post_init__(self) -> None:
        self.base_format().validate()
        if self.mlp_group_size is None:
            self.mlp_group_size = MLP_GROUP if self.group_size == DEFAULT_GROUP else self.group_size
        replace(self.base_format(), group_size=self.mlp_group_size).validate("mlp_group_size")
        if self.head_bits is not None and self.head_bits != HEAD_AUTO:
            if isinstance(self.head_bits, (str, bool)):
                raise EdgepackError(
                    f"head_bits={self.head_bits!r} is not supported; use an integer from 2 to 8, "
                    f"{HEAD_AUTO!r} or None (the body's width)"
                )
            replace(self.base_format(), wbits=self.head_bits).validate("the output head (head_bits)")
        if self.weight_range not in WEIGHT_RANGES:
            raise EdgepackError(
                f"weight_range={self.weight_range!r} is not supported; choose one of {', '.join(WEIGHT_RANGES)}"
            )
        if self.abits not in VALID_ABITS:
            raise EdgepackError(f"abits={self.abits} is not supported; choose 16 (float activations) or 8")
        if self.budget_bpw is not None and self.size_budget is not None:
            raise EdgepackError("give one mixed-precision budget: --bpw or --size-budget, not both")
        if (self.budget_bpw is not None and self.budget_bpw <= 0) or (
            self.size_budget is not None and self.size_budget <= 0
        ):
            raise EdgepackError(
                "a mixed-precision budget must be positive, e.g. --bpw 3.0 or --size-budget 6MB"
            )
        _load_methods()
        if self.method not in METHODS:
            raise EdgepackError(
                f"unknown quantization method {self.method!r}; available: {', '.join(sorted(METHODS))}"
            )
        for pattern, over in self.overrides.items():
            unknown = set(over) - {"wbits", "group_size", "symmetric"}
            if unknown:
                raise EdgepackError(
                    f"override {pattern!r} has unknown keys {sorted(unknown)}; allowed: wbits, group_size, symmetric"
                )
            replace(self.base_format(), **over).validate(pattern)

    def base_format(self) -> QuantFormat:
        return QuantFormat(self.wbits, self.group_size, self.symmetric)

    def head_width(self) -> int:
        """The output head's width before overrides: ``head_bits``, resolved ("auto": the widened lowering's
        storage width of ``wbits``; None: ``wbits``)."""
        if self.head_bits == HEAD_AUTO:
            from edgepack.kernels.packing import WIDENED_BITS

            return WIDENED_BITS[self.wbits]
        return self.wbits if self.head_bits is None else self.head_bits

    def head_format(self) -> QuantFormat:
        """The output head's format before overrides (``head_width``)."""
        return replace(self.base_format(), wbits=self.head_width())

    def format_for(self, name: str, k: int | None = None, head: bool = False) -> QuantFormat | None:
        """The storage format of module ``name`` (``k`` inputs; ``head``: it is the output head), or None when it
        is skipped. Later overrides win over ``head_bits`` and ``mlp_group_size``, which applies to ``*.mlp.*``
        projections whose K it divides (no padding)."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return None
        fmt = self.head_format() if head else self.base_format()
        mlp = self.mlp_group_size
        if (
            mlp not in (-1, fmt.group_size)
            and k is not None
            and k % mlp == 0
            and fnmatch.fnmatchcase(name, MLP_MODULES)
        ):
            fmt = replace(fmt, group_size=mlp)
        for pattern, over in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                fmt = replace(fmt, **over)
        return fmt

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EdgepackError(
                f"unknown quantize keys {sorted(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**d)


# ---------------------------------------------------------------- pure tensor math


@dataclass
class QTensor:
    """Integer codes plus per-group scales and zero points of one (N, K) weight."""

    codes: torch.Tensor  # (N, K) uint8
    scales: torch.Tensor  # (N, G) float32
    zero_points: torch.Tensor  # (N, G) uint8
    bits: int
    group_size: int  # actual group length along K (per-channel: K)
    note: dict | None = None  # what a calibrated method decided for this weight (recorded in the report)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zero_points, self.group_size)


def group_view(w: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, G, group), zero-padding K up to a multiple of ``group``."""
    n, k = w.shape
    pad = (-k) % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(n, -1, group)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group: int
) -> torch.Tensor:
    """Float (N, K) weight from codes (N, K), scales and zero points (N, G)."""
    k = codes.shape[1]
    w = group_view(codes.float(), group)  # (N, G, g), a fresh float copy: updated in place below
    w.sub_(zero_points.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1))
    return w.flatten(1)[:, :k]


def effective_group(fmt: QuantFormat, k: int) -> int:
    return k if fmt.group_size == -1 else fmt.group_size


def fake_quant_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 per-token, per-``block``-of-K fake quantization (what MatMulNBits accuracy_level=4 does)."""
    shape = x.shape
    k = shape[-1]
    xb = group_view(x.reshape(-1, k), block)  # (T, G, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    xq = torch.round(xb / scale).clamp(-127, 127) * scale
    return xq.flatten(1)[:, :k].reshape(shape)


# ---------------------------------------------------------------- module


class QuantLinear(nn.Module):
    """A linear layer holding quantized codes; forward is the exact dequantized matmul (fake quant)."""

    def __init__(self, q: QTensor, bias: torch.Tensor | None, abits: int = 16, symmetric: bool = False):
        super().__init__()
        self.out_features, self.in_features = q.codes.shape
        self.bits, self.group_size, self.abits, self.symmetric = q.bits, q.group_size, abits, symmetric
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zero_points", q.zero_points)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._weight_cache: torch.Tensor | None = None

    def qtensor(self) -> QTensor:
        return QTensor(self.codes, self.scales, self.zero_points, self.bits, self.group_size)

    cache_weight = True  # keep the dequantized weight between forwards (see ``uncached_weights``)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight (cached: the codes never change after quantization)."""
        if self._weight_cache is not None and self._weight_cache.device == self.codes.device:
            return self._weight_cache
        weight = self.qtensor().dequantize().to(self.scales.dtype)
        if self.cache_weight:
            self._weight_cache = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.abits == 8:
            x = fake_quant_activations(x, activation_block(self.group_size, self.in_features))
        return nn.functional.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w{self.bits}a{self.abits}, group={self.group_size}"


def lowering_block_size(group: int, k: int) -> int:
    """MatMulNBits block_size for a weight of K inputs and this group length (a power of two >= 16).

    Grouped formats use their group; per-channel weights (group == K) use blocks of up to 128 with the row's
    one scale repeated in each block, which is exact and stays within the sizes every kernel supports.
    """
    if group != k:
        return group
    return min(128, max(16, 1 << (k - 1).bit_length()))


@contextmanager
def kernel_activations(model: nn.Module, abits: int) -> Iterator[None]:
    """Temporarily run every QuantLinear on ``abits``-bit activations (8: what MatMulNBits accuracy_level 4
    computes), e.g. to check an artifact against a PyTorch model that reproduces its kernels."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [m.abits for m in layers]
    for m in layers:
        m.abits = min(m.abits, abits)
    try:
        yield
    finally:
        for m, a in zip(layers, saved, strict=True):
            m.abits = a


@contextmanager
def uncached_weights(model: nn.Module) -> Iterator[None]:
    """Dequantize every QuantLinear's weight per forward and keep no float copy: the model's memory stays at its
    codes (1 byte a weight instead of 4), for a few forwards of a large model (the export's parity check)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.cache_weight, m._weight_cache = False, None
    try:
        yield
    finally:
        for m in layers:
            del m.cache_weight  # back to the class default


def activation_block(group: int, k: int) -> int:
    """The K-block over which MatMulNBits (accuracy_level 4) quantizes activations to int8."""
    return lowering_block_size(group, k)


# ---------------------------------------------------------------- orchestration


@dataclass
class LinearSite:
    """One unique linear weight to quantize and every (parent module, attribute) that uses it."""

    name: str  # name of its first use (module path; the family declares the layout)
    module: nn.Linear
    fmt: QuantFormat
    uses: list[tuple[nn.Module, str, str]] = field(default_factory=list)  # (parent, attr, full name)


def linear_sites(model: nn.Module, config: QuantConfig) -> list[LinearSite]:
    """Unique quantizable linears in forward order; weights shared by folding appear once with all their uses."""
    sites: dict[int, LinearSite] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{attr}" if name else attr
            fmt = config.format_for(full, child.in_features, head=child is head)
            if fmt is None:
                continue
            key = id(child.weight)
            if key not in sites:
                sites[key] = LinearSite(full, child, fmt)
            sites[key].uses.append((parent, attr, full))
    return list(sites.values())


Method = Callable[[nn.Module, list[LinearSite], QuantConfig, "torch.Tensor | None"], dict[str, QTensor]]
METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return deco


def rtn_tensor(site: LinearSite, config: QuantConfig) -> QTensor:
    """One site's round-to-nearest codes on the range ``config.weight_range`` picks;
    ``options["bit_balance"]`` puts 2-bit weights on the W2* grid."""
    from edgepack.compressor.calib_grid import quantize_on_grid

    return quantize_on_grid(
        site.module.weight.detach(),
        site.fmt,
        bool(config.options.get("bit_balance")),
        search=config.weight_range == "mse",
    )


@register_method("rtn")
def rtn_method(
    model: nn.Module, sites: list[LinearSite], config: QuantConfig, calib_ids=None
) -> dict[str, QTensor]:
    """Round-to-nearest: no calibration data (``quantize`` runs it site by site, see there)."""
    return {s.name: rtn_tensor(s, config) for s in sites}


def _load_methods() -> None:
    """Import calibrated quantizers so they register themselves (they live in their own modules)."""
    import importlib

    for mod in ("edgepack.compressor.gptq", "edgepack.compressor.abq"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, calib_ids: torch.Tensor | None = None) -> dict:
    """Replace the model's linears with ``QuantLinear`` per ``config``; returns a per-layer report.

    The tied lm_head (unless skipped) is quantized once; the embedding then uses the same dequantized weight,
    because the exporter stores one packed tensor for both (GatherBlockQuantized).
    """
    sites = linear_sites(model, config)
    e2e = e2e_options(config)
    teacher = None
    if e2e is not None:
        from edgepack.compressor.e2e import teacher_copy

        if calib_ids is None:
            raise EdgepackError(
                "end-to-end scale tuning (e2e) needs calibration text: pass --calib self or a file"
            )
        teacher = teacher_copy(model)  # the float model, before its linears are replaced
    # RTN needs no other layer, so each weight is quantized and replaced in turn: its float tensor is freed
    # before the next one is read, and peak memory stays at the model plus one layer's temporaries.
    qtensors = None if config.method == "rtn" else METHODS[config.method](model, sites, config, calib_ids)
    layers = []
    while sites:
        site = sites.pop(0)
        q = qtensors.pop(site.name) if qtensors is not None else rtn_tensor(site, config)
        bias = site.module.bias.detach() if site.module.bias is not None else None
        qlin = QuantLinear(q, bias, config.abits, site.fmt.symmetric)
        for parent, attr, _ in site.uses:
            setattr(parent, attr, qlin)
        del site.module
        layers.append(
            {
                "name": site.name,
                "shape": list(q.codes.shape),
                "bits": q.bits,
                "group": q.group_size,
                "abits": config.abits,
                "uses": [u[2] for u in site.uses],
                **({"calibration": q.note} if q.note else {}),
            }
        )
    _retie_embedding(model)
    report = {"method": config.method, "layers": layers}
    if teacher is not None:
        from edgepack.compressor.e2e import tune_scales

        report["e2e"] = tune_scales(model, teacher, calib_ids, e2e)
    return report


E2E_DEFAULT = {"rtn": 0, "gptq": 4, "abq": 4}  # epochs of end-to-end scale tuning by method (0 = off)


def e2e_options(config: QuantConfig):
    """The end-to-end scale tuning this config runs after its quantizer (compressor.e2e), or None.

    ``options["e2e"]``: epochs, a dict of ``E2EOptions`` fields, true (the defaults) or 0/false (off). Unset: on
    for the calibrated methods (``E2E_DEFAULT``), off for RTN, which stays data-free unless asked."""
    from edgepack.compressor.e2e import E2EOptions

    value = config.options.get("e2e", E2E_DEFAULT.get(config.method, 0))
    if value is None or value == 0:  # 0 or False: off
        return None
    opts = E2EOptions.from_value(value)
    return opts if opts.epochs > 0 else None


def _retie_embedding(model: nn.Module) -> None:
    """Keep a tied embedding equal to the quantized lm_head (the artifact stores one weight for both)."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(lm_head, QuantLinear) or not getattr(model.config, "tie_word_embeddings", False):
        return
    emb = model.get_input_embeddings()
    emb.weight = nn.Parameter(lm_head.weight.detach(), requires_grad=False)
    lm_head._weight_cache = None  # the embedding owns that float copy; the lm_head dequantizes on demand
