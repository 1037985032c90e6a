"""The export pipeline: load -> compress (recipe) -> build graph -> target passes -> parity -> artifact.

The artifact is assembled in a temporary sibling folder and renamed into place only when everything,
parity included, has succeeded: a failed export leaves nothing at the output path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgepack import __version__
from edgepack.errors import EdgepackError
from edgepack.recipe import Recipe
from edgepack.runtime.runner import sha256_file as sha256
from edgepack.targets.profiles import Target, get_target

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's 2 GB limit


@dataclass
class ExportRequest:
    model_dir: Path
    out_dir: Path
    target: str = "cpu"
    recipe: Recipe = field(default_factory=Recipe)
    calib: Path | str | None = None  # a text file, a calib_self.json, or "self" (the default: data-free)
    self_calib: dict = field(default_factory=dict)  # SelfCalibConfig overrides, e.g. {"temperature": 0.8}
    trust_remote_code: bool = False
    parity: bool = True
    force: bool = False
    new_tokens: int = 32


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    seconds: float


@contextmanager
def staging_dir(out_dir: Path, force: bool):
    """A temp folder beside ``out_dir`` that replaces it atomically on success and vanishes on failure."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not force:
        raise EdgepackError(
            f"output folder {out_dir} already exists; pass --force to replace it or choose another -o"
        )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as e:
        raise EdgepackError(
            f"cannot write to {out_dir.parent} ({e.strerror}); choose a writable -o folder"
        ) from e
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact gets the user's usual mode
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export(req: ExportRequest) -> ExportResult:
    """Run the whole pipeline for one request; raises EdgepackError for any user-facing problem."""
    from edgepack.model import load_model, load_tokenizer, read_config

    t0 = time.perf_counter()
    target = get_target(req.target)
    raw_config, arch = read_config(req.model_dir)
    precheck(req, raw_config)
    with staging_dir(req.out_dir, req.force) as tmp:
        log.info("loading %s (%s)", req.model_dir, arch.name)
        model = load_model(req.model_dir, trust_remote_code=req.trust_remote_code)
        tokenizer = load_tokenizer(req.model_dir)
        reports = compress(model, tokenizer, req, tmp)
        built = write_model(model, target, tmp, reports)
        parity = None
        if req.parity:
            parity = run_parity(
                model, tokenizer, target, tmp / "model.onnx", built["thresholds"], req.new_tokens
            )
        write_side_files(req.model_dir, tmp, model, raw_config, tokenizer)
        if target.android_bundle:
            from edgepack.targets.android import make_android_bundle

            make_android_bundle(tmp, target.allowed_ops)
        manifest = build_manifest(req, target, arch.name, model, built, reports, parity, tmp)
        write_app_readme(tmp, manifest)
        manifest["files"] = file_table(tmp)
        manifest["file_bytes"] = file_sizes(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    log.info("wrote %s in %.1f s", req.out_dir, seconds)
    return ExportResult(req.out_dir, manifest, seconds)


def precheck(req: ExportRequest, raw_config: dict) -> None:
    """Refuse a recipe that cannot work on this model before anything heavy is loaded."""
    from edgepack.recipe import kind_of

    kinds = {kind_of(s): s for s in req.recipe.steps}
    quant = kinds.get("quantize")
    needs_calib = "fold" in kinds or (
        quant is not None
        and (quant.method != "rtn" or quant.budget_bpw is not None or quant.size_budget is not None)
    )
    if needs_calib and calib_source(req) == "self":
        from edgepack.compressor.selfcalib import SelfCalibConfig

        SelfCalibConfig.from_dict(req.self_calib)
    elif calib_source(req) != "self" and not Path(req.calib).is_file():
        raise EdgepackError(
            f"calibration text {req.calib} does not exist; pass a local UTF-8 text file to --calib"
        )
    if "fold" in kinds:
        from edgepack.compressor.fold_plan import removal_count, resolve_groups

        depth = int(raw_config["num_hidden_layers"])
        resolve_groups(kinds["fold"].share_group, depth - removal_count(kinds["fold"].remove, depth))


def compress(model, tokenizer, req: ExportRequest, out: Path | None = None) -> dict:
    """Apply the recipe's steps in order; returns each step's report by kind (self-calibration text -> ``out``)."""
    from edgepack.recipe import kind_of

    reports: dict = {}
    calib_ids = None
    for step in req.recipe.steps:
        kind = kind_of(step)
        if kind == "fold":
            from edgepack.compressor.fold import fold

            if calib_ids is None:
                calib_ids = calibration_ids(tokenizer, req, step, model, out, reports)
            reports["fold"] = fold(model, step, calib_ids).to_dict()
        elif kind == "quantize":
            from edgepack.compressor.quantize import quantize

            mixed = step.budget_bpw is not None or step.size_budget is not None
            needs_calib = step.method != "rtn" or mixed
            if needs_calib and calib_ids is None:
                calib_ids = calibration_ids(tokenizer, req, step, model, out, reports)
            if mixed:
                from edgepack.compressor.mixed import plan_mixed_precision

                plan = plan_mixed_precision(model, step, calib_ids, step.budget_bpw, step.size_budget)
                step = dataclasses.replace(step, overrides={**step.overrides, **plan})
            reports["quantize"] = quantize(model, step, calib_ids if needs_calib else None)
    return reports


def calib_source(req: ExportRequest) -> str:
    """The calibration source: "self" (sampled from the model; the default) or a file path."""
    from edgepack.compressor.selfcalib import SELF

    return SELF if req.calib is None or str(req.calib) == SELF else str(req.calib)


def calibration_ids(tokenizer, req: ExportRequest, step, model, out: Path | None, reports: dict):
    """The step's (n_samples, seq_len) calibration ids from the request's source; records it in ``reports``."""
    from edgepack.compressor import selfcalib
    from edgepack.textdata import calibration_samples, read_text

    n = getattr(step, "n_samples", None) or getattr(step, "options", {}).get("n_samples", 64)
    seq = getattr(step, "seq_len", None) or getattr(step, "options", {}).get("seq_len", 256)
    source = calib_source(req)
    if source == selfcalib.SELF:
        config = selfcalib.SelfCalibConfig.from_dict({"n_samples": n, "seq_len": seq, **req.self_calib})
        ids = selfcalib.generate_samples(model, tokenizer, config)
        if out is not None:
            selfcalib.write_samples(out, ids, tokenizer, config)
        reports["calibration"] = {"source": source, "file": selfcalib.FILE_NAME, **dataclasses.asdict(config)}
        return ids
    if Path(source).name == selfcalib.FILE_NAME:  # reproduce an earlier self-calibrated export
        ids = selfcalib.read_samples(Path(source))
    else:
        ids = calibration_samples(tokenizer, read_text(source), n, seq)
    reports["calibration"] = {"source": source, "n_samples": len(ids), "seq_len": ids.shape[1]}
    return ids


def write_model(model, target: Target, out: Path, reports: dict) -> dict:
    """Build the graph for ``target``, run its passes and save model.onnx; returns facts for the manifest."""
    import onnx_ir as ir

    from edgepack.exporter.builder import BuildOptions, build_decoder
    from edgepack.exporter.passes import run_target_passes

    quant = reports.get("quantize")
    abits = 8 if quant and any(layer.get("abits", 16) == 8 for layer in quant["layers"]) else 16
    opts = BuildOptions(dtype=target.dtype, quantized_embedding=target.quantized_embedding)
    graph = build_decoder(model, opts)
    run_target_passes(graph, target)
    if quant:
        for layer in quant["layers"]:  # what each quantized weight really costs in the file
            stored = graph.meta["quant_layers"][layer["name"]]
            n, k = layer["shape"]
            layer.update(stored, bits_per_weight=round(8 * stored["bytes"] / (n * k), 3))
    init_bytes = sum(v.const_value.nbytes for v in graph.graph.initializers.values())
    path = out / "model.onnx"
    if init_bytes > EXTERNAL_DATA_THRESHOLD:
        ir.save(graph, path, external_data="model.onnx.data")
    else:
        ir.save(graph, path)
    ops = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in graph.graph.all_nodes())
    if target.dtype == "float16":
        thresholds = "float16"
    else:
        thresholds = "int8-activations" if abits == 8 else "float32"
    return {
        "ops": dict(sorted(ops.items())),
        "opsets": {k or "ai.onnx": v for k, v in graph.opset_imports.items()},
        "ir_version": graph.ir_version,
        "initializer_bytes": init_bytes,
        "tensors": [
            {
                "name": v.name,
                "shape": list(v.const_value.shape),
                "dtype": v.const_value.dtype.name,
                "bytes": v.const_value.nbytes,
            }
            for v in graph.graph.initializers.values()
            if not v.name.startswith("const_")
        ],
        "io": {
            "inputs": [io_spec(v) for v in graph.graph.inputs],
            "outputs": [io_spec(v) for v in graph.graph.outputs],
        },
        "thresholds": thresholds,
        "abits": abits,
    }


