"""Mixed precision under a size budget: per-layer bit widths and group sizes with the least estimated loss.

Sensitivity: one forward/backward pass over the calibration ids collects, for every quantizable weight, the
input second moment ``H = sum_t x_t x_t^T`` and the output Fisher ``f_n = mean_t (dNLL/dy_tn)^2`` at each
of its uses. Quantizing the weight by ``dW`` (round-to-nearest at a width and group size) raises the mean next-token
NLL by about ``1/2 sum_n f_n (dW H dW^T)_nn / T`` (a diagonal-Fisher second-order estimate, separable over
tokens). A tied lm_head also moves the embedding rows it shares; that term uses the Fisher of the embedding
output, gathered per vocabulary row.

Cost: the bytes each format really stores through the MatMulNBits bit-plane lowering, scales and zero points
included (``edgepack.artifact.stored_bytes``, exact: one shared scale per block in the target's dtype, planes
at their logical width with a 1-bit plane packed 8 per byte, a zero point per plane, K and zero-point rows
padded).

Group sizes are chosen too, because K padding decides what a group costs (K = 320 pads to 384 at g128).

Choice: a multiple-choice knapsack (one format per layer, least summed loss within the budget), solved by
dynamic programming over the budget in small units.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from edgepack.compressor.calib_grid import grid_for, quantize_on_grid
from edgepack.compressor.quantize import (
    LinearSite,
    QuantConfig,
    QuantFormat,
    effective_group,
    linear_sites,
    lowering_block_size,
)
from edgepack.kernels.packing import kernel_bits, storage_of
from torch import nn

from edgepack.artifact import dtype_bytes
from edgepack.artifact import stored_bytes as artifact_bytes
from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

# Size budgets are about the file: budgeted exports store odd widths compact (pipeline.write_model).
BUDGET_LOWERING = "compact"

WIDTHS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128, 256)


@dataclass
class Sensitivity:
    """One quantizable weight: its size and, per format (wbits, group), stored bytes and estimated NLL increase."""

    name: str
    numel: int
    bytes: dict[tuple[int, int], float]
    loss: dict[tuple[int, int], float]


# ---------------------------------------------------------------- pure functions


def stored_bytes(
    shape: tuple[int, int],
    fmt: QuantFormat,
    bit_balance: bool = False,
    dtype: str = "float32",
    lowering: str = BUDGET_LOWERING,
) -> float:
    """Bytes of one (N, K) weight as an export with ``lowering`` stores it (a budgeted export: BUDGET_LOWERING),
    scales (in the target's ``dtype``: fp16 on cuda) and zero points included."""
    n, k = shape
    grid = grid_for(fmt, bit_balance)
    block = lowering_block_size(effective_group(fmt, k), k)
    bits = grid.bits
    kernel, storage = kernel_bits(bits, lowering), storage_of(bits, lowering)
    return artifact_bytes(n, k, bits, block, grid.symmetric, dtype, kernel, storage)


def fisher_error(dw: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> float:
    """1/2 sum_n f_n (dW H dW^T)_nn for a weight change dW (N, K), input moment H (K, K), output Fisher f (N,)."""
    dw = dw.float()
    return 0.5 * float((f * ((dw @ h) * dw).sum(1)).sum())


def choose_formats(layers: list[Sensitivity], budget: float, resolution: int = 4096) -> dict[str, tuple]:
    """Per-layer formats with the least total estimated loss whose total bytes stay within ``budget``.

    A multiple-choice knapsack solved by dynamic programming over the budget cut into ``resolution`` units
    (each layer's bytes rounded up, so the result always fits), then topped up with the single upgrades that
    still fit at exact byte counts.
    """
    unit = budget / resolution
    dp = np.full(resolution + 1, np.inf)  # dp[c]: least loss of the layers so far using exactly c units
    dp[0] = 0.0
    choices = np.zeros((len(layers), resolution + 1), dtype=np.int64)
    options = [sorted(s.bytes) for s in layers]
    costs = [
        [math.ceil(s.bytes[w] / unit - 1e-9) for w in opts] for s, opts in zip(layers, options, strict=True)
    ]
    for i, s in enumerate(layers):
        best = np.full(resolution + 1, np.inf)
        for j, w in enumerate(options[i]):
            c = costs[i][j]
            if c > resolution:
                continue
            candidate = np.full(resolution + 1, np.inf)
            candidate[c:] = dp[: resolution + 1 - c] + s.loss[w]
            better = candidate < best
            best[better] = candidate[better]
            choices[i, better] = j
        dp = best
    if not np.isfinite(dp).any():
        raise ValueError(f"no choice of formats fits {budget} bytes")
    used = int(np.argmin(dp))
    chosen: dict[str, tuple] = {}
    for i in reversed(range(len(layers))):
        j = int(choices[i, used])
        chosen[layers[i].name] = options[i][j]
        used -= costs[i][j]
    total = sum(s.bytes[chosen[s.name]] for s in layers)
    while True:  # spend the rounding slack on the single best upgrade that still fits
        best_move = None
        for s in layers:
            w = chosen[s.name]
            for w2 in s.bytes:
                extra, gain = s.bytes[w2] - s.bytes[w], s.loss[w] - s.loss[w2]
                if gain > 0 and total + extra <= budget and (best_move is None or gain > best_move[0]):
                    best_move = (gain, s.name, w2, extra)
        if best_move is None:
            return chosen
        _, name, w2, extra = best_move
        chosen[name], total = w2, total + extra


# ---------------------------------------------------------------- measurement


def measure_sensitivity(
    model: nn.Module, config: QuantConfig, calib_ids: torch.Tensor, dtype: str = "float32"
) -> list[Sensitivity]:
    """Bytes (scales in the target's ``dtype``) and estimated NLL increase of every quantizable weight in each
    format (RTN on ``config.weight_range``)."""
    sites = linear_sites(model, config)
    bit_balance = bool(config.options.get("bit_balance", False))
    search = config.weight_range == "mse"  # each format's error as RTN will store it
    stats = _collect_statistics(model, sites, calib_ids, int(config.options.get("batch_size", 8)))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings()
    out = []
    for site in sites:
        w = site.module.weight.detach().float()
        tied = head is not None and site.module.weight is head.weight and emb.weight is head.weight
        loss, size = {}, {}
        for key in itertools.product(WIDTHS, GROUPS):
            fmt = replace(site.fmt, wbits=key[0], group_size=key[1])
            dw = quantize_on_grid(w, fmt, bit_balance, search=search).dequantize() - w
            err = sum(fisher_error(dw, h, f) for h, f in stats.uses[site.name])
            if tied:
                err += 0.5 * float((stats.embedding * dw.pow(2)).sum())
            loss[key] = err / stats.tokens
            size[key] = stored_bytes(tuple(w.shape), fmt, bit_balance, dtype)
        out.append(Sensitivity(site.name, w.numel(), size, loss))
    return out


@dataclass
class _Statistics:
    uses: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # site -> per use (H (K, K), f (N,))
    embedding: torch.Tensor | None  # (V, C) summed squared gradients of the embedding output per row
    tokens: int


def _collect_statistics(
    model: nn.Module, sites: list[LinearSite], ids: torch.Tensor, batch_size: int
) -> _Statistics:
    """One forward/backward pass over ``ids`` with hooks gathering H and f per use and the embedding Fisher."""
    device = next(model.parameters()).device
    uses: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for site in sites:
        for parent, attr, _ in site.uses:
            m = getattr(parent, attr)
            k, n = m.in_features, m.out_features
            uses.setdefault(
                id(m), (site.name, torch.zeros(k, k, device=device), torch.zeros(n, device=device))
            )
    emb = model.get_input_embeddings()
    emb_fisher = torch.zeros_like(emb.weight, dtype=torch.float32)
    batch_ids: list[torch.Tensor] = []

    def linear_hook(module, args, output):
        _, h, f = uses[id(module)]
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        h.addmm_(x.t(), x)

        def grad_hook(g: torch.Tensor) -> None:
            f.add_(g.detach().reshape(-1, g.shape[-1]).float().pow(2).sum(0))

        output.register_hook(grad_hook)

    def emb_hook(module, args, output):
        output = output.detach().requires_grad_(True)
        rows = batch_ids[-1].reshape(-1)

        def grad_hook(g):
            emb_fisher.index_add_(0, rows, g.detach().reshape(-1, g.shape[-1]).float().pow(2))

        output.register_hook(grad_hook)
        return output

    modules = {id(getattr(p, a)): getattr(p, a) for s in sites for p, a, _ in s.uses}
    handles = [m.register_forward_hook(linear_hook) for m in modules.values()]
    handles.append(emb.register_forward_hook(emb_hook))
    tokens = 0
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.enable_grad():
            for start in range(0, len(ids), batch_size):
                batch = ids[start : start + batch_size].to(device)
                batch_ids.append(batch[:, :-1])
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
                nll = nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                nll.backward()
                tokens += batch[:, 1:].numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    per_site: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, h, f in uses.values():
        per_site.setdefault(name, []).append((h, f / tokens))
    return _Statistics(per_site, emb_fisher, tokens)


# ---------------------------------------------------------------- entry point


def plan_mixed_precision(
    model: nn.Module,
    config: QuantConfig,
    calib_ids: torch.Tensor,
    budget_bits_per_weight: float | None = None,
    budget_bytes: int | None = None,
    dtype: str = "float32",
) -> dict[str, dict]:
    """Per-layer ``{"wbits": b, "group_size": g}`` overrides meeting one budget with the least estimated loss.

    b in 2, 3, 4, 5, 6, 8 and g in 32, 64, 128, 256 (``bit_balance`` in the options makes b = 2 the W2* grid).

    ``budget_bits_per_weight``: average stored bits over the quantized weights (scales, zero points and
    bit-plane padding included). ``budget_bytes``: the whole model's weights, i.e. the quantized weights
    as stored plus every other parameter at its dtype size (graph overhead excluded). Pass exactly one.
    ``dtype``: the target's dtype (targets/profiles.py), which the artifact stores scales and float weights in.
    Merge the result last: ``replace(config, overrides={**config.overrides, **plan})``.
    """
    budget = quantized_budget(model, config, budget_bits_per_weight, budget_bytes, dtype)
    layers = measure_sensitivity(model, config, calib_ids, dtype)
    numel = sum(s.numel for s in layers)
    chosen = choose_formats(layers, budget)
    total = sum(s.bytes[chosen[s.name]] for s in layers)
    counts = {
        f"W{w}g{g}": sum(1 for v in chosen.values() if v == (w, g)) for w, g in sorted(set(chosen.values()))
    }
    log.info(
        "mixed precision: %.3f bits per weight (%.2f MB quantized), formats %s, estimated +%.4f NLL",
        8 * total / numel,
        total / 1e6,
        counts,
        sum(s.loss[chosen[s.name]] for s in layers),
    )
    return {name: {"wbits": w, "group_size": g} for name, (w, g) in chosen.items()}


def quantized_budget(
    model: nn.Module,
    config: QuantConfig,
    budget_bits_per_weight: float | None = None,
    budget_bytes: int | None = None,
    dtype: str = "float32",
) -> float:
    """Bytes the quantized weights may take under one budget; refuses, in one line, a budget that no choice of
    formats meets. Shapes only (no data, no quantization): the pipeline calls it before drawing calibration."""
    if (budget_bits_per_weight is None) == (budget_bytes is None):
        raise EdgepackError("give exactly one budget: bits per weight (--bpw) or bytes (--size-budget)")
    sites = linear_sites(model, config)
    bit_balance = bool(config.options.get("bit_balance", False))
    numel = sum(site.module.weight.numel() for site in sites)
    minimum = sum(
        min(
            stored_bytes(
                tuple(site.module.weight.shape), replace(site.fmt, wbits=w, group_size=g), bit_balance, dtype
            )
            for w, g in itertools.product(WIDTHS, GROUPS)
        )
        for site in sites
    )
    if budget_bits_per_weight is not None:
        budget = budget_bits_per_weight * numel / 8
        if budget < minimum:
            raise EdgepackError(
                f"budget {budget_bits_per_weight:g} bits per weight is below the minimum achievable "
                f"{8 * minimum / numel:.3f} (2-bit everywhere, cheapest groups); raise --bpw"
            )
        return budget
    fixed = _unquantized_bytes(model, sites, dtype)
    budget = budget_bytes - fixed
    if budget < minimum:
        raise EdgepackError(
            f"size budget {_size(budget_bytes)} is below the minimum achievable {_size(minimum + fixed)} "
            f"(2-bit everywhere, cheapest groups, {_size(fixed)} unquantized); raise --size-budget"
        )
    return budget


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def _unquantized_bytes(model: nn.Module, sites: list[LinearSite], dtype: str = "float32") -> int:
    """Bytes of every parameter and buffer not stored as a quantized weight (norms, skipped layers, ...);
    floating-point tensors at the target's ``dtype``, as the artifact stores them."""
    quantized = {id(s.module.weight) for s in sites}
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in quantized or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (dtype_bytes(dtype) if t.is_floating_point() else t.element_size())
    return total
