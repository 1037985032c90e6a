"""Server-GPU decode of edgepack's cuda artifacts against the onnxruntime-genai builder's, on one CUDA GPU.

    python bench/cuda_runtime.py [--steps model,builder,export,parity,torch,ort] [--widths fp16,W4,W3,W2]
                                 [--cache DIR] [--out docs/results/cuda_runtime.json]

Steps (each caches what it builds in ``--cache``; the JSON at ``--out`` is updated step by step, so the steps
can run in separate calls on one machine):

- ``model``: Qwen2.5-0.5B's exact config with random weights (bench/speed.py's, no hub), or ``--model DIR``.
- ``builder``: the onnxruntime-genai model builder's ``-e cuda -p int4`` artifact (the yardstick for W4).
- ``export``: ``edgepack export --target cuda`` at each width, default flags plus ``--wbits`` (no parity here:
  speed artifacts, as in bench/speed.py).
- ``parity``: the same widths plus a folded W4 (Scan-shared blocks) of a small model (``--parity-model``,
  default stories260k: head_dim 8, so the plain-attention fallback) and of mix-llama-14m when present (fused
  attention), exported for the cuda target with the exporter's parity check on; the exporter runs it on the
  CUDA EP when onnxruntime has it (the report's ``provider`` says where it ran).
- ``torch``: ``edgepack bench --backend torch-triton`` on the quantized artifacts at ``--widths`` (PyTorch on
  the Triton kernels, fp16 activations, the same weights as the ONNX file).
- ``ort``: the builder's artifact and ours at ``--widths``, through one plain onnxruntime decode loop
  (runtime/runner.py ``--device cuda``: IOBinding, KV cache on the GPU, each artifact's declared KV layout),
  a fresh process per measurement, ``--rounds`` rounds in turn; ratios are taken within a round.

Prints a table and writes JSON plus a Markdown table beside it. Needs onnxruntime-gpu for ``ort`` and for
parity on the CUDA EP, and a CUDA GPU for ``torch``; ``--device cpu`` runs the ort step on the CPU EP (a dry run
of the bench on a host without a GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import RUNNER, SHARED, build_builder, build_edgepack, random_qwen05b, run_logged  # noqa: E402

log = logging.getLogger("cuda_runtime")

STEPS = ("model", "builder", "export", "parity", "torch", "ort")
QUANT_WIDTHS = {"W8": 8, "W4": 4, "W3": 3, "W2": 2}
DEFAULT_WIDTHS = "fp16,W4,W3,W2"
# W2 / W3 as bit-plane kernels (a 2-bit MatMulNBits, plus a 1-bit plane widened to 2 bits for W3) instead of
# the 4-bit kernel that the cuda target's float activations choose by default: the bytes a 2-bit kernel saves on
# the CUDA EP, where it ran at the 4-bit kernel's speed (../shared/docs/facts.md, H100). Not yet measured here.
PLANE_VARIANTS = {"W2-planes": 2, "W3-planes": 3}
# W4 in the builder's own layout (symmetric, block 32 everywhere, no zero points): the layout ONNX Runtime's
# CUTLASS weight-only path (ORT_FPA_INTB_GEMM=1) takes in its default build, and the builder's block size, to tell
# the layout's share of the prefill gap from the graph's.
LAYOUT_VARIANTS = {
    "W4-sym32": ["--wbits", "4", "--symmetric", "--group-size", "32", "--mlp-group-size", "0"],
    # compressed KV caches on the fp16 graph: the parity step checks the float16-kv bounds on the CUDA EP's
    # kernels (docs/results/kv.md measured them on the CPU EP only)
    "W4-kv4": ["--wbits", "4", "--kv-bits", "4"],
    "W4-minicache-kv8": ["--wbits", "4", "--kv-merge", "minicache", "--kv-start", "1", "--kv-bits", "8"],
}
VARIANTS = (*QUANT_WIDTHS, *PLANE_VARIANTS, *LAYOUT_VARIANTS)


def width_flags(width: str) -> list[str]:
    if width in PLANE_VARIANTS:
        return ["--wbits", str(PLANE_VARIANTS[width]), "--lowering", "planes"]
    if width in LAYOUT_VARIANTS:
        return list(LAYOUT_VARIANTS[width])
    return [] if width == "fp16" else ["--wbits", str(QUANT_WIDTHS[width])]


def export_cuda(
    model: Path, variant: str, flags: list[str], parity: bool, work: Path, timeout: float
) -> dict:
    """One ``edgepack export --target cuda`` (speed.build_edgepack, run outside the checkout); the manifest's
    parity and build facts, or the error line."""
    (work / model.name).mkdir(parents=True, exist_ok=True)
    art = build_edgepack(
        model.name, model, variant, shlex.join(flags), work, timeout, "cuda", parity, cwd=work
    )
    out = work / model.name / f"edgepack-{variant}"
    row = {"path": str(out), "flags": art.flags, "export_s": round(art.build_s, 1), "error": art.error}
    if art.error is None:
        manifest = json.loads((out / "manifest.json").read_text())
        row.update(
            file_mib=round(art.file_mib, 2),
            parity=manifest.get("parity"),
            attention_form=manifest["build"].get("attention_form"),
            ops=manifest.get("ops"),
        )
    log.info(
        "export %s %s: %s", model.name, variant, art.error or f"{row['file_mib']} MiB in {row['export_s']} s"
    )
    return row


def step_model(args: argparse.Namespace, result: dict) -> None:
    model = args.model or random_qwen05b(args.cache, args.tokenizer)
    result["model"] = {"path": str(model), "name": model.name}


def step_builder(args: argparse.Namespace, result: dict) -> None:
    model = Path(result["model"]["path"])
    (args.cache / model.name).mkdir(parents=True, exist_ok=True)
    art = build_builder(model.name, model, "int4", "-p int4", args.cache, args.timeout, ep="cuda")
    result.setdefault("artifacts", {})["builder int4"] = {
        "path": str(args.cache / model.name / "builder-int4"),
        "tool": "builder",
        "flags": "-p int4 -e cuda",
        "build_s": round(art.build_s, 1),
        "file_mib": None if art.error else round(art.file_mib, 2),
        "error": art.error,
    }
    log.info("builder int4: %s", art.error or "built")


def step_export(args: argparse.Namespace, result: dict) -> None:
    model = Path(result["model"]["path"])
    for width in args.widths:
        row = export_cuda(model, width, width_flags(width), False, args.cache, args.timeout)
        result.setdefault("artifacts", {})[f"edgepack {width}"] = {"tool": "edgepack", **row}
        args.save(result)


def step_parity(args: argparse.Namespace, result: dict) -> None:
    """Small models exported for the cuda target with the exporter's parity check (on the CUDA EP if present)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    rows = result.setdefault("parity", {})
    models = [m for m in (args.parity_model, args.parity_model_fused) if m is not None and m.is_dir()]
    for model in models:
        variants = {w: width_flags(w) for w in args.widths}
        if not args.no_fold:
            variants["fold W4"] = ["--wbits", "4", "--remove", "0.25", "--share-groups", "2",
                                   "--fold-structure", "blocks"]  # fmt: skip
        for name, flags in variants.items():
            variant = name.replace(" ", "-")
            rows[f"{model.name} {name}"] = export_cuda(
                model, variant, flags, True, args.cache / "parity", args.timeout
            )
            args.save(result)
    rows["providers"] = ort.get_available_providers()


