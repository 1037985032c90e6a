"""Quality against llama.cpp's quantizations of the same model, on the same evaluation windows.

    python bench/peer_quality.py [--models stories260k,mix-llama-14m] [--formats Q4_0,Q4_K_M,Q3_K_M,Q2_K] \
        [--n-samples 64] [--eval-tokens 4096] [--work /tmp/edgepack-peer-quality] [--out docs/results]

The peer: llama.cpp's own converter and ``llama-quantize`` (the build bench/speed.py caches; skipped with
its message when absent) turn the model into GGUF files. Each file is read back with llama.cpp's gguf-py,
every tensor dequantized by gguf-py's reference (numpy) dequantizers, the converter's q/k row permutation
undone, and the weights loaded into the transformers model. The F32 file's round trip must reproduce the
float model's perplexity exactly; the bench stops otherwise. Then the perplexity of every llama.cpp format
and of edgepack's quantizations is measured by the same function (edgepack/evaluate.py) on the same windows
as bench/cross_domain.py: the last 10% of Tiny Shakespeare and WikiText-2 test's second half, 256-token
windows, the text never seen by calibration. Activations stay float on both sides (llama.cpp's CPU kernels
round them to 8 bits, as our int8-activation kernels do).

Bytes are the weights as stored: for llama.cpp the GGUF tensors' bytes (metadata and vocabulary excluded),
for edgepack the exporter's byte count of each quantized weight (compressor/mixed.py ``stored_bytes``, the
lowering the row's export uses) plus every other parameter at float32, which is what both files hold besides.
llama.cpp's k-quants need K to be a multiple of 256 and its legacy formats a multiple of 32; where a
tensor is not, llama-quantize falls back to another type, so the tensor types of every file are listed
with it (on these small models "Q3_K_M" and "Q2_K" are mostly 4- and 5-bit).

Rows for edgepack: the export default (RTN, group 64, MLP group 128 where it divides K, head at the body's
width), GPTQ with the data-free calibration (``--calib self``), the head at 8 bits (as llama.cpp keeps its
tied output), and the mixed-precision planner (``--size-budget``) at the byte count of llama.cpp's Q4_0
file and at that of edgepack's own W4, calibrated on the model's own samples: the same size, the choice of
widths left to edgepack. The calibrated rows depend on the draw of the self samples (``--seed``); the
llama.cpp and RTN rows use no data.

The other peer, the onnxruntime-genai model builder's int4, and edgepack's own W4 export are run as ONNX
files by ONNX Runtime on the same windows (bench/quant_quality.py's ``ort_perplexity``; int8 activations in
both tools' kernels, so the W4 export's row also checks the PyTorch W4 row it was quantized like). Their
bytes are the initializers less the rotary cos/sin tables. ``--no-onnx`` skips them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cross_domain  # noqa: E402
import speed  # noqa: E402
from edgepack.compressor.mixed import (  # noqa: E402
    BUDGET_LOWERING,
    _unquantized_bytes,
    plan_mixed_precision,
    stored_bytes,
)
from edgepack.compressor.quantize import (  # noqa: E402
    QuantConfig,
    linear_sites,
    quantize,
)

from edgepack.model import load_model, load_tokenizer  # noqa: E402

log = logging.getLogger("peer_quality")

FORMATS = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
SELF = "self@1.6"  # the data-free calibration's default temperature
# GGUF name -> transformers name, per decoder block and for the rest (llama-family models)
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """``blk.3.ffn_up.weight`` -> ``model.layers.3.mlp.up_proj.weight``."""
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{kind}"
    return f"{TOP_NAMES[stem]}.{kind}"


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute of q/k rows (its rotary layout) for ``heads`` heads."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path, config) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` dequantized to float32, under its transformers name."""
    gguf = speed.gguf_module()
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.array(t.data, dtype=np.float32)
        else:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, config.num_key_value_heads)
        state[name] = w
    return state


def load_into(model, state: dict[str, torch.Tensor]):
    """A copy of ``model`` holding ``state`` (a tied head follows the embedding unless the file has its own)."""
    m = copy.deepcopy(model)
    if "lm_head.weight" in state and m.config.tie_word_embeddings:
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())  # the file unties it
    params = dict(m.named_parameters(remove_duplicate=False))
    missing = sorted(
        set(params) - set(state) - ({"lm_head.weight"} if m.config.tie_word_embeddings else set())
    )
    if missing:
        raise SystemExit(f"error: the GGUF file has no tensor for {missing[0]}")
    with torch.no_grad():
        for name, w in state.items():
            if params[name].shape != w.shape:
                raise SystemExit(
                    f"error: {name}: GGUF shape {tuple(w.shape)} != model {tuple(params[name].shape)}"
                )
            params[name].copy_(w)
    return m


def edgepack_bytes(model, config: QuantConfig, lowering: str = "auto") -> int:
    """Weights as the export stores them: each quantized weight by the exporter's count, the rest at float32."""
    sites = linear_sites(model, config)
    total = _unquantized_bytes(model, sites)
    return total + sum(stored_bytes(tuple(s.module.weight.shape), s.fmt, lowering=lowering) for s in sites)


