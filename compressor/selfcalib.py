"""Data-free calibration (LLM-QAT, Liu et al., 2023): sample calibration/cure sequences from the float model.

Text a user happens to have is one domain; the model's own samples cover what the model knows, so
calibration fitted on them generalizes. Each sequence starts from one of a mix of first tokens (the BOS
token, a token drawn from the model's own distribution after BOS, or a uniformly random vocabulary token),
then the first ``greedy_tokens`` continue greedily (LLM-QAT's hybrid: a random start alone often derails)
and the rest are sampled with ``temperature`` and nucleus ``top_p``. Seeded, so a run reproduces exactly;
the result is written into the artifact (``calib_self.json``: settings, token ids, decoded text).

``temperature="auto"`` (``--calib-temperature auto``) chooses it per model: 1.6, or hotter when the model's
sampling distribution at 1.6 is narrow. A pilot batch measures the mean entropy of softmax(logits / T) over the
sampled steps; when it is under ``entropy_target`` x ln(vocabulary), T is raised until it is not
(``resolve_temperature``). stories260k (TinyStories: 0.40 ln V at 1.6) goes to about 2.5; mix-llama-14m (about
0.67 ln V at 1.6) keeps 1.6. Where it heats, the samples are drawn from the whole distribution (top-p 1.0
unless one is given): the entropy it solves for is that distribution's, and a nucleus cut would remove the tail
the heat reaches into (round 23). It is not the default: on stories260k it moves the quantized model away from
the float model on its own prose (rounds 21 and 23 of docs/results/generalization.md).
"""

from __future__ import annotations

import json
import logging
import math
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
AUTO = "auto"  # the temperature chosen from the model's sampling entropy (resolve_temperature)
AUTO_MIN_TEMPERATURE = 1.6  # "auto" never samples cooler than the default
DEFAULT_TOP_P = 0.95  # the nucleus of a fixed temperature (and of "auto" where it stays at the minimum)
# the pilot batch's fixed-point iterations (each samples the batch at the T solved from the last one's logits;
# they settle within 0.01-0.03 in two or three) and the float bytes of logits a pilot keeps to solve on
PILOT_ITERATIONS = 4
PILOT_LOGIT_BYTES = 64 << 20


