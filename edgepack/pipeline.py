"""The export pipeline: load -> compress (recipe) -> build graph -> target passes -> parity -> artifact.

The artifact is assembled in a temporary sibling folder and renamed into place only when everything,
parity included, has succeeded: a failed export leaves nothing at the output path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack import __version__
from edgepack.errors import EdgepackError
from edgepack.families import decoder_layers
from edgepack.recipe import Recipe
from edgepack.runtime.manifest import file_sizes, file_table
from edgepack.runtime.runner import _proc_status_mib, peak_rss_mib
from edgepack.runtime.runner import sha256_file as sha256
from edgepack.staging import PARTIAL_MARKER, Termination, staging_dir
from edgepack.targets.profiles import Target, get_target

if TYPE_CHECKING:
    from edgepack.exporter.builder import BuildOptions

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
GENAI_CONFIG = "genai_config.json"
# Initializer bytes above which model.onnx keeps its weights in model.onnx.data (protobuf's limit is 2 GB).
# ONNX Runtime maps an external data file instead of parsing the weights into its heap: on the 0.5B
# Qwen2.5-config W4 (290 MB) that took the peak RSS of a run from 637 to 543 MiB and load from 3.1 to 1.8 s
# (docs/results/speed.md). Small artifacts stay one file.
EXTERNAL_DATA_THRESHOLD = 64 * 1024**2


@dataclass
class ExportRequest:
    model_dir: Path
    out_dir: Path
    target: str = "cpu"
    recipe: Recipe = field(default_factory=Recipe)
    calib: Path | str | None = None  # a text file, a calib_self.json, or "self" (the default: data-free)
    self_calib: dict = field(default_factory=dict)  # SelfCalibConfig overrides, e.g. {"temperature": 0.8}
    # with a text file: the fraction of GPTQ's calibration samples sampled from the model itself, shuffled in
    # (cross-domain round 4, docs/results/generalization.md: GPTQ on one text alone fits its domain)
    calib_self_share: float = 0.5
    eval_text: Path | None = None  # held-out text for quality vs the original (default: calib's tail)
    trust_remote_code: bool = False
    parity: bool = True
    force: bool = False
    new_tokens: int = 32
    build: dict = field(default_factory=dict)  # BuildOptions overrides: activations, lowering, attention


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    seconds: float


@dataclass
class ExportJob:
    """What the pipeline's steps read and write, one export at a time (the folder being staged is ``out``)."""

    req: ExportRequest
    target: Target
    out: Path
    raw_config: dict
    arch: str
    model: Any = None
    tokenizer: Any = None
    reports: dict = field(default_factory=dict)
    built: dict | None = None
    parity: dict | None = None
    quality: dict | None = None
    genai: dict | None = None
    manifest: dict | None = None
    phases: dict = field(default_factory=dict)  # step -> seconds and RSS, recorded in the manifest


def reads_weights_once(recipe: Recipe) -> bool:
    """True for a recipe that runs no forward pass before the graph: none (a float export), or one that only
    rounds weights (RTN, no size budget; KV quantization without MiniCache). The model may then load in its
    checkpoint's dtype (bf16 for most hub models: half the memory of float32, mapped from the file); each weight
    is upcast exactly where it is quantized or written, and the rest before the first forward (parity)."""
    from edgepack.recipe import kind_of

    def once(step) -> bool:
        kind = kind_of(step)
        if kind == "quantize":
            return step.method == "rtn" and step.budget_bpw is None and step.size_budget is None
        # KV quantization with per-token/channel groups; not merging nor static scales (both run calibration)
        return kind == "kv" and step.merge == "none" and not (step.group == "static" and step.bits != 16)

    return all(once(s) for s in recipe.steps)


def step_load(job: ExportJob) -> None:
    from edgepack.model import load_model, load_tokenizer

    lean = reads_weights_once(job.req.recipe)
    log.info("loading %s (%s%s)", job.req.model_dir, job.arch, ", checkpoint dtype" if lean else "")
    job.model = load_model(
        job.req.model_dir, trust_remote_code=job.req.trust_remote_code, dtype="auto" if lean else None
    )
    job.tokenizer = load_tokenizer(job.req.model_dir)


def step_compress(job: ExportJob) -> None:
    job.reports = compress(job.model, job.tokenizer, job.req, job.out)


def float_model(job: ExportJob):
    """The model in float32 for a forward pass: what a lean load kept in the checkpoint's dtype (norms, the
    embedding, unquantized linears) is upcast, exactly, after the graph was written from it."""
    return job.model.float()


def step_graph(job: ExportJob) -> None:
    job.built = write_model(job.model, job.target, job.out, job.reports, job.req.build)


def step_parity(job: ExportJob) -> None:
    job.parity = run_parity(
        float_model(job),
        job.tokenizer,
        job.target,
        job.out / "model.onnx",
        job.built["thresholds"],
        job.req.new_tokens,
        job.built["abits"],
        kv_plan(job.reports),
    )


def step_quality(job: ExportJob) -> None:
    job.quality = measure_quality(job.req, float_model(job), job.tokenizer, kv_plan(job.reports))


def step_side_files(job: ExportJob) -> None:
    from edgepack.exporter.kv_cache import genai_can_run

    genai = genai_can_run(kv_plan(job.reports), job.built["build"]["attention_form"])
    job.genai = write_side_files(
        job.req.model_dir,
        job.out,
        job.model,
        job.raw_config,
        job.tokenizer,
        job.built,
        genai=genai,
        providers=job.target.genai_providers(),
    )


def step_bundle(job: ExportJob) -> None:
    from edgepack.targets.android import make_android_bundle

    make_android_bundle(job.out, job.target.allowed_ops, job.genai)


