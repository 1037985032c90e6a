"""ONNX-vs-PyTorch parity: the same prompts through the artifact (onnxruntime) and the model it came from.

The artifact prefills each prompt and decodes ``new_tokens`` greedy tokens through its KV cache with the runner's
decode loop (runtime/runner.py); the PyTorch model scores the same sequence in one forward pass (a compressed KV
layout is instead replayed token by token through its reference cache). Reported: max abs logit error and top-1
agreement over every position (prefill and decode steps), and greedy agreement over the ``new_tokens``. Each
export runs it and fails when a threshold for its dtype / activation bits is missed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from edgepack.runtime.runner import Decoder, DecoderIO, RunDecoder

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "Once upon a time, there was a little",
    "The quick brown fox jumps over the lazy dog. Then",
    "To be, or not to be, that is the question:",
)


@dataclass(frozen=True)
class Thresholds:
    max_abs_logit: float
    min_top1: float
    min_greedy: float


# Exact lowerings (float weights, or quantized codes with float activations) in fp32 match to rounding;
# fp16 activations and int8 activation quantization (accuracy_level 4) legitimately move logits more.
THRESHOLDS = {
    "float32": Thresholds(max_abs_logit=2e-3, min_top1=0.99, min_greedy=0.9),
    "float16": Thresholds(max_abs_logit=0.25, min_top1=0.9, min_greedy=0.5),
    "int8-activations": Thresholds(max_abs_logit=1.5, min_top1=0.8, min_greedy=0.25),
    # A compressed KV cache on fp16 activations: which tokens MiniCache retains and how KV codes round are decided
    # on fp16 K/V, so a few cached tokens differ from the fp32 reference; top-1 agreement is the quality measure.
    "float16-kv": Thresholds(max_abs_logit=3.0, min_top1=0.9, min_greedy=0.25),
    # The same in fp32: the graph's K/V match the reference's to rounding, but a value that lands on a rounding
    # boundary of the KV codes takes the neighbouring code in one of the two, one quantization step apart.
    # stories260k, MiniCache + 4-bit token groups on an AVX-512 host: max |dlogit| 2.81e-03 (8.8e-05 with the
    # merge alone), top-1 and greedy 1.000.
    "float32-kv": Thresholds(max_abs_logit=0.05, min_top1=0.99, min_greedy=0.9),
}


@dataclass
class ParityReport:
    max_abs_logit: float
    top1: float  # prefill + decode positions
    greedy: float  # mean over prompts of (leading greedy tokens equal) / new_tokens
    new_tokens: int
    prompts: int
    thresholds: str
    passed: bool
    flips: int = 0  # positions whose top-1 differs
    flips_at_ties: int = 0  # of those, at a reference margin under twice the median logit error (diagnostic)
    median_margin: float = 0.0  # the reference's median top-1 margin (near 0: near-uniform logits, e.g.
    median_error: float = 0.0  # random weights) and the median per-position |dlogit|

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        ties = (
            f" ({self.flips_at_ties} of {self.flips} flips at near-ties; median top-1 margin "
            f"{self.median_margin:.3g} vs median |dlogit| {self.median_error:.3g})"
            if self.flips
            else ""
        )
        return (
            f"max |dlogit| {self.max_abs_logit:.2e}, top-1 {self.top1:.3f}, greedy {self.greedy:.3f}{ties} "
            f"over {self.new_tokens} tokens x {self.prompts} prompts"
        )


def open_decoder(path: str | Path, providers: list[str] | None = None, threads: int = 0) -> RunDecoder:
    """The runner's decoder (runtime/runner.py: the one onnxruntime decode loop, shared by parity, the tests and
    ``edgepack bench``) on a session of ``path``, any KV layout."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
    return RunDecoder(session, DecoderIO.from_session(session))


def ort_decode(
    dec: Decoder, prompt: list[int], new_tokens: int, forced: list[int] | None = None
) -> tuple[list[int], np.ndarray]:
    """Prefill ``prompt``, then decode through the KV cache: the tokens fed are ``forced`` when given, else the
    artifact's own greedy choices. Returns the tokens and the logits of every step (T+N-1, V)."""
    dec.reset()
    rows = [dec.step(np.array([prompt], np.int64), all_positions=True)]
    tokens: list[int] = []
    for j in range(new_tokens):
        tokens.append(int(rows[-1][-1].argmax()) if forced is None else int(forced[j]))
        if len(tokens) == new_tokens:
            break
        rows.append(dec.step(np.array([[tokens[-1]]], np.int64), all_positions=True))
    return tokens, np.concatenate(rows).astype(np.float32)


def ort_greedy(dec: Decoder, prompt: list[int], new_tokens: int) -> list[int]:
    """The artifact's greedy continuation of ``prompt`` (``new_tokens`` ids)."""
    return ort_decode(dec, prompt, new_tokens)[0]


def length_dependent_rope(model) -> bool:
    """True when rotary tables switch with the total length (longrope): cached keys keep the tables of the step
    that wrote them, so one forward over the whole sequence is not what a decode through the cache computes."""
    from edgepack.families import resolve

    return any(rope.long_inv_freq is not None for rope in resolve(model).ropes.values())


