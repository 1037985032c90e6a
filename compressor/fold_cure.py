"""Cure a folded model: a short fine-tune distilled from the original on logits and tail-layer hidden states.

Loss = KL(teacher || student) on next-token distributions + ``hidden_weight`` * relative MSE between the
student's last k positions and the teacher's last k layers. Per-position norms are always trained (they are
what makes a shared block behave differently at each depth); block weights, shared ones included, optionally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from edgepack.compressor.fold_hooks import captured, decoder_layers, trainable_only
from edgepack.compressor.fold_importance import batches
from torch import nn
from tqdm.auto import tqdm

from edgepack.families import family_of

if TYPE_CHECKING:
    from edgepack.compressor.fold import FoldConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- pure tensor math


def logit_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of logits (B, T, V)."""
    s = torch.log_softmax(student.float().flatten(0, -2), dim=-1)  # (B*T, V)
    t = torch.log_softmax(teacher.float().flatten(0, -2), dim=-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layer pairs of ||s - t||^2 / ||t||^2: scale-free, so deep (large-norm) layers do not dominate."""
    terms = [
        (s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean()
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(terms).mean()


def distill_loss(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    s_hidden: list[torch.Tensor],
    t_hidden: list[torch.Tensor],
    hidden_weight: float,
) -> torch.Tensor:
    """Tail-layer distillation loss: logit KL + ``hidden_weight`` * hidden-state relative MSE."""
    loss = logit_kl(s_logits, t_logits)
    if s_hidden:
        loss = loss + hidden_weight * hidden_mse(s_hidden, t_hidden)
    return loss


# ---------------------------------------------------------------- orchestration


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean per-token KL(teacher || student) of next-token distributions over ``ids`` (N, T): the drift from
    the original, comparable across folds of any depth."""
    per_sample = sample_kls(student, teacher, ids, batch_size)
    return sum(per_sample) / len(per_sample)


@torch.no_grad()
def sample_kls(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch_size: int) -> list[float]:
    """``held_out_kl`` of each row of ``ids`` on its own (paired comparisons between students)."""
    device = next(student.parameters()).device
    out = []
    for x in batches(ids, batch_size, device):
        s_logits = student(input_ids=x, use_cache=False).logits
        t_logits = teacher(input_ids=x, use_cache=False).logits
        out += [logit_kl(s_logits[i : i + 1], t_logits[i : i + 1]).item() for i in range(len(x))]
    return out


@dataclass
class CureResult:
    """Per-step training loss and the distillation loss on fixed samples before and after the cure; with held-out
    samples, their KL to the original at each check (step 0 = uncured) and the step whose weights were kept."""

    curve: list[float]
    before: float
    after: float
    held_out: dict | None = None


def norm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of every normalization module under ``module`` (RMSNorm, LayerNorm, q/k norms)."""
    return [
        p for m in module.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)
    ]


def unique(params) -> list[nn.Parameter]:
    """Each Parameter once, by identity, in first-seen order."""
    return list({id(p): p for p in params}.values())


class _Distiller:
    """Runs teacher and student on a batch and returns the distillation loss."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        k: int,
        hidden_weight: float,
        pairs: list[tuple[int, int]] | None = None,
    ):
        self.student, self.teacher, self.hidden_weight = student, teacher, hidden_weight
        s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
        if pairs is None:  # the last k positions against the teacher's last k layers
            pairs = [(len(s_layers) - k + j, len(t_layers) - k + j) for j in range(k)]
        self.s_matched = [s for s, _ in pairs]
        self.t_matched = [t for _, t in pairs]
        self.s_layers, self.t_layers = s_layers, t_layers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), captured(self.t_layers, self.t_matched) as t_h:
            t_logits = self.teacher(input_ids=x, use_cache=False).logits
        with captured(self.s_layers, self.s_matched) as s_h:
            s_logits = self.student(input_ids=x, use_cache=False).logits
        s_hidden = [s_h[i] for i in self.s_matched]
        t_hidden = [t_h[i] for i in self.t_matched]
        return distill_loss(s_logits, t_logits, s_hidden, t_hidden, self.hidden_weight)

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, batch_size: int) -> float:
        device = next(self.student.parameters()).device
        return sum(self(x).item() * len(x) for x in batches(ids, batch_size, device)) / len(ids)