def io_spec(value) -> dict:
    return {
        "name": value.name,
        "dtype": value.type.dtype.name.lower(),
        "shape": [str(d) for d in value.shape],
    }


def run_parity(model, tokenizer, target: Target, onnx_path: Path, thresholds: str, new_tokens: int) -> dict:
    import onnxruntime as ort

    from edgepack.exporter.parity import DEFAULT_PROMPTS, check_parity

    providers = ["CPUExecutionProvider"]
    if (
        target.execution_provider != providers[0]
        and target.execution_provider in ort.get_available_providers()
    ):
        providers.insert(0, target.execution_provider)
    prompts = [tokenizer(p)["input_ids"] for p in DEFAULT_PROMPTS]
    report = check_parity(model, onnx_path, prompts, thresholds, new_tokens, providers)
    log.info("parity (%s, %s): %s", thresholds, providers[0], report.summary())
    if not report.passed:
        raise EdgepackError(
            f"parity check failed ({report.summary()}; thresholds {thresholds}); the artifact was not written. "
            "Report this with the command you ran, or pass --no-parity to keep it anyway"
        )
    return {**report.to_dict(), "provider": providers[0]}


def write_side_files(model_dir: Path, out: Path, model, raw_config: dict, tokenizer) -> None:
    """Tokenizer files, the (possibly folded) config.json, and genai_config.json."""
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    config = dict(raw_config)
    config["num_hidden_layers"] = len(model.model.layers)
    if "layer_types" in config:  # fold keeps the types of the positions it kept
        config["layer_types"] = list(model.config.layer_types)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "genai_config.json").write_text(json.dumps(genai_config(model, tokenizer), indent=4) + "\n")