def quantized(result: dict) -> list[str]:
    return [
        name
        for name, art in result.get("artifacts", {}).items()
        if art["tool"] == "edgepack" and not art.get("error") and not name.endswith("fp16")
    ]


def bench_settings(args: argparse.Namespace) -> list[str]:
    return [f"--prompt-len={args.prompt_len}", f"--gen={args.gen}", f"--runs={args.runs}", "--warmup=1"]


def step_torch(args: argparse.Namespace, result: dict) -> None:
    rows = result.setdefault("torch", {})
    for name in quantized(result):
        if name.removeprefix("edgepack ") not in args.widths:
            continue
        art = Path(result["artifacts"][name]["path"])
        report = args.cache / f"torch-{art.name}.json"
        report.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "edgepack", "bench", str(art), "--backend", "torch-triton", "--device", "cuda",
               *bench_settings(args), "--json", str(report)]  # fmt: skip
        error = run_logged(cmd, args.cache / f"torch-{art.name}.log", args.timeout, cwd=args.cache)
        runner = None if error else json.loads(report.read_text())["artifacts"][0]["runner"]
        rows[name] = {"error": error, "runner": runner}
        args.save(result)
        log.info("torch-triton %s: %s", name, error or f"{runner['decode_tok_s']['median']:.1f} tok/s")


