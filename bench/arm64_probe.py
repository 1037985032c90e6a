#!/usr/bin/env python3
"""Logits and greedy tokens of one artifact's model file: run on x86 and inside the emulated ARM64 root.

Standard library + numpy + onnxruntime only (it runs in the arm64 chroot). Usage:
    python arm64_probe.py MODEL_FILE PROMPTS.json OUT.npz [--new-tokens N]
PROMPTS.json: a list of token-id lists. OUT.npz: logits_<i> (T, V) over every prompt position (first half
prefilled, the rest teacher-forced through the KV cache) and greedy_<i> (N free-running greedy tokens).
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import onnxruntime as ort


def run(model_file: str, prompts: list[list[int]], new_tokens: int) -> dict[str, np.ndarray]:
    """Per prompt: prefill its first half, teacher-force the rest one token at a time through the KV cache
    (logits of every position: the same inputs on every machine and artifact), then greedy-decode
    ``new_tokens`` from its end. One intra-op thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    names = [o.name for o in session.get_outputs()]
    has_positions = any(i.name == "position_ids" for i in session.get_inputs())  # the fused form has none

    def step(ids: list[int], cache: dict, past: int) -> tuple[np.ndarray, dict]:
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, past + len(ids)), np.int64),
            **cache,
        }
        if has_positions:
            feeds["position_ids"] = np.arange(past, past + len(ids), dtype=np.int64)[None]
        results = dict(zip(names, session.run(names, feeds), strict=True))
        new = {k.replace("present.", "past_key_values."): v for k, v in results.items() if k != "logits"}
        return results["logits"][0], new

    out: dict[str, np.ndarray] = {}
    for p, prompt in enumerate(prompts):
        cache = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
        half = max(1, len(prompt) // 2)
        logits, cache = step(prompt[:half], cache, 0)  # (half, V)
        rows = [logits]
        for j, token in enumerate(prompt[half:]):  # teacher-forced decode steps
            logits, cache = step([token], cache, half + j)
            rows.append(logits)
        tokens = []
        for j in range(new_tokens):  # free-running greedy from the prompt's end
            tokens.append(int(rows[-1][-1].argmax()) if j == 0 else int(logits[-1].argmax()))
            logits, cache = step([tokens[-1]], cache, len(prompt) + j)
        out[f"logits_{p}"] = np.concatenate(rows).astype(np.float32)  # (T, V): every prompt position
        out[f"greedy_{p}"] = np.array(tokens, np.int64)
    out["machine"] = np.array(platform.machine())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_file")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    prompts = json.loads(open(args.prompts).read())
    np.savez(args.out, **run(args.model_file, prompts, args.new_tokens))


if __name__ == "__main__":
    main()