@dataclass(frozen=True)
class SelfCalibConfig:
    """How the float model samples its own calibration text."""

    n_samples: int = 64
    seq_len: int = 256
    # Above 1 the samples cover more of the vocabulary (word salad at 1.6, yet what a Hessian needs): GPTQ
    # self-calibrated at 1.6 <= RTN in all 12 self cells of the cross-domain matrix vs 9 at 1.0 (round 4 of
    # docs/results/generalization.md). Or "auto": AUTO_MIN_TEMPERATURE, hotter where the sampling entropy there
    # is under entropy_target (round 21)
    temperature: float | str = 1.6
    # "auto": the least mean entropy of softmax(logits / T) the samples are drawn at, as a fraction of
    # ln(vocabulary). stories260k's self cells of the cross-domain goal close at T = 2.5 against round 10's
    # text calibrations (round 13), which is 0.65 of its ln V; mix-llama-14m is above it at 1.6
    entropy_target: float = 0.65
    # None: DEFAULT_TOP_P, or 1.0 where "auto" heats the temperature. The entropy "auto" solves for is the whole
    # distribution's, and a nucleus cut removes the tail it heats into: at 1.0 stories260k's self-calibrated
    # W3 g128 ends 5% closer to the float model by KL off its domain (round 23)
    top_p: float | None = None
    greedy_tokens: int = 2  # after the first token (LLM-QAT: a few deterministic steps, then sampling)
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature != AUTO and not (
            isinstance(self.temperature, int | float) and self.temperature > 0
        ):
            raise EdgepackError(
                f"calibration temperature={self.temperature!r} must be 'auto' or a number > 0, e.g. 1.0"
            )
        if not 0 < self.entropy_target < 1:
            raise EdgepackError(
                f"self-calibration entropy_target={self.entropy_target} must be in (0, 1) (a fraction of "
                "ln(vocabulary)), e.g. 0.65"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
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


def sampling_entropy(logits: torch.Tensor, temperature: float) -> float:
    """Mean entropy (nats) of softmax(``logits`` / ``temperature``) over the rows of ``logits`` (N, V)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def solve_temperature(logits: torch.Tensor, target: float, lo: float = 0.05, hi: float = 50.0) -> float:
    """The temperature at which ``sampling_entropy(logits, T)`` is ``target`` nats (bisection in log T; the
    entropy grows with T), clamped to [lo, hi]."""
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if sampling_entropy(logits, mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    first: torch.Tensor,
    config: SelfCalibConfig,
    gen: torch.Generator,
    keep: list | None = None,
    keep_every: int = 1,
    entropy: list | None = None,
) -> torch.Tensor:
    """Continue ``first`` (B,) to (B, seq_len) tokens with the KV cache: greedy, then nucleus sampling. With
    ``keep``, the logits (B, V) of every ``keep_every``-th sampled step are appended to it. With ``entropy``,
    the mean sampling entropy (nats, whole distribution at the temperature) of each sampled step is appended."""
    device = next(model.parameters()).device
    ids = first.to(device)[:, None]  # (B, 1)
    out = model(input_ids=ids, use_cache=True)
    for t in range(1, config.seq_len):
        logits = out.logits[:, -1]  # (B, V)
        if t <= config.greedy_tokens:
            nxt = logits.argmax(-1)
        else:
            if keep is not None and (t - config.greedy_tokens - 1) % keep_every == 0:
                keep.append(logits.float().cpu())
            if entropy is not None:
                entropy.append(sampling_entropy(logits, config.temperature))
            nxt = nucleus_sample(logits, config.temperature, config.top_p, gen)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if t < config.seq_len - 1:
            out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    return ids.cpu()


def _pilot_logits(model: nn.Module, tokenizer, config: SelfCalibConfig) -> torch.Tensor:
    """(steps x B, V) logits of the sampled steps of the first batch ``config`` draws (at most
    ``PILOT_LOGIT_BYTES`` of them, steps evenly spaced)."""
    gen = torch.Generator().manual_seed(config.seed)
    b = min(config.batch_size, config.n_samples)
    vocab = model.get_output_embeddings().weight.shape[0]
    steps = max(1, config.seq_len - 1 - config.greedy_tokens)
    every = max(1, math.ceil(steps * b * vocab * 4 / PILOT_LOGIT_BYTES))
    keep: list[torch.Tensor] = []
    first = _first_tokens(model, tokenizer, start_kinds(b), gen)
    generate_batch(model, first, config, gen, keep, every)
    return torch.cat(keep)


def resolve_temperature(model: nn.Module, tokenizer, config: SelfCalibConfig) -> SelfCalibConfig:
    """``config`` with its sampling made numbers. A number of temperature is kept, and ``top_p=None`` becomes
    ``DEFAULT_TOP_P``. ``temperature="auto"`` becomes ``AUTO_MIN_TEMPERATURE`` if the first batch drawn there
    (at ``DEFAULT_TOP_P`` unless a top-p is given) has a mean sampling entropy of at least ``entropy_target`` x
    ln(vocabulary); else the T at which it does (fixed point: the batch is drawn at T, T solved on its logits, up
    to ``PILOT_ITERATIONS`` times; rounded to 0.01), and ``top_p=None`` becomes 1.0 there: the heated batches
    sample the whole distribution whose entropy was solved for. Costs one batch of sampling (more when it heats).
    """
    if config.temperature != AUTO:
        return config if config.top_p is not None else replace(config, top_p=DEFAULT_TOP_P)
    was_training = model.training
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    target = config.entropy_target * math.log(vocab)
    t, top_p = AUTO_MIN_TEMPERATURE, config.top_p or DEFAULT_TOP_P
    # one bar step per pilot batch drawn (a large model spends a while on each)
    bar = tqdm(total=PILOT_ITERATIONS, desc="self-calibration temperature", unit="pilot", leave=False)
    logits = _pilot_logits(model, tokenizer, replace(config, temperature=t, top_p=top_p))
    bar.update()
    at_min = sampling_entropy(logits, t)
    if at_min < target:
        top_p = config.top_p or 1.0
        for i in range(PILOT_ITERATIONS):
            t_next = max(AUTO_MIN_TEMPERATURE, solve_temperature(logits, target))
            settled = abs(t_next - t) < 0.02
            t = t_next
            bar.set_postfix(T=f"{t:.2f}")
            if settled or i == PILOT_ITERATIONS - 1:
                break
            logits = _pilot_logits(model, tokenizer, replace(config, temperature=t, top_p=top_p))
            bar.update()
    bar.close()
    model.train(was_training)
    t = round(t, 2)
    log.info(
        "self-calibration temperature auto: %.2f, top-p %.2f (sampling entropy at %.1f: %.2f of ln V; target %.2f)",
        t,
        top_p,
        AUTO_MIN_TEMPERATURE,
        at_min / math.log(vocab),
        config.entropy_target,
    )
    return replace(config, temperature=t, top_p=top_p)


def generate_samples(
    model: nn.Module,
    tokenizer,
    config: SelfCalibConfig,
    purpose: str = "self-calibration",
    stats: dict | None = None,
) -> torch.Tensor:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model``: a LongTensor (N, T). A temperature
    of "auto" is resolved first (``resolve_temperature``; callers that record the settings resolve it
    themselves). With ``stats``, ``stats["sampling_entropy"]`` is set to the draw's mean sampling entropy as a
    fraction of ln(vocabulary), the measure "auto" heats by."""
    config = resolve_temperature(model, tokenizer, config)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(config.seed)
    kinds = start_kinds(config.n_samples)
    chunks = []
    bar = tqdm(range(0, config.n_samples, config.batch_size), desc=purpose, unit="batch", leave=False)
    entropy: list[float] | None = [] if stats is not None else None
    for i in bar:
        first = _first_tokens(model, tokenizer, kinds[i : i + config.batch_size], gen)
        chunks.append(generate_batch(model, first, config, gen, entropy=entropy))
    model.train(was_training)
    ids = torch.cat(chunks)
    if stats is not None and entropy:
        vocab = model.get_output_embeddings().weight.shape[0]
        stats["sampling_entropy"] = round(sum(entropy) / len(entropy) / math.log(vocab), 3)
    log.info(
        "%s: %d samples x %d tokens (T=%.2f, top-p %.2f)",
        purpose,
        *ids.shape,
        config.temperature,
        config.top_p,
    )
    return ids


def narrow_samples_hint(config: SelfCalibConfig, entropy: float | None) -> str | None:
    """One line for a user whose own samples, drawn at a fixed temperature, carry less sampling entropy than
    ``entropy_target`` (the draw "auto" would heat): how to calibrate for text outside the model's domain.
    None when the draw is broad enough or was unmeasured."""
    if entropy is None or entropy >= config.entropy_target:
        return None
    return (
        f"the model's own calibration samples at T={config.temperature:g} are narrow ({entropy:.2f} of ln "
        f"vocabulary, under {config.entropy_target:g}): if it will run on text outside its own domain, "
        "--calib-temperature auto calibrates closer to the float model there (and further on its own prose; "
        "docs/results/generalization.md rounds 21 and 23)"
    )


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
    config = resolve_temperature(model, tokenizer, SelfCalibConfig.sized(n_own, seq_len, self_calib))
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
