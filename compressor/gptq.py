"""GPTQ (Frantar et al., 2022) in pure PyTorch, registered as quantization method ``"gptq"``.

Each linear weight is quantized column by column; the rounding error of a column is spread onto the columns
not yet quantized through the inverse Hessian ``H = 2 X X^T / n`` of the layer's calibration inputs. Blocks
are processed in order on the inputs of the already-quantized model, and inside a block in stages of
linears that read the same input (q/k/v, then o, then gate/up, then down), so every stage sees the
quantized outputs of the stages before it.

Options (``QuantConfig.options``): ``damp`` (dampening, fraction of the mean Hessian diagonal; 0.1 by
default), ``act_order`` (quantize columns by decreasing Hessian diagonal, with static groups; on by default),
``block_size`` (lazy-batch width),
``head`` ("rtn", the default, or "gptq" for the tied lm_head/embedding: GPTQ fits the head's error to the
calibration hidden states while the same codes also serve as input embeddings; on mix-llama-14m's 8192-token
tied head RTN generalizes better, on stories260k's 512-token one GPTQ does; the head is stored at
``QuantConfig.head_bits``), ``head_damp``, ``choose`` (on by default: every 4th calibration
sample of each batch is held out; per site, GPTQ fit on the others is compared with RTN by the output error
on the held-out inputs, ``sum (dW H_held dW^T) / tokens``, and the lower one wins; a GPTQ win is re-run on
every sample; the decision and both errors are recorded per layer in the quantize report, i.e. the manifest's
``compression.quantize.layers[].calibration``), plus the common ``n_samples``, ``seq_len``, ``batch_size``,
``bit_balance``, ``seed``. ``QuantConfig.weight_range`` applies as in RTN: "mse" (default) shrinks each group's
range by ``calib_grid.search_range`` when its scales are chosen (on the error-updated columns; up front for
act-order's static groups), and every RTN path here (the head by RTN, the per-site alternative, unplanned
sites) is ``quantize.rtn_tensor``. Measurements: docs/results/generalization.md, docs/results/cross_domain.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from edgepack.compressor.calib_blocks import (
    BlockPlan,
    CalibOptions,
    Swaps,
    plan_blocks,
    require_calibration,
    run_layer,
    tied_embedding,
    trace_inputs,
)
from edgepack.compressor.calib_grid import Grid, grid_for, range_params
from edgepack.compressor.quantize import (
    LinearSite,
    QTensor,
    QuantConfig,
    effective_group,
    register_method,
    rtn_tensor,
)
from torch import nn
from tqdm import tqdm

from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

HEAD_MODES = ("gptq", "rtn")
HOLDOUT_EVERY = 4  # with ``choose``, every 4th calibration sample of each batch is held out
MIN_TOKENS_PER_INPUT = 16  # calibration tokens per input feature below which the Hessian is poorly estimated


@dataclass(frozen=True)
class GPTQOptions(CalibOptions):
    # Round 5 of docs/results/generalization.md, on the sources the defaults calibrate on (text + self@1.6,
    # self@1.6): damp 0.1 with act-order (static groups: each shrunk range is fixed before GPTQ's updates move
    # the weights) is <= RTN's searched ranges in 36 of 36 cells (W3 g128 / W4 g128 / W4 g64 x 3 sources x 2
    # texts x 2 models) and closer to fp32 than damp 1.0 without act-order in 33 of 48 (W2* g64 included); on a
    # second draw of the samples (W3, W4 g64) <= RTN in 24 of 24 and closer in 14 of 24 (W3 gains, W4 a wash).
    # Round 3, calibrated on each text alone and on self text at T=1.0, had found the opposite (30 vs 33 of 36).
    damp: float = 0.1
    act_order: bool = True
    block_size: int = 128
    head: str = "rtn"  # the tied lm_head/embedding: "rtn" or "gptq" (on final hidden states)
    head_damp: float | None = None  # dampening of a *tied* head (None: ``damp``); see gptq_method
    choose: bool = True  # per site, keep GPTQ's or RTN's codes by the output error on held-out samples


# ---------------------------------------------------------------- pure math


def accumulate_hessian(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Add the inputs ``x`` (..., K) of one call to the running sum ``h`` (K, K) of x^T x (float32)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return h.addmm_(x.t(), x)


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening; increases the damping if H is not positive definite."""
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h + eye * damp * mean_diag * 10**attempt)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True)
    raise EdgepackError(
        "GPTQ Hessian is not positive definite even with strong damping; use more calibration text"
    )


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    group: int,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    search: bool = False,
) -> tuple[QTensor, float]:
    """GPTQ of weight (N, K) given the summed input Hessian (K, K); returns the QTensor and the proxy error.

    Group scales are chosen on the fly from the error-updated weights when a group's first column is reached.
    With ``act_order`` the columns go in order of decreasing Hessian diagonal; groups must stay contiguous in K
    (the MatMulNBits layout has no column permutation), so their scales are then fixed from the unmodified
    weight up front (AutoGPTQ's ``static_groups``). ``search``: each group's range is shrunk by
    ``search_range`` on those same weights (the reference quantizer's ``mse=True``; no data).
    """
    n, k = w.shape
    wq = w.detach().clone().float()
    h = h.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    wq[:, dead] = 0
    n_groups = -(-k // group)
    scales = torch.zeros(n, n_groups, device=w.device)
    zeros = torch.zeros(n, n_groups, device=w.device)
    perm = torch.arange(k, device=w.device)
    if act_order:
        scales, zeros = range_params(wq, grid, group, search)
        perm = torch.argsort(torch.diag(h), descending=True)
        wq, h = wq[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_factor(h, damp)
    order = perm.tolist()
    codes = torch.zeros_like(wq)  # (N, K) in processing order
    error = torch.zeros((), device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wq[:, i1:i2].clone()  # (N, B): updated as columns of this lazy batch are quantized
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // group
            if not act_order and col % group == 0:
                # Every pending update has reached columns col.. (groups start on lazy-batch boundaries or
                # inside one), so the group's current values give its range.
                current = torch.cat([w1[:, i:], wq[:, i2:]], 1)[:, :group]
                s, z = range_params(current, grid, group, search)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, g], zeros[:, g]
            x = w1[:, i]
            q = (torch.round(x / s) + z).clamp(grid.qmin, grid.qmax)
            dq = (q - z) * s
            codes[:, i1 + i] = q
            d = hinv1[i, i]
            e = (x - dq) / d
            error += (e**2).sum() / 2
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        wq[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    ordered = torch.empty_like(codes)
    ordered[:, perm] = codes
    q = QTensor(ordered.to(torch.uint8), scales.float(), zeros.to(torch.uint8), grid.bits, group)
    return q, float(error)


# ---------------------------------------------------------------- orchestration


def _use_modules(sites: list[LinearSite]) -> dict[int, tuple[nn.Module, LinearSite]]:
    """The distinct modules at the sites' uses (folded positions may hold separate Linear objects)."""
    return {id(getattr(p, a)): (getattr(p, a), s) for s in sites for p, a, _ in s.uses}


@torch.no_grad()
def block_stages(
    layer: nn.Module, sites: list[LinearSite], hidden: torch.Tensor, kwargs: dict
) -> list[list[LinearSite]]:
    """Group a block's sites into stages of consecutive calls that read the same input tensor."""
    calls: list[tuple[LinearSite, torch.Tensor]] = []  # keeps the inputs alive, so identity is meaningful
    handles = [
        m.register_forward_pre_hook(lambda mod, args, s=s: calls.append((s, args[0])))
        for m, s in _use_modules(sites).values()
    ]
    try:
        run_layer(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[LinearSite]] = []
    last_input = None
    for site, x in calls:
        if any(site in st for st in stages):
            continue
        if stages and x is last_input:
            stages[-1].append(site)
        else:
            stages.append([site])
        last_input = x
    return stages + [[s] for s in sites if not any(s in st for st in stages)]


@torch.no_grad()
def _hessians(
    plan: BlockPlan,
    index: int,
    sites: list[LinearSite],
    stream: list[torch.Tensor],
    layer_kwargs: list[list[dict]],
    holdout: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Summed x^T x of each site over all its uses; later positions get the stream run through the blocks between.

    Returns (fit, held-out) sums: with ``holdout`` every ``HOLDOUT_EVERY``-th sample of each batch goes to the
    held-out sum (``held_out_rows``), else all go to the fit sum and the held-out sums stay zero."""

    def zeros():
        return {
            s.name: torch.zeros(s.module.in_features, s.module.in_features, device=stream[0].device)
            for s in sites
        }

    hess, held = zeros(), zeros()

    def hook(site: LinearSite):
        def fn(module, args):
            x = args[0]
            if not holdout:
                accumulate_hessian(hess[site.name], x)
                return
            mask = held_out_rows(x.shape[0], x.device)
            accumulate_hessian(hess[site.name], x[~mask])
            accumulate_hessian(held[site.name], x[mask])

        return fn

    handles = [m.register_forward_pre_hook(hook(s)) for m, s in _use_modules(sites).values()]
    last = max(max(plan.positions[s.name]) for s in sites)
    try:
        for hidden, kwargs in zip(stream, layer_kwargs, strict=True):
            for j in range(index, last + 1):
                hidden = run_layer(plan.layers[j], hidden, kwargs[j])
    finally:
        for h in handles:
            h.remove()
    return hess, held


def held_out_rows(batch: int, device=None) -> torch.Tensor:
    """Boolean mask of the held-out samples of one calibration batch (every ``HOLDOUT_EVERY``-th)."""
    return torch.arange(batch, device=device) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def output_error(w: torch.Tensor, q: QTensor, h: torch.Tensor, tokens: int) -> float:
    """Mean squared output error per token of the quantized weight on inputs with summed x^T x ``h``."""
    dw = q.dequantize().to(w.device) - w.float()
    return float(((dw @ h) * dw).sum()) / max(tokens, 1)


def choose_codes(
    site: LinearSite,
    fit: torch.Tensor,
    held: torch.Tensor,
    tokens: tuple[int, int],
    opts: GPTQOptions,
    config: QuantConfig,
) -> QTensor:
    """GPTQ (fit on the fit samples) or RTN codes, whichever has the lower output error on the held-out samples;
    a GPTQ win is then re-run on every sample. The decision and both errors go into ``QTensor.note``."""
    w = site.module.weight.detach()
    n_fit, n_held = tokens
    q_gptq, _ = _gptq_site(site, fit, n_fit, opts, config)
    q_rtn = rtn_tensor(site, config)
    errors = {"gptq": output_error(w, q_gptq, held, n_held), "rtn": output_error(w, q_rtn, held, n_held)}
    choice = "gptq" if errors["gptq"] <= errors["rtn"] else "rtn"
    q = _gptq_site(site, fit + held, n_fit + n_held, opts, config)[0] if choice == "gptq" else q_rtn
    q.note = {"choice": choice, "held_out_error": {k: float(f"{v:.6g}") for k, v in errors.items()}}
    return q


def _gptq_site(
    site: LinearSite,
    h: torch.Tensor,
    n_tokens: int,
    opts: GPTQOptions,
    config: QuantConfig,
    damp: float | None = None,
) -> tuple[QTensor, float]:
    w = site.module.weight.detach()
    q, err = gptq_quantize(
        w,
        h * (2.0 / n_tokens),
        grid_for(site.fmt, opts.bit_balance),
        effective_group(site.fmt, w.shape[1]),
        opts.damp if damp is None else damp,
        opts.act_order,
        opts.block_size,
        search=config.weight_range == "mse",
    )
    return q, err


@register_method("gptq")
@torch.no_grad()
def gptq_method(
    model: nn.Module, sites: list[LinearSite], config: QuantConfig, calib_ids: torch.Tensor | None
) -> dict[str, QTensor]:
    """GPTQ every site: the tied head first (on full-precision final hidden states), then the blocks in order."""
    opts = GPTQOptions.from_options(config.options, "gptq")
    if opts.head not in HEAD_MODES:
        raise EdgepackError(
            f"option head={opts.head!r} for method 'gptq' is unknown; choose one of {', '.join(HEAD_MODES)}"
        )
    ids = require_calibration(calib_ids, "gptq")
    plan = plan_blocks(model, sites)
    out: dict[str, QTensor] = {s.name: rtn_tensor(s, config) for s in plan.other}
    swaps = Swaps()
    try:
        trace = trace_inputs(model, plan.layers, ids, opts.batch_size, head=model.get_output_embeddings())
        tokens = sum(x.shape[0] * x.shape[1] for x in trace.hidden)
        widest = max(s.module.in_features for s in sites)
        if tokens < MIN_TOKENS_PER_INPUT * widest:
            log.warning(
                "gptq: %d calibration tokens for linears with %d inputs: the Hessian is poorly estimated and "
                "GPTQ may fit the calibration text; use n_samples x seq_len >= %d",
                tokens,
                widest,
                MIN_TOKENS_PER_INPUT * widest,
            )
        if plan.head is not None and opts.head == "rtn":
            out[plan.head.name] = rtn_tensor(plan.head, config)
        elif plan.head is not None:
            k = plan.head.module.in_features
            h = torch.zeros(k, k, device=trace.head_inputs[0].device)
            for x in trace.head_inputs:
                accumulate_hessian(h, x)
            # A tied head is also the input embedding, whose error is plain ||dW_row||^2: dampening adds
            # exactly that identity term to the logits Hessian, so head_damp weighs the embedding use.
            tied = tied_embedding(model, plan.head) is not None
            damp = opts.head_damp if tied and opts.head_damp is not None else None
            out[plan.head.name], err = _gptq_site(plan.head, h, tokens, opts, config, damp)
            log.info("gptq %s: error %.4g", plan.head.name, err)
        if plan.head is not None:
            qlin = swaps.quantized(plan.head, out[plan.head.name], config.abits)
            emb = tied_embedding(model, plan.head)
            if emb is not None:
                swaps.embedding(emb, qlin.weight)
                trace.hidden = trace_inputs(model, plan.layers, ids, opts.batch_size, first_only=True).hidden
        stream = trace.hidden
        rows = [held_out_rows(x.shape[0]) for x in trace.hidden]
        held_tokens = sum(int(m.sum()) * x.shape[1] for m, x in zip(rows, trace.hidden, strict=True))
        choose = opts.choose and 0 < held_tokens < tokens
        if opts.choose and not choose:
            log.warning("gptq: no held-out samples (batch_size < %d): GPTQ codes kept without the RTN check",
                        HOLDOUT_EVERY)  # fmt: skip
        bar = tqdm(range(len(plan.layers)), desc="gptq", unit="block")
        for i in bar:
            layer = plan.layers[i]
            if plan.owned[i]:
                block_error, kept_rtn = 0.0, 0
                for stage in block_stages(layer, plan.owned[i], stream[0], trace.layer_kwargs[0][i]):
                    fit, held = _hessians(plan, i, stage, stream, trace.layer_kwargs, holdout=choose)
                    for site in stage:
                        uses = len(plan.positions[site.name])
                        if choose:
                            n = ((tokens - held_tokens) * uses, held_tokens * uses)
                            out[site.name] = choose_codes(
                                site, fit[site.name], held[site.name], n, opts, config
                            )
                            kept_rtn += out[site.name].note["choice"] == "rtn"
                        else:
                            out[site.name], err = _gptq_site(
                                site, fit[site.name], tokens * uses, opts, config
                            )
                            block_error += err
                        swaps.quantized(site, out[site.name], config.abits)
                log.info("gptq block %d: error %.4g, RTN kept for %d sites", i, block_error, kept_rtn)
                bar.set_postfix(error=f"{block_error:.4g}", rtn=kept_rtn)
            stream = [run_layer(layer, x, kw[i]) for x, kw in zip(stream, trace.layer_kwargs, strict=True)]
    finally:
        swaps.restore()
    return out
