"""ONNX-vs-PyTorch parity: the same prompts through the artifact (onnxruntime) and the model it came from.

Reported: max abs logit error and top-1 agreement over the prompt (prefill) and over teacher-forced decode
steps through the KV cache, and greedy agreement over ``new_tokens`` free-running tokens. Each export runs it
and fails when a threshold for its dtype / activation bits is missed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

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
}


@dataclass
class ParityReport:
    max_abs_logit: float
    top1: float  # prefill + teacher-forced decode positions
    greedy: float  # mean over prompts of (leading greedy tokens equal) / new_tokens
    new_tokens: int
    prompts: int
    thresholds: str
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"max |dlogit| {self.max_abs_logit:.2e}, top-1 {self.top1:.3f}, "
            f"greedy {self.greedy:.3f} over {self.new_tokens} tokens x {self.prompts} prompts"
        )


PAST_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,  # quantized KV codes
    "tensor(int8)": np.int8,  # static per-channel int8 KV codes
    "tensor(int64)": np.int64,  # MiniCache retained positions
}


class OrtDecoder:
    """Minimal prefill + decode driver for an edgepack decoder graph (batch 1)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.has_position_ids = any(i.name == "position_ids" for i in self.session.get_inputs())
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Every past input empty: symbolic dims 0 (batch_size = ``batch``), dtype from the graph (any KV layout)."""
        cache = {}
        for i in self.past_inputs:
            shape = [batch if d == "batch_size" else (d if isinstance(d, int) else 0) for d in i.shape]
            cache[i.name] = np.zeros(shape, PAST_DTYPES[i.type])
        return cache

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict]:
        """Run ids (B, S) after ``past_len`` cached tokens; returns logits (B, S, V) and the new cache."""
        b, s = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((b, past_len + s), np.int64),
            **cache,
        }
        if self.has_position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + s, dtype=np.int64)[None].repeat(b, 0)
        outs = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        new_cache = {
            name.replace("present.", "past_key_values."): v for name, v in outs.items() if name != "logits"
        }
        return outs["logits"], new_cache


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


def ort_logits_teacher_forced(dec: OrtDecoder, prompt: list[int], forced: list[int]) -> np.ndarray:
    """Artifact logits over the prompt (prefill) then one decode step per forced token: (T+N-1, V)."""
    cache = dec.empty_cache()
    logits, cache = dec.step(np.array([prompt]), cache, 0)
    rows = [logits[0]]
    for j, tok in enumerate(forced[:-1]):
        logits, cache = dec.step(np.array([[tok]]), cache, len(prompt) + j)
        rows.append(logits[0])
    return np.concatenate(rows).astype(np.float32)


def ort_greedy(dec: OrtDecoder, prompt: list[int], new_tokens: int) -> list[int]:
    cache = dec.empty_cache()
    logits, cache = dec.step(np.array([prompt]), cache, 0)
    tokens = []
    for j in range(new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        if len(tokens) == new_tokens:
            break
        logits, cache = dec.step(np.array([[tokens[-1]]]), cache, len(prompt) + j)
    return tokens


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
    dec = OrtDecoder(onnx_path, providers)
    max_err, agree, total, greedy = 0.0, 0, 0, []
    for prompt in prompt_ids:
        ref_tokens, ref_logits = torch_greedy(model, torch.tensor([prompt]), new_tokens, cache_factory)
        got = ort_logits_teacher_forced(dec, prompt, ref_tokens)
        ref = ref_logits.cpu().numpy()
        max_err = max(max_err, float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
        # Until the first disagreement a free-running greedy decode sees exactly these inputs, so the
        # leading agreement of the teacher-forced argmax equals free-running greedy agreement.
        ort_tokens = got[len(prompt) - 1 :].argmax(-1).tolist()
        greedy.append(leading_agreement(ref_tokens, ort_tokens))
    t = THRESHOLDS[thresholds]
    report = ParityReport(
        max_abs_logit=max_err,
        top1=agree / total,
        greedy=float(np.mean(greedy)),
        new_tokens=new_tokens,
        prompts=len(prompt_ids),
        thresholds=thresholds,
        passed=False,
    )
    report.passed = max_err <= t.max_abs_logit and report.top1 >= t.min_top1 and report.greedy >= t.min_greedy
    return report
