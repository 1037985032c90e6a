"""Run an edgepack artifact in PyTorch on the Triton low-bit kernels: the server-GPU twin of the edge artifact.

The weights come from the artifact's own ``model.onnx`` (checksums verified first), so the GPU serves exactly
the compressed weights the edge devices get. A quantized linear's MatMulNBits bit planes are unpacked and
recombined into its codes (q = sum_j plane_j << shift_j, zero points likewise) and become one
`TritonQuantLinear`; float linears become ``nn.Linear``. Folded models keep their sharing: every depth position
that uses a weight holds the same linear module, while attention modules stay per position (own ``layer_idx``,
own KV cache slot). A quantized lm_head tied to the embedding gives the embedding its dequantized rows.

Usage::

    edgepack bench ARTIFACT --backend torch-triton --device cuda [--compare OTHER] [--json out.json]

    from edgepack.runtime.torch_backend import load_artifact_torch
    model = load_artifact_torch("out/w4", device="cuda")  # a transformers *ForCausalLM, float16 activations
    ids = model.generate(input_ids.cuda(), max_new_tokens=32, do_sample=False)

The benchmark (`run_benchmark_torch`, run by ``edgepack bench`` in a fresh ``python -m
edgepack.runtime.torch_backend`` process per artifact) times prefill and greedy decode through a transformers
``DynamicCache`` with runner.py's own loop (host argmax of the last logits, wall clock after the device is done)
and writes the runner's JSON report; GPU memory is ``torch.cuda.max_memory_allocated`` over the measured runs
(after the warm-up, in which the kernels tune their configs). The kernels take float16/bfloat16 activations;
float32 runs only where `TritonQuantLinear` falls back to its exact torch math (a CPU device without
TRITON_INTERPRET=1), which is how the loader is checked against ONNX Runtime to 1e-3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from edgepack.kernels.packing import TRITON_PLANE_BITS
from edgepack.kernels.reference import dequantize
from edgepack.kernels.torch_backend import TritonQuantLinear
from edgepack.runtime.bench import TORCH_BACKEND
from edgepack.runtime.runner import (
    RUNNER_VERSION,
    RunConfig,
    RunnerError,
    _proc_status_mib,
    check_config,
    context_length,
    generate,
    make_prompt,
    model_bytes,
    peak_rss_mib,
    percentiles,
    spread,
    sweep_point,
)
from torch import nn

from edgepack.artifact import (
    DecodedWeight,
    Manifest,
    Packed,
    PackedView,
    QuantLayer,
    bias_name,
    decode_weight,
    stacked_name,
    weight_name,
)
from edgepack.errors import EdgepackError
from edgepack.families import Family, family_of

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def require_cuda() -> None:
    """Refuse ``--backend torch-triton`` on a machine without a CUDA GPU, in one line."""
    if not torch.cuda.is_available():
        raise EdgepackError(
            f"--backend {TORCH_BACKEND} needs a CUDA GPU (torch.cuda.is_available() is False); "
            "use --backend onnxruntime"
        )


# ---------------------------------------------------------------------------------------------- weights


class Initializers:
    """The named initializers of an artifact's model.onnx, read as numpy arrays on demand (``stored``); the
    view ``inits`` also reads each packed projection's tensors under the projection's own names."""

    def __init__(self, path: Path, packed: list[Packed], aliases: dict[str, str] | None = None) -> None:
        self.path = path
        self.values = ir.load(path).graph.initializers
        self.aliases = aliases or {}
        self.view = PackedView(self.stored, lambda n: self.aliases.get(n, n) in self.values, packed)

    def __contains__(self, name: str) -> bool:
        return name in self.view

    def get(self, name: str) -> np.ndarray:
        return self.view.get(name)

    def stored(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.values:
            raise EdgepackError(
                f"{self.path} has no initializer {name}: the graph does not match its manifest; re-export it"
            )
        return np.array(self.values[name].const_value.numpy())  # a writable copy (the file may be mapped)


def read_quant_weight(inits: Initializers, layer: QuantLayer) -> DecodedWeight:
    """Codes, scales and zero points of a manifest quantize layer, decoded from the artifact's planes."""
    return decode_weight(inits.get, inits.__contains__, layer)


