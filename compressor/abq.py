"""ABQ-LLM block-wise calibration (Zeng et al., 2024), registered as quantization method ``"abq"``.

Blocks are calibrated in order. For each block the quantizer learns per-group weight clipping (OmniQuant's
learnable weight clipping) and, when activations are quantized (``abits=8``), per-channel smoothing scales
between each norm and the linears it feeds (SmoothQuant/OmniQuant-LET style: ``x / s`` and ``W * s``, folded
into the norm weight and the quantized weight afterwards). With ``rounding`` (the default) it also learns a
per-weight offset, in units of the quantization step, added before rounding (the weight-rounding freedom
GPTQ exploits, learned here against the block loss as in AdaRound/EfficientQAT; ``rounding=False`` is the
paper's clipping-and-smoothing-only variant). Rounding uses straight-through gradients. The loss is ABQ's
distribution correction against the full-precision block ``F``, with ``X`` the full-precision model's block
input and ``X_q`` the quantized model's:

    mse(Fq(X), F(X)) + mse(Fq(X_q), F(X)) + cos(Fq(X), F(X)) + cos(Fq(X_q), F(X))
        + symKL(A(X), Aq(X)) + symKL(A(X), Aq(X_q))

with ``mse`` relative to the target's mean square (so every depth weighs alike), ``cos`` one minus the
per-token cosine similarity and ``A`` the attention probabilities (eager attention only).

Folding: a weight shared by several depth positions is calibrated once, at its first position, on samples
from every position that uses it (later positions contribute their full-precision inputs and targets; their
quantized-model inputs do not exist yet). Smoothing is skipped for norm groups whose linears are shared, or
whose norm weight is shared, so a folded scale never has to fit two norms.

The tied lm_head (it is also the input embedding) is calibrated first, against the full-precision logits,
so that the quantized stream through the blocks starts from the quantized embedding.

Options (``QuantConfig.options``): ``epochs``, ``lr``, ``rounding``, ``round_lr``, the regularisers
``clip_min``, ``round_bound`` and ``holdout`` (all off by default: in the cross-domain table they cost
mix-llama-14m quality off the calibration domain, docs/results/generalization.md), plus the common
``n_samples``, ``seq_len``, ``batch_size``, ``bit_balance``, ``seed``. With ``abits=8``, ``quantize`` rewrites
the smoothed norm weights in place; the returned codes belong with those norms.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from edgepack.compressor.calib_blocks import (
    BlockPlan,
    CalibOptions,
    Swaps,
    frozen_parameters,
    plan_blocks,
    record_attention,
    require_calibration,
    run_layer,
    tied_embedding,
    trace_inputs,
)
from edgepack.compressor.calib_grid import (
    Grid,
    fake_quant,
    grid_for,
    grid_params,
    search_range,
    to_qtensor,
)
from edgepack.compressor.quantize import (
    LinearSite,
    QTensor,
    QuantConfig,
    activation_block,
    effective_group,
    fake_quant_activations,
    register_method,
    rtn_tensor,
)
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

CLIP_INIT = 4.0  # sigmoid(4) = 0.98: start near round-to-nearest (OmniQuant's initialisation)


@dataclass(frozen=True)
class ABQOptions(CalibOptions):
    batch_size: int = 2  # samples per optimizer step
    epochs: int = 3
    lr: float = 0.1  # Adam step on the clipping logits and log smoothing scales
    rounding: bool = True  # also learn per-weight rounding offsets
    round_lr: float = 0.01  # Adam step on the offsets, in units of the quantization step
    round_bound: float = 0.0  # > 0: offsets bounded to +-round_bound steps (bound * tanh); 0 = unbounded
    clip_min: float = 0.0  # > 0: learned clipping keeps at least this fraction of each group's range
    holdout: float = 0.0  # fraction of each block's batches held out; stop (and keep the best) when it rises


# Calibration cost grows with parameters x samples x epochs. Measured on this project's 2-core host (loaded, load
# average ~7): Qwen2.5-0.5B's shape, 4 samples x 1 epoch, ~17 s per block and ~110 s of head + tracing, i.e.
# ~127 s per sample-epoch at 494M parameters (docs/results/scale.md). This budget of parameter-sample-epochs
# keeps a default ABQ run near 35 minutes there, under the 60-minute goal; smaller models keep the full defaults.
COST_BUDGET = 9e9


def size_defaults(parameters: int, budget: float | None = None) -> dict:
    """``n_samples`` / ``epochs`` for a model of ``parameters`` when the user set neither ({} below the budget:
    the class defaults, 64 samples x 3 epochs)."""
    full = ABQOptions.n_samples * ABQOptions.epochs
    sample_epochs = int((COST_BUDGET if budget is None else budget) // max(1, parameters))
    if sample_epochs >= full:
        return {}
    epochs = 3 if sample_epochs >= 48 else 2 if sample_epochs >= 8 else 1
    n = max(ABQOptions.batch_size, sample_epochs // epochs)
    return {"n_samples": n - n % ABQOptions.batch_size, "epochs": epochs}


# ---------------------------------------------------------------- pure math


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error divided by the target's mean square."""
    target = target.float()
    return (pred.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One minus the mean cosine similarity over the last dimension."""
    return 1 - nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(p||q) + KL(q||p) of probability rows (last dimension), averaged over rows."""
    p, q = p.float(), q.float()
    return ((p - q) * ((p + eps).log() - (q + eps).log())).sum(-1).mean()


def dlc_loss(
    target: torch.Tensor,
    outputs: list[torch.Tensor],
    target_maps: torch.Tensor | None = None,
    maps: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """ABQ's distribution-correction loss of quantized ``outputs`` (one per input stream) against ``target``."""
    loss = sum(relative_mse(y, target) + cosine_distance(y, target) for y in outputs)
    if target_maps is not None and maps:
        loss = loss + sum(symmetric_kl(target_maps, a) for a in maps)
    return loss


def fake_quant_activations_ste(x: torch.Tensor, block: int) -> torch.Tensor:
    """Int8 per-token fake quantization of activations with a straight-through gradient."""
    return x + (fake_quant_activations(x, block) - x).detach()


class LearnableQuant(nn.Module):
    """A linear under calibration: learnable per-group clipping, optional smoothing, optional int8 inputs."""

    def __init__(
        self,
        linear: nn.Linear,
        grid: Grid,
        group: int,
        abits: int,
        smooth: nn.Parameter | None,
        rounding: bool = False,
        round_bound: float = 0.0,
        clip_min: float = 0.0,
        search: bool = False,
    ):
        super().__init__()
        n, k = linear.weight.shape
        self.grid, self.group, self.abits = grid, group, abits
        self.round_bound, self.clip_min = round_bound, clip_min
        self.act_block = activation_block(group, k)
        self.register_buffer("w", linear.weight.detach().float())
        step = grid_params(self.w, grid, group)[0]  # (N, G): round-to-nearest step, the unit of the offsets
        self.register_buffer("step", step.repeat_interleave(group, 1)[:, :k])
        self.offset = nn.Parameter(torch.zeros_like(self.w)) if rounding else None
        self.bias = None if linear.bias is None else linear.bias.detach()
        shape = (n, -(-k // group))
        device = linear.weight.device
        init = torch.full(shape, CLIP_INIT, device=device)
        if search:  # start from RTN's searched range (weight_range "mse"), not from the full one
            kept = (search_range(self.w, grid, group) - clip_min) / (1 - clip_min)
            init = torch.logit(kept.clamp(1e-4, 1 - 1e-4)).clamp(max=CLIP_INIT)
        self.hi = nn.Parameter(init.clone())
        self.lo = None if grid.symmetric else nn.Parameter(init.clone())
        self.log_smooth = smooth  # (K,) log of the smoothing scales, shared by every linear of a norm group

    def target_weight(self) -> torch.Tensor:
        """The weight to be quantized: (W + offset * step) * s along K (offsets when learning rounding)."""
        w = self.w if self.offset is None else self.w + self.rounding_offset() * self.step
        return w if self.log_smooth is None else w * self.log_smooth.exp().unsqueeze(0)

    def rounding_offset(self) -> torch.Tensor:
        """The learned offset in quantization steps, squashed into +-round_bound when bounded."""
        if self.round_bound > 0:
            return self.round_bound * torch.tanh(self.offset / self.round_bound)
        return self.offset

    def clip(self, logit: torch.Tensor) -> torch.Tensor:
        """Fraction of the group range kept: sigmoid, floored at ``clip_min``."""
        return self.clip_min + (1 - self.clip_min) * torch.sigmoid(logit)

    def grid_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = None if self.lo is None else self.clip(self.lo)
        return grid_params(self.target_weight(), self.grid, self.group, self.clip(self.hi), lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_smooth is not None:
            x = x / self.log_smooth.exp().to(x.dtype)
        if self.abits == 8:
            x = fake_quant_activations_ste(x, self.act_block)
        scales, zeros = self.grid_params()
        w = fake_quant(self.target_weight(), scales, zeros, self.grid, self.group)
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self) -> QTensor:
        """The learned quantization as codes (exactly what ``forward`` computed)."""
        scales, zeros = self.grid_params()
        return to_qtensor(self.target_weight(), scales, zeros, self.grid, self.group)


# ---------------------------------------------------------------- orchestration


def split_holdout(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of ``n`` batches; held out: ``holdout`` of them, none unless 2+ batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(max(int(round(holdout * n)), 1 if holdout > 0 else 0), n - 1)
    return order[k:], order[:k]


def _train(
    modules: list[LearnableQuant], steps: list[Callable[[], torch.Tensor]], opts: ABQOptions
) -> tuple[float, float]:
    """Adam on the modules' parameters over the loss closures ``steps``; mean loss of the (first, last) epoch.

    With ``opts.holdout`` some closures are only evaluated, after every epoch: training stops when their
    loss no longer falls, and the parameters of the best epoch are kept (early stopping)."""
    train, held = split_holdout(len(steps), opts.holdout, opts.seed)
    params = list({id(p): p for m in modules for p in m.parameters()}.values())  # shared smoothing once
    offsets = {id(m.offset) for m in modules if m.offset is not None}
    groups = [{"params": [p for p in params if id(p) not in offsets]}]
    if offsets:
        groups.append({"params": [p for p in params if id(p) in offsets], "lr": opts.round_lr})
    optimizer = torch.optim.Adam(groups, lr=opts.lr)
    order = torch.Generator().manual_seed(opts.seed)
    first = last = math.nan
    best, best_state = _held_loss(steps, held), [p.detach().clone() for p in params]
    for epoch in range(opts.epochs):
        total = 0.0
        for j in torch.randperm(len(train), generator=order).tolist():
            loss = steps[train[j]]()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        last = total / len(train)
        first = last if epoch == 0 else first
        if held:
            now = _held_loss(steps, held)
            if now >= best:
                log.info(
                    "abq: held-out loss %.4g >= best %.4g after epoch %d; keeping the best", now, best, epoch
                )
                break
            best, best_state = now, [p.detach().clone() for p in params]
    if held:
        with torch.no_grad():
            for p, saved in zip(params, best_state, strict=True):
                p.copy_(saved)
    return first, last


def _held_loss(steps: list[Callable[[], torch.Tensor]], held: list[int]) -> float:
    """Mean loss of the held-out closures (no gradients); inf when nothing is held out."""
    if not held:
        return math.inf
    with torch.no_grad():
        return sum(steps[i]().item() for i in held) / len(held)


def _smooth_groups(
    model: nn.Module, plan: BlockPlan, index: int, by_use: dict[str, LinearSite]
) -> list[tuple[nn.Module, list[LinearSite]]]:
    """(norm, sites) pairs of block ``index`` that may be smoothed: every linear a site used only here."""
    layer = plan.layers[index]
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    groups = []
    for norm_name, linear_names in plan.family.smooth_groups:  # norm -> the linears it feeds
        norm = getattr(layer, norm_name, None)
        sites = [by_use.get(f"{plan.prefix}.{index}.{name}") for name in linear_names]
        if norm is None or getattr(norm, "weight", None) is None or None in sites:
            continue
        if counts[id(norm.weight)] > 1 or any(plan.positions[s.name] != [index] for s in sites):
            log.info("abq: no smoothing for %s.%d.%s (shared by folding)", plan.prefix, index, norm_name)
            continue
        groups.append((norm, sites))
    return groups


def _calibrate_head(
    site: LinearSite, inputs: list[torch.Tensor], config: QuantConfig, opts: ABQOptions
) -> tuple[QTensor, float, float]:
    """Learn the head's clipping against the full-precision logits."""
    w = site.module.weight
    grid = grid_for(site.fmt, opts.bit_balance)
    module = LearnableQuant(
        site.module,
        grid,
        effective_group(site.fmt, w.shape[1]),
        config.abits,
        None,
        opts.rounding,
        opts.round_bound,
        opts.clip_min,
        config.weight_range == "mse",
    )
    w_fp, bias = w.detach(), site.module.bias

    def step(x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: dlc_loss(nn.functional.linear(x, w_fp, bias), [module(x)])

    with torch.enable_grad():
        first, last = _train([module], [step(x) for x in inputs], opts)
    return module.freeze(), first, last


def stacked_kwargs(kwargs: dict, batch: int) -> dict:
    """Layer keyword arguments for two stacked copies of a batch (tensors with a batch dimension repeat)."""

    def stack(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return torch.cat([v, v])
        if isinstance(v, tuple):
            return tuple(stack(u) for u in v)
        return v

    return {k: stack(v) for k, v in kwargs.items()}


def _block_steps(
    layer: nn.Module,
    kwargs: list[dict],
    x_fp: list[torch.Tensor],
    x_q: list[torch.Tensor] | None,
    attention: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[Callable[[], torch.Tensor]]]:
    """Full-precision targets and attention maps of ``layer`` (as currently installed) and loss closures.

    Call with the full-precision weights installed; the closures run whatever is installed when called.
    """
    targets, target_maps = [], []
    with torch.no_grad():
        for x, kw in zip(x_fp, kwargs, strict=True):
            with record_attention(layer, attention) as maps:
                targets.append(run_layer(layer, x, kw))
            target_maps.append(maps[0] if maps else None)

    def step(b: int) -> Callable[[], torch.Tensor]:
        # Both input streams go through the block as one batch: one weight fake-quantization per step.
        x = x_fp[b] if x_q is None else torch.cat([x_fp[b], x_q[b]])
        kw = kwargs[b] if x_q is None else stacked_kwargs(kwargs[b], len(x_fp[b]))

        def fn() -> torch.Tensor:
            with record_attention(layer, attention) as maps:
                y = run_layer(layer, x, kw)
            n = 1 if x_q is None else 2
            return dlc_loss(
                targets[b], list(y.chunk(n)), target_maps[b], [a for m in maps for a in m.chunk(n)]
            )

        return fn

    return targets, target_maps, [step(b) for b in range(len(x_fp))]


@register_method("abq")
@torch.no_grad()
def abq_method(
    model: nn.Module, sites: list[LinearSite], config: QuantConfig, calib_ids: torch.Tensor | None
) -> dict[str, QTensor]:
    """ABQ-LLM calibration of every site: the tied head first, then the decoder blocks in order."""
    opts = ABQOptions.from_options(config.options, "abq")
    ids = require_calibration(calib_ids, "abq")
    plan = plan_blocks(model, sites)
    out: dict[str, QTensor] = {s.name: rtn_tensor(s, config) for s in plan.other}
    by_use = {full: s for s in sites for _, _, full in s.uses}
    swaps = Swaps()
    with frozen_parameters(model):
        try:
            trace = trace_inputs(model, plan.layers, ids, opts.batch_size, head=model.get_output_embeddings())
            x_fp, x_q = trace.hidden, trace.hidden
            if plan.head is not None:
                q, first, last = _calibrate_head(plan.head, trace.head_inputs, config, opts)
                log.info("abq %s: loss %.4g -> %.4g", plan.head.name, first, last)
                out[plan.head.name] = q
                qlin = swaps.quantized(plan.head, q, config.abits)
                emb = tied_embedding(model, plan.head)
                if emb is not None:
                    swaps.embedding(emb, qlin.weight)
                    x_q = trace_inputs(model, plan.layers, ids, opts.batch_size, first_only=True).hidden
            bar = tqdm(range(len(plan.layers)), desc="abq", unit="block")
            for i in bar:
                layer = plan.layers[i]
                kwargs = [kw[i] for kw in trace.layer_kwargs]
                used_here = [s for s in sites if i in plan.positions[s.name]]
                with swaps.originals(used_here):
                    y_fp, _, steps = _block_steps(layer, kwargs, x_fp, x_q, plan.family.attention)
                if plan.owned[i]:
                    steps += _later_steps(plan, i, sites, swaps, y_fp, trace.layer_kwargs)
                    first, last = _calibrate_block(model, plan, i, by_use, steps, swaps, config, opts, out)
                    log.info("abq block %d: loss %.4g -> %.4g", i, first, last)
                    bar.set_postfix(loss=f"{last:.4g}")
                x_q = [run_layer(layer, x, kw) for x, kw in zip(x_q, kwargs, strict=True)]
                x_fp = y_fp
        finally:
            swaps.restore()
    return out


def _later_steps(
    plan: BlockPlan,
    index: int,
    sites: list[LinearSite],
    swaps: Swaps,
    y_fp: list[torch.Tensor],
    layer_kwargs: list[list[dict]],
) -> list[Callable[[], torch.Tensor]]:
    """Loss closures at later positions that share block ``index``'s weights (full-precision inputs only)."""
    later = sorted({p for s in plan.owned[index] for p in plan.positions[s.name] if p > index})
    steps: list[Callable[[], torch.Tensor]] = []
    x = y_fp
    for j in range(index + 1, (later[-1] + 1) if later else index + 1):
        kwargs = [kw[j] for kw in layer_kwargs]
        with swaps.originals([s for s in sites if j in plan.positions[s.name]]):
            x_next, _, more = _block_steps(plan.layers[j], kwargs, x, None, plan.family.attention)
        if j in later:
            steps += more
        x = x_next
    return steps


def _calibrate_block(
    model: nn.Module,
    plan: BlockPlan,
    index: int,
    by_use: dict[str, LinearSite],
    steps: list[Callable[[], torch.Tensor]],
    swaps: Swaps,
    config: QuantConfig,
    opts: ABQOptions,
    out: dict[str, QTensor],
) -> tuple[float, float]:
    """Install learnable quantizers for the block's own sites, train them, freeze codes, fold smoothing."""
    groups = _smooth_groups(model, plan, index, by_use) if config.abits == 8 else []
    smooth_of: dict[str, nn.Parameter] = {}
    for norm, group_sites in groups:
        log_s = nn.Parameter(torch.zeros_like(norm.weight, dtype=torch.float32))
        smooth_of.update({s.name: log_s for s in group_sites})
    modules: dict[str, LearnableQuant] = {}
    for site in plan.owned[index]:
        w = site.module.weight
        modules[site.name] = LearnableQuant(
            site.module,
            grid_for(site.fmt, opts.bit_balance),
            effective_group(site.fmt, w.shape[1]),
            config.abits,
            smooth_of.get(site.name),
            opts.rounding,
            opts.round_bound,
            opts.clip_min,
            config.weight_range == "mse",
        )
        swaps.set(site, modules[site.name])
    with torch.enable_grad():
        first, last = _train(list(modules.values()), steps, opts)
    for site in plan.owned[index]:
        out[site.name] = modules[site.name].freeze()
        swaps.quantized(site, out[site.name], config.abits)
    offset = plan.family.norm_offset  # the norm scales by (offset + w): fold 1 / s into that
    for norm, group_sites in groups:
        scale = smooth_of[group_sites[0].name].detach().exp().to(norm.weight.dtype)
        norm.weight.data.add_(offset).div_(scale).sub_(offset)
    return first, last
