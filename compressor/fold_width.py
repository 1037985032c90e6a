"""The fold's width structure: the unique block parameters a removal of whole blocks would save, taken from the
width of every block's MLP instead of from depth (FLAP / Minitron-style channel pruning).

Each MLP channel owns a row of gate_proj and up_proj and a column of down_proj. Per block, channels are removed
one at a time by greedy Optimal Brain Surgeon over down_proj's input columns (SlimGPT / ZipLM): each time the
channel whose loss, with the rest of down_proj refitted, adds least squared error to the block's original MLP
output on calibration text. (``select="energy"``, round 14's rule, drops the channels of least output energy,
mean squared activation x squared down_proj column norm, one by one, blind to channels that stand in for each
other.) down_proj over the kept channels is then refitted by ridge least squares to the original block's MLP
output, on the original model's activations, and the fold's cure runs as for a removal. Depth, the KV cache and
the op graph stay the original's; every block keeps the same, smaller ``intermediate_size``.

Measured on mix-llama-14m (docs/results/generalization.md, rounds 14-15): at the parameters of 3 of 12 blocks,
with channels chosen on the model's own samples, it lands closer to the float model than BI removal off the
cure's domain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from edgepack.compressor.calib_blocks import _Stop
from edgepack.compressor.fold_hooks import decoder_layers
from edgepack.compressor.fold_importance import batches
from torch import nn

from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

CHANNEL_MULTIPLE = 32  # kept channels round to this (8 below 256 channels): whole kernel blocks, no K padding
RIDGE = 1e-3  # the refit's ridge, relative to the mean diagonal of the activations' Gram matrix


@dataclass
class WidthPlan:
    """How many MLP channels every block keeps, and the unique block parameters before folding."""

    channels: int
    kept: int
    params_before: int


def mlp_of(layer: nn.Module) -> nn.Module:
    """A block's gated MLP (gate_proj / up_proj / down_proj), or a one-line error naming the family's gap."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(
        isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    ):
        raise EdgepackError(
            f"{type(layer).__name__} has no gated MLP with gate_proj/up_proj/down_proj; width folding needs one "
            "(use --fold-structure blocks)"
        )
    return mlp


def plan_width(layers: nn.ModuleList, hidden: int, removed_blocks: int) -> WidthPlan:
    """Kept channels per block so the blocks lose the parameters of ``removed_blocks`` whole blocks, rounded to
    ``CHANNEL_MULTIPLE`` (8 for MLPs under 256 channels)."""
    from edgepack.compressor.fold import unique_parameter_count

    n = len(layers)
    channels = mlp_of(layers[0]).down_proj.in_features
    if any(mlp_of(layer).down_proj.in_features != channels for layer in layers):
        raise EdgepackError("the blocks' MLPs differ in width; width folding needs one intermediate size")
    before = unique_parameter_count(layers)
    per_channel = 3 * hidden + sum(
        0 if getattr(mlp_of(layers[0]), name).bias is None else 1 for name in ("gate_proj", "up_proj")
    )
    exact = channels - removed_blocks * before / n / n / per_channel
    multiple = CHANNEL_MULTIPLE if channels >= 256 else 8
    kept = int(min(channels, max(multiple, round(exact / multiple) * multiple)))
    return WidthPlan(channels, kept, before)


