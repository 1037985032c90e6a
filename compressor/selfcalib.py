"""Data-free calibration (LLM-QAT, Liu et al., 2023): sample calibration/cure sequences from the float model.

Text a user happens to have is one domain; the model's own samples cover what the model knows, so
calibration fitted on them generalizes. Each sequence starts from one of a mix of first tokens (the BOS
token, a token drawn from the model's own distribution after BOS, or a uniformly random vocabulary token),
then the first ``greedy_tokens`` continue greedily (LLM-QAT's hybrid: a random start alone often derails)
and the rest are sampled with ``temperature`` and nucleus ``top_p``. Seeded, so a run reproduces exactly;
the result is written into the artifact (``calib_self.json``: settings, token ids, decoded text).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

SELF = "self"  # the --calib value that selects data-free calibration
FILE_NAME = "calib_self.json"
STARTS = ("bos", "model", "uniform")  # the mix of first tokens, in round-robin order
# a check's held-out samples (fold structure auto) are drawn apart from the calibration samples, on seed + this
# (the calibration draws use the seed itself; the cross-domain bench's own-prose text, 1000 + the seed)
HELD_OUT_SEED_OFFSET = 2000


@dataclass(frozen=True)
class SelfCalibConfig:
    """How the float model samples its own calibration text."""

    n_samples: int = 64
    seq_len: int = 256
    # Above 1 the samples cover more of the vocabulary (word salad at 1.6, yet what a Hessian needs): GPTQ
    # self-calibrated at 1.6 <= RTN in all 12 self cells of the cross-domain matrix vs 9 at 1.0 (round 4 of
    # docs/results/generalization.md)
    temperature: float = 1.6
    top_p: float = 0.95
    greedy_tokens: int = 2  # after the first token (LLM-QAT: a few deterministic steps, then sampling)
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise EdgepackError(f"calibration temperature={self.temperature} must be > 0, e.g. 1.0")
        if not 0 < self.top_p <= 1:
            raise EdgepackError(f"calibration top_p={self.top_p} must be in (0, 1], e.g. 0.95")
        for name in ("n_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise EdgepackError(f"self-calibration {name}={getattr(self, name)} must be >= 1")
        if self.seq_len < 2 or self.greedy_tokens < 0:
            raise EdgepackError("self-calibration needs seq_len >= 2 and greedy_tokens >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> SelfCalibConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EdgepackError(
                f"unknown self-calibration keys {sorted(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**d)

    @classmethod
    def sized(cls, n_samples: int, seq_len: int, overrides: dict) -> SelfCalibConfig:
        """``n_samples`` x ``seq_len`` samples with ``overrides`` (a request's settings) for the other fields."""
        return cls.from_dict({"n_samples": n_samples, "seq_len": seq_len, **overrides})


# ---------------------------------------------------------------- pure tensor math


def nucleus_sample(
    logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): softmax at ``temperature``, restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is already full
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    pick = torch.multinomial(sorted_p.cpu(), 1, generator=gen).to(logits.device)  # (B, 1)
    return order.gather(-1, pick).squeeze(-1)


def start_kinds(n: int) -> list[str]:
    """The first-token kind of each of ``n`` sequences: ``STARTS`` in turn."""
    return [STARTS[i % len(STARTS)] for i in range(n)]


# ---------------------------------------------------------------- orchestration


def _special_ids(model: nn.Module, tokenizer) -> set[int]:
    cfg = model.config
    ids = {getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids |= set(getattr(tokenizer, "all_special_ids", []) or [])
    flat: set[int] = set()
    for i in ids:
        flat.update(i if isinstance(i, list) else [i])
    return {i for i in flat if isinstance(i, int)}


def _first_tokens(model: nn.Module, tokenizer, kinds: list[str], gen: torch.Generator) -> torch.Tensor:
    """(B,) first tokens for the given kinds; "model" draws from p(. | BOS), "uniform" from non-special ids."""
    vocab = model.get_output_embeddings().weight.shape[0]
    special = _special_ids(model, tokenizer)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    bos = model.config.bos_token_id if isinstance(model.config.bos_token_id, int) else tokenizer.bos_token_id
    if bos is None:  # no BOS token: every start is uniform over the vocabulary
        kinds = ["uniform"] * len(kinds)
        bos = int(allowed[0])
    device = next(model.parameters()).device
    with torch.no_grad():
        after_bos = model(input_ids=torch.tensor([[bos]], device=device)).logits[0, -1]  # (V,)
    after_bos[[i for i in special if i < vocab]] = float("-inf")
    out = []
    for kind in kinds:
        if kind == "bos":
            out.append(bos)
        elif kind == "model":
            out.append(int(nucleus_sample(after_bos[None], 1.0, 1.0, gen)))
        else:
            out.append(int(allowed[torch.randint(len(allowed), (1,), generator=gen)]))
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def generate_batch(
    model: nn.Module, first: torch.Tensor, config: SelfCalibConfig, gen: torch.Generator
) -> torch.Tensor:
    """Continue ``first`` (B,) to (B, seq_len) tokens with the KV cache: greedy, then nucleus sampling."""
    device = next(model.parameters()).device
    ids = first.to(device)[:, None]  # (B, 1)
    out = model(input_ids=ids, use_cache=True)
    for t in range(1, config.seq_len):
        logits = out.logits[:, -1]  # (B, V)
        if t <= config.greedy_tokens:
            nxt = logits.argmax(-1)
        else:
            nxt = nucleus_sample(logits, config.temperature, config.top_p, gen)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if t < config.seq_len - 1:
            out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    return ids.cpu()


def generate_samples(model: nn.Module, tokenizer, config: SelfCalibConfig) -> torch.Tensor:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model``: a LongTensor (N, T)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(config.seed)
    kinds = start_kinds(config.n_samples)
    chunks = []
    bar = tqdm(
        range(0, config.n_samples, config.batch_size), desc="self-calibration", unit="batch", leave=False
    )
    for i in bar:
        first = _first_tokens(model, tokenizer, kinds[i : i + config.batch_size], gen)
        chunks.append(generate_batch(model, first, config, gen))
    model.train(was_training)
    ids = torch.cat(chunks)
    log.info(
        "self-calibration: %d samples x %d tokens (T=%.2f, top-p %.2f)",
        *ids.shape,
        config.temperature,
        config.top_p,
    )
    return ids


def held_out_config(config: SelfCalibConfig, fraction: float) -> SelfCalibConfig:
    """``fraction`` as many more (at least one) of the model's own samples as ``config`` draws, drawn like them
    but on a seed no calibration draw uses: text a check can hold out because no fold or quantizer ever fitted
    on it."""
    n = max(1, round(fraction * config.n_samples))
    return replace(config, n_samples=n, seed=config.seed + HELD_OUT_SEED_OFFSET)


def mix_samples(real: torch.Tensor, own: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Real-text and self-generated samples (each (n, T)) shuffled together with a seeded permutation, so every
    calibration batch (and GPTQ's held-out rows, the cure's batches) holds both kinds."""
    both = torch.cat([real, own[:, : real.shape[1]]])
    return both[torch.randperm(len(both), generator=torch.Generator().manual_seed(seed))]


def text_with_own(
    model: nn.Module, tokenizer, text: str, n: int, seq_len: int, share: float, **self_calib
) -> tuple[torch.Tensor, torch.Tensor | None, SelfCalibConfig | None]:
    """``n`` x ``seq_len`` calibration ids: ``round(n * share)`` of them sampled from ``model`` (``self_calib``:
    SelfCalibConfig fields), the rest windows of ``text``, shuffled together by ``mix_samples``. Returns the ids,
    the model's own samples and their config (both None when ``share`` draws none)."""
    from edgepack.textdata import calibration_samples

    n_own = min(n, round(n * share))
    ids = calibration_samples(tokenizer, text, n - n_own, seq_len) if n_own < n else None
    if not n_own:
        return ids, None, None
    config = SelfCalibConfig.sized(n_own, seq_len, self_calib)
    own = generate_samples(model, tokenizer, config)
    return (own if ids is None else mix_samples(ids, own, config.seed)), own, config


def write_samples(folder: Path, ids: torch.Tensor, tokenizer, config: SelfCalibConfig) -> Path:
    """Store the generated samples (settings, token ids, decoded text) as ``calib_self.json`` in ``folder``."""
    path = Path(folder) / FILE_NAME
    data = {
        "settings": asdict(config),
        "starts": start_kinds(len(ids)),
        "ids": ids.tolist(),
        "text": [tokenizer.decode(row, skip_special_tokens=False) for row in ids.tolist()],
    }
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_samples(path: Path) -> torch.Tensor:
    """Token ids (N, T) from a ``calib_self.json`` an earlier export wrote (to reproduce its calibration)."""
    try:
        ids = json.loads(Path(path).read_text(encoding="utf-8"))["ids"]
        out = torch.tensor(ids, dtype=torch.long)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgepackError(
            f"{path} is not a calib_self.json written by edgepack ({type(e).__name__}); pass --calib self or a text file"
        ) from e
    if out.dim() != 2 or out.shape[1] < 2:
        raise EdgepackError(
            f"{path} holds no (n_samples, seq_len) token ids; pass --calib self or a text file"
        )
    return out
