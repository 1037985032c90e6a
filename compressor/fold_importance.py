"""Block importance for depth folding: learnable gates, ShortGPT's Block Influence, and drop-one perplexity.

Every method returns one score per decoder block, higher = more important, and is registered in
``IMPORTANCE``. The math (influence, gate penalty, token NLL) is in pure tensor functions; the rest runs
calibration batches through hooks from ``fold_hooks`` and leaves the model unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from edgepack.compressor.fold_hooks import captured, decoder_layers, gated, skipped, trainable_only
from edgepack.compressor.fold_plan import removal_count
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from edgepack.compressor.fold import FoldConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- pure tensor math


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """ShortGPT's BI per token: 1 - cos(block input, block output). (B, T, C) x2 -> (B, T)."""
    return 1.0 - torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) on the ids (B, T) they were computed from."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


def gate_penalty(g: torch.Tensor, n_keep: int, sparsity: float, polarization: float) -> torch.Tensor:
    """Hinge L1 pressure on the gates (L,) while their sum exceeds the budget ``n_keep``, plus g(1-g),
    which is zero only at 0 and 1 and so polarizes them: the LM loss decides which gates stay open."""
    return sparsity * torch.relu(g.sum() - n_keep) + polarization * (g * (1.0 - g)).sum()


# ---------------------------------------------------------------- orchestration


def batches(ids: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Consecutive (B, T) slices of the calibration ids, moved to ``device``."""
    for i in range(0, len(ids), batch_size):
        yield ids[i : i + batch_size].to(device)


@torch.no_grad()
def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token NLL of ``model`` over all calibration samples."""
    device = next(model.parameters()).device
    total = 0.0
    for x in batches(ids, batch_size, device):
        total += next_token_nll(model(input_ids=x, use_cache=False).logits, x).item() * len(x)
    return total / len(ids)


@torch.no_grad()
def bi_scores(model: nn.Module, ids: torch.Tensor, config: FoldConfig) -> list[float]:
    """Block Influence: mean over calibration tokens of 1 - cos(input, output) of each block."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    which = list(range(len(layers)))
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    with captured(layers, which, inputs=True) as ins, captured(layers, which) as outs:
        for x in batches(ids, config.batch_size, device):
            model(input_ids=x, use_cache=False)
            for i in which:
                sums[i] += block_influence(ins[i], outs[i]).sum().item()
            count += x.numel()
    return (sums / count).tolist()


def drop_one_scores(model: nn.Module, ids: torch.Tensor, config: FoldConfig) -> list[float]:
    """Calibration perplexity with each block bypassed in turn (the full model's is logged for reference)."""
    layers = decoder_layers(model)
    log.info("fold: drop-one baseline perplexity %.2f", math.exp(mean_nll(model, ids, config.batch_size)))
    scores = []
    for i in tqdm(range(len(layers)), desc="fold: drop-one", leave=False):
        with skipped(layers, i):
            scores.append(math.exp(mean_nll(model, ids, config.batch_size)))
    return scores


# Gate training is the slowest importance method: each step is a full forward + backward of the frozen model.
# Gates train on the first 128 tokens of each sample (the length the fold benchmark tuned the gates with):
# 2.3x less CPU per step than 256 on mix-llama-14m (bench/gate_time.py, docs/results/bundle.md).
GATE_SEQ_LEN = 128


def gate_scores(model: nn.Module, ids: torch.Tensor, config: FoldConfig) -> list[float]:
    """Train one sigmoid gate per block (model frozen) on the LM loss + gate penalty; the gates are the scores.

    The budget is the removal rate of ``config`` (at least one block), so the gates learn which blocks to
    drop *together* rather than one at a time.
    """
    layers = decoder_layers(model)
    n_keep = len(layers) - max(removal_count(config.remove, len(layers)), 1)
    device = next(model.parameters()).device
    logits = torch.full((len(layers),), config.gate_init, device=device, requires_grad=True)  # (L,)
    opt = torch.optim.Adam([logits], lr=config.gate_lr)
    gen = torch.Generator().manual_seed(config.seed)
    with trainable_only(model, []), gated(layers, lambda i: torch.sigmoid(logits[i])):
        bar = tqdm(range(config.gate_steps), desc="fold: gates", leave=False)
        for step in bar:
            x = ids[torch.randint(len(ids), (config.batch_size,), generator=gen)][:, :GATE_SEQ_LEN].to(device)
            g = torch.sigmoid(logits)
            lm = next_token_nll(model(input_ids=x, use_cache=False).logits, x)
            loss = lm + gate_penalty(g, n_keep, config.gate_sparsity, config.gate_polarization)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(lm=f"{lm.item():.3f}", mean_gate=f"{g.mean().item():.2f}")
            if step % 20 == 0 or step == config.gate_steps - 1:
                log.info("fold: gates step %d lm %.4f gates %s", step, lm.item(), _fmt(g))
    return torch.sigmoid(logits).detach().cpu().tolist()


def _fmt(g: torch.Tensor) -> str:
    return " ".join(f"{v:.2f}" for v in g.detach().cpu().tolist())


IMPORTANCE: dict[str, Callable[[nn.Module, torch.Tensor, FoldConfig], list[float]]] = {
    "gates": gate_scores,
    "bi": bi_scores,
    "drop_one": drop_one_scores,
}