def edgepack_rows(q4_0_bytes: int | None, w4_bytes: int) -> list[tuple[str, dict, str | None]]:
    """(label, QuantConfig fields, calibration source) of edgepack's rows."""
    rows = [
        ("edgepack RTN W4 (export default)", {}, None),
        ("edgepack GPTQ W4, --calib self, --e2e-epochs 0", {"method": "gptq", "options": {"e2e": 0}}, SELF),
        ("edgepack GPTQ W4, --calib self (scales tuned end to end)", {"method": "gptq"}, SELF),
        ("edgepack RTN W4, --head-bits 8", {"head_bits": 8}, None),
        ("edgepack RTN W3 (export default group)", {"wbits": 3}, None),
        (
            "edgepack GPTQ W3, --calib self, --e2e-epochs 0",
            {"wbits": 3, "method": "gptq", "options": {"e2e": 0}},
            SELF,
        ),
        ("edgepack GPTQ W3, --calib self (scales tuned end to end)", {"wbits": 3, "method": "gptq"}, SELF),
        ("edgepack RTN W2", {"wbits": 2}, None),
    ]
    if q4_0_bytes:
        rows.append(("edgepack --size-budget = llama.cpp Q4_0's bytes", {"size_budget": q4_0_bytes}, SELF))
    rows.append(("edgepack --size-budget = edgepack W4's bytes", {"size_budget": w4_bytes}, SELF))
    return rows


def run_edgepack(model, data, label: str, fields: dict, source: str | None) -> dict:
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    budget = fields.pop("size_budget", None)
    config = QuantConfig(**fields)
    calib = data.ids(source) if source else None
    lowering = "auto"
    if budget is not None:
        plan = plan_mixed_precision(m, config, calib, budget_bytes=budget)
        config = replace(config, overrides={**config.overrides, **plan}, head_bits=None)
        lowering = BUDGET_LOWERING
    nbytes = edgepack_bytes(m, config, lowering)
    report = quantize(m, config, calib)
    widths = Counter(f"W{layer['bits']}g{layer['group']}" for layer in report["layers"])
    return {
        "name": label, "tool": "edgepack", "source": source, "weight_bytes": nbytes,
        "ppl": data.ppl(m), "own_text": data.own_text(m), "seconds": round(time.perf_counter() - t0, 1),
        "formats": dict(widths), **({"e2e": report["e2e"]} if "e2e" in report else {}),
    }  # fmt: skip


ROTARY_TABLES = ("cos_cache", "sin_cache")  # computed on the fly by llama.cpp, so not counted as weights


