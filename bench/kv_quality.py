"""KV-cache quality vs bytes: perplexity at a long context through the MiniCache PyTorch reference.

Rows: no merge; MiniCache from mid-depth (the paper's setting) and from the earliest start layer that keeps
calibration perplexity within 2% (the default plan search), each also with int4 KV; int8 KV; int4 KV (per token
and per channel); the cross-layer baseline (layer l+1 reuses layer l's KV, the mid-depth pairs).
Every row runs the text token by token through ``CompressedCache`` (decode mode: each token attends over the
compressed past plus itself), so the numbers do not depend on the export; the exported graph matches the reference (tests/test_minicache.py). Calibration: Tiny Shakespeare's first 90%; evaluation: its
held-out 10% (in domain) and WikiText-2 test (off domain). Bytes per token are what the layout really stored.

    nice -n 10 .venv/bin/python bench/kv_quality.py --model ../shared/models/mix-llama-14m --context 1024 \
        --json docs/results/kv_mix-llama-14m.json

``--make-qwen05 DIR`` writes the random-weight Qwen2.5-0.5B-shaped model that docs/results/kv.md exports and
benchmarks with ``edgepack bench --context 1024,4096`` (memory and speed; its perplexity means nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from edgepack.compressor.minicache import (
    KVCacheConfig,
    decode_nll,
    layer_kv,
    make_plan,
    plain_bytes_per_token,
    plan_kv_cache,
)

from edgepack.model import load_model, load_tokenizer
from edgepack.textdata import calibration_samples, read_text, split_text, tokenize

SHARED = Path(__file__).resolve().parents[2] / "shared"
log = logging.getLogger("kv_quality")


def eval_windows(tokenizer, text: str, context: int, n: int) -> torch.Tensor:
    """``n`` consecutive windows of ``context`` + 1 tokens from the start of ``text``: (n, context + 1)."""
    ids = tokenize(tokenizer, text, max_tokens=n * (context + 1))
    if len(ids) < n * (context + 1):
        raise SystemExit(f"text too short for {n} windows of {context} tokens")
    return ids.view(n, context + 1)


def rows(
    model, calib: torch.Tensor, only: set[int] | None = None, t: float = 0.5
) -> list[tuple[str, object]]:
    """(name, plan or None) per row: MiniCache from mid-depth (the paper's setting) and from the earliest start
    layer that keeps calibration perplexity within 2% (the default plan search), each also with int4 KV.
    ``only`` keeps the rows with those indices (the plan search runs only when an "auto" row is kept)."""
    n = model.config.num_hidden_layers
    keep = only if only is not None else set(range(11))
    # t fixed (default: the paper's 0.5) for these rows, so the start-layer search is what they compare
    mini = KVCacheConfig(merge="minicache", t=t, n_samples=calib.shape[0], seq_len=calib.shape[1])
    mid = make_plan(model, mini, layer_kv(model, calib), n // 2)
    auto = None
    if keep & {3, 4}:
        auto, search = plan_kv_cache(model, mini, calib)
        log.info("MiniCache auto plan: start %s, search %s", auto.start_layer, search)
    table = [("no merge (float)", lambda: None)]
    mid_label = f"mid-depth, start {mid.start_layer}" + (f", t {t}" if t != 0.5 else "")
    for label, plan in ((mid_label, lambda: mid), ("auto", lambda: auto)):
        table.append((f"MiniCache ({label})", plan))
        table.append((f"MiniCache ({label}) + int4 per token", lambda p=plan: replace(p(), bits=4)))
    for name, cfg in (
        ("int8 KV (per token)", KVCacheConfig(bits=8)),
        ("int4 KV (per token)", KVCacheConfig(bits=4)),
        ("int4 KV (per channel, 32 tokens)", KVCacheConfig(bits=4, group="channel")),
        (f"cross-layer share (start {mid.start_layer})", KVCacheConfig(merge="share")),
    ):
        start = mid.start_layer if cfg.merge == "share" else None
        table.append((name, lambda c=cfg, s=start: make_plan(model, c, None, s)))
    for bits in (8, 4):  # fixed per-channel scales from the calibration text (GroupQueryAttention's cache)
        cfg = KVCacheConfig(bits=bits, group="static")
        table.append(
            (
                f"int{bits} KV (static per channel)",
                lambda c=cfg: make_plan(model, c, layer_kv(model, calib), None),
            )
        )
    out = []
    for k, (name, plan) in enumerate(table):
        if k in keep:
            p = plan()
            out.append((name.replace("auto", f"auto, start {p.start_layer}") if p is not None else name, p))
    return out


QWEN05 = dict(  # Qwen2.5-0.5B's exact shape; random weights: for KV memory and decode speed, not quality
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    architectures=["Qwen2ForCausalLM"],
    bos_token_id=1,
    eos_token_id=2,
)


def make_qwen05(folder: Path) -> None:
    """Write a random-weight model with Qwen2.5-0.5B's config (q/k/v bias) and stories260k's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **QWEN05))
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SHARED / "models" / "stories260k" / name, folder / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "mix-llama-14m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=1, help="evaluation windows per dataset")
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rows", default="", help="comma-separated row indices to run (default: all 11)")
    ap.add_argument("--t", type=float, default=0.5, help="MiniCache SLERP position for the MiniCache rows")
    ap.add_argument("--make-qwen05", type=Path, default=None, help="only write the random 0.5B model there")
    args = ap.parse_args()
    if args.make_qwen05 is not None:
        make_qwen05(args.make_qwen05)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    train, held = split_text(read_text(SHARED / "data" / "tinyshakespeare.txt"))
    calib = calibration_samples(tok, train, args.calib_samples, args.calib_len)
    data = {
        "shakespeare held-out": eval_windows(tok, held, args.context, args.windows),
        "wikitext-2": eval_windows(
            tok, read_text(SHARED / "data" / "wikitext2-raw-test.txt"), args.context, args.windows
        ),
    }
    base_bytes = plain_bytes_per_token(model.config, 4)
    results = []
    only = {int(r) for r in args.rows.split(",") if r.strip()} or None
    for name, plan in rows(model, calib, only, args.t):
        t0 = time.perf_counter()
        entry = {"row": name, "plan": plan.to_dict() if plan is not None else None, "ppl": {}}
        for dname, ids in data.items():
            nll, n, stats = decode_nll(model, ids, plan)
            entry["ppl"][dname] = math.exp(nll / n)
            entry.update(stats)
        per_token = entry.get("bytes_per_token", base_bytes)
        per_token16 = entry.get("bytes_per_token_fp16", base_bytes / 2)
        entry["compression_vs_fp32"] = base_bytes / per_token
        entry["compression_vs_fp16"] = base_bytes / 2 / per_token16
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
        log.info("%s: %s", name, json.dumps({k: v for k, v in entry.items() if k != "plan"}))
    base = results[0]["ppl"]  # row 0 (no merge) must be among --rows for the deltas
    print(f"\n{args.model.name}, context {args.context}, decode mode, {args.windows} window(s) per dataset")
    print(
        "| KV layout | bytes/token (fp32 artifact) | x fewer (fp32) | x fewer (fp16 artifact) | retained | "
        + " | ".join(f"ppl {d} (delta)" for d in data)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(data))
    for r in results:
        cells = [f"{r['ppl'][d]:.2f} ({100 * (r['ppl'][d] / base[d] - 1):+.1f}%)" for d in data]
        print(
            f"| {r['row']} | {r.get('bytes_per_token', base_bytes):.0f} | {r['compression_vs_fp32']:.2f} | "
            f"{r['compression_vs_fp16']:.2f} | {r.get('retained_fraction', 0):.3f} | "
            + " | ".join(cells)
            + " |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"model": args.model.name, "context": args.context, "rows": results}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
