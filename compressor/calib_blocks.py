"""Orchestration shared by the calibrated quantizers (GPTQ, ABQ): options, block inputs, module swaps.

Calibrated methods walk the decoder blocks in order and keep, per calibration batch, the block's input
hidden states plus the keyword arguments the model passes to its layers (rotary embeddings, causal mask),
captured once from a forward pass. Weights are never modified in place: a quantized site is swapped in as a
``QuantLinear`` at every use, and :class:`Swaps` puts the original modules back when the method returns
(``quantize`` then installs the final modules), or briefly, to compute a block's full-precision reference.

Folded models share one weight between depth positions (one site, several uses). A shared site is
calibrated at its first position (its "owner" block); uses at later positions are then already quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from edgepack.compressor.quantize import LinearSite, QTensor, QuantLinear
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.families import Family, family_of

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class CalibOptions:
    """``QuantConfig.options`` common to calibrated methods; subclasses add their own keys.

    ``n_samples`` x ``seq_len`` tokens of calibration text are drawn by the caller (the pipeline reads these
    two keys); ``bit_balance`` stores 2-bit sites on the 5-level W2* grid.
    """

    n_samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    bit_balance: bool = False
    seed: int = 0
    e2e: object = None  # end-to-end scale tuning after the method (read by quantize: quantize.e2e_options)

    @classmethod
    def from_options(cls, options: dict, method: str):
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise EdgepackError(
                f"unknown options {sorted(unknown)} for method {method!r}; allowed: {', '.join(sorted(known))}"
            )
        opts = cls(**options)
        for f in fields(opts):
            value = getattr(opts, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise EdgepackError(f"option {f.name}={value} for method {method!r} must not be negative")
        if opts.n_samples < 1 or opts.seq_len < 2 or opts.batch_size < 1:
            raise EdgepackError(f"options n_samples, batch_size must be >= 1 and seq_len >= 2 for {method!r}")
        return opts


def require_calibration(calib_ids: torch.Tensor | None, method: str) -> torch.Tensor:
    if calib_ids is None or calib_ids.ndim != 2 or calib_ids.numel() == 0:
        raise EdgepackError(
            f"method {method!r} needs calibration text (token ids of shape (n_samples, seq_len)); pass --calib FILE"
        )
    return calib_ids


# ---------------------------------------------------------------- model structure


@dataclass
class BlockPlan:
    """Decoder layers, which block owns (calibrates) each site, and at which positions each site is used."""

    prefix: str  # module name of the layers list (the family's ``layers``)
    layers: nn.ModuleList
    owned: list[list[LinearSite]]  # per layer: sites whose first use is in that layer
    positions: dict[str, list[int]]  # site name -> layer indices of all its uses
    head: LinearSite | None  # the output embedding (lm_head), calibrated before the blocks
    other: list[LinearSite] = field(default_factory=list)  # outside blocks and not the head: RTN
    family: Family | None = None  # module names inside a block (smoothing groups, the attention module)


def plan_blocks(model: nn.Module, sites: list[LinearSite]) -> BlockPlan:
    """Assign every site to its first decoder layer, or to the head, or to the RTN fallback."""
    family = family_of(model)
    prefix, layers = family.layers, model.get_submodule(family.layers)
    if not isinstance(layers, nn.ModuleList):
        raise EdgepackError(
            f"calibrated quantization needs decoder blocks at {prefix} ({family.name} family)"
        )
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owned: list[list[LinearSite]] = [[] for _ in layers]
    positions: dict[str, list[int]] = {}
    head, other = None, []
    for site in sites:
        pos = sorted(
            {
                int(full[len(prefix) + 1 :].split(".")[0])
                for _, _, full in site.uses
                if full.startswith(prefix + ".")
            }
        )
        positions[site.name] = pos
        if pos:
            owned[pos[0]].append(site)
        elif head_module is not None and site.module.weight is head_module.weight:
            head = site
        else:
            other.append(site)
    return BlockPlan(prefix, layers, owned, positions, head, other, family)


def tied_embedding(model: nn.Module, head: LinearSite | None) -> nn.Embedding | None:
    """The input embedding when it shares its weight with the quantized head (so it is quantized too)."""
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return None
    emb = model.get_input_embeddings()
    return emb if emb.weight is head.module.weight else None


# ---------------------------------------------------------------- swaps


class Swaps:
    """Replaces modules at the sites' uses (and a tied embedding's weight); ``restore`` puts originals back."""

    def __init__(self) -> None:
        self._orig: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        self._emb: tuple[nn.Embedding, nn.Parameter] | None = None

    def set(self, site: LinearSite, module: nn.Module) -> None:
        for parent, attr, _ in site.uses:
            self._orig.setdefault((id(parent), attr), (parent, attr, getattr(parent, attr)))
            setattr(parent, attr, module)

    def quantized(self, site: LinearSite, q: QTensor, abits: int) -> QuantLinear:
        """Swap in the final fake-quant module of ``site``; returns it."""
        bias = site.module.bias.detach() if site.module.bias is not None else None
        qlin = QuantLinear(q, bias, abits, site.fmt.symmetric).to(site.module.weight.device)
        self.set(site, qlin)
        return qlin

    def embedding(self, emb: nn.Embedding, weight: torch.Tensor) -> None:
        """Let a tied embedding use the quantized head weight (as ``quantize`` does at the end)."""
        if self._emb is None:
            self._emb = (emb, emb.weight)
        emb.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    @contextmanager
    def originals(self, sites: list[LinearSite]) -> Iterator[None]:
        """Temporarily put the original (full-precision) modules back at these sites' uses."""
        current = []
        for site in sites:
            for parent, attr, _ in site.uses:
                key = (id(parent), attr)
                if key in self._orig:
                    current.append((parent, attr, getattr(parent, attr)))
                    setattr(parent, attr, self._orig[key][2])
        try:
            yield
        finally:
            for parent, attr, module in current:
                setattr(parent, attr, module)

    def restore(self) -> None:
        for parent, attr, module in self._orig.values():
            setattr(parent, attr, module)
        self._orig.clear()
        if self._emb is not None:
            self._emb[0].weight = self._emb[1]
            self._emb = None


