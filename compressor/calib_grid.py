"""Integer grids of the weight formats, as pure (differentiable where needed) tensor functions.

A :class:`Grid` says which codes a format may use and how its scales and zero points follow from a group's
range. Plain formats use every code of ``bits`` bits; RTN's ranges may first be shrunk by a data-free
search (``search_range``). ABQ-LLM's balanced 2-bit format W2* uses the symmetric 5-level grid
{-2, -1, 0, 1, 2} * s: it needs 3-bit codes (zero point 4, codes 2..6), which lower as a 2-bit plane plus a
1-bit plane. ``rtn``, ``gptq`` and ``abq`` all quantize
through these functions, so their codes always satisfy ``dequant = (codes - zero_point) * scale`` exactly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
    if fmt.symmetric:
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


# Data-free range search (GPTQ's reference quantizer with mse=True, searched coarse to fine): per group, the
# shrink of the range on the lattice 1.0, 0.975, ..., 0.75 whose dequantized weights have the lowest squared
# error: 3 shrinks 0.1 apart, then +-0.05 and +-0.025 around the best (7 evaluations instead of 11). On
# mix-llama-14m (RTN, ONNX Runtime perplexity, WikiText-2 / Shakespeare tail) W4 goes 535.6 / 51.1 ->
# 525.9 / 49.7 and W2 2445 / 309 -> 1247 / 154 (bench/weight_range.py, docs/results/speed.md).
RANGE_COARSE = (1.0, 0.9, 0.8)
RANGE_REFINE = (0.05, 0.025)
RANGE_MIN = 0.75
RANGE_CHUNK = 1 << 18  # elements searched at a time: the temporaries stay in cache


@contextmanager
def one_thread():
    """Run small elementwise torch ops on the calling thread: on a busy host, torch's intra-op threads spend
    most of such an op waiting for a descheduled sibling (quantize_on_grid parallelises over rows instead)."""
    threads = torch.get_num_threads()
    if threads == 1:  # nothing to change (and nothing to restore from a worker thread)
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def search_range(w: torch.Tensor, grid: Grid, group: int) -> torch.Tensor:
    """Per-group range shrink (N, G) minimising the weight's squared error on ``grid`` (no data)."""
    rows_per = max(1, RANGE_CHUNK // w.shape[1])
    with one_thread():  # a chunk at a time: a bf16 head is never upcast whole
        return torch.cat(
            [_search_chunk(group_view(r.float(), group), grid) for r in w.detach().split(rows_per)]
        )


def _search_chunk(g: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``search_range`` of the groups g (N, G, group)."""
    if grid.symmetric:
        span, zero = g.abs().amax(-1, keepdim=True) / grid.steps, float(grid.zero)
    else:
        low, high = torch.aminmax(g, dim=-1, keepdim=True)
        span = (high.clamp(min=0) - low.clamp(max=0)) / grid.qmax
        zero = torch.round(-low.clamp(max=0) / span.clamp(min=1e-8)).clamp_(0, grid.qmax)
    q = torch.empty_like(g)

    def error(shrink: torch.Tensor) -> torch.Tensor:
        s = (span * shrink).clamp_(min=1e-8)
        torch.div(g, s, out=q)
        q.round_().add_(zero).clamp_(grid.qmin, grid.qmax).sub_(zero).mul_(s).sub_(g)
        return torch.linalg.vector_norm(q, dim=-1, keepdim=True)

    best = torch.ones_like(span)
    best_err = error(best)
    for stage in range(1 + len(RANGE_REFINE)):
        if stage == 0:
            candidates = [torch.full_like(span, p) for p in RANGE_COARSE[1:]]
        else:  # both ways from the previous stage's best
            d = RANGE_REFINE[stage - 1]
            candidates = [(best + d).clamp(RANGE_MIN, 1.0), (best - d).clamp(RANGE_MIN, 1.0)]
        for shrink in candidates:
            err = error(shrink)
            better = err < best_err
            best = torch.where(better, shrink, best)
            best_err = torch.where(better, err, best_err)
    return best.squeeze(-1)


def range_params(w: torch.Tensor, grid: Grid, group: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (N, G) of ``w``'s groups from their [min, max], shrunk by ``search_range`` when
    ``search`` (what RTN and GPTQ use when a group's scales are chosen)."""
    shrink = search_range(w, grid, group) if search else None
    return grid_params(w, grid, group, hi=shrink, lo=shrink)


def quantize_on_grid(
    w: torch.Tensor, fmt: QuantFormat, bit_balance: bool = False, search: bool = False
) -> QTensor:
    """Round-to-nearest on the format's grid (what method "rtn" stores); ``search``: each group's range is first
    shrunk by ``search_range``. Blocks of rows go to a pool of torch's intra-op thread count, each running its
    torch ops on one thread: the rows are independent, and no op waits for a sibling thread (see one_thread)."""
    grid = grid_for(fmt, bit_balance)
    group = effective_group(fmt, w.shape[1])
    workers = torch.get_num_threads()

    def rows(block: torch.Tensor) -> QTensor:
        block = block.float()
        scales, zeros = range_params(block, grid, group, search)
        return to_qtensor(block, scales, zeros, grid, group)

    blocks = w.detach().split(max(1, RANGE_CHUNK // w.shape[1]))
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(rows, blocks))
    return QTensor(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.zero_points for p in parts]),
        grid.bits,
        group,
    )
