"""Export cost at real model sizes: wall time and peak RSS of `edgepack export` next to the onnxruntime-genai
model builder, on models with the exact configs of Qwen2.5-0.5B, Llama-3.2-1B and Qwen2.5-3B and random
weights (no hub: the configs are written out below).

The random checkpoint is written shard by shard from a meta-device skeleton (one tensor in memory at a time),
so making a 3B model costs no more RAM than its largest tensor. Each export runs in a fresh process; its peak
RSS is the child's ru_maxrss (os.wait4). Runs are sequential (never two big processes at once).

    python bench/scale.py --models qwen2.5-0.5b --modes w4 --json docs/results/scale.json
    python bench/scale.py --models qwen2.5-0.5b,llama-3.2-1b,qwen2.5-3b --modes fp32,w4,w3 --peer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "edgepack" / "assets" / "stories260k"  # its tokenizer: parity prompts only need valid ids

# The published config.json fields that shape the math and the size (Hugging Face model cards).
QWEN_COMMON = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    use_sliding_window=False,
    sliding_window=32768,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151643,
)
CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        QWEN_COMMON,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_window_layers=21,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen2.5-3b": dict(
        QWEN_COMMON,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_window_layers=70,
    ),
}
MODES = {
    "fp32": [],
    "w4": ["--wbits", "4", "--group-size", "128"],
    "w3": ["--wbits", "3", "--group-size", "128"],
}
PEER_PRECISION = {"fp32": "fp32", "w4": "int4"}  # the builder has no 3-bit
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# Calibration cost probes (--no-parity, Tiny Shakespeare): small sample counts whose time scales linearly to the
# defaults' (every cost of these methods is per calibration sample and epoch), see project().
PROBES: dict[str, dict] = {
    "gptq-w4": {"kind": "quantize", "wbits": 4, "method": "gptq", "options": {"n_samples": 16}},
    "abq-w4": {"kind": "quantize", "wbits": 4, "method": "abq", "options": {"n_samples": 4, "epochs": 1}},
    "fold": {
        "kind": "fold",
        "remove": 0.25,
        "share_group": 2,
        "gate_steps": 4,
        "cure_steps": 4,
        "n_samples": 8,
    },
}


def make_checkpoint(name: str, folder: Path, shard_bytes: int = 1 << 30) -> Path:
    """A random-weight safetensors checkpoint of CONFIGS[name], written one tensor at a time in bfloat16 (the
    dtype these models are published in, so loaders and the builder read what they would read from the hub)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fields = dict(CONFIGS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    shard, size, index, n = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            file = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            index.update({k: file for k in shard})
            shard, size, n = {}, 0, n + 1

    for key, p in skeleton.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if p.dim() == 1:
            t = torch.ones(p.shape) if "norm" in key else torch.randn(p.shape, generator=gen) * 0.02
        else:
            t = torch.randn(p.shape, generator=gen) * 0.02
        shard[key] = t.to(torch.bfloat16)
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}, indent=2)
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(STORIES / f, folder / f)
    return folder


def measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds, the child's peak RSS (GB) and its exit status."""
    start = time.perf_counter()
    with log.open("w") as out:
        # outside the checkout, whose kernels/ would shadow the Hugging Face package transformers imports
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    ok = os.waitstatus_to_exitcode(status) == 0
    row = {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
        "ok": ok,
        "log": str(log),
    }
    if not ok:  # the tool's last line: edgepack's one-line error
        row["error"] = (log.read_text().strip().splitlines() or [""])[-1][:400]
    return row


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.models:
        model = make_checkpoint(name, args.work / name)
        for mode in args.modes:
            out = args.work / f"{name}-{mode}"
            cmd = [sys.executable, "-m", "edgepack", "export", "--model", str(model), "-o", str(out)]
            if mode in PROBES:
                recipe = args.work / f"probe-{mode}.json"
                recipe.write_text(json.dumps({"steps": [PROBES[mode]]}))
                cmd += ["--recipe", str(recipe), "--calib", str(SHAKESPEARE), "--no-parity"]
            else:
                # --eval none: export time comparable with the builder's (which measures no quality)
                cmd += MODES[mode] + ([] if args.parity else ["--no-parity"]) + ["--eval", "none"]
            tools = [("edgepack", out, cmd)]
            if args.peer and mode in PEER_PRECISION:
                peer = args.work / f"{name}-{mode}-genai"
                cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model)]
                cmd += [
                    "-o",
                    str(peer),
                    "-p",
                    PEER_PRECISION[mode],
                    "-e",
                    "cpu",
                    "-c",
                    str(args.work / "cache"),
                ]
                tools.append(("genai-builder", peer, cmd))
            for tool, folder, command in tools:
                shutil.rmtree(folder, ignore_errors=True)
                load = os.getloadavg()[0]
                row = {
                    "model": name,
                    "mode": mode,
                    "tool": tool,
                    **measured(
                        command, folder.with_name(folder.name + ("" if args.parity else "-noparity") + ".log")
                    ),
                    "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)],
                }
                manifest = folder / "manifest.json"
                if manifest.is_file():  # edgepack's per-step seconds and memory
                    m = json.loads(manifest.read_text())
                    row["phases"] = m.get("phases")
                    row["parity"] = m.get("parity")
                rows.append(row)
                print(json.dumps(row), flush=True)
                if not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | mode | tool | seconds | peak RSS GB | ok | load avg | edgepack steps (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in (r.get("phases") or {}).items())
        load = " -> ".join(str(x) for x in r.get("load_avg", []))
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['tool']} | {r['seconds']} | {r['peak_rss_gb']} | {r['ok']} | {load} "
            f"| {steps or '—'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen2.5-0.5b", help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument(
        "--modes", default="fp32,w4,w3", help=f"comma-separated: {', '.join([*MODES, *PROBES])}"
    )
    parser.add_argument("--peer", action="store_true", help="also run the onnxruntime-genai builder")
    parser.add_argument("--parity", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--keep", action="store_true", help="keep the artifacts")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-scale"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--make-only", action="store_true", help="only write the random checkpoints")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.models if m not in CONFIGS] + [
        m for m in args.modes if m not in MODES and m not in PROBES
    ]
    if unknown:
        parser.error(f"unknown model/mode {', '.join(unknown)}")
    if args.make_only:
        for name in args.models:
            print(make_checkpoint(name, args.work / name))
        return
    rows = run(args)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"host": os.uname().nodename, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