def position_sources(manifest: Manifest, num_layers: int) -> list[int]:
    """For each depth position, the position whose names its float weights are stored under (folded models
    store a share group's weights once, named after the group's first position)."""
    sources = list(range(num_layers))
    for group in manifest.fold_groups:
        for position in group:
            sources[position] = min(group)
    return sources


def layer_name_pattern(fam: Family) -> re.Pattern:
    """Matches ``<layers>.<position>.<rest>`` module names of the family's decoder blocks."""
    return re.compile(rf"^{re.escape(fam.layers)}\.(\d+)\.(.+)$")


def stored_name(fam: Family, module_name: str, sources: list[int]) -> str:
    match = layer_name_pattern(fam).match(module_name)
    if match is None:
        return module_name
    return f"{fam.layer_name(sources[int(match.group(1))])}.{match.group(2)}"


def position_weight(fam: Family, inits: Initializers, name: str) -> np.ndarray:
    """A per-position weight (a norm): its own initializer, or its row of the ``.stacked`` table that a run of
    positions sharing one block (exported as one Scan) stores under the run's first position."""
    if name in inits:
        return inits.get(name)
    match = layer_name_pattern(fam).match(name)
    if match is not None:
        position, rest = int(match.group(1)), match.group(2)
        for first in range(position, -1, -1):
            stacked = stacked_name(f"{fam.layer_name(first)}.{rest.removesuffix('.weight')}")
            if stacked in inits:
                rows = inits.get(stacked)  # (positions in the run, H)
                if position - first < len(rows):
                    return rows[position - first]
                break
    return inits.get(name)  # the one-line error naming the missing initializer