@torch.no_grad()
def channel_energy(model: nn.Module, ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per block, each MLP channel's output energy on ``ids``: mean squared activation (the input of down_proj)
    times the squared norm of its down_proj column."""
    layers = decoder_layers(model)
    sums = [None] * len(layers)
    count = [0]

    def hook(i):
        def run(module, args):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[i] = a.pow(2).sum(0) if sums[i] is None else sums[i] + a.pow(2).sum(0)
            if i == 0:
                count[0] += len(a)

        return run

    handles = [mlp_of(layer).down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for x in batches(ids, batch_size, next(model.parameters()).device):
            model(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [
        (s / count[0]) * mlp_of(layer).down_proj.weight.detach().double().pow(2).sum(0)
        for s, layer in zip(sums, layers, strict=True)
    ]


def _sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of ``linear`` keeping ``index`` of its outputs (dim 0) or of its inputs (dim 1)."""
    w = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        bias = linear.bias.detach()
        out.bias.data.copy_(bias if dim == 1 else bias[index.to(bias.device)])
    return out


# down_proj refitted on the original's activations, on the pruned model's, or not at all
REFITS = ("original", "pruned", "none")
# how a block's channels are chosen: least output energy each, or greedy least refit error (OBS, as SlimGPT/ZipLM)
SELECTS = ("energy", "obs")


@torch.no_grad()
def _block_io(model: nn.Module, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``block``'s down_proj when ``model`` runs ``x``, as (N, I) and (N, C) rows; the blocks
    after it are not run."""
    down = mlp_of(decoder_layers(model)[block]).down_proj
    got: list[torch.Tensor] = []

    def grab(module, args, out):
        got.extend((args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1])))
        raise _Stop

    handle = down.register_forward_hook(grab)
    try:
        model(input_ids=x, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0], got[1]


@torch.no_grad()
def _gram(teacher: nn.Module, block: int, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The Gram matrix (I, I) of ``block``'s down_proj input over ``ids``, in float64, run block by block so that
    only one block's matrix is ever held."""
    device = next(teacher.parameters()).device
    gram = None
    for x in batches(ids, batch_size, device):
        a = _block_io(teacher, block, x)[0].double().cpu()
        gram = a.T @ a if gram is None else gram + a.T @ a
    return gram


OBS_STEPS = 512  # at most this many greedy OBS steps per block: wider MLPs remove channels in chunks


@torch.no_grad()
def obs_keep(gram: torch.Tensor, weight: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` channels (sorted indices) left by greedy Optimal Brain Surgeon over whole input columns:
    each step removes the channel whose loss, with the rest of down_proj refitted, adds least squared error to
    the MLP output. ``gram``: (I, I) activations' Gram matrix; ``weight``: (C, I) down_proj weight. With a
    diagonal Gram matrix this is the energy rule; otherwise it accounts for channels that others can stand in
    for. Past ``OBS_STEPS`` removals, channels go in equal chunks, each chunk removed jointly."""
    k = gram.shape[0]
    ridge = RIDGE * torch.trace(gram) / k
    hinv = torch.linalg.inv(gram + ridge * torch.eye(k, dtype=gram.dtype))
    w = weight.detach().double().cpu().T.clone()  # (I, C): row j is channel j's output direction
    alive = torch.ones(k, dtype=torch.bool)
    remove = k - kept
    chunk = max(1, -(-remove // OBS_STEPS))
    while remove > 0:
        cost = torch.where(alive, w.pow(2).sum(1) / hinv.diagonal().clamp_min(1e-300), torch.inf)
        j = torch.topk(cost, min(chunk, remove), largest=False).indices
        cols = hinv[:, j] @ torch.linalg.inv(hinv[j][:, j])
        w -= cols @ w[j]  # the rest of down_proj refitted without j
        hinv -= cols @ hinv[j]  # the inverse Gram matrix of the channels left
        alive[j] = False
        remove -= len(j)
    return torch.nonzero(alive).flatten()


@torch.no_grad()
def _refit_down(
    student: nn.Module,
    teacher: nn.Module,
    block: int,
    keep: torch.Tensor,
    ids: torch.Tensor,
    batch_size: int,
    on: str = "original",
) -> float:
    """Refit ``student``'s block ``block`` down_proj (over the ``keep`` channels) by ridge least squares to the
    original MLP output of that block: on the original model's activations of those channels (``on="original"``),
    or on the activations of the student pruned so far (``"pruned"``). Returns the fit's R^2 (``"none"``: the
    R^2 of the sliced weights as they are, on the original's activations)."""
    down = mlp_of(decoder_layers(student)[block]).down_proj
    bias = mlp_of(decoder_layers(teacher)[block]).down_proj.bias
    device = next(teacher.parameters()).device
    k, c = len(keep), down.out_features
    gram = torch.zeros(k, k, dtype=torch.float64)
    cross = torch.zeros(k, c, dtype=torch.float64)
    y_sum = torch.zeros(c, dtype=torch.float64)
    y_sq, n = 0.0, 0
    for x in batches(ids, batch_size, device):
        a, y = _block_io(teacher, block, x)
        a = a.double().cpu()[:, keep.cpu()]
        if on == "pruned":
            a = _block_io(student, block, x)[0].double().cpu()
        y = y.double().cpu() - (0.0 if bias is None else bias.detach().double().cpu())
        gram += a.T @ a
        cross += a.T @ y
        y_sum += y.sum(0)
        y_sq += y.pow(2).sum().item()
        n += len(a)
    if on == "none":
        weight = down.weight.detach().double().cpu().T
    else:
        ridge = RIDGE * torch.trace(gram) / k
        weight = torch.linalg.solve(gram + ridge * torch.eye(k, dtype=gram.dtype), cross)  # (K, C)
        down.weight.data.copy_(weight.T.to(down.weight.dtype))
    # the fit's residual sum of squares from the same sufficient statistics
    rss = y_sq - 2 * (weight * cross).sum().item() + (weight * (gram @ weight)).sum().item()
    tss = y_sq - y_sum.pow(2).sum().item() / n
    return 1.0 - rss / tss if tss > 0 else 1.0


def fold_width(
    model: nn.Module,
    teacher: nn.Module,
    removed_blocks: int,
    channel_ids: torch.Tensor,
    batch_size: int,
    refit: str = "original",
    select: str = "obs",
) -> dict:
    """Prune every block's MLP to ``plan_width``'s channels (chosen on ``channel_ids``: the model's own samples by
    default), refitting each down_proj on ``channel_ids`` against ``teacher`` (the unpruned original), in place.
    Returns the report the manifest records."""
    if refit not in REFITS:
        raise EdgepackError(f"refit={refit!r} is unknown; choose one of {', '.join(REFITS)}")
    if select not in SELECTS:
        raise EdgepackError(f"select={select!r} is unknown; choose one of {', '.join(SELECTS)}")
    layers = decoder_layers(model)
    plan = plan_width(layers, model.config.hidden_size, removed_blocks)
    energy = channel_energy(teacher, channel_ids, batch_size)
    per_block = []
    for i, layer in enumerate(layers):
        mlp = mlp_of(layer)
        if select == "obs":
            keep = obs_keep(_gram(teacher, i, channel_ids, batch_size), mlp.down_proj.weight, plan.kept)
        else:
            keep = torch.sort(torch.topk(energy[i], plan.kept).indices).values
        mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, keep, 0), _sliced(mlp.up_proj, keep, 0)
        mlp.down_proj = _sliced(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = plan.kept
        r2 = _refit_down(model, teacher, i, keep, channel_ids, batch_size, refit)
        per_block.append(
            {
                "energy_kept": round((energy[i][keep].sum() / energy[i].sum()).item(), 4),
                "refit_r2": round(r2, 4),
            }
        )
        log.info(
            "fold: block %d MLP %d -> %d channels, energy kept %.3f, refit R^2 %.3f",
            i,
            plan.channels,
            plan.kept,
            per_block[-1]["energy_kept"],
            r2,
        )
    model.config.intermediate_size = plan.kept
    return {
        "structure": "mlp-width",
        "channels_before": plan.channels,
        "channels_after": plan.kept,
        # the unique block parameters a removal of ``removed_blocks`` blocks keeps, for comparison
        "block_params_of_removal": plan.params_before * (len(layers) - removed_blocks) // len(layers),
        "per_block": per_block,
        "channel_samples": len(channel_ids),
        "refit": refit,
        "select": select,
    }
