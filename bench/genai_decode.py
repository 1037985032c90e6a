"""Decode one ONNX artifact through onnxruntime-genai (its C++ loop): prefill P tokens, then N greedy steps.

    python bench/genai_decode.py ARTIFACT_DIR --threads 1 --prompt-len 64 --gen 32 --runs 5 --json out.json

Run by bench/speed.py in a fresh process per artifact, so the peak RSS it reports is this artifact's own. The
prompt is runtime/runner.py's (same seed, same ids), so both drivers decode the same sequence. Timing follows
onnxruntime-genai's lazy loop: ``append_tokens`` runs the prompt's forward pass and the first
``generate_next_token`` only picks its token (prefill = both); each later call runs one forward pass and picks the
next token (one decode step). A bad folder prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgepack.runtime.runner import make_prompt, peak_rss_mib, read_genai_config, spread


@dataclass(frozen=True)
class GenaiRun:
    """One timed sequence: prefill seconds, each decode step's seconds and the token ids generated."""

    prefill_s: float
    step_s: list[float]
    tokens: list[int]


def load_model(artifact: Path, threads: int):
    """og.Model on the CPU with ``threads`` intra-op threads (overlaid on the artifact's genai_config.json)."""
    import onnxruntime_genai as og

    config = og.Config(str(artifact))
    config.clear_providers()
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def decode_once(model, prompt: np.ndarray, steps: int) -> GenaiRun:
    """Greedy prefill + ``steps`` decode steps through og.Generator, timed per call."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + steps + 1, batch_size=1)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt.astype(np.int32))
    generator.generate_next_token()
    prefill_s = time.perf_counter() - start
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        generator.generate_next_token()
        step_s.append(time.perf_counter() - start)
    tokens = [int(t) for t in generator.get_sequence(0)[prompt.shape[1] :]]
    return GenaiRun(prefill_s, step_s, tokens)


def run(artifact: Path, threads: int, prompt_len: int, gen: int, runs: int, warmup: int) -> dict:
    """Load, warm up, time ``runs`` sequences; the report uses runner.py's keys for the shared metrics."""
    import onnxruntime_genai as og

    genai = read_genai_config(artifact)
    if not genai:
        raise ValueError(f"{artifact} has no genai_config.json: onnxruntime-genai cannot load it")
    start = time.perf_counter()
    model = load_model(artifact, threads)
    load_s = time.perf_counter() - start
    prompt = make_prompt(prompt_len, genai["model"].get("vocab_size"))
    for _ in range(warmup):
        decode_once(model, prompt, gen)
    timings = [decode_once(model, prompt, gen) for _ in range(runs)]
    return {
        "driver": "onnxruntime-genai",
        "onnxruntime_genai": og.__version__,
        "artifact": str(artifact.resolve()),
        "threads": threads,
        "prompt_len": prompt_len,
        "gen": gen,
        "runs": runs,
        "warmup": warmup,
        "kv_layout": "shared" if genai.get("search", {}).get("past_present_share_buffer") else "concat",
        "load_s": load_s,
        "ttft_ms": spread([t.prefill_s * 1e3 for t in timings]),
        "prefill_tok_s": spread([prompt_len / t.prefill_s for t in timings]),
        "decode_tok_s": spread([gen / sum(t.step_s) for t in timings]),
        "decode_token_ms_median": statistics.median(s * 1e3 for t in timings for s in t.step_s),
        "peak_rss_mib": peak_rss_mib(),
        "generated_ids": timings[0].tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("error: onnxruntime-genai is not installed: pip install onnxruntime-genai", file=sys.stderr)
        return 2
    if not args.artifact.is_dir():
        print(f"error: artifact folder {args.artifact} does not exist", file=sys.stderr)
        return 2
    try:
        report = run(args.artifact, args.threads, args.prompt_len, args.gen, args.runs, args.warmup)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
