"""End-to-end tuning of the quantization scales by distillation from the float model.

After a quantizer has chosen every weight's integer codes (RTN, GPTQ or ABQ), the per-group scales are trained
end to end with the codes fixed, as EfficientQAT's E2E-QP stage does (Chen et al., 2024), against the float
model's next-token distribution on the calibration sequences (KL, as LLM-QAT distils on its self-generated
data). The block-wise methods fit each weight or block to its own float output; this step fits the whole
model's output, so errors that pass through several blocks, and the tied head's, are corrected together.

What is trained stays in the artifact's format: one multiplier per group scale (parameterised as ``exp(a)``,
so the step size is scale-free), and optionally the RMSNorm weights, which the exporter stores in float
anyway. Codes and zero points do not move, so the artifact's bytes and kernels are unchanged.

A slice of the sequences is held out: the tuning keeps the epoch with the lowest held-out KL and stops when it
rises, so the scales do not fit the calibration text more than it generalizes. With ``--calib self`` (the
default) the sequences are the float model's own samples, which is what keeps the tuning domain-neutral.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, fields

import torch
from edgepack.compressor.fold_cure import held_out_kl, logit_kl, norm_parameters, unique
from edgepack.compressor.quantize import QuantLinear, activation_block, fake_quant_activations, group_view
from torch import nn
from tqdm.auto import tqdm

from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2EOptions:
    """``QuantConfig.options["e2e"]``: how the scales are tuned (``epochs`` 0 = off)."""

    epochs: int = 4
    lr: float = 2e-3  # Adam, on the log of each scale's multiplier
    norms: bool = True  # also train the RMSNorm weights (float in the artifact)
    norm_lr: float = 2e-4
    batch_size: int = 4
    holdout: float = 0.125  # share of the sequences held out for the KL that picks the epoch
    seed: int = 0

    @classmethod
    def from_value(cls, value) -> E2EOptions:
        if value is True:
            value = {}
        elif isinstance(value, int) and not isinstance(value, bool):
            value = {"epochs": value}
        if not isinstance(value, dict):
            raise EdgepackError(f"e2e={value!r} is not supported; use true, a number of epochs or a dict")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise EdgepackError(f"unknown e2e keys {sorted(unknown)}; allowed: {', '.join(sorted(known))}")
        opts = cls(**value)
        if opts.epochs < 0 or opts.lr <= 0 or opts.batch_size < 1 or not 0 < opts.holdout < 1:
            raise EdgepackError(
                "e2e needs epochs >= 0, lr > 0, batch_size >= 1 and holdout in (0, 1), e.g. {'epochs': 4}"
            )
        return opts


class _Scaled:
    """One QuantLinear with a trainable multiplier per scale; its weight is rebuilt from the codes each step."""

    def __init__(self, m: QuantLinear):
        self.m = m
        n, k = m.codes.shape
        self.k = k
        self.centered = group_view(m.codes.float(), m.group_size).sub_(m.zero_points.float().unsqueeze(-1))
        self.log_mult = nn.Parameter(torch.zeros_like(m.scales, dtype=torch.float32))

    def weight(self) -> torch.Tensor:
        s = self.m.scales.float() * self.log_mult.exp()
        return (self.centered * s.unsqueeze(-1)).flatten(1)[:, : self.k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        if m.abits == 8:
            x = fake_quant_activations(x, activation_block(m.group_size, m.in_features))
        bias = None if m.bias is None else m.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight().to(x.dtype), bias)

    def commit(self) -> None:
        with torch.no_grad():
            self.m.scales.copy_((self.m.scales.float() * self.log_mult.exp()).to(self.m.scales.dtype))
        self.m._weight_cache = None


@torch.enable_grad()  # quantize() runs under no_grad
def tune_scales(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, opts: E2EOptions) -> dict:
    """Train ``model``'s QuantLinear scales (and norms) to match ``teacher`` on ``ids`` (n, seq_len); in place.

    Returns a report: held-out KL before and after, the epoch kept, and how many scales were trained."""
    layers = {id(m): m for m in model.modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise EdgepackError("e2e tuning needs a quantized model (no quantized linear layer found)")
    if ids is None or len(ids) < 2:
        raise EdgepackError("e2e tuning needs at least 2 calibration sequences (--calib)")
    scaled = {key: _Scaled(m) for key, m in layers.items()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings()
    tied = isinstance(head, QuantLinear) and getattr(model.config, "tie_word_embeddings", False)
    norms = unique(norm_parameters(model)) if opts.norms else []  # each once, however many positions use it
    norm_init = [w.detach().clone() for w in norms]

    g = torch.Generator().manual_seed(opts.seed)
    order = torch.randperm(len(ids), generator=g)
    n_hold = max(1, round(len(ids) * opts.holdout))
    hold, train = ids[order[:n_hold]], ids[order[n_hold:]]

    saved_forward = {key: m.forward for key, m in layers.items()}
    saved_emb = emb.forward
    saved_grad = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in norms:
        w.requires_grad_(True)
    for key, m in layers.items():
        m.forward = scaled[key].forward
    if tied:
        emb.forward = lambda input_ids: nn.functional.embedding(input_ids, scaled[id(head)].weight())

    params = [{"params": [s.log_mult for s in scaled.values()], "lr": opts.lr}]
    if norms:
        params.append({"params": norms, "lr": opts.norm_lr})
    optim = torch.optim.Adam(params)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    best = start = held_out_kl(model, teacher, hold, opts.batch_size)
    best_state = _snapshot(scaled, norms)
    best_epoch, history = 0, [round(start, 5)]
    steps = math.ceil(len(train) / opts.batch_size)
    try:
        for epoch in range(1, opts.epochs + 1):
            perm = torch.randperm(len(train), generator=g)
            bar = tqdm(range(steps), desc=f"e2e scales, epoch {epoch}/{opts.epochs}", leave=False)
            for step in bar:
                b = train[perm[step * opts.batch_size : (step + 1) * opts.batch_size]]
                with torch.no_grad():
                    target = teacher(input_ids=b).logits
                loss = logit_kl(model(input_ids=b).logits, target)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                bar.set_postfix(kl=f"{loss.item():.4f}")
            kl = held_out_kl(model, teacher, hold, opts.batch_size)
            history.append(round(kl, 5))
            log.info("e2e epoch %d: held-out KL %.5f (start %.5f)", epoch, kl, start)
            if kl < best:
                best, best_epoch, best_state = kl, epoch, _snapshot(scaled, norms)
            elif kl > history[-2]:
                break  # the held-out KL rose: stop, keep the best epoch
    finally:
        _restore(scaled, norms, best_state)
        for key, m in layers.items():
            m.forward = saved_forward[key]
        emb.forward = saved_emb
        for p in model.parameters():
            p.requires_grad_(saved_grad.get(id(p), False))
        model.train(was_training)
    for s in scaled.values():
        s.commit()
    if tied:
        emb.weight = nn.Parameter(head.weight.detach(), requires_grad=False)
        head._weight_cache = None
    drift = (
        max(
            ((w.detach() - w0).abs().max() / w0.abs().max().clamp_min(1e-12)).item()
            for w, w0 in zip(norms, norm_init, strict=True)
        )
        if norms
        else 0.0
    )
    return {
        "held_out_kl_before": round(start, 5),
        "held_out_kl_after": round(best, 5),
        "kl_by_epoch": history,
        "epoch_kept": best_epoch,
        "scales": sum(s.log_mult.numel() for s in scaled.values()),
        "norm_weights": sum(w.numel() for w in norms),
        "norm_max_relative_change": round(drift, 4),
        "train_sequences": len(train),
        "held_out_sequences": len(hold),
    }


def _snapshot(scaled: dict, norms: list[nn.Parameter]) -> tuple[list, list]:
    return [s.log_mult.detach().clone() for s in scaled.values()], [w.detach().clone() for w in norms]


def _restore(scaled: dict, norms: list[nn.Parameter], state: tuple[list, list]) -> None:
    with torch.no_grad():
        for s, v in zip(scaled.values(), state[0], strict=True):
            s.log_mult.copy_(v)
        for w, v in zip(norms, state[1], strict=True):
            w.copy_(v)


def teacher_copy(model: nn.Module) -> nn.Module:
    """A frozen float copy of ``model`` to distil from (taken before quantization replaces its linears)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