def step_ort(args: argparse.Namespace, result: dict) -> None:
    arts = {
        n: a
        for n, a in result.get("artifacts", {}).items()
        if not a.get("error") and (a["tool"] != "edgepack" or n.removeprefix("edgepack ") in args.widths)
    }
    rounds = []
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("ORT_")}  # e.g. ORT_FPA_INTB_GEMM=1
    result["ort"] = {"device": args.device, "env": env, "rounds": rounds}
    for rnd in range(args.rounds):
        runs = {}
        rounds.append(runs)
        for name, art in arts.items():
            report = args.cache / "ort-report.json"
            report.unlink(missing_ok=True)
            verify = [] if art["tool"] == "edgepack" else ["--no-verify"]  # the builder writes no manifest
            cmd = [sys.executable, str(RUNNER), art["path"], f"--device={args.device}", *verify,
                   *bench_settings(args), "--json", str(report)]  # fmt: skip
            error = run_logged(cmd, args.cache / "ort-driver.log", args.timeout, cwd=args.cache)
            runs[name] = {"error": error, "runner": None if error else json.loads(report.read_text())}
            got = runs[name]["runner"]
            log.info("round %d %s: %s", rnd + 1, name, error or f"{got['decode_tok_s']['median']:.1f} tok/s")
            args.save(result)