# ---------------------------------------------------------------- block inputs


@dataclass
class Trace:
    """Per calibration batch: the first block's input, every block's keyword arguments, the head's input."""

    hidden: list[torch.Tensor]  # per batch (B, T, C)
    layer_kwargs: list[list[dict]]  # per batch, per layer
    head_inputs: list[torch.Tensor]  # per batch (B, T, C); empty when the trace stopped before the head


class _Stop(Exception):
    """Raised by a hook to end a capture pass early."""


@torch.no_grad()
def trace_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    ids: torch.Tensor,
    batch_size: int,
    head: nn.Module | None = None,
    first_only: bool = False,
) -> Trace:
    """Run ``ids`` (N, T) through the model batch by batch, recording what the blocks and the head receive.

    ``first_only`` stops each batch at the first block (its input only); otherwise every block's keyword
    arguments are kept and, given ``head``, the head's input too (the pass stops there, skipping the logits).
    """
    trace = Trace([], [], [])
    kwargs_now: list[dict] = []

    def layer_hook(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                trace.hidden.append(hidden.detach())
                if first_only:
                    raise _Stop
            kwargs_now.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    def head_hook(module, args):
        trace.head_inputs.append(args[0].detach())
        raise _Stop

    handles = [
        layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    if head is not None and not first_only:
        handles.append(head.register_forward_pre_hook(head_hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, len(ids), batch_size):
            kwargs_now = []
            try:
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            trace.layer_kwargs.append(kwargs_now)
    finally:
        for h in handles:
            h.remove()
    return trace


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block's output hidden states (B, T, C)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def record_attention(layer: nn.Module, attention: str) -> Iterator[list[torch.Tensor]]:
    """Collect the attention probabilities (B, H, T, T) of each forward of ``layer`` (eager attention only);
    ``attention``: the attention module's name in the block (the family's)."""
    maps: list[torch.Tensor] = []
    attn = getattr(layer, attention, None)
    if attn is None:
        yield maps
        return

    def hook(module, args, output):
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            maps.append(output[1])

    handle = attn.register_forward_hook(hook)
    try:
        yield maps
    finally:
        handle.remove()


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off gradients of every model parameter (calibration trains only its own parameters)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
