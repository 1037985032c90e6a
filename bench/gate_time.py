#!/usr/bin/env python3
"""Gate-training cost for depth folding: one gate step (forward + backward of the frozen, gated model) at
sequence length 256 (the calibration samples) vs GATE_SEQ_LEN (what gate_scores trains on), interleaved in one
process so both see the same host load. Reports CPU seconds (on one thread: robust on a loaded host, where
OpenMP spinning inflates multi-thread CPU time) and wall seconds per step, and the projected time of
config.gate_steps steps on an idle host with that many threads.

    python bench/gate_time.py [--model DIR] [--reps 3] [--json docs/results/gate_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from edgepack.compressor.fold import FoldConfig
from edgepack.compressor.fold_hooks import decoder_layers, gated, trainable_only
from edgepack.compressor.fold_importance import GATE_SEQ_LEN, gate_penalty, next_token_nll

from edgepack.model import load_model, load_tokenizer
from edgepack.textdata import calibration_samples, read_text

SHARED = Path(__file__).resolve().parents[2] / "shared"


def step_seconds(model, ids: torch.Tensor, gate_logits: torch.Tensor, seq_len: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one gate step on ``ids[:, :seq_len]``."""
    x = ids[:, :seq_len]
    cpu, wall = time.process_time(), time.perf_counter()
    lm = next_token_nll(model(input_ids=x, use_cache=False).logits, x)
    (lm + gate_penalty(torch.sigmoid(gate_logits), len(gate_logits) - 3, 1.0, 0.2)).backward()
    gate_logits.grad = None
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "mix-llama-14m")
    parser.add_argument("--calib", type=Path, default=SHARED / "data" / "tinyshakespeare.txt")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while timing (1: CPU time is not inflated by spinning)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "results" / "gate_time.json",
    )
    args = parser.parse_args()
    config = FoldConfig(structure="blocks")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    ids = calibration_samples(tokenizer, read_text(args.calib), config.batch_size, config.seq_len)  # (B, 256)
    layers = decoder_layers(model)
    gate_logits = torch.full((len(layers),), config.gate_init, requires_grad=True)
    lengths = (config.seq_len, GATE_SEQ_LEN)
    cpu: dict[int, list[float]] = {n: [] for n in lengths}
    wall: dict[int, list[float]] = {n: [] for n in lengths}
    with trainable_only(model, []), gated(layers, lambda i: torch.sigmoid(gate_logits[i])):
        step_seconds(model, ids, gate_logits, GATE_SEQ_LEN)  # warm-up
        for _ in range(args.reps):
            for n in lengths:
                c, w = step_seconds(model, ids, gate_logits, n)
                cpu[n].append(c)
                wall[n].append(w)
    threads = args.threads
    rows = []
    print(
        f"| seq_len | CPU s/step (median of {args.reps}) | wall s/step | projected {config.gate_steps} steps, idle host, {threads} threads |"
    )
    print("|---|---|---|---|")
    for n in lengths:
        c = statistics.median(cpu[n])
        projected = config.gate_steps * c / threads
        rows.append({"seq_len": n, "cpu_s": cpu[n], "wall_s": wall[n], "projected_s": round(projected, 1)})
        print(f"| {n} | {c:.2f} | {statistics.median(wall[n]):.2f} | {projected / 60:.1f} min |")
    print(
        f"CPU ratio {statistics.median(cpu[lengths[0]]) / statistics.median(cpu[lengths[1]]):.2f}x; load average {os.getloadavg()[0]:.1f}"
    )
    args.json.write_text(json.dumps({
        "model": args.model.name, "batch_size": config.batch_size, "gate_steps": config.gate_steps,
        "torch_threads": threads, "load_average": os.getloadavg(), "rows": rows,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