def float_linear(inits: Initializers, name: str, device: str, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` from the stored W^T (K, N) and optional bias."""
    weight = torch.from_numpy(np.ascontiguousarray(inits.get(weight_name(name)).T))  # (N, K)
    has_bias = bias_name(name) in inits
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if has_bias:
            linear.bias.copy_(torch.from_numpy(inits.get(bias_name(name))))
    return linear.requires_grad_(False)


def quant_linear(inits: Initializers, layer: QuantLayer, device: str) -> TritonQuantLinear:
    """A `TritonQuantLinear` for one manifest quantize layer (refuses widths the kernels do not take)."""
    if layer.bits not in TRITON_PLANE_BITS:
        raise EdgepackError(
            f"{layer.name} is {layer.bits}-bit; the Triton kernels take {sorted(TRITON_PLANE_BITS)} bits: "
            "re-export with another width or use --backend onnxruntime"
        )
    w = read_quant_weight(inits, layer)
    bias = torch.from_numpy(inits.get(bias_name(layer.name))) if bias_name(layer.name) in inits else None
    module = TritonQuantLinear(w.codes, w.scales, w.zero_points, w.bits, w.block, bias)
    return module.to(device)  # buffers keep their dtypes (int32 planes, float32 scales, uint8 zero points)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def runs_kernels(device: str) -> bool:
    """Whether `TritonQuantLinear` runs the Triton kernels on ``device`` (else its exact torch math)."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _check_dtype(device: str, dtype: torch.dtype) -> None:
    if runs_kernels(device) and dtype not in KERNEL_DTYPES:
        raise EdgepackError(
            f"the Triton kernels take float16 or bfloat16 activations, got {dtype}: pass dtype=torch.float16"
        )


def load_artifact_torch(
    artifact_dir: str | Path, device: str, dtype: torch.dtype = torch.float16
) -> nn.Module:
    """The artifact as a transformers ``*ForCausalLM`` on ``device``, every weight read from its model.onnx.

    The skeleton is built on the meta device from the artifact's config.json (no download, no random init);
    linears, embedding and norms are then filled from the initializers. Returns the model in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    artifact_dir = Path(artifact_dir)
    _check_dtype(device, dtype)
    manifest = Manifest.load(artifact_dir)
    onnx_path = artifact_dir / MODEL_FILE
    if not onnx_path.is_file():
        raise EdgepackError(f"{artifact_dir} has no {MODEL_FILE}: the torch backend reads the ONNX weights")
    inits = Initializers(onnx_path, manifest.packed, manifest.aliases)
    config = AutoConfig.from_pretrained(artifact_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = manifest.quant_layers
    if any(layer.abits == 8 for layer in layers):
        log.warning(
            "%s has int8-activation (A8) layers; this backend runs them on float activations", artifact_dir
        )
    quantized = {use: layer for layer in layers for use in layer.uses}
    sources = position_sources(manifest, config.num_hidden_layers)
    fam = family_of(model)

    shared: dict[str, nn.Module] = {}  # stored weight name -> the one module every position using it holds
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    head_name = fam.lm_head
    tied_float_head = False
    for name in linears:
        if name in quantized:
            layer = quantized[name]
            key = layer.name
            if key not in shared:
                shared[key] = quant_linear(inits, layer, device)
        else:
            key = stored_name(fam, name, sources)
            if name == head_name and weight_name(key) not in inits:
                tied_float_head = True  # the builder's Gemm(transB) on the embedding table
                continue
            if key not in shared:
                shared[key] = float_linear(inits, key, device, dtype)
        _replace(model, name, shared[key])

    emb = model.get_input_embeddings()
    if weight_name(fam.embed) in inits:
        table = inits.get(weight_name(fam.embed))
    elif head_name in quantized:  # a quantized tied lm_head: the embedding is its dequantized rows
        w = read_quant_weight(inits, quantized[head_name])
        table = dequantize(w.codes, w.scales, w.zero_points, w.block)
    else:
        raise EdgepackError(f"{onnx_path} has neither {fam.embed}.weight nor a quantized {head_name}")
    emb.weight = nn.Parameter(torch.from_numpy(table).to(device, dtype), requires_grad=False)
    if tied_float_head:
        model.get_output_embeddings().weight = emb.weight
    elif head_name in quantized:
        model.config.tie_word_embeddings = False  # the head is its own quantized module: never re-tie it

    for name, param in list(model.named_parameters()):  # norms: every position has its own
        if param.is_meta:
            module_name, _, attr = name.rpartition(".")
            stored = position_weight(fam, inits, name) - fam.norm_offset  # the file keeps (offset + w)
            value = torch.from_numpy(stored).to(device, dtype)
            setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
    if getattr(emb, "embed_scale", None) is not None and emb.embed_scale.is_meta:  # Gemma's scaled embedding
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale, device=device)
    for name, module in list(model.named_modules()):  # rotary tables: buffers computed from the config
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):
                _replace(model, name, type(module)(config=model.config))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EdgepackError(f"the torch backend could not fill {', '.join(left)} from {onnx_path}")
    log.info(
        "loaded %s: %d quantized and %d float linear weights on %s",
        artifact_dir,
        sum(isinstance(m, TritonQuantLinear) for m in shared.values()),
        sum(isinstance(m, nn.Linear) for m in shared.values()),
        device,
    )
    return model.eval()


# ---------------------------------------------------------------------------------------------- benchmark


class TorchDecoder:
    """runner.py's decoder interface over a transformers model: ``step(ids (1, S)) -> last logits (V,)``."""

    kv_cache = "transformers DynamicCache, device-resident"

    def __init__(self, model: nn.Module, device: str) -> None:
        self.model = model
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new sequence (empty cache)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed ``ids`` after the cached context; the host copy of the logits waits for the device."""
        out = self.model(
            input_ids=torch.from_numpy(ids).to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[0, -1].float().cpu().numpy()  # (V,)


def run_benchmark_torch(artifact_dir: Path, config: RunConfig, dtype: torch.dtype = torch.float16) -> dict:
    """Load and benchmark one artifact with the torch backend; the report has runner.py's JSON fields."""
    import triton

    from edgepack.model import DecoderDims

    if config.device == "cuda":
        require_cuda()
    Manifest.load(artifact_dir)  # verify every file before genai_config.json is parsed
    try:
        check_config(config, context_length(artifact_dir))
    except RunnerError as exc:
        raise EdgepackError(str(exc)) from exc
    if config.threads:
        torch.set_num_threads(config.threads)
    rss_before = _proc_status_mib("VmRSS")
    start = time.perf_counter()
    model = load_artifact_torch(artifact_dir, config.device, dtype)
    if config.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    rss_after_load = _proc_status_mib("VmRSS")
    dims = DecoderDims.from_config(model.config)
    decoder = TorchDecoder(model, config.device)
    prompt = make_prompt(config.prompt_len, dims.vocab_size)

    for _ in range(config.warmup):
        generate(decoder, prompt, config.gen)
    if config.device == "cuda" and config.warmup:
        # the kernels' first calls time candidate configs on a 256 MB L2-flush buffer (triton_matmul's tuner):
        # a one-off, kept out of the runs' peak (weights stay allocated, so they count)
        torch.cuda.reset_peak_memory_stats()
    timings = [generate(decoder, prompt, config.gen) for _ in range(config.runs)]
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if config.device == "cuda" else None
    report = {
        "runner_version": RUNNER_VERSION,
        "backend": TORCH_BACKEND,
        "artifact": str(artifact_dir.resolve()),
        "model_file": MODEL_FILE,
        "model_bytes": model_bytes(artifact_dir / MODEL_FILE),
        "verified_files": len(json.loads((artifact_dir / "manifest.json").read_text())["files"]),
        "device": config.device,
        "provider": f"TritonQuantLinear ({'Triton kernels' if runs_kernels(config.device) else 'torch math'}, "
        f"{str(dtype).removeprefix('torch.')} activations)",
        "kv_cache": decoder.kv_cache,
        "kv_layout": "transformers DynamicCache",
        "threads": config.threads,
        "prompt_len": config.prompt_len,
        "gen": config.gen,
        "runs": config.runs,
        "warmup": config.warmup,
        "onnxruntime": None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kv": {
            "layers": dims.num_layers,
            "kv_heads": dims.num_kv_heads,
            "head_dim": dims.head_dim,
            "dtype": str(dtype).removeprefix("torch."),
            "bytes_per_position": 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * dtype.itemsize,
        },
        "kv_bytes": (config.prompt_len + config.gen)
        * 2
        * dims.num_layers
        * dims.num_kv_heads
        * dims.head_dim
        * dtype.itemsize,  # the cache after the last timed run, as runner.py's kv_bytes
        "load_s": load_s,
        "ttft_ms": spread([t.prefill_s * 1e3 for t in timings]),
        "prefill_tok_s": spread([config.prompt_len / t.prefill_s for t in timings]),
        "decode_tok_s": spread([config.gen / sum(t.step_s) for t in timings]),
        "decode_token_ms": percentiles([s * 1e3 for t in timings for s in t.step_s]),
        "rss_before_load_mib": rss_before,
        "rss_after_load_mib": rss_after_load,
        "peak_rss_mib": peak_rss_mib(),
        "gpu_memory_mib": gpu_mib,
        "gpu_memory_source": "torch.cuda.max_memory_allocated" if gpu_mib is not None else None,
        "generated_ids": timings[0].tokens,
    }
    if config.sweep:
        report["sweep"] = [sweep_point(decoder, length, dims.vocab_size, config) for length in config.sweep]
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """runner.py's options (as ``edgepack bench`` passes them) plus the activation dtype."""
    parser = argparse.ArgumentParser(
        description="Benchmark one edgepack artifact with the torch-triton backend."
    )
    parser.add_argument("artifact", type=Path, help="artifact folder (manifest.json, model.onnx)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--prompt-len", type=int, default=RunConfig.prompt_len, help="prompt tokens P")
    parser.add_argument("--gen", type=int, default=RunConfig.gen, help="greedy decode steps N after prefill")
    parser.add_argument("--runs", type=int, default=RunConfig.runs, help="measured repetitions")
    parser.add_argument("--warmup", type=int, default=RunConfig.warmup, help="unmeasured repetitions first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--sweep", default="", help="comma-separated extra prompt lengths")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="activation dtype")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the per-artifact process; errors are one ``error: ...`` line and exit status 2."""
    args = parse_args(argv)
    try:
        sweep = tuple(int(v) for v in args.sweep.split(",") if v.strip())
    except ValueError:
        print(f"error: --sweep {args.sweep!r} is not a comma-separated list of integers", file=sys.stderr)
        return 2
    config = RunConfig(args.threads, args.prompt_len, args.gen, args.runs, args.warmup, args.device, sweep)
    try:
        report = run_benchmark_torch(args.artifact, config, DTYPES[args.dtype])
    except EdgepackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
