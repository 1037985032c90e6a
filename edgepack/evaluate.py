"""Perplexity of a causal LM on token ids, in non-overlapping windows (the standard strided evaluation)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over consecutive ``seq_len`` windows of the 1-D tensor ``ids``."""
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(f"need more than {seq_len} tokens for perplexity, got {len(ids)}")
    windows = ids[: n * seq_len + 1]
    inputs = windows[:-1].view(n, seq_len)  # (N, T)
    targets = windows[1:].view(n, seq_len)  # (N, T)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        logits = model(input_ids=inputs[i : i + batch_size]).logits.float()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[i : i + batch_size].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += targets[i : i + batch_size].numel()
    return math.exp(total / count)