def onnx_facts(path: Path) -> tuple[int, str]:
    """An ONNX artifact's weight bytes (its initializers less the rotary tables) and what its weights are
    stored as (MatMulNBits / GatherBlockQuantized by bits and block, float Gather/MatMul)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    nbytes = sum(
        numpy_helper.to_array(t).nbytes for t in graph.initializer if not t.name.endswith(ROTARY_TABLES)
    )
    kinds = Counter()
    for node in graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            kinds[f"{node.op_type} {attrs.get('bits', 4)}b/b{attrs.get('block_size')}"] += 1
        elif node.op_type == "MatMul":
            kinds["float MatMul"] += 1
    return nbytes, ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))


def onnx_rows(name: str, model_dir: Path, model, data, work: Path) -> list[dict]:
    """The onnxruntime-genai builder's int4 and edgepack's W4 export, each run by ONNX Runtime on the windows
    of every other row (int8 activations inside both tools' kernels); a runtime failure is the row's result."""
    from quant_quality import ort_perplexity

    from edgepack.model import DecoderDims

    dims = DecoderDims.from_config(model.config)
    arts = [
        (
            "onnxruntime-genai builder int4",
            speed.build_builder(name, model_dir, "int4", speed.BUILDER_VARIANTS["int4"], work, 900),
        ),
        ("edgepack W4 export", speed.build_edgepack(name, model_dir, "W4", "--wbits 4", work, 900)),
    ]
    rows = []
    for label, art in arts:
        row = {"name": f"{label} (ONNX Runtime)", "tool": art.tool, "source": None}
        rows.append(row)
        if art.error:
            row["error"] = f"build failed: {art.error}"
            continue
        onnx_path = art.path / "model.onnx"
        row["weight_bytes"], row["stored_text"] = onnx_facts(onnx_path)
        try:
            row["ppl"] = {
                k: round(ort_perplexity(onnx_path, ids, dims, 2), 3) for k, ids in data.eval.items()
            }
        except Exception as e:  # the peer's own runtime failure is a result (e.g. head_size % 16 != 0)
            row["error"] = f"fails in ONNX Runtime: {str(e).splitlines()[0][:160]}"
        log.info("%s %s: %s", name, row["name"], row.get("ppl", row.get("error")))
    return rows


def bench(name: str, args: argparse.Namespace) -> dict:
    model_dir = cross_domain.SHARED / "models" / name
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    data = cross_domain.Data(model, tok, args.n_samples, args.eval_tokens, args.seed)
    fp = data.ppl(model)
    rows = [{"name": "fp32", "tool": "transformers", "source": None, "ppl": fp, "own_text": data.own_text(model),
             "weight_bytes": sum(p.numel() * 4 for p in model.parameters())}]  # fmt: skip
    gguf_paths = {
        a.variant: a for a in speed.build_gguf(name, model_dir, ("F32", *args.formats), args.work, 900)
    }
    for fmt, art in gguf_paths.items():
        if art.error:
            raise SystemExit(f"error: llama.cpp {fmt} of {name}: {art.error}")
        loaded = load_into(model, read_gguf(art.path, model.config))
        ppl = data.ppl(loaded)
        if fmt == "F32" and ppl != fp:
            raise SystemExit(f"error: the F32 GGUF round trip gives {ppl}, not the float model's {fp}")
        rows.append({"name": f"llama.cpp {fmt}", "tool": "llama.cpp", "source": None, "ppl": ppl,
                     "own_text": data.own_text(loaded),
                     "weight_bytes": art.stored["tensor_bytes"], "stored": art.stored})  # fmt: skip
        log.info("%s llama.cpp %s: %s", name, fmt, ppl)
    if not args.no_onnx:
        rows += onnx_rows(name, model_dir, model, data, args.work)
    q4_0 = next((r["weight_bytes"] for r in rows if r["name"] == "llama.cpp Q4_0"), None)
    for label, fields, source in edgepack_rows(q4_0, edgepack_bytes(model, QuantConfig())):
        if args.rows and label not in args.rows:
            continue
        rows.append(run_edgepack(model, data, label, dict(fields), source))
        log.info("%s %s: %s", name, label, rows[-1]["ppl"])
    return {
        "model": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "n_samples": args.n_samples,
        "seed": args.seed, "seq_len": cross_domain.SEQ_LEN,
        "eval_tokens": {k: (len(v) - 1) // cross_domain.SEQ_LEN * cross_domain.SEQ_LEN for k, v in data.eval.items()},
        "load": [round(x, 2) for x in os.getloadavg()], "rows": rows,
    }  # fmt: skip


def markdown(results: list[dict]) -> str:
    out = []
    for res in results:
        fp = res["rows"][0]["ppl"]
        out += [f"### {res['model']}", "",
                f"{res['date']}; eval tokens {res['eval_tokens']}; calibration {res['n_samples']} x "
                f"{res['seq_len']} tokens (seed {res['seed']}); load {res['load']}.", "",
                "| row | weights KiB | Shakespeare tail | WikiText-2 tail | own text (KL to fp32) | stored as |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        own_fp = res["rows"][0].get("own_text")
        for r in res["rows"]:
            stored = ""
            if "error" in r:
                out.append(f"| {r['name']} | {r.get('weight_bytes', 0) / 1024:.0f} | {r['error']} | | | |")
                continue
            if r["tool"] == "llama.cpp":
                stored = speed.stored_line(r["stored"])
            elif "stored_text" in r:
                stored = r["stored_text"]
            elif r["tool"] == "edgepack":
                stored = ", ".join(f"{k} x{v}" for k, v in sorted(r["formats"].items()))
            ppl = r["ppl"]
            own = ""
            if own_fp and "own_text" in r:
                own = f"{cross_domain.pct(r['own_text']['ppl'], own_fp['ppl'])} ({r['own_text']['kl']:.3f})"
            out.append(
                f"| {r['name']} | {r['weight_bytes'] / 1024:.0f} | {cross_domain.pct(ppl['shakespeare_tail'], fp['shakespeare_tail'])} "
                f"| {cross_domain.pct(ppl['wikitext2_tail'], fp['wikitext2_tail'])} | {own} | {stored} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="stories260k,mix-llama-14m")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--rows", default="", help="';'-separated edgepack row labels (default: all)")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-onnx", action="store_true", help="skip the ONNX Runtime rows (builder int4, W4 export)"
    )
    p.add_argument("--tag", default="", help="suffix of the output files' names, e.g. -seed1")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgepack-peer-quality"))
    p.add_argument("--out", type=Path, default=None, help="folder for peer_quality{TAG}.json and .tables.md")
    args = p.parse_args(argv)
    args.formats = tuple(f for f in args.formats.split(",") if f)
    args.rows = [r for r in args.rows.split(";") if r]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = speed.llama_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    results = []
    for name in args.models.split(","):
        (args.work / name).mkdir(parents=True, exist_ok=True)
        results.append(bench(name, args))
        text = markdown(results)
        if args.out:
            (args.out / f"peer_quality{args.tag}.json").write_text(json.dumps(results, indent=1) + "\n")
            (args.out / f"peer_quality{args.tag}.tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