def step_manifest(job: ExportJob) -> None:
    m = build_manifest(job.req, job.target, job.arch, job.model, job.built, job.reports, job.parity, job.out)
    m["quality"] = job.quality
    # what the rotary tables cover; runner.py reads it here where there is no genai_config.json (a compressed KV)
    m["context_length"] = int(job.genai["model"]["context_length"])
    # BOS rule, EOS ids and context: what runner.py --prompt and `edgepack generate` feed and stop by
    m["tokens"] = dataclasses.asdict(token_facts(job.out, job.genai))
    m["phases"] = dict(job.phases)  # the steps before this one (the file cannot time its own writing)
    write_app_readme(job.out, m, job.genai)
    m["files"] = file_table(job.out, exclude=(PARTIAL_MARKER,))
    m["file_bytes"] = file_sizes(job.out, exclude=(PARTIAL_MARKER,))
    (job.out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    job.manifest = m


@dataclass(frozen=True)
class Step:
    """One pipeline step: it runs when ``when(job)`` holds, reading and writing the job."""

    name: str
    run: Callable[[ExportJob], None]
    when: Callable[[ExportJob], bool] = lambda job: True


STEPS: tuple[Step, ...] = (
    Step("load", step_load, lambda job: job.model is None),
    Step("compress", step_compress),
    Step("graph", step_graph),
    Step("parity", step_parity, lambda job: job.req.parity),
    Step("quality", step_quality),
    Step("side_files", step_side_files),
    Step("android_bundle", step_bundle, lambda job: job.target.android_bundle),
    Step("manifest", step_manifest),
)


def run_steps(job: ExportJob, steps: tuple[Step, ...] = STEPS) -> None:
    """The pipeline: each applicable step in order, timed, with the process's memory after it."""
    for step in steps:
        Termination.check()  # a SIGTERM whose SystemExit a callback swallowed stops the export here
        if not step.when(job):
            continue
        start = time.perf_counter()
        step.run(job)
        now, peak = _proc_status_mib("VmRSS") or 0.0, peak_rss_mib() or 0.0  # VmHWM >= VmRSS where both exist
        phase = {
            "seconds": round(time.perf_counter() - start, 2),
            "rss_gb": round(now * 2**20 / 1e9, 3),
            "peak_rss_gb": round(max(now, peak) * 2**20 / 1e9, 3),
        }
        job.phases[step.name] = phase
        log.info("%s: %.1f s, RSS %.2f GB (peak %.2f GB)", step.name, *phase.values())


def export(req: ExportRequest) -> ExportResult:
    """Run the whole pipeline for one request; raises EdgepackError for any user-facing problem."""
    from edgepack.model import read_config

    t0 = time.perf_counter()
    target = get_target(req.target)
    raw_config, arch = read_config(req.model_dir)
    precheck(req, raw_config)
    with staging_dir(req.out_dir, req.force, req.model_dir) as tmp:
        job = ExportJob(req, target, tmp, raw_config, arch.name)
        run_steps(job)
    seconds = time.perf_counter() - t0
    log.info("wrote %s in %.1f s", req.out_dir, seconds)
    return ExportResult(req.out_dir, job.manifest, seconds)


def export_model(
    model,
    target: str = "cpu",
    out: Path | str = "out",
    *,
    source: Path | str | None = None,
    tokenizer=None,
    reports: dict | None = None,
    parity: bool = False,
    force: bool = False,
    build: dict | None = None,
    new_tokens: int = 32,
) -> ExportResult:
    """Write an artifact from a model already in memory (compressed or not), from Python.

    ``model``: a transformers causal LM, e.g. one bench code compressed itself; ``source``: the local folder it
    was loaded from (its config, tokenizer and generation config go into the artifact; default: the model's
    ``name_or_path``); ``reports``: what compressed it (compress()'s reports, e.g. {"quantize": ...}), recorded
    in the manifest and used for the KV layout and size accounting. The steps of ``edgepack export`` run from
    the graph on (parity when asked; quality vs the original needs a recipe and is not measured), and the folder
    appears atomically.
    """
    from edgepack.model import load_tokenizer, read_config

    source = Path(source if source is not None else getattr(model.config, "name_or_path", "") or "")
    if not (source / "config.json").is_file():
        raise EdgepackError(
            f"export_model needs the model's source folder (config.json, tokenizer): pass source=, not '{source}'"
        )
    t0 = time.perf_counter()
    raw_config, arch = read_config(source)
    req = ExportRequest(
        model_dir=source, out_dir=Path(out), target=target, parity=parity, force=force,
        new_tokens=new_tokens, build=dict(build or {}),
    )  # fmt: skip
    with staging_dir(req.out_dir, req.force, req.model_dir) as tmp:
        job = ExportJob(req, get_target(target), tmp, raw_config, arch.name, model=model)
        job.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
        job.reports = dict(reports or {})
        job.quality = {"measured": False, "reason": "export_model: compressed outside the pipeline"}
        run_steps(job, tuple(s for s in STEPS if s.name not in ("compress", "quality")))
    return ExportResult(req.out_dir, job.manifest, time.perf_counter() - t0)


def precheck(req: ExportRequest, raw_config: dict) -> None:
    """Refuse a recipe that cannot work on this model before anything heavy is loaded."""
    from edgepack.compressor.quantize import e2e_options
    from edgepack.recipe import kind_of

    kinds = {kind_of(s): s for s in req.recipe.steps}
    quant = kinds.get("quantize")
    needs_calib = "fold" in kinds or (
        quant is not None
        and (
            quant.method != "rtn"
            or quant.budget_bpw is not None
            or quant.size_budget is not None
            or e2e_options(quant) is not None
        )
    )
    kv = kinds.get("kv")
    needs_calib = needs_calib or (kv is not None and kv.merge == "minicache")
    if get_target(req.target).dtype == "float16" and (
        req.build.get("activations") == "int8" or (quant is not None and quant.abits == 8)
    ):
        raise EdgepackError(
            f"int8 activations (--activations int8, --abits 8) are for the cpu and android targets: ONNX Runtime's "
            f"CUDA EP runs the low-bit matmuls on float16 activations whatever the accuracy level; drop them for "
            f"--target {req.target}"
        )
    from edgepack.compressor.selfcalib import FILE_NAME, SelfCalibConfig
    from edgepack.textdata import read_text

    source = calib_source(req)
    if not 0 <= req.calib_self_share <= 1:
        raise EdgepackError(
            f"--calib-self-share {req.calib_self_share} must be in [0, 1], e.g. 0.5 (0: the --calib text only)"
        )
    if needs_calib and (source == "self" or req.calib_self_share > 0):  # samples will be drawn from the model
        SelfCalibConfig.from_dict(req.self_calib)
    if source != "self" and not (Path(source).name == FILE_NAME and Path(source).is_file()):
        read_text(source)  # missing, a folder, binary or empty: refused before the model loads
    if req.eval_text is not None and str(req.eval_text) not in (EVAL_NONE, EVAL_SELF):
        if not Path(req.eval_text).exists():
            raise EdgepackError(
                f"held-out text {req.eval_text} does not exist; pass a local UTF-8 text file to --eval"
            )
        read_text(req.eval_text)  # a folder, binary or empty: refused like --calib
    depth = int(raw_config["num_hidden_layers"])
    kv_depth = depth  # layers the KV step will see: a block fold removes some, a width fold (or auto) may not
    if "fold" in kinds:
        from edgepack.compressor.fold_plan import removal_count, resolve_groups

        kept = depth - removal_count(kinds["fold"].remove, depth)
        resolve_groups(kinds["fold"].share_group, kept)
        if kinds["fold"].structure == "blocks":
            kv_depth = kept
    if kv is not None:
        from edgepack.compressor.minicache import check_start_layer

        check_start_layer(kv, kv_depth, " (after the fold)" if kv_depth != depth else "")


def compress(model, tokenizer, req: ExportRequest, out: Path | None = None) -> dict:
    """Apply the recipe's steps in order; returns each step's report by kind (self-calibration text -> ``out``)."""
    from edgepack.compressor.selfcalib import FILE_NAME
    from edgepack.recipe import kind_of

    reports: dict = {}
    calib: dict[float, object] = {}  # calibration ids by the share of self-generated samples mixed in

    def ids_for(step, share: float = 0.0):
        if calib_source(req) == "self" or Path(calib_source(req)).name == FILE_NAME:
            share = 0.0  # the source is the model's samples already
        if share not in calib:
            calib[share] = calibration_ids(tokenizer, req, step, model, out, reports, share, kind_of(step))
        return calib[share]

    for step in req.recipe.steps:
        kind = kind_of(step)
        if kind == "fold":
            from edgepack.compressor.fold import fold

            # the cure on the text alone: mixing in the model's samples cost the fold in and off the text's
            # domain (generalization.md, round 4), where it helps GPTQ
            # a width fold chooses its channels on the model's own samples, whatever the cure text: channels
            # chosen on WikiText-2 cost Shakespeare +39.5% against +24.8% (generalization.md, round 14)
            before = set(reports)
            cure_ids = ids_for(step)
            channels = ids_for(step, 1.0) if step.structure in ("mlp-width", "auto") else None
            # auto judges its candidates on own samples that none is built on: drawn apart, so every candidate
            # is the plain fold of its structure and the winner is kept as built; at the temperature the
            # calibration draw resolved "auto" to (the same model and sizes: no second pilot)
            drawn = own_sample_settings({k: v for k, v in reports.items() if k not in before}, req)
            held_req = dataclasses.replace(req, self_calib={**req.self_calib, **drawn}) if drawn else req
            held = held_out_samples(model, tokenizer, held_req, step) if step.structure == "auto" else None
            reports["fold"] = fold(model, step, cure_ids, channel_ids=channels, held_ids=held).to_dict()
        elif kind == "quantize":
            from edgepack.compressor.quantize import HEAD_AUTO, e2e_options, quantize

            if step.head_bits == HEAD_AUTO:
                from edgepack.kernels.packing import storage_of

                opts = build_options(get_target(req.target), req.build)
                if storage_of(step.wbits, opts.lowering, opts.activations) != "kernel":
                    # the body's codes are stored at their own width (compact, planes): a head at the kernel's
                    # wider width would cost bytes there
                    step = dataclasses.replace(step, head_bits=None)
            mixed = step.budget_bpw is not None or step.size_budget is not None
            needs_calib = step.method != "rtn" or mixed or e2e_options(step) is not None
            if step.method == "abq" and not {"n_samples", "epochs"} & set(step.options):
                from edgepack.compressor.abq import size_defaults

                sized = size_defaults(unique_parameter_count(model))
                if (
                    sized
                ):  # a large model: fewer samples/epochs so ABQ stays within the hour (abq.COST_BUDGET)
                    log.info("abq: %s for a model of this size (set n_samples/epochs to override)", sized)
                    step = dataclasses.replace(step, options={**step.options, **sized})
            # GPTQ on the text mixed with the model's own samples; ABQ on the text alone (the mix cost it
            # off-domain and in it on mix-llama-14m, generalization.md round 4)
            share = req.calib_self_share if step.method == "gptq" else 0.0
            if mixed:  # a budget no format meets is refused from the shapes, before calibration is drawn
                from edgepack.compressor.mixed import quantized_budget

                quantized_budget(model, step, step.budget_bpw, step.size_budget, get_target(req.target).dtype)
            calib_ids = ids_for(step, share) if needs_calib else None
            if mixed:
                from edgepack.compressor.mixed import plan_mixed_precision

                plan = plan_mixed_precision(
                    model, step, calib_ids, step.budget_bpw, step.size_budget, get_target(req.target).dtype
                )
                step = dataclasses.replace(step, overrides={**step.overrides, **plan})
            reports["quantize"] = quantize(model, step, calib_ids if needs_calib else None)
            if step.options:
                reports["quantize"]["options"] = dict(
                    step.options
                )  # as run (ABQ's may be sized to the model)
            if mixed:
                reports["quantize"]["budget"] = {"bpw": step.budget_bpw, "bytes": step.size_budget}
        elif kind == "kv":
            reports["kv"] = plan_kv(model, tokenizer, req, step, out, reports)
    return reports


def plan_kv(
    model, tokenizer, req: ExportRequest, step, out: Path | None = None, reports: dict | None = None
) -> dict:
    """Resolve the KV-cache step (MiniCache start layer and thresholds on calibration text) into a plan."""
    from edgepack.compressor.minicache import plan_kv_cache
    from edgepack.exporter.kv_cache import make_layout

    calib_ids = None
    if step.merge != "none" or (step.group == "static" and step.bits != 16):  # thresholds / static scales
        reports = {} if reports is None else reports
        calib_ids = calibration_ids(tokenizer, req, step, model, out, reports, 0.0, "kv")
    plan, search = plan_kv_cache(model, step, calib_ids)
    if make_layout(plan).compressed and plan.group != "static":  # static: genai runs it in the fused form
        log.warning(
            "compressed KV cache (merge %s from layer %s, %s-bit %s groups): onnxruntime-genai cannot run this "
            "artifact (no genai_config.json); run it with onnxruntime (runner.py, edgepack bench)",
            plan.merge,
            plan.start_layer,
            plan.bits,
            plan.group,
        )
    return {"plan": plan.to_dict(), "search": search}


def own_sample_settings(reports: dict, req: ExportRequest) -> dict | None:
    """The temperature and top-p the latest calibration draw of the model's own samples in ``reports`` (the
    step's "calibration*" entries, as ``calibration_ids`` records them) resolved ``--calib-temperature auto``
    to; None when the request names a number or no own samples were drawn."""
    from edgepack.compressor.selfcalib import AUTO

    if req.self_calib.get("temperature") != AUTO:
        return None
    drawn = None
    for key, report in reports.items():
        if key.startswith("calibration") and isinstance(report, dict):
            own = report if "temperature" in report else report.get("self")
            if own and own.get("temperature") not in (None, AUTO):
                drawn = {k: own[k] for k in ("temperature", "top_p")}  # insertion order: the latest draw wins
    return drawn


def held_out_samples(model, tokenizer, req: ExportRequest, step):
    """The fold's held-out share of ``step.n_samples`` (at least one) in more of the model's own samples, drawn
    with the request's self-calibration settings on a seed apart from every calibration draw; None when the
    fold removes nothing."""
    from edgepack.compressor import selfcalib

    if not step.remove:
        return None
    config = selfcalib.SelfCalibConfig.sized(step.n_samples, step.seq_len, req.self_calib)
    config = selfcalib.resolve_temperature(model, tokenizer, config)  # the calibration draw's temperature
    return selfcalib.generate_samples(model, tokenizer, selfcalib.held_out_config(config, step.held_out))


def calib_source(req: ExportRequest) -> str:
    """The calibration source: "self" (sampled from the model; the default) or a file path."""
    from edgepack.compressor.selfcalib import SELF

    return SELF if req.calib is None or str(req.calib) == SELF else str(req.calib)


def calibration_ids(
    tokenizer, req: ExportRequest, step, model, out: Path | None, reports: dict, share: float, kind: str
):
    """The step's (n_samples, seq_len) calibration ids from the request's source, with ``share`` of them sampled
    from ``model`` when the source is a text file; recorded as ``reports["calibration"]``, or as
    ``reports["calibration_<kind>"]`` when an earlier step already calibrated (a fold before quantization)."""
    from edgepack.compressor import selfcalib
    from edgepack.textdata import read_text

    key = f"calibration_{kind}" if "calibration" in reports else "calibration"
    n = getattr(step, "n_samples", None) or getattr(step, "options", {}).get("n_samples", 64)
    seq = getattr(step, "seq_len", None) or getattr(step, "options", {}).get("seq_len", 256)
    source = calib_source(req)
    if source == selfcalib.SELF:
        config = selfcalib.SelfCalibConfig.sized(n, seq, req.self_calib)
        config = selfcalib.resolve_temperature(model, tokenizer, config)  # "auto" recorded as its number
        stats: dict = {}
        ids = selfcalib.generate_samples(model, tokenizer, config, stats=stats)
        if out is not None:
            selfcalib.write_samples(out, ids, tokenizer, config)
        reports[key] = {"source": source, "file": selfcalib.FILE_NAME, **dataclasses.asdict(config), **stats}
        hint = selfcalib.narrow_samples_hint(config, stats.get("sampling_entropy"))
        if hint and req.self_calib.get("temperature") != selfcalib.AUTO:  # shown by `edgepack export`
            reports[key]["note"] = hint
        return ids
    if Path(source).name == selfcalib.FILE_NAME:  # reproduce an earlier self-calibrated export
        ids = selfcalib.read_samples(Path(source))
        reports[key] = {"source": source, "n_samples": len(ids), "seq_len": ids.shape[1]}
        return ids
    ids, own, config = selfcalib.text_with_own(
        model, tokenizer, read_text(source), n, seq, share, **req.self_calib
    )
    reports[key] = report = {"source": source, "n_samples": n, "seq_len": seq, "self_share": share}
    if own is not None:  # the model's own samples shuffled in; stored beside, as with --calib self
        if out is not None:
            selfcalib.write_samples(out, own, tokenizer, config)
        report["self"] = {"file": selfcalib.FILE_NAME, **dataclasses.asdict(config)}
    return ids


def build_options(target: Target, overrides: dict | None = None) -> BuildOptions:
    """The target's graph options with the user's overrides (unknown keys or values: one-line error)."""
    from edgepack.exporter.builder import ACTIVATIONS, ATTENTION_FORMS, BuildOptions
    from edgepack.kernels.packing import LOWERINGS

    overrides = dict(overrides or {})
    valid = {"activations": ACTIVATIONS, "lowering": LOWERINGS, "attention": ATTENTION_FORMS}
    for key, value in overrides.items():
        if key not in valid:
            raise EdgepackError(f"unknown build option {key!r}; valid: {', '.join(valid)}")
        if value not in valid[key]:
            raise EdgepackError(f"--{key} {value} is not valid; choose one of {', '.join(valid[key])}")
    return BuildOptions(
        dtype=target.dtype,
        quantized_embedding=target.quantized_embedding,
        gather_zero_points=target.gather_zero_points,
        activations=overrides.get("activations", target.activations),
        lowering=overrides.get("lowering", "auto"),
        attention=overrides.get("attention", "auto"),
    )


def write_model(model, target: Target, out: Path, reports: dict, overrides: dict | None = None) -> dict:
    """Build the graph for ``target``, run its passes and save model.onnx; returns facts for the manifest."""
    import onnx_ir as ir

    from edgepack.exporter.builder import build_decoder
    from edgepack.exporter.passes import run_target_passes

    quant = reports.get("quantize")
    if quant and quant.get("budget") and "lowering" not in (overrides or {}):
        from edgepack.compressor.mixed import BUDGET_LOWERING

        overrides = {**(overrides or {}), "lowering": BUDGET_LOWERING}  # the planner counted compact bytes
    opts = dataclasses.replace(build_options(target, overrides), kv_layout=kv_layout(reports))
    abits = 16
    if quant and (
        opts.activations == "int8" or any(layer.get("abits", 16) == 8 for layer in quant["layers"])
    ):
        abits = 8  # the kernels quantize activations to int8 per block (accuracy_level 4)
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
    # a compressed KV cache: codes / retained tokens decided on the graph's own K/V (exporter/parity.py)
    kv = "-kv" if kv_layout(reports).compressed else ""
    if target.dtype == "float16":
        thresholds = f"float16{kv}"
    elif abits == 8:
        thresholds = "int8-activations"
    else:
        thresholds = f"float32{kv}"
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
        "packed": graph.meta["packed"],
        "aliases": graph.meta["aliases"],
        "thresholds": thresholds,
        "abits": abits,
        "build": {**opts.to_dict(), "attention_form": graph.meta["attention"]},
    }


