"""Integer grids of the weight formats, as pure (differentiable where needed) tensor functions.

A :class:`Grid` says which codes a format may use and how its scales and zero points follow from a group's
range. Plain formats use every code of ``bits`` bits, as in ``quantize.quant_params``. ABQ-LLM's balanced
2-bit format W2* uses the symmetric 5-level grid {-2, -1, 0, 1, 2} * s: it needs 3-bit codes (zero point 4,
codes 2..6), which lower as a 2-bit plane plus a 1-bit plane. ``rtn``, ``gptq`` and ``abq`` all quantize
through these functions, so their codes always satisfy ``dequant = (codes - zero_point) * scale`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from edgepack.compressor.quantize import QTensor, QuantFormat, effective_group, group_view


@dataclass(frozen=True)
class Grid:
    """Codes in [qmin, qmax] of a ``bits``-bit integer; symmetric grids have one fixed zero point."""

    bits: int  # stored code width
    qmin: int
    qmax: int
    symmetric: bool
    zero: int = 0  # the zero point of a symmetric grid
    steps: int = 1  # symmetric: the group's abs max maps to ``steps`` steps from zero

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


def grid_for(fmt: QuantFormat, bit_balance: bool = False) -> Grid:
    """The grid of ``fmt``; with ``bit_balance`` a 2-bit format becomes W2* (5 levels in 3-bit codes)."""
    if bit_balance and fmt.wbits == 2:
        return Grid(bits=3, qmin=2, qmax=6, symmetric=True, zero=4, steps=2)
    qmax = 2**fmt.wbits - 1
    if fmt.symmetric:  # same grid as quantize.quant_params
        half = 2 ** (fmt.wbits - 1)
        return Grid(fmt.wbits, 0, qmax, True, zero=half, steps=half - 1 if fmt.wbits > 2 else 1)
    return Grid(fmt.wbits, 0, qmax, False)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grid_params(
    w: torch.Tensor,
    grid: Grid,
    group: int,
    hi: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and (float) zero points (N, G) of weight (N, K) on ``grid``.

    ``hi`` / ``lo`` (N, G) in (0, 1] shrink the group's upper / lower range (learnable weight clipping); a
    symmetric grid uses ``hi`` only. Differentiable in ``w``, ``hi`` and ``lo`` (zero points round with STE).
    """
    g = group_view(w.float(), group)  # (N, G, g)
    if grid.symmetric:
        amax = g.abs().amax(-1)
        if hi is not None:
            amax = amax * hi
        scales = (amax / grid.steps).clamp_min(1e-8)
        return scales, torch.full_like(scales, float(grid.zero))
    low = g.amin(-1).clamp(max=0)
    high = g.amax(-1).clamp(min=0)
    if hi is not None:
        high = high * hi
    if lo is not None:
        low = low * lo
    scales = ((high - low) / grid.qmax).clamp_min(1e-8)
    zeros = round_ste(-low / scales).clamp(0, grid.qmax)
    return scales, zeros


def grid_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, grid: Grid, group: int
) -> torch.Tensor:
    """Float codes (N, G, g) of ``w`` on the grid, rounded with STE and clamped to [qmin, qmax]."""
    g = group_view(w.float(), group)
    return (round_ste(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(grid.qmin, grid.qmax)


def fake_quant(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, grid: Grid, group: int
) -> torch.Tensor:
    """The dequantized (N, K) weight ``(codes - zero) * scale``, differentiable through STE rounding."""
    q = grid_codes(w, scales, zeros, grid, group)
    return ((q - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).flatten(1)[:, : w.shape[1]]


@torch.no_grad()
def to_qtensor(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, grid: Grid, group: int) -> QTensor:
    """Freeze ``w`` on the grid: its QTensor dequantizes to exactly ``fake_quant(w, scales, zeros, ...)``."""
    codes = grid_codes(w, scales, zeros, grid, group).flatten(1)[:, : w.shape[1]]
    return QTensor(
        codes.to(torch.uint8), scales.detach().float(), zeros.detach().to(torch.uint8), grid.bits, group
    )


# Data-free range search (GPTQ's reference quantizer with mse=True, coarser): per group, the shrink of the
# range in RANGE_SHRINK whose dequantized weights have the lowest sum |w - w_q|^RANGE_NORM. On mix-llama-14m
# (RTN, ONNX Runtime perplexity, WikiText-2 / Shakespeare tail) W4 goes 535.6 / 51.1 -> 522.6 / 50.0 and
# W3 g128 717.9 / 62.1 -> 568.5 / 57.6 (docs/results/speed.md, "Weight range search").
RANGE_SHRINK = tuple(1 - i / 40 for i in range(11))  # 1.0, 0.975, ..., 0.75
RANGE_NORM = 2
RANGE_ROWS = 4096  # rows searched at a time: bounds the temporaries of a 150k-row head


@torch.no_grad()
def search_range(w: torch.Tensor, grid: Grid, group: int) -> torch.Tensor:
    """Per-group range shrink (N, G) in RANGE_SHRINK minimising the weight error on ``grid`` (no data)."""
    out = []
    for rows in w.detach().split(RANGE_ROWS):
        g = group_view(rows.float(), group)  # a chunk at a time: a bf16 head is never upcast whole
        if grid.symmetric:
            high = g.abs().amax(-1, keepdim=True)
            low = None
        else:
            low, high = torch.aminmax(g, dim=-1, keepdim=True)
            low, high = low.clamp_(max=0), high.clamp_(min=0)
        best = best_err = None
        for p in RANGE_SHRINK:
            if grid.symmetric:
                s = (high * (p / grid.steps)).clamp_(min=1e-8)
                z = float(grid.zero)
            else:
                s = ((high - low) * (p / grid.qmax)).clamp_(min=1e-8)
                z = torch.round(low * -p / s).clamp_(0, grid.qmax)
            q = (g / s).round_().add_(z).clamp_(grid.qmin, grid.qmax)
            q = q.sub_(z).mul_(s).sub_(g)
            err = (q.square_() if RANGE_NORM == 2 else q.abs_().pow_(RANGE_NORM)).sum(-1)
            if best is None:
                best, best_err = torch.full_like(err, p), err
            else:
                better = err < best_err
                best.masked_fill_(better, p)
                best_err = torch.where(better, err, best_err)
        out.append(best)
    return torch.cat(out)


def range_params(w: torch.Tensor, grid: Grid, group: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (N, G) of ``w``'s groups from their [min, max], shrunk by ``search_range`` when
    ``search`` (what RTN and GPTQ use when a group's scales are chosen)."""
    shrink = search_range(w, grid, group) if search else None
    return grid_params(w, grid, group, hi=shrink, lo=shrink)


def quantize_on_grid(
    w: torch.Tensor, fmt: QuantFormat, bit_balance: bool = False, search: bool = False
) -> QTensor:
    """Round-to-nearest on the format's grid (equal to ``quantize_rtn`` for plain formats); ``search``: each
    group's range is first shrunk by ``search_range``."""
    grid = grid_for(fmt, bit_balance)
    group = effective_group(fmt, w.shape[1])
    scales, zeros = range_params(w.detach(), grid, group, search)
    return to_qtensor(w.detach(), scales, zeros, grid, group)
