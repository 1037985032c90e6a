"""Decode speed of two or more artifacts side by side in ONE process, taking turns sequence by sequence.

    python bench/duel.py A B [C ...] --driver onnxruntime|onnxruntime-genai --threads 1 \
        [--prompt-len 64] [--gen 32] [--pairs 20] [--rounds 3] [--json out.json]

bench/speed.py measures every artifact in a fresh process, one after the other. That is what peak RSS needs,
but on this host a whole process can land in a slow or a fast state (the same 8 MB artifact decodes at
1,206-3,015 tok/s between processes), so at a 0.4 ms decode step a ratio of two processes is mostly that
state. Here every artifact is loaded once into the same process; each "pair" decodes one sequence per artifact
(prefill ``--prompt-len`` tokens, then ``--gen`` greedy steps), the artifact that goes first rotating every
pair, so both meet the same host state. Per round: each artifact's median decode tok/s over its sequences and
the ratio of the first artifact to each other one; per pair: the same ratio, whose spread shows the noise.

The decode loops are the drivers' own: runtime/runner.py's ``generate`` over the KV layout the artifact declares
(the builder's shared buffer, edgepack's), and bench/genai_decode.py's ``decode_once`` (onnxruntime-genai's
C++ loop). Peak RSS is not measured here (one process holds all artifacts): bench/speed.py reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from edgepack.runtime import runner  # noqa: E402

Sequence = Callable[[], tuple[float, float]]  # one timed sequence -> (prefill tok/s, decode tok/s)


def runner_sequence(artifact: Path, threads: int, prompt_len: int, gen: int) -> Sequence:
    """runner.py's decoder for ``artifact`` (its declared KV layout); each call times one sequence."""
    config = runner.RunConfig(threads=threads, prompt_len=prompt_len, gen=gen)
    session = runner.make_session(runner.find_model_file(artifact), config)
    genai = runner.read_genai_config(artifact)
    io = runner.DecoderIO.from_session(session, genai)
    decoder = runner.KV_LAYOUTS[runner.declared_kv_layout(genai, io)].decoder(session, io, config)
    prompt = runner.make_prompt(prompt_len, io.vocab_size)

    def once() -> tuple[float, float]:
        t = runner.generate(decoder, prompt, gen)
        return prompt_len / t.prefill_s, gen / sum(t.step_s)

    return once


def genai_sequence(artifact: Path, threads: int, prompt_len: int, gen: int) -> Sequence:
    """onnxruntime-genai's generator loop (bench/genai_decode.py) for ``artifact``."""
    import genai_decode

    model = genai_decode.load_model(artifact, threads)
    prompt = runner.make_prompt(prompt_len, runner.read_genai_config(artifact)["model"].get("vocab_size"))

    def once() -> tuple[float, float]:
        t = genai_decode.decode_once(model, prompt, gen)
        return prompt_len / t.prefill_s, gen / sum(t.step_s)

    return once


DRIVERS = {"onnxruntime": runner_sequence, "onnxruntime-genai": genai_sequence}


def duel(artifacts: list[Path], driver: str, threads: int, prompt_len: int, gen: int, pairs: int,
         rounds: int, warmup: int = 2) -> dict:  # fmt: skip
    """Per round and artifact, every sequence's prefill and decode tok/s; artifacts take turns, rotating."""
    sequences = [DRIVERS[driver](a, threads, prompt_len, gen) for a in artifacts]
    for seq in sequences:
        for _ in range(warmup):
            seq()
    result = {"rounds": [], "load": [os.getloadavg()[0]]}
    n = len(sequences)
    for _ in range(rounds):
        decode: list[list[float]] = [[] for _ in sequences]
        prefill: list[list[float]] = [[] for _ in sequences]
        for p in range(pairs):
            for j in range(n):
                i = (p + j) % n  # who goes first rotates every pair
                pre, dec = sequences[i]()
                prefill[i].append(pre)
                decode[i].append(dec)
        result["rounds"].append({"decode_tok_s": decode, "prefill_tok_s": prefill})
        result["load"].append(os.getloadavg()[0])
    return result


def summarize(result: dict, names: list[str]) -> dict:
    """Per round: median tok/s per artifact, and the first artifact's ratio to each other (medians and pairs)."""
    out = []
    for rnd in result["rounds"]:
        med = [statistics.median(v) for v in rnd["decode_tok_s"]]
        pre = [statistics.median(v) for v in rnd["prefill_tok_s"]]
        first = rnd["decode_tok_s"][0]
        out.append(
            {
                "decode_median": dict(zip(names, med, strict=True)),
                "prefill_median": dict(zip(names, pre, strict=True)),
                "decode_ratio": {n: med[0] / m for n, m in zip(names[1:], med[1:], strict=True)},
                "prefill_ratio": {n: pre[0] / m for n, m in zip(names[1:], pre[1:], strict=True)},
                "pair_ratio_quartiles": {
                    n: [
                        float(q)
                        for q in np.percentile([a / b for a, b in zip(first, v, strict=True)], [25, 50, 75])
                    ]  # fmt: skip
                    for n, v in zip(names[1:], rnd["decode_tok_s"][1:], strict=True)
                },
            }
        )
    return {"per_round": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "artifacts", type=Path, nargs="+", help="artifact folders; ratios are the first to each other"
    )
    p.add_argument("--names", default="", help="comma-separated labels (default: folder names)")
    p.add_argument("--driver", choices=tuple(DRIVERS), default="onnxruntime")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--pairs", type=int, default=20, help="sequences per artifact per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if len(args.artifacts) < 2:
        p.error("give at least two artifacts")
    missing = [a for a in args.artifacts if not a.is_dir()]
    if missing:
        print(f"error: artifact folder {missing[0]} does not exist", file=sys.stderr)
        return 2
    names = args.names.split(",") if args.names else [a.name for a in args.artifacts]
    if len(names) != len(args.artifacts):
        p.error("--names needs one label per artifact")
    start = time.time()
    raw = duel(args.artifacts, args.driver, args.threads, args.prompt_len, args.gen, args.pairs, args.rounds)
    summary = summarize(raw, names)
    load = raw["load"]
    print(f"{args.driver}, {args.threads} thread(s), prompt {args.prompt_len}, {args.gen} steps, "
          f"{args.pairs} sequences per artifact per round; host load {min(load):.1f}-{max(load):.1f}")  # fmt: skip
    print("| round | " + " | ".join(f"{n} decode tok/s" for n in names) + " | "
          + " | ".join(f"{names[0]} / {n} decode (pairs p25-p75)" for n in names[1:])
          + " | " + " | ".join(f"{names[0]} / {n} prefill" for n in names[1:]) + " |")  # fmt: skip
    print("|---" * (1 + len(names) + 2 * (len(names) - 1)) + "|")
    for r, row in enumerate(summary["per_round"], 1):
        cells = [f"{row['decode_median'][n]:.1f}" for n in names]
        cells += [
            f"{row['decode_ratio'][n]:.2f} ({row['pair_ratio_quartiles'][n][0]:.2f}-"
            f"{row['pair_ratio_quartiles'][n][2]:.2f})"
            for n in names[1:]
        ]
        cells += [f"{row['prefill_ratio'][n]:.2f}" for n in names[1:]]
        print(f"| {r} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({
            "artifacts": [str(a) for a in args.artifacts], "names": names, "driver": args.driver,
            "threads": args.threads, "prompt_len": args.prompt_len, "gen": args.gen, "pairs": args.pairs,
            "seconds": round(time.time() - start, 1), **raw, **summary,
        }, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