def kv_plan(reports: dict):
    """The MiniCachePlan of the recipe's kv step, or None."""
    from edgepack.compressor.minicache import MiniCachePlan

    if "kv" not in reports:
        return None
    fields = {k: v for k, v in reports["kv"]["plan"].items() if k != "pairs"}
    return MiniCachePlan(**fields)


def kv_layout(reports: dict):
    """The exporter's KV layout for the recipe (PlainKV without a kv step)."""
    from edgepack.exporter.kv_cache import make_layout

    return make_layout(kv_plan(reports))


def io_spec(value) -> dict:
    return {
        "name": value.name,
        "dtype": value.type.dtype.name.lower(),
        "shape": [str(d) for d in value.shape],
    }


def run_parity(
    model,
    tokenizer,
    target: Target,
    onnx_path: Path,
    thresholds: str,
    new_tokens: int,
    abits: int = 16,
    plan=None,
) -> dict:
    """The artifact against the PyTorch model it was built from, with the kernels' activation quantization
    reproduced in PyTorch when the low-bit matmuls run on int8 activations (``abits`` 8), and the compressed
    KV cache reproduced by CompressedCache when ``plan`` (a MiniCache/KV quantization plan) is given."""
    import onnxruntime as ort

    from edgepack.compressor.minicache import CompressedCache
    from edgepack.compressor.quantize import kernel_activations, uncached_weights
    from edgepack.exporter.parity import DEFAULT_PROMPTS, check_parity

    providers = ["CPUExecutionProvider"]
    if (
        target.execution_provider != providers[0]
        and target.execution_provider in ort.get_available_providers()
    ):
        providers.insert(0, target.execution_provider)
    prompts = [tokenizer(p)["input_ids"] for p in DEFAULT_PROMPTS]
    factory = (lambda: CompressedCache(plan)) if plan is not None else None  # noqa: E731
    with kernel_activations(model, abits), uncached_weights(model):
        report = check_parity(model, onnx_path, prompts, thresholds, new_tokens, providers, factory)
    log.info("parity (%s, %s): %s", thresholds, providers[0], report.summary())
    if not report.passed:
        raise EdgepackError(
            f"parity check failed ({report.summary()}; thresholds {thresholds}); the artifact was not written. "
            "Report this with the command you ran, or pass --no-parity to keep it anyway"
        )
    return {**report.to_dict(), "provider": providers[0]}