def cure(
    student: nn.Module,
    teacher: nn.Module,
    ids: torch.Tensor,
    config: FoldConfig,
    extra: tuple[dict, ...] = (),
    pairs: list[tuple[int, int]] | None = None,
    held_ids: torch.Tensor | None = None,
) -> CureResult:
    """Fine-tune ``student`` (norms, plus block weights if ``config.cure_weights``) to match ``teacher``.
    ``extra``: more optimizer groups ({"params": [...], "lr": ...}) for parameters a caller added to the
    student (bench/cross_domain.py's per-position branch scales); they are excluded from the weights group.
    ``pairs``: (student position, teacher layer) whose hidden states are matched, instead of the last
    ``config.distill_layers`` of each.
    ``held_ids``: samples kept out of the training; before the first step and every ``config.cure_check_every``
    steps their mean KL to the teacher is measured, and the trained weights end as they were at the lowest one,
    a guard against a cure that drifts from the original on samples it does not train on (FoldConfig.cure_stop)."""
    device = next(student.parameters()).device
    teacher.to(device).eval()
    k = min(config.distill_layers, len(decoder_layers(student)))
    distiller = _Distiller(student, teacher, k, config.hidden_weight, pairs)
    eval_ids = ids[: max(config.batch_size, 8)]
    layers = decoder_layers(student)
    norms = unique(
        norm_parameters(layers) + norm_parameters(student.get_submodule(family_of(student).final_norm))
    )
    groups = [{"params": norms, "lr": config.lr}]
    if config.cure_weights:
        seen = {id(p) for p in norms} | {id(p) for group in extra for p in group["params"]}
        weights = [
            p
            for name, p in layers.named_parameters()  # each shared Parameter once, first-seen order
            if id(p) not in seen and (config.cure_weights != "mlp" or ".mlp." in f".{name}")
        ]
        groups.append({"params": weights, "lr": config.lr * config.weight_lr_scale})
    groups += [dict(group) for group in extra]
    params = [p for group in groups for p in group["params"]]
    before = distiller.evaluate(eval_ids, config.batch_size)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.cure_steps, 1))
    gen = torch.Generator().manual_seed(config.seed + 1)
    curve: list[float] = []
    checks: list[tuple[int, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None

    def check(step: int) -> None:
        nonlocal best
        kl = held_out_kl(student, teacher, held_ids, config.batch_size)
        checks.append((step, round(kl, 6)))
        if best is None or kl < best[0]:
            best = (kl, step, [p.detach().clone() for p in params])

    with trainable_only(student, params):
        if held_ids is not None:
            check(0)
        bar = tqdm(range(config.cure_steps), desc="fold: cure", leave=False)
        for step in bar:
            x = ids[torch.randint(len(ids), (config.batch_size,), generator=gen)].to(device)
            loss = distiller(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            curve.append(loss.item())
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
            if step % 25 == 0 or step == config.cure_steps - 1:
                log.info("fold: cure step %d distill loss %.4f", step, curve[-1])
            done = step + 1
            if held_ids is not None and (done % config.cure_check_every == 0 or done == config.cure_steps):
                check(done)
    held = None
    if best is not None:
        _, best_step, state = best
        with torch.no_grad():
            for p, kept in zip(params, state, strict=True):
                p.copy_(kept)
        held = {"samples": len(held_ids), "kl": [list(c) for c in checks], "kept_step": best_step}
        log.info("fold: cure held-out KL %s; weights of step %d kept", checks, best_step)
    after = distiller.evaluate(eval_ids, config.batch_size)
    log.info("fold: cure distill loss %.4f -> %.4f over %d steps", before, after, config.cure_steps)
    return CureResult(curve=curve, before=before, after=after, held_out=held)