def ratios(result: dict) -> list[dict]:
    """Decode and prefill ratios within each ort round: our widths against the builder's int4 and our fp16."""
    widths = VARIANTS
    pairs = [(f"edgepack {w}", "builder int4") for w in widths]
    pairs += [(f"edgepack {w}", "edgepack fp16") for w in widths]
    out = []
    for ours, base in pairs:
        for metric in ("decode_tok_s", "prefill_tok_s"):
            values = []
            for runs in result.get("ort", {}).get("rounds", []):
                a, b = runs.get(ours, {}).get("runner"), runs.get(base, {}).get("runner")
                if a and b:
                    values.append(round(a[metric]["median"] / b[metric]["median"], 3))
            if values:
                out.append({"ratio": f"{ours} / {base}", "metric": metric, "per_round": values})
    return out


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [f"# edgepack cuda artifacts on {result.get('device', 'n/a')}", ""]
    model = result.get("model", {}).get("name", "n/a")
    lines += [
        f"Model {model}; prompt {result['settings']['prompt_len']} tokens, {result['settings']['gen']} greedy "
        f"steps, medians of {result['settings']['runs']} runs per measurement; driver runtime/runner.py "
        f"(--device {result.get('ort', {}).get('device', 'cuda')})"
        + "".join(f"; {k}={v}" for k, v in result.get("ort", {}).get("env", {}).items())
        + ".",
        "",
        "| artifact | file MiB | round | prefill tok/s | decode tok/s | GPU MiB | peak RSS MiB | load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rnd, runs in enumerate(result.get("ort", {}).get("rounds", []), 1):
        for name, run in runs.items():
            art = result["artifacts"][name]
            r = run["runner"]
            if r is None:
                lines.append(f"| {name} | {fmt(art.get('file_mib'))} | {rnd} | {run['error']} |||||")
                continue
            lines.append(
                f"| {name} | {fmt(art.get('file_mib'))} | {rnd} | {fmt(r['prefill_tok_s']['median'])} | "
                f"{fmt(r['decode_tok_s']['median'])} | {fmt(r.get('gpu_memory_mib'))} | "
                f"{fmt(r['peak_rss_mib'])} | {fmt(r['load_s'], 2)} |"
            )
    if result.get("ratios"):
        lines += ["", "| ratio | metric | per round |", "|---|---|---|"]
        lines += [
            f"| {r['ratio']} | {r['metric']} | {', '.join(f'{v:.2f}' for v in r['per_round'])} |"
            for r in result["ratios"]
        ]
    if result.get("torch"):
        lines += [
            "",
            "PyTorch on the Triton kernels (`edgepack bench --backend torch-triton`), same weights:",
            "",
            "| artifact | prefill tok/s | decode tok/s | GPU MiB (max allocated) | greedy ids = ORT CUDA round 1 |",
            "|---|---|---|---|---|",
        ]
        first = (result.get("ort", {}).get("rounds") or [{}])[0]
        for name, row in result["torch"].items():
            r = row["runner"]
            if r is None:
                lines.append(f"| {name} | {row['error']} ||||")
                continue
            ort_ids = (first.get(name, {}).get("runner") or {}).get("generated_ids")
            same = "n/a" if ort_ids is None else _leading(r["generated_ids"], ort_ids)
            lines.append(
                f"| {name} | {fmt(r['prefill_tok_s']['median'])} | {fmt(r['decode_tok_s']['median'])} | "
                f"{fmt(r.get('gpu_memory_mib'))} | {same} |"
            )
    if result.get("parity"):
        lines += [
            "",
            "Exporter parity on the cuda target (artifact vs the PyTorch model it was built from):",
            "",
            "| model, width | form | provider | max abs logit | top-1 | greedy | passed | error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in result["parity"].items():
            if name == "providers":
                continue
            p = row.get("parity") or {}
            lines.append(
                f"| {name} | {row.get('attention_form', 'n/a')} | {p.get('provider', 'n/a')} | "
                f"{fmt(p.get('max_abs_logit'), 4)} | {fmt(p.get('top1'), 3)} | {fmt(p.get('greedy'), 3)} | "
                f"{p.get('passed', 'n/a')} | {row.get('error') or ''} |"
            )
    return "\n".join(lines) + "\n"


def _leading(a: list[int], b: list[int]) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"{n}/{min(len(a), len(b))}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cache = Path(os.environ.get("EDGEPACK_BENCH_CACHE", Path.home() / ".cache" / "edgepack-bench")) / "cuda"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument(
        "--widths",
        default=DEFAULT_WIDTHS,
        help=f"fp16 and any of {', '.join(VARIANTS)}: what the export, parity, torch and ort steps take",
    )
    p.add_argument("--model", type=Path, help="model folder (default: the random Qwen2.5-0.5B-config model)")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "models" / "mix-llama-14m",
                   help="folder with the random model's tokenizer.json")  # fmt: skip
    p.add_argument("--parity-model", type=Path, default=SHARED / "models" / "stories260k")
    p.add_argument("--parity-model-fused", type=Path, default=SHARED / "models" / "mix-llama-14m")
    p.add_argument("--no-fold", action="store_true", help="the parity step without its folded W4 export")
    p.add_argument("--cache", type=Path, default=cache)
    p.add_argument("--out", type=Path, default=Path("docs/results/cuda_runtime.json"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="the ort step's device")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    args.widths = [w for w in args.widths.split(",") if w]
    bad = [s for s in args.steps if s not in STEPS] + [w for w in args.widths if w not in ("fp16", *VARIANTS)]
    if bad:
        p.error(
            f"unknown step or width {bad[0]!r}: steps {', '.join(STEPS)}; widths fp16, {', '.join(VARIANTS)}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["settings"] = {"prompt_len": args.prompt_len, "gen": args.gen, "runs": args.runs}
    try:
        import torch

        if torch.cuda.is_available():
            result["device"] = torch.cuda.get_device_name()
        result.setdefault("versions", {})["torch"] = torch.__version__
    except ImportError:
        pass
    import onnxruntime as ort

    result.setdefault("versions", {})["onnxruntime"] = ort.__version__
    if "model" in args.steps or "model" not in result:
        step_model(args, result)

    def save(result: dict) -> None:
        """JSON and Markdown after every row, so a run cut short keeps what it measured."""
        result["ratios"] = ratios(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))

    args.save = save
    steps = {"builder": step_builder, "export": step_export, "parity": step_parity, "torch": step_torch,
             "ort": step_ort}  # fmt: skip
    for name, fn in steps.items():
        if name in args.steps:
            start = time.perf_counter()
            fn(args, result)
            result.setdefault("step_s", {})[name] = round(time.perf_counter() - start, 1)
            save(result)
    print(markdown(result))
    for r in result.get("ratios", []):
        log.info(
            "%s %s: %s (median %.2f)",
            r["ratio"],
            r["metric"],
            r["per_round"],
            statistics.median(r["per_round"]),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