@torch.no_grad()
def torch_logits_batch(model, sequences: list[list[int]]) -> list[np.ndarray]:
    """Each sequence's logits (T_i, V) from one forward pass over the batch, right-padded with token 0."""
    width = max(len(ids) for ids in sequences)
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in sequences])
    logits = model(input_ids=batch, use_cache=False).logits.float()
    return [logits[i, : len(ids)].cpu().numpy() for i, ids in enumerate(sequences)]


@torch.no_grad()
def torch_greedy(
    model, ids: torch.Tensor, new_tokens: int, cache_factory: Callable[[], object] | None = None
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens from a HF model through its KV cache (``cache_factory()``, e.g. the MiniCache reference, or
    transformers' default), and the logits of every step (T+N-1, V)."""
    cache = cache_factory() if cache_factory is not None else None
    out = model(input_ids=ids, use_cache=True, past_key_values=cache)
    logits = [out.logits[0]]
    cache, tokens = out.past_key_values, []
    for _ in range(new_tokens):
        nxt = int(logits[-1][-1].argmax())
        tokens.append(nxt)
        if len(tokens) == new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0])
    return tokens, torch.cat(logits).float()


def leading_agreement(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        n += 1
    return n / len(a)


def check_parity(
    model,
    onnx_path: str | Path,
    prompt_ids: list[list[int]],
    thresholds: str,
    new_tokens: int = 32,
    providers: list[str] | None = None,
    cache_factory: Callable[[], object] | None = None,
) -> ParityReport:
    """Compare the artifact at ``onnx_path`` with ``model`` (the compressed PyTorch model it was built from);
    a compressed KV layout is compared against its PyTorch reference cache from ``cache_factory``."""
    dec = open_decoder(onnx_path, providers)
    pairs: list[tuple[list[int], np.ndarray, np.ndarray]] = []  # (prompt, artifact logits, reference logits)
    if cache_factory is None and not length_dependent_rope(model):
        # The artifact decodes greedily through its own KV cache; the reference scores the same sequences in
        # one batched forward pass (no cache, right padding: causal attention keeps the padding out of every
        # real position), so the PyTorch side dequantizes each weight once, not once per token.
        runs = [(prompt, *ort_decode(dec, prompt, new_tokens)) for prompt in prompt_ids]
        refs = torch_logits_batch(model, [prompt + tokens[:-1] for prompt, tokens, _ in runs])
        pairs = [(prompt, got, ref) for (prompt, _, got), ref in zip(runs, refs, strict=True)]
    else:  # a token-by-token reference: a compressed KV layout (CompressedCache), or longrope's switch
        for prompt in prompt_ids:
            tokens, ref_logits = torch_greedy(model, torch.tensor([prompt]), new_tokens, cache_factory)
            got = ort_decode(dec, prompt, new_tokens, forced=tokens)[1]
            pairs.append((prompt, got, ref_logits.cpu().numpy()))
    return score_pairs(pairs, thresholds, new_tokens)


def score_pairs(
    pairs: list[tuple[list[int], np.ndarray, np.ndarray]], thresholds: str, new_tokens: int
) -> ParityReport:
    """The report over (prompt, artifact logits, reference logits (T+N-1, V)) of every prompt."""
    max_err, agree, total, greedy, flips, ties, margins, errors = 0.0, 0, 0, [], 0, 0, [], []
    for prompt, got, ref in pairs:
        err = np.abs(got - ref).max(-1)  # per position
        max_err = max(max_err, float(err.max()))
        flipped = got.argmax(-1) != ref.argmax(-1)
        top2 = np.partition(ref, -2, axis=-1)[:, -2:]
        gap = top2.max(-1) - top2.min(-1)  # the reference's top-1 margin
        flips += int(flipped.sum())
        # Diagnostic only (the verdict below uses every flip): a flip where the reference's margin is within
        # twice the typical rounding error is a near-tie, as on random-weight models' near-uniform logits.
        ties += int((flipped & (gap < 2 * np.median(err))).sum())
        margins.append(gap)
        errors.append(err)
        agree += int((~flipped).sum())
        total += len(ref)
        # Until the first disagreement both greedy decodes see exactly these inputs, so the leading agreement
        # of the two argmaxes over the decoded positions is the free-running greedy agreement.
        decoded = slice(len(prompt) - 1, None)
        greedy.append(leading_agreement(got[decoded].argmax(-1).tolist(), ref[decoded].argmax(-1).tolist()))
    t = THRESHOLDS[thresholds]
    report = ParityReport(
        max_abs_logit=max_err,
        top1=agree / total,
        greedy=float(np.mean(greedy)),
        new_tokens=new_tokens,
        prompts=len(pairs),
        thresholds=thresholds,
        passed=False,
        flips=flips,
        flips_at_ties=ties,
        median_margin=float(np.median(np.concatenate(margins))),
        median_error=float(np.median(np.concatenate(errors))),
    )
    report.passed = max_err <= t.max_abs_logit and report.top1 >= t.min_top1 and report.greedy >= t.min_greedy
    return report