# Quality without held-out text: this many of the original model's own samples, drawn on a seed that no
# calibration draw (seed 0 and up) or held-out draw (2000 and up) uses.
OWN_QUALITY_SAMPLES = 8
OWN_QUALITY_SEED = 7919
OWN_QUALITY_LARGE = 100_000_000  # above: own samples only with --eval self, and 4 x 128 tokens, not 8 x 256
# held-out windows decoded through a compressed KV cache (4 above LARGE), token by token up to LARGE; above it,
# KV_QUALITY_CHUNK tokens per step (each attends over the compressed past and, exactly, the earlier tokens of its
# chunk): one token per step cost a 0.5B model 120 s of a 134 s export (~0.12 s a token)
KV_QUALITY_WINDOWS = 8
KV_QUALITY_CHUNK = 16
EVAL_NONE = "none"  # --eval none: no quality measurement
EVAL_SELF = "self"  # --eval self: on the original model's own samples, at any size


def measure_quality(req: ExportRequest, model, tokenizer, plan=None) -> dict:
    """Top-1 agreement and perplexity delta vs the original float model on held-out text (see evaluate.py).

    The text is ``--eval FILE`` or else the calibration text's tail (the part calibration samples least).
    Without either (a data-free or self-calibrated export), or with ``--eval self``, it is the original
    model's own text: samples drawn at temperature 1 on a seed no calibration draw uses, so the figure says how
    far the artifact moved from the model on the model's own distribution, not on the user's domain (the
    README says so). By default that runs only up to OWN_QUALITY_LARGE parameters: it loads a second copy of
    the model and samples token by token (a 0.5B model: +41 s and 7.2 GB peak RSS against a 17 s, 3.3 GB
    export). For a recipe that changes no weights, or ``--eval none``, the dict says why nothing was measured.

    With a compressed KV cache (``plan``, a MiniCachePlan that merges or quantizes), the compressed side decodes
    each sequence one token at a time through it, as the artifact does when it generates, so the figure counts
    what the cache loses too (a full-sequence forward pass would attend over float keys and values).
    """
    from edgepack.compressor.selfcalib import SelfCalibConfig, generate_samples
    from edgepack.evaluate import HELD_OUT, QUALITY_WINDOWS, quality_on_sequences, quality_vs_original
    from edgepack.model import load_model
    from edgepack.textdata import read_text, split_text, tokenize

    if not req.recipe.steps:
        return {"measured": False, "reason": "no compression: the artifact is the original float model"}
    if str(req.eval_text) == EVAL_NONE:
        return {"measured": False, "reason": "skipped (--eval none)"}
    seq_len = min(256, int(getattr(model.config, "max_position_embeddings", 256)))
    text = None
    if req.eval_text is not None and str(req.eval_text) != EVAL_SELF:
        text, name = read_text(req.eval_text), f"{Path(req.eval_text).name} (--eval)"
    elif req.eval_text is None and calib_source(req) != "self" and not str(req.calib).endswith(".json"):
        text = split_text(read_text(req.calib), HELD_OUT)[1]
        name = f"{Path(req.calib).name}, last {HELD_OUT:.0%} (held out from calibration)"
    big = unique_parameter_count(model) > OWN_QUALITY_LARGE
    large = text is None and big  # own samples of a big model: a second copy of it, and fewer samples
    if large and req.eval_text is None:
        return {
            "measured": False,
            "reason": f"no held-out text, and above {OWN_QUALITY_LARGE / 1e6:.0f}M parameters the original model's "
            "own samples are not drawn by default (a second copy of the model in RAM): pass --eval FILE, or "
            "--eval self",
        }
    original = load_model(req.model_dir, trust_remote_code=req.trust_remote_code).eval()
    logits_of, through = None, ""
    if plan is not None and plan.active:
        from edgepack.compressor.minicache import decode_logits

        chunk = KV_QUALITY_CHUNK if big else 1

        def logits_of(ids):
            return decode_logits(model, ids, plan, chunk)

        step = "one token" if chunk == 1 else f"{chunk} tokens"
        through = f"; through the compressed KV cache, {step} per step"
    if text is None:
        n, length = (OWN_QUALITY_SAMPLES // 2, seq_len // 2) if large else (OWN_QUALITY_SAMPLES, seq_len)
        own = SelfCalibConfig(
            n_samples=n, seq_len=length + 1, temperature=1.0, top_p=1.0, greedy_tokens=0, batch_size=n,
            seed=OWN_QUALITY_SEED,
        )  # fmt: skip
        samples = generate_samples(original, tokenizer, own, purpose="quality samples")
        name = (
            f"the original model's own samples ({n} x {length} tokens at temperature 1, seed "
            f"{OWN_QUALITY_SEED}; how far the artifact moved from the model, not how it does on your domain: "
            f"pass --eval FILE for that{through})"
        )
        report = quality_on_sequences(
            original, model.eval(), samples[:, :-1], samples[:, 1:], name, logits_of=logits_of
        )
    else:
        n_windows = QUALITY_WINDOWS
        if logits_of is not None:  # a forward pass per token (per chunk when large): fewer windows
            n_windows = KV_QUALITY_WINDOWS // (2 if big else 1)
        ids = tokenize(tokenizer, text, max_tokens=n_windows * seq_len + 1)
        if len(ids) <= seq_len:
            raise EdgepackError(f"held-out text {name} has {len(ids)} tokens; pass a longer --eval FILE")
        name += f" ({through[2:]})" if through else ""
        report = quality_vs_original(original, model.eval(), ids, name, seq_len, logits_of=logits_of)
    log.info("quality vs original on %s: top-1 %.3f, ppl %.3f -> %.3f", name, report.top1_agreement,
             report.perplexity_original, report.perplexity)  # fmt: skip
    return {"measured": True, **report.to_dict()}


def write_side_files(
    model_dir: Path,
    out: Path,
    model,
    raw_config: dict,
    tokenizer,
    built: dict | None = None,
    genai: bool = True,
    providers: list[dict] | None = None,
) -> dict:
    """Tokenizer files, the (possibly folded) config.json, and genai_config.json for the graph ``built`` (not
    for a compressed KV layout, which onnxruntime-genai cannot run), opened on the target's ``providers``."""
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    config = dict(raw_config)
    config["num_hidden_layers"] = len(decoder_layers(model))
    if "layer_types" in config:  # fold keeps the types of the positions it kept
        config["layer_types"] = list(model.config.layer_types)
    if "intermediate_size" in config:  # a width fold narrows every block's MLP
        config["intermediate_size"] = model.config.intermediate_size
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    config = genai_config(model, tokenizer, read_generation_config(Path(model_dir)), built, providers)
    if genai:
        (out / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    return config  # the README's token facts and sampling defaults, also where no file is written


@dataclass(frozen=True)
class TokenFacts:
    """What an app needs to feed and stop the decoder: BOS rule, EOS ids, context length."""

    bos_id: int | None  # None: the model has no BOS token
    add_bos: bool  # transformers' tokenizer puts BOS first: prepend it on the device too
    eos_ids: tuple[int, ...]  # stop when the next token is one of these (not emitted)
    context_length: int  # positions the graph's rotary tables cover: prompt + generated tokens


def token_facts(folder: Path, genai: dict | None = None) -> TokenFacts:
    """TokenFacts of an artifact folder, from its genai_config.json (or ``genai``, that config's contents)
    and its own tokenizer files."""
    from transformers import AutoTokenizer

    if genai is None and not (folder / GENAI_CONFIG).is_file():
        raise EdgepackError(
            f"{folder} has no {GENAI_CONFIG} (an artifact with a compressed KV cache has none): pass its genai "
            "config's contents, or re-export the artifact with `edgepack export`"
        )
    model = (genai or json.loads((folder / GENAI_CONFIG).read_text()))["model"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    probe = "Hello"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    eos, bos = model["eos_token_id"], model["bos_token_id"]
    return TokenFacts(
        bos_id=None if bos is None else int(bos),
        add_bos=bos is not None and with_special[:1] == [bos] and with_special[1 : 1 + len(plain)] == plain,
        eos_ids=tuple(int(i) for i in (eos if isinstance(eos, list) else [eos])),
        context_length=int(model["context_length"]),
    )


# onnxruntime-genai model builder's search defaults: what a source without generation_config.json gets, and
# every search field genai reads (all written, so no value is left to the runtime's own default).
SEARCH_DEFAULTS = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": True,
    "length_penalty": 1.0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "past_present_share_buffer": False,  # genai_config: True where the fused graph allows it
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}
SOURCE_SEARCH_KEYS = ("diversity_penalty", "do_sample", "length_penalty", "no_repeat_ngram_size", "num_beams",
                      "num_return_sequences", "repetition_penalty", "temperature", "top_k", "top_p")  # fmt: skip


def read_generation_config(model_dir: Path) -> dict:
    """The source model's generation_config.json ({} when it has none)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepackError(f"{path} is not valid JSON ({e}); fix or remove it") from e


def search_config(generation: dict, max_length: int) -> dict:
    """genai's search section: the source's generation_config values over the builder's defaults."""
    search = dict(SEARCH_DEFAULTS, max_length=max_length)
    search.update({k: generation[k] for k in SOURCE_SEARCH_KEYS if generation.get(k) is not None})
    return dict(sorted(search.items()))


def shares_kv_buffer(built: dict | None) -> bool:
    """True when onnxruntime-genai may bind past and present to one buffer: every present comes straight from
    GroupQueryAttention (the fused form without Scan groups, whose presents are split from the Scan's)."""
    if not built:
        return False
    return built["build"]["attention_form"] == "fused" and "ai.onnx::Scan" not in built["ops"]


def genai_config(
    model,
    tokenizer,
    generation: dict | None = None,
    built: dict | None = None,
    providers: list[dict] | None = None,
) -> dict:
    """onnxruntime-genai's config for our graph ``built`` (write_model's facts: its inputs, its block form);
    ``generation``: the source's generation_config.json; ``providers``: the execution providers genai opens the
    model on (the target's; none: its CPU default)."""
    from edgepack.model import DecoderDims

    dims = DecoderDims.from_config(model.config)
    cfg = model.config
    generation = generation or {}
    eos = generation.get("eos_token_id", cfg.eos_token_id)
    eos = eos if eos is not None else tokenizer.eos_token_id
    bos = generation.get("bos_token_id", cfg.bos_token_id)
    pad = generation.get("pad_token_id", getattr(cfg, "pad_token_id", None))
    return {
        "model": {
            "bos_token_id": bos if bos is not None else tokenizer.bos_token_id,
            "context_length": dims.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers or []},
                "filename": "model.onnx",
                "head_size": dims.head_dim,
                "hidden_size": dims.hidden_size,
                "inputs": genai_inputs(built),
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": dims.num_heads,
                "num_hidden_layers": len(decoder_layers(model)),
                "num_key_value_heads": dims.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": "llama",
            "vocab_size": dims.vocab_size,
        },
        "search": {
            **search_config(generation, dims.max_positions),
            "past_present_share_buffer": shares_kv_buffer(built),
        },
    }


def genai_inputs(built: dict | None) -> dict:
    """genai's input names: position_ids only where the graph takes it (the fused form derives positions)."""
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    if built:
        graph_inputs = {spec["name"] for spec in built["io"]["inputs"]}
        names = {k: v for k, v in names.items() if v in graph_inputs}
    return {
        **names,
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
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


def build_manifest(req, target, arch, model, built, reports, parity, folder: Path) -> dict:
    from edgepack.model import weight_files

    model_bytes = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {
        "edgepack_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "path": str(Path(req.model_dir).resolve()),
            "architecture": arch,
            "config_sha256": sha256(Path(req.model_dir) / "config.json"),
            "weights_sha256": {p.name: sha256(p) for p in weight_files(Path(req.model_dir))},
        },
        "recipe": req.recipe.to_dict(),
        "target": target.to_dict(),
        "io": built["io"],
        "build": built["build"],
        "ops": built["ops"],
        "opsets": built["opsets"],
        "ir_version": built["ir_version"],
        "parameters": unique_parameter_count(model),
        "num_layers": len(decoder_layers(model)),
        "model_bytes": model_bytes,
        "bits_per_weight": round(8 * built["initializer_bytes"] / max(1, unique_parameter_count(model)), 3),
        "tensors": built["tensors"],
        "packed": built["packed"],  # artifact.Packed: projections stored as one tensor per kind
        "aliases": built["aliases"],  # initializers stored once under another name (identical bytes)
        "compression": reports,
        "parity": parity,
    }


APP_README = """# {name}: ONNX decoder for app teams

Made by edgepack {version} for target `{target}` from `{arch}` ({layers} layers, {params:,} parameters,
{mb:.2f} MB model file). Recipe: `{recipe}`.

## Load
Python (onnxruntime): `ort.InferenceSession("{model_file}")`. {genai_load}
{ort_line}
## Tokenizer
Files: {tokenizer_files}. On a device, run `tokenizer.json` with onnxruntime-genai's tokenizer (Python
`og.Tokenizer(model)`, Java/Kotlin `ai.onnxruntime.genai.Tokenizer` from its Android AAR) or with
onnxruntime-extensions (it reads the same tokenizer.json / tokenizer_config.json); any tokenizer that reproduces
transformers' ids works, the graph only sees ids.

## BOS, EOS and the stop rule
- BOS id {bos_id}; {bos_rule}
  onnxruntime-genai 0.18 adds no special tokens unless told: call `tokenizer.update_options(add_special_tokens="true")`
  (then its greedy output equals transformers').
- EOS id(s) {eos_ids}: stop when the next token is one of them (do not emit it), or at the context length.

## Context length
{context_length} positions (prompt + generated tokens); the rotary tables end there.

## KV cache and memory
{kv_line}
| context | KV cache | + model file | total (weights + KV, before activations) |
|---|---|---|---|
{memory_rows}

## Threads
One intra-op thread per big core: `setIntraOpNumThreads(4)` on a 4+4 phone (default in EdgepackDecoder.kt);
more threads than big cores slow decoding down. `runner.py --threads N` measures it on the device.

## Sampling defaults
From the source model's generation_config.json over onnxruntime-genai's builder defaults{search_where}: {sampling}.
`do_sample` false means greedy; set it true to sample with these top_k / top_p / temperature.

## Quality against the original float model
{quality}

## Inputs
{inputs}
## Outputs
{outputs}
## One step
Prefill: feed the prompt ids with `position_ids = 0..S-1`, `attention_mask` all ones and every
`past_key_values.*` as an empty tensor (past length 0). Decode: feed the next token (S = 1), its position,
a mask one longer, and each `present.{{i}}.*` from the last call as `past_key_values.{{i}}.*`.
Logits are {logits_dtype} over the vocabulary; take the argmax (or sample) of the last position.
{android}
`manifest.json` lists every file's SHA-256 (`edgepack inspect .` verifies them), the ops used, and the
parity figures measured against the PyTorch model at export time.
"""

ANDROID_README = """
## Android
- `EdgepackDecoder.kt`: a complete greedy generate loop (prefill, decode carrying the KV cache, EOS stop) on the
  ONNX Runtime Java API. Gradle: `implementation("com.microsoft.onnxruntime:onnxruntime-android:{ort_version}")`.
- Reduced runtime: `required_operators.config` lists the ops and opsets `model.ort` uses. Build a smaller
  onnxruntime with only those kernels from an onnxruntime checkout:
  `./build.sh --android --android_sdk_path $ANDROID_HOME --android_ndk_path $ANDROID_NDK_HOME --android_abi arm64-v8a
  --android_api 24 --minimal_build --include_ops_by_config required_operators.config --build_java --config MinSizeRel`
  (`--minimal_build` loads .ort files only; use the full `onnxruntime-android` AAR otherwise).
- Execution provider: use the CPU EP (the default; XNNPACK optional for float MatMul). {accelerators}
  The quantized matmuls (com.microsoft.MatMulNBits / GatherBlockQuantized) run only on the CPU EP, and every
  partition boundary copies activations between the accelerator and the CPU at each token, so NNAPI/CoreML would
  be slower than the CPU EP's ARM64 kernels here.
- `runner.py`: the same benchmark on a device with Python + onnxruntime + numpy (`python runner.py . --threads 4`);
  with the `tokenizers` package it also continues a prompt (`python runner.py . --prompt "..." --gen 64`).
"""


KV_ITEMSIZE = {"float": 4, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int64": 8}


@dataclass(frozen=True)
class KVFacts:
    """What the cache inputs cost, from their dtypes and shapes (README's memory table)."""

    inputs: int  # past_key_values.* inputs
    per_token: float  # bytes per context position, over every stream that grows with the context
    dtypes: str  # their dtypes, e.g. "uint8, float16"
    bounded: int  # at most this many more bytes that do not grow (a channel-group layout's float residual)
    per_retained: int  # bytes per outlier token a MiniCache pair keeps (data-dependent count), 0 without


def kv_facts(inputs: list[dict], channel_group: int = 32) -> KVFacts:
    """KVFacts from the graph's past_key_values inputs (manifest io specs: name, dtype, shape with free axes
    named). A stream grows with the free axis it carries: one entry per position (past_sequence_length,
    past_quantized_length), one per ``channel_group`` positions (past_group_count), at most ``channel_group``
    entries (past_residual_length) or one per retained outlier token (past_retained_length)."""
    kv = [s for s in inputs if s["name"].startswith("past_key_values.")]
    per_token = 0.0
    bounded = per_retained = 0
    pairs: set[str] = set()  # merged pairs, by their retained length (each pair keeps its own tokens)
    for spec in kv:
        if spec["dtype"] not in KV_ITEMSIZE:
            raise EdgepackError(
                f"{spec['name']} has dtype {spec['dtype']}, which the README's KV table cannot size"
            )
        shape = [str(d) for d in spec["shape"]]
        axes = shape[1:] if len(shape) == 4 else shape  # a 4-d cache's axis 0 is the batch (1 on a device)
        fixed = KV_ITEMSIZE[spec["dtype"]] * math.prod(int(d) for d in axes if d.isdigit())
        free = [d for d in axes if not d.isdigit()]
        axis = free[0] if len(free) == 1 else str(free)
        if axis in ("past_sequence_length", "past_quantized_length"):
            per_token += fixed
        elif axis == "past_group_count":
            per_token += fixed / channel_group
        elif axis == "past_residual_length":
            bounded += fixed * channel_group
        elif axis.startswith("past_retained_length"):  # one per merged pair: past_retained_length_{a}_{b}
            per_retained += fixed
            pairs.add(axis)
        else:
            raise EdgepackError(
                f"{spec['name']} has a cache axis {axis!r} that the README's KV table cannot size"
            )
    dtypes = ", ".join(dict.fromkeys({"float": "float32"}.get(s["dtype"], s["dtype"]) for s in kv)) or "none"
    return KVFacts(len(kv), per_token, dtypes, bounded, per_retained // max(len(pairs), 1))


def kv_line(facts: KVFacts) -> str:
    """The README's sentence on the cache's cost per token."""
    per_token = (
        f"{facts.per_token:,.0f}" if facts.per_token == int(facts.per_token) else f"{facts.per_token:,.1f}"
    )
    line = f"{facts.inputs} KV inputs (`past_key_values.*`, {facts.dtypes}): {per_token} bytes per token"
    if facts.bounded:
        line += (
            f", plus at most {facts.bounded:,} bytes of float residual (the newest tokens, not yet grouped)"
        )
    if facts.per_retained:
        line += (
            f", plus {facts.per_retained:,} bytes per outlier token a merged pair keeps (how many depends on "
            "the text; `runner.py --context N` measures the whole cache)"
        )
    return line + "."


# An artifact this far from its original is flagged at export, in inspect and in the app README: perplexity
# more than doubled, or the original's next token kept at fewer than half the positions. stories260k at W3
# (3.40 -> 6.51, top-1 0.61) stays under the line; W2 with a 2-bit head (3.40 -> 305, top-1 0.09) does not.
COLLAPSE_PPL_RATIO = 2.0
COLLAPSE_TOP1 = 0.5


# The levers of each recipe step that move an artifact back towards its original, for quality_warning.
QUALITY_LEVERS = {
    "fold": "remove fewer blocks (--remove) or share fewer (--share-groups)",
    "quantize": "raise --wbits or --bpw, keep the head at 8 bits (--head-bits 8), or calibrate (--method gptq / abq)",
}  # a kv step's levers follow its merge and bits (quality_warning)


def quality_warning(quality: dict | None, recipe: dict | None = None) -> str | None:
    """One line when the measured quality says the artifact has collapsed, naming the levers of the steps the
    recipe (manifest["recipe"]) ran; else None."""
    if not quality or not quality.get("measured"):
        return None
    ratio = quality["perplexity"] / quality["perplexity_original"]
    if ratio <= COLLAPSE_PPL_RATIO and quality["top1_agreement"] >= COLLAPSE_TOP1:
        return None
    steps = {s.get("kind"): s for s in (recipe or {}).get("steps", [])} or {"quantize": {}}
    levers = [QUALITY_LEVERS[k] for k in ("fold", "quantize") if k in steps]
    kv = steps.get("kv")
    if kv is not None:
        kv_levers = (
            ["merge from a later layer (--kv-start)"] if kv.get("merge", "none") != "none" else []
        ) + (["keep 8 bits of the KV cache (--kv-bits 8)"] if kv.get("bits", 16) < 8 else [])
        levers += [" or ".join(kv_levers)] if kv_levers else []
    levers = "; ".join(levers)
    return (
        f"perplexity {quality['perplexity_original']:.3f} -> {quality['perplexity']:.3f} ({ratio:.1f}x the "
        f"original's), top-1 agreement {quality['top1_agreement']:.3f}: this artifact may not be usable; "
        f"{levers or QUALITY_LEVERS['quantize']}"
    )


def quality_text(quality: dict | None, recipe: dict | None = None) -> str:
    """The README's quality paragraph from manifest['quality'] (and ['recipe'], for the warning's levers)."""
    if not quality or not quality.get("measured"):
        reason = (quality or {}).get("reason", "not measured")
        return f"Not measured: {reason}."
    q = quality
    warning = quality_warning(q, recipe)
    return (
        f"On {q['text']} ({q['tokens']:,} tokens): top-1 agreement with the original {q['top1_agreement']:.3f}; "
        f"perplexity {q['perplexity_original']:.3f} (original) -> {q['perplexity']:.3f} "
        f"(delta {q['perplexity_delta']:+.3f}). Measured with the compressed PyTorch model, which the parity check "
        "ties to this graph." + (f"\n\n**Warning:** {warning}." if warning else "")
    )


KV_README = """
**Compressed KV cache** (merge `{merge}` from layer {start_layer}, pairs {pairs}, KV bits {bits}, groups `{group}`):
onnxruntime-genai cannot run this artifact (its cache is one float past/present per layer), so there is no
genai_config.json; drive it with onnxruntime (`runner.py`). Every `past_key_values.X` input is fed from the
`present.X` output of the previous call and starts empty (all symbolic dims 0 except batch): `.codes` uint8,
`.scale`/`.low` float16, `.residual`/`.magnitude`/`.retained` float, `.retained_index` int64 positions.
"""


def write_app_readme(folder: Path, m: dict, genai: dict | None = None) -> None:
    """README.md: the integration guide an app team needs, from the manifest and the folder's own files."""

    def rows(specs):
        return "\n".join(f"- `{s['name']}` {s['dtype']} [{', '.join(s['shape'])}]" for s in specs[:5]) + (
            f"\n- ... and {len(specs) - 5} more of the same pattern" if len(specs) > 5 else ""
        )

    genai = genai or json.loads((folder / GENAI_CONFIG).read_text())
    facts = token_facts(folder, genai)
    kv_plan = m["compression"].get("kv", {}).get("plan", {})
    cache = kv_facts(m["io"]["inputs"], kv_plan.get("channel_group", 32))
    memory_rows = "\n".join(
        f"| {n:,} tokens{'' if n <= facts.context_length else ' (beyond this model)'} | "
        f"{(cache.per_token * n + cache.bounded) / 2**20:.2f} MiB | {m['model_bytes'] / 2**20:.2f} MiB | "
        f"{(cache.per_token * n + cache.bounded + m['model_bytes']) / 2**20:.2f} MiB |"
        for n in (1024, 4096)
    )
    android = ""
    ort_line = ""
    if m["target"]["file_format"] == "ort":
        import onnxruntime

        from edgepack.targets.android import accelerator_fit

        ort_line = "Android: `model.ort` with the ONNX Runtime Android package; see `EdgepackDecoder.kt` and `runner.py`.\n"
        android = ANDROID_README.format(
            ort_version=onnxruntime.__version__, accelerators=accelerator_fit(folder / "model.onnx")
        )
    if "kv" in m["compression"] and not (folder / "genai_config.json").exists():
        ort_line += KV_README.format(**m["compression"]["kv"]["plan"])
    elif providers := genai["model"]["decoder"]["session_options"]["provider_options"]:
        names = ", ".join(next(iter(p)) for p in providers)
        ort_line += (
            f"genai_config.json opens the model on onnxruntime-genai's `{names}` provider (install the matching "
            f"onnxruntime-genai package, e.g. onnxruntime-genai-cuda); Python onnxruntime: pass "
            f'`providers=["{m["target"]["execution_provider"]}"]` (onnxruntime-gpu).\n'
        )
    steps = [s["kind"] for s in m["recipe"]["steps"]] or ["none (float)"]
    search = genai["search"]
    logits_dtype = next(o["dtype"] for o in m["io"]["outputs"] if o["name"] == "logits")  # onnx-ir's names
    text = APP_README.format(
        name=Path(m["source"]["path"]).name,
        version=m["edgepack_version"],
        target=m["target"]["name"],
        arch=m["source"]["architecture"],
        layers=m["num_layers"],
        params=m["parameters"],
        mb=m["model_bytes"] / 1e6,
        recipe=" -> ".join(steps),
        model_file="model.ort" if m["target"]["file_format"] == "ort" else "model.onnx",
        genai_load=(
            f'onnxruntime-genai: `og.Model(".")` (genai_config.json names `{genai["model"]["decoder"]["filename"]}`).'
            if (folder / GENAI_CONFIG).is_file()
            else "onnxruntime-genai: not this artifact (below)."
        ),
        search_where=" (genai_config.json's `search`)" if (folder / GENAI_CONFIG).is_file() else "",
        ort_line=ort_line,
        tokenizer_files=", ".join(f"`{n}`" for n in TOKENIZER_FILES if (folder / n).is_file()),
        bos_id="none" if facts.bos_id is None else facts.bos_id,
        bos_rule=(
            "transformers' tokenizer puts it first, so prepend it to every prompt (EdgepackDecoder.ADD_BOS)."
            if facts.add_bos
            else "transformers' tokenizer does not add it, so do not prepend it."
        ),
        eos_ids=", ".join(str(i) for i in facts.eos_ids),
        context_length=facts.context_length,
        kv_line=kv_line(cache),
        memory_rows=memory_rows,
        sampling=", ".join(
            f"`{k}` {json.dumps(search[k])}"
            for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
        ),  # fmt: skip
        quality=quality_text(m.get("quality"), m.get("recipe")),
        inputs=rows(m["io"]["inputs"]),
        outputs=rows(m["io"]["outputs"]),
        logits_dtype={"float": "float32"}.get(logits_dtype, logits_dtype),
        android=android,
    )
    (folder / "README.md").write_text(text)
