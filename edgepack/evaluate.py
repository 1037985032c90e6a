"""Quality of a causal LM on token ids, in non-overlapping windows (the standard strided evaluation):
perplexity, and how a compressed model compares with the original float model on held-out text."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

HELD_OUT = 0.1  # the calibration text's last 10% is the default held-out text
QUALITY_WINDOWS = 16  # windows of up to 256 tokens: enough for a stable top-1 figure, quick on a laptop CPU


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive (inputs, next-token targets) windows of the 1-D tensor ``ids``: two (N, T) tensors."""
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(f"need more than {seq_len} tokens for perplexity, got {len(ids)}")
    ids = ids[: n * seq_len + 1]
    return ids[:-1].view(n, seq_len), ids[1:].view(n, seq_len)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over consecutive ``seq_len`` windows of the 1-D tensor ``ids``."""
    inputs, targets = windows(ids, seq_len)  # (N, T), (N, T)
    total = 0.0
    for i in range(0, len(inputs), batch_size):
        logits = model(input_ids=inputs[i : i + batch_size]).logits.float()  # (B, T, V)
        total += nll_sum(logits, targets[i : i + batch_size])
    return math.exp(total / targets.numel())


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of (B, T, V) logits against (B, T) targets."""
    flat = logits.reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="sum").item()


@dataclass(frozen=True)
class QualityReport:
    """The artifact's model against the original float model on the same held-out tokens."""

    text: str  # where the tokens came from
    tokens: int
    top1_agreement: float  # positions where both models' argmax agree
    perplexity_original: float
    perplexity: float
    perplexity_delta: float  # perplexity - perplexity_original

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def quality_vs_original(
    original,
    model,
    ids: torch.Tensor,
    text: str,
    seq_len: int = 256,
    batch_size: int = 4,
    logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> QualityReport:
    """Top-1 agreement and perplexity of ``model`` vs ``original`` over windows of ``ids`` (1-D)."""
    return quality_on_sequences(original, model, *windows(ids, seq_len), text, batch_size, logits_of)


@torch.no_grad()
def quality_on_sequences(
    original,
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    text: str,
    batch_size: int = 4,
    logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> QualityReport:
    """Top-1 agreement and perplexity of ``model`` vs ``original`` on (N, T) inputs and next-token targets.

    ``logits_of``: how the compressed side computes (B, T, V) logits of (B, T) ids, when not one forward pass of
    ``model`` (a compressed KV cache: token by token through it, minicache.decode_logits)."""
    agree, nll, nll_original = 0, 0.0, 0.0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
        ref = original(input_ids=x).logits.float()  # (B, T, V)
        out = (logits_of(x) if logits_of is not None else model(input_ids=x).logits).float()  # (B, T, V)
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        nll += nll_sum(out, y)
        nll_original += nll_sum(ref, y)
    n = targets.numel()
    ppl, ppl_original = math.exp(nll / n), math.exp(nll_original / n)
    return QualityReport(
        text=text,
        tokens=n,
        top1_agreement=round(agree / n, 4),
        perplexity_original=round(ppl_original, 4),
        perplexity=round(ppl, 4),
        perplexity_delta=round(ppl - ppl_original, 4),
    )