def genai_config(model, tokenizer) -> dict:
    """onnxruntime-genai's config for our graph (concatenating KV cache, so no shared past/present buffer)."""
    from edgepack.model import DecoderDims

    dims = DecoderDims.from_config(model.config)
    cfg = model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    pad = getattr(cfg, "pad_token_id", None)
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id,
            "context_length": dims.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": dims.head_dim,
                "hidden_size": dims.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": dims.num_heads,
                "num_hidden_layers": len(model.model.layers),
                "num_key_value_heads": dims.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": "llama",
            "vocab_size": dims.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": dims.max_positions,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def unique_parameter_count(model) -> int:
    """Parameters counted once per tensor identity (folded positions share); quantized codes count as weights."""
    from edgepack.compressor.quantize import QuantLinear

    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, QuantLinear):
            tensors.append(module.codes)
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(
        model.get_output_embeddings(), QuantLinear
    ):
        total -= model.get_input_embeddings().weight.numel()  # stored once, as the packed lm_head
    return total


def artifact_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"]


def file_table(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every artifact file but the manifest itself."""
    return {str(p.relative_to(folder)): sha256(p) for p in artifact_files(folder)}


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in artifact_files(folder)}


def build_manifest(req, target, arch, model, built, reports, parity, folder: Path) -> dict:
    model_bytes = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {
        "edgepack_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "path": str(Path(req.model_dir).resolve()),
            "architecture": arch,
            "config_sha256": sha256(Path(req.model_dir) / "config.json"),
            "weights_sha256": {p.name: sha256(p) for p in sorted(Path(req.model_dir).glob("*.safetensors"))},
        },
        "recipe": req.recipe.to_dict(),
        "target": target.to_dict(),
        "io": built["io"],
        "ops": built["ops"],
        "opsets": built["opsets"],
        "ir_version": built["ir_version"],
        "parameters": unique_parameter_count(model),
        "num_layers": len(model.model.layers),
        "model_bytes": model_bytes,
        "bits_per_weight": round(8 * built["initializer_bytes"] / max(1, unique_parameter_count(model)), 3),
        "tensors": built["tensors"],
        "compression": reports,
        "parity": parity,
    }


APP_README = """# {name}: ONNX decoder for app teams

Made by edgepack {version} for target `{target}` from `{arch}` ({layers} layers, {params:,} parameters,
{mb:.2f} MB model file). Recipe: `{recipe}`.

## Load
Python (onnxruntime): `ort.InferenceSession("model.onnx")`. onnxruntime-genai: `og.Model(".")` (genai_config.json).
{ort_line}
## Inputs
{inputs}
## Outputs
{outputs}
## One step
Prefill: feed the prompt ids with `position_ids = 0..S-1`, `attention_mask` all ones and every
`past_key_values.*` as an empty tensor (past length 0). Decode: feed the next token (S = 1), its position,
a mask one longer, and each `present.{{i}}.*` from the last call as `past_key_values.{{i}}.*`.
Logits are float32 over the vocabulary; take the argmax (or sample) of the last position.

`manifest.json` lists every file's SHA-256 (`edgepack inspect .` verifies them), the ops used, and the
parity figures measured against the PyTorch model at export time.
"""


def write_app_readme(folder: Path, m: dict) -> None:
    def rows(specs):
        return "\n".join(f"- `{s['name']}` {s['dtype']} [{', '.join(s['shape'])}]" for s in specs[:5]) + (
            f"\n- ... and {len(specs) - 5} more of the same pattern" if len(specs) > 5 else ""
        )

    ort_line = ""
    if m["target"]["file_format"] == "ort":
        ort_line = "Android: `model.ort` with the ONNX Runtime Android package; see `EdgepackDecoder.kt` and `runner.py`.\n"
    steps = [s["kind"] for s in m["recipe"]["steps"]] or ["none (float)"]
    text = APP_README.format(
        name=Path(m["source"]["path"]).name,
        version=m["edgepack_version"],
        target=m["target"]["name"],
        arch=m["source"]["architecture"],
        layers=m["num_layers"],
        params=m["parameters"],
        mb=m["model_bytes"] / 1e6,
        recipe=" -> ".join(steps),
        ort_line=ort_line,
        inputs=rows(m["io"]["inputs"]),
        outputs=rows(m["io"]["outputs"]),
    )
    (folder / "README.md").write_text(text)
