"""Decode speed of KV-cache layouts at a long context, step by step interleaved across artifacts.

`edgepack bench A --compare B --context C` times 32 decode steps of each artifact one after the other, so on a
shared, loaded host one burst of someone else's work lands on one artifact only (ratios moved 0.5x-3.9x
between identical calls at load 8 on 2 CPUs). Here every artifact is opened through runner.py's own decoder
(the KV layout it declares: the shared past/present buffer, or concat), filled to ``--context`` tokens
(chunked prefill), then the artifacts take turns one decode step at a time (who goes first rotates every
step); each round refills the context.
The median step time per artifact, and its ratio to the first artifact's, are what is reported.

    python bench/kv_speed.py /tmp/kvs/w_plain /tmp/kvs/w_s8 /tmp/kvs/w_int4 --context 960 --steps 60 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from edgepack.runtime import runner


def open_decoder(spec: str, config: runner.RunConfig) -> tuple[runner.Decoder, str, int | None]:
    """runner.py's decoder for ``spec`` (ARTIFACT, or ARTIFACT@LAYOUT to override the KV layout it declares,
    e.g. a static-KV artifact in GroupQueryAttention's shared buffer): (decoder, layout, vocab)."""
    path, _, forced = spec.partition("@")
    artifact = Path(path)
    session = runner.make_session(runner.find_model_file(artifact), config)
    genai = runner.read_genai_config(artifact)
    io = runner.DecoderIO.from_session(session, genai)
    layout = forced or runner.declared_kv_layout(genai, io)
    return runner.KV_LAYOUTS[layout].decoder(session, io, config), layout, io.vocab_size


def fill(decoder: runner.Decoder, context: int, vocab: int | None) -> int:
    """Reset and prefill ``context`` tokens in runner.py's chunks; the greedy next token."""
    decoder.reset()
    prompt = runner.make_prompt(context, vocab)
    for s in range(0, context, runner.PREFILL_CHUNK):
        logits = decoder.step(prompt[:, s : s + runner.PREFILL_CHUNK])
    return int(np.argmax(logits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "artifacts",
        nargs="+",
        help="ARTIFACT or ARTIFACT@concat|shared; the first is the reference of the ratios",
    )
    ap.add_argument("--context", type=int, default=960, help="tokens filled before timing")
    ap.add_argument("--steps", type=int, default=60, help="decode steps per round (context .. context+steps)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    config = runner.RunConfig(
        threads=args.threads, prompt_len=args.context, gen=args.steps, contexts=(args.context,)
    )
    opened = [open_decoder(a, config) for a in args.artifacts]
    steps: list[list[float]] = [[] for _ in opened]
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        tokens = [fill(d, args.context, vocab) for d, _, vocab in opened]
        for i in range(args.steps):
            for k in [(i + j) % len(opened) for j in range(len(opened))]:  # rotate who goes first
                decoder = opened[k][0]
                start = time.perf_counter()
                logits = decoder.step(np.array([[tokens[k]]], np.int64))
                steps[k].append(time.perf_counter() - start)
                tokens[k] = int(np.argmax(logits))
        load.append(os.getloadavg()[0])
    base = statistics.median(steps[0])
    rows = []
    for artifact, (decoder, layout, _), times in zip(args.artifacts, opened, steps, strict=True):
        med = statistics.median(times)
        rows.append(
            {
                "artifact": artifact,
                "kv_layout": layout,
                "kv_bytes_per_token": decoder.kv_bytes() / (args.context + args.steps),
                "median_step_ms": med * 1e3,
                "p10_step_ms": float(np.percentile(times, 10)) * 1e3,
                "decode_tok_s": 1 / med,
                "ratio": base / med,
            }
        )
    print(
        f"context {args.context}..{args.context + args.steps}, {args.rounds} rounds x {args.steps} interleaved "
        f"steps, {args.threads} thread(s); host load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs"
    )
    print("| artifact | KV layout | KV B/token | median step (ms) | p10 (ms) | decode tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {Path(r['artifact']).name} | {r['kv_layout']} | {r['kv_bytes_per_token']:.0f} | "
            f"{r['median_step_ms']:.2f} | {r['p10_step_ms']:.2f} | {r['decode_tok_s']:.1f} | {r['ratio']:.2f}x |"
        )
    if args.json:
        report = {
            "context": args.context,
            "steps": args.steps,
            "rounds": args.rounds,
            "load": load,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
