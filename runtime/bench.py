"""``edgepack bench``: benchmark one artifact, or two side by side, each in its own ``runner.py`` process.

A fresh process per artifact keeps each peak RSS its own. With a device profile (targets/devices.py) the run
uses the profile's threads and device, checks peak memory against the profile's budget, and adds a
bandwidth-bound estimate of decode tokens/s on that device (an upper bound, not a measurement).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from types import ModuleType

import onnx
import onnxruntime as ort
from edgepack.runtime.runner import DEVICES, RunConfig, context_length
from edgepack.targets.devices import DeviceProfile

from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

RUNNER_PATH = Path(__file__).with_name("runner.py")
TORCH_BACKEND = "torch-triton"  # runtime/torch_backend.py: PyTorch on the Triton low-bit kernels (CUDA)
BACKENDS = ("onnxruntime", TORCH_BACKEND)
# Ops that read one row of their table input per token, not the whole table.
GATHER_OPS = {("", "Gather"), ("com.microsoft", "GatherBlockQuantized")}
SUB_BYTE_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
MIB = 2**20


# ---------------------------------------------------------------------------------------------- measuring


def check_artifact_dir(artifact_dir: Path) -> None:
    """Refuse a missing folder with one line naming the artifacts that do exist next to it."""
    if artifact_dir.is_dir():
        return
    if artifact_dir.exists():
        raise EdgepackError(
            f"{artifact_dir} is a file, not a folder: pass the folder `edgepack export` wrote"
        )
    parent = artifact_dir.parent
    found = sorted(p.parent.name for p in parent.glob("*/manifest.json")) if parent.is_dir() else []
    where = f" (artifacts in {parent}: {', '.join(found)})" if found else ""
    raise EdgepackError(
        f"artifact folder {artifact_dir} does not exist: pass a folder `edgepack export` wrote{where}"
    )


def runner_args(config: RunConfig) -> list[str]:
    args = [
        f"--threads={config.threads}",
        f"--prompt-len={config.prompt_len}",
        f"--gen={config.gen}",
        f"--runs={config.runs}",
        f"--warmup={config.warmup}",
        f"--device={config.device}",
    ]
    if config.sweep:
        args.append("--sweep=" + ",".join(str(length) for length in config.sweep))
    if config.contexts:
        args.append("--context=" + ",".join(str(c) for c in config.contexts))
    return args


def run_artifact(artifact_dir: Path, config: RunConfig, backend: str = "onnxruntime") -> dict:
    """Benchmark one artifact in a fresh ``python runner.py`` (or torch backend) process; return its report."""
    check_artifact_dir(artifact_dir)
    script = [str(RUNNER_PATH)] if backend == "onnxruntime" else ["-m", "edgepack.runtime.torch_backend"]
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, *script, str(artifact_dir), "--json", str(out), *runner_args(config)]
        log.info("running %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no error output"]
            errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
            if done.returncode == 2 and errors:
                raise EdgepackError(errors[-1])
            raise EdgepackError(f"runner.py failed on {artifact_dir} (exit {done.returncode}): {lines[-1]}")
        return json.loads(out.read_text())


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    bits = SUB_BYTE_BITS.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weight_bytes_per_token(model_path: Path) -> int:
    """Initializer bytes one decode step reads: all of them, except tables only gathered (one row per token).

    Counts a tied embedding once (the lm_head reads it whole). Reads shapes only, never the weight data.
    """
    graph = onnx.load(str(model_path), load_external_data=False).graph
    sizes = {init.name: _tensor_bytes(init) for init in graph.initializer}
    read_whole: set[str] = set()
    for node in graph.node:
        gathered = (node.domain if node.domain != "ai.onnx" else "", node.op_type) in GATHER_OPS
        read_whole.update(
            name for i, name in enumerate(node.input) if name in sizes and not (gathered and i == 0)
        )
    return sum(sizes[name] for name in read_whole)


# ---------------------------------------------------------------------------------------------- profile checks


@dataclass(frozen=True)
class DecodeEstimate:
    """Bandwidth-bound decode speed on a device: bytes read per token / memory bandwidth (an upper bound)."""

    weight_bytes: int
    kv_bytes: int  # mean KV bytes read per decode step over the run's contexts
    tokens_per_s: float


@dataclass(frozen=True)
class BudgetCheck:
    """Peak memory of the host run against the profile's per-app budget; ``passed`` None when unmeasured."""

    used_mib: float | None
    budget_mib: int
    basis: str
    passed: bool | None


def estimate_decode(profile: DeviceProfile, report: dict, weight_bytes: int) -> DecodeEstimate:
    mean_context = report["prompt_len"] + (report["gen"] + 1) / 2
    kv_bytes = int(report["kv"]["bytes_per_position"] * mean_context)
    return DecodeEstimate(
        weight_bytes, kv_bytes, profile.memory_bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)
    )


def check_budget(profile: DeviceProfile, report: dict) -> BudgetCheck:
    rss, gpu = report["peak_rss_mib"], report["gpu_memory_mib"]
    if report["device"] == "cpu":
        used, basis = rss, "peak RSS"
    elif profile.unified_memory:
        used, basis = (rss + gpu if rss is not None and gpu is not None else None), "peak RSS + GPU memory"
    else:
        used, basis = gpu, "GPU memory"
    return BudgetCheck(
        used, profile.app_memory_mib, basis, None if used is None else used <= profile.app_memory_mib
    )


# ---------------------------------------------------------------------------------------------- report


@dataclass
class ArtifactResult:
    """One artifact's runner report plus what bench derives from it."""

    artifact: Path
    runner: dict
    weight_bytes_per_token: int
    estimate: DecodeEstimate | None = None
    budget: BudgetCheck | None = None

    def to_dict(self) -> dict:
        return {
            "artifact": str(self.artifact),
            "weight_bytes_per_token": self.weight_bytes_per_token,
            "estimate": asdict(self.estimate) if self.estimate else None,
            "budget": asdict(self.budget) if self.budget else None,
            "runner": self.runner,
        }


@dataclass(frozen=True)
class Metric:
    """One table row: a label, the value compared (medians) and how to print it."""

    label: str
    value: Callable[[ArtifactResult], float | None]
    text: Callable[[ArtifactResult], str]


def _fmt_spread(key: str, scale: float = 1.0, digits: int = 1) -> Callable[[ArtifactResult], str]:
    def text(r: ArtifactResult) -> str:
        s = r.runner[key]
        return (
            f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"
        )

    return text


def _fmt_optional(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


METRICS: tuple[Metric, ...] = (
    Metric(
        "model file (MiB)",
        lambda r: r.runner["model_bytes"] / MIB,
        lambda r: f"{r.runner['model_bytes'] / MIB:.2f}",
    ),
    Metric(
        "weights read/token (MiB)",
        lambda r: r.weight_bytes_per_token / MIB,
        lambda r: f"{r.weight_bytes_per_token / MIB:.2f}",
    ),
    Metric("load (ms)", lambda r: r.runner["load_s"] * 1e3, lambda r: f"{r.runner['load_s'] * 1e3:.0f}"),
    Metric("TTFT (ms) [min-max]", lambda r: r.runner["ttft_ms"]["median"], _fmt_spread("ttft_ms", digits=2)),
    Metric(
        "prefill (tok/s) [min-max]",
        lambda r: r.runner["prefill_tok_s"]["median"],
        _fmt_spread("prefill_tok_s", digits=0),
    ),
    Metric(
        "decode (tok/s) [min-max]", lambda r: r.runner["decode_tok_s"]["median"], _fmt_spread("decode_tok_s")
    ),
    Metric(
        "decode ms/token p10/p50/p90",
        lambda r: r.runner["decode_token_ms"]["median"],
        lambda r: "/".join(f"{r.runner['decode_token_ms'][k]:.3f}" for k in ("p10", "median", "p90")),
    ),
    Metric(
        "peak RSS (MiB)",
        lambda r: r.runner["peak_rss_mib"],
        lambda r: _fmt_optional(r.runner["peak_rss_mib"]),
    ),
    Metric(
        "GPU memory (MiB)",
        lambda r: r.runner["gpu_memory_mib"],
        lambda r: _fmt_optional(r.runner["gpu_memory_mib"]),
    ),
)


def context_value(context: int, key: str, scale: float) -> Callable[[ArtifactResult], float | None]:
    """A ``--context`` point's measurement (scaled), or None when the artifact has no such point."""

    def value(r: ArtifactResult) -> float | None:
        point = next((p for p in r.runner.get("contexts", []) if p["context"] == context), None)
        return None if point is None or point[key] is None else point[key] * scale

    return value


def context_metrics(context: int) -> list[Metric]:
    """Rows for one ``--context`` point: KV bytes per token and in all, decode tok/s, peak RSS."""
    rows = (
        ("KV bytes/token", "kv_bytes_per_token", 1.0, 0),
        ("KV cache (MiB)", "kv_bytes", 1 / MIB, 2),
        ("decode (tok/s)", "decode_tok_s", 1.0, 1),
        ("peak RSS (MiB)", "peak_rss_mib", 1.0, 0),
    )
    metrics = []
    for label, key, scale, digits in rows:
        value = context_value(context, key, scale)
        metrics.append(Metric(f"@{context}: {label}", value, partial(_text, value, digits)))
    return metrics


def _text(value: Callable[[ArtifactResult], float | None], digits: int, r: ArtifactResult) -> str:
    return _fmt_optional(value(r), digits)


@dataclass
class BenchReport:
    """Everything one ``edgepack bench`` invocation measured."""

    config: RunConfig
    profile: DeviceProfile | None
    backend: str = "onnxruntime"
    results: list[ArtifactResult] = field(default_factory=list)
    load_average: tuple[float, float] = (
        0.0,
        0.0,
    )  # host 1-minute load before and after: a busy host skews it

    def metrics(self) -> list[Metric]:
        """The rows that have a value for some artifact (GPU memory only on CUDA), then one block per context."""
        rows = [*METRICS, *(m for c in self.config.contexts for m in context_metrics(c))]
        return [m for m in rows if any(m.value(r) is not None for r in self.results)]

    def ratios(self) -> dict[str, float | None]:
        """Second artifact over first, per metric (medians measured in this one invocation)."""
        if len(self.results) != 2:
            return {}
        a, b = self.results
        out: dict[str, float | None] = {}
        for m in self.metrics():
            va, vb = m.value(a), m.value(b)
            out[m.label] = vb / va if va and vb is not None else None
        return out

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "backend": self.backend,
            "profile": self.profile.to_dict() if self.profile else None,
            "artifacts": [r.to_dict() for r in self.results],
            "ratios": self.ratios(),
            "host": {"cpus": os.cpu_count(), "load_average_before_after": self.load_average},
        }

    def table(self) -> str:
        """A plain-text table: one column per artifact, plus B/A when comparing, plus the profile verdicts."""
        c = self.config
        header = ["metric", *(r.artifact.name for r in self.results)]
        ratios = self.ratios()
        if ratios:
            header.append(f"{self.results[1].artifact.name} / {self.results[0].artifact.name}")
        rows = []
        for m in self.metrics():
            row = [m.label, *(m.text(r) for r in self.results)]
            if ratios:
                row.append(_fmt_optional(ratios[m.label], 2) + "x" if ratios[m.label] is not None else "n/a")
            rows.append(row)
        if self.profile is not None:
            p = self.profile
            rows.append(
                [
                    f"ESTIMATE decode on {p.name} (tok/s)",
                    *(f"{r.estimate.tokens_per_s:.0f}" for r in self.results),
                ]
            )
            rows.append([f"memory budget {p.name}", *(_verdict(r.budget) for r in self.results)])
        widths = [
            max(len(str(row[i])) for row in [header, *rows] if i < len(row)) for i in range(len(header))
        ]
        lines = [
            f"P={c.prompt_len} prompt tokens, N={c.gen} decode steps, {c.runs} runs after {c.warmup} warm-up, "
            f"{c.threads or 'default'} threads, device {c.device}, backend {self.backend}; host load average "
            f"{self.load_average[0]:.1f} -> {self.load_average[1]:.1f} on {os.cpu_count()} CPUs",
            "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)) for row in rows]
        if self.profile is not None:
            p = self.profile
            lines.append(
                f"ESTIMATE = bandwidth bound on {p.name}: (weights read/token + mean KV read) / "
                f"{p.memory_bandwidth_gbs:g} GB/s peak; an upper bound, not a measurement ({p.source})"
            )
        return "\n".join(lines)


def _verdict(budget: BudgetCheck | None) -> str:
    if budget is None or budget.passed is None:
        return f"UNKNOWN ({budget.basis} not measured)" if budget else "n/a"
    word = "PASS" if budget.passed else "FAIL"
    return f"{word} {budget.used_mib:.0f} / {budget.budget_mib} MiB {budget.basis}"


# ---------------------------------------------------------------------------------------------- entry points


def sweep_lengths(prompt_len: int, gen: int, context: int | None) -> tuple[int, ...]:
    """Prompt lengths for the latency plot: doubling from 16 to 4x the prompt, within the context."""
    lengths, length = [], 16
    while length <= max(4 * prompt_len, 16) and (context is None or length + gen <= context):
        lengths.append(length)
        length *= 2
    return tuple(lengths)


def bench(
    artifacts: list[Path],
    config: RunConfig,
    profile: DeviceProfile | None = None,
    with_sweep: bool = False,
    backend: str = "onnxruntime",
) -> BenchReport:
    """Benchmark each artifact in its own process (in order, same config) and derive the profile checks."""
    from edgepack.inspect import load_manifest

    for artifact in artifacts:
        check_artifact_dir(artifact)
        load_manifest(artifact)  # every file listed and intact before anything in it is parsed
    if config.device not in DEVICES:
        raise EdgepackError(f"unknown device {config.device!r}: use one of {', '.join(DEVICES)}")
    if backend not in BACKENDS:
        raise EdgepackError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    provider = DEVICES[config.device].provider
    if backend == TORCH_BACKEND:
        from edgepack.runtime.torch_backend import require_cuda

        require_cuda()
        if config.device != "cuda":
            raise EdgepackError(f"--backend {TORCH_BACKEND} runs on --device cuda, got {config.device}")
    elif provider not in ort.get_available_providers():
        via = f" (the {profile.name} profile's device)" if profile and profile.device == config.device else ""
        raise EdgepackError(
            f"--device {config.device}{via} needs {provider}, which this onnxruntime lacks: run on a machine with "
            "onnxruntime-gpu and an NVIDIA driver, or pass --device cpu to measure on this host's CPU"
        )
    if with_sweep:
        contexts = [c for c in (context_length(a) for a in artifacts) if c is not None]
        config = replace(
            config, sweep=sweep_lengths(config.prompt_len, config.gen, min(contexts, default=None))
        )
    report = BenchReport(config, profile, backend)
    load_before = os.getloadavg()[0]
    for artifact in artifacts:
        runner = run_artifact(artifact, config, backend)
        onnx_path = artifact / "model.onnx"  # a .ort-only folder: its file size stands in for the weights
        weights = weight_bytes_per_token(onnx_path) if onnx_path.is_file() else runner["model_bytes"]
        result = ArtifactResult(artifact, runner, weights)
        if profile is not None:
            result.estimate = estimate_decode(profile, runner, weights)
            result.budget = check_budget(profile, runner)
        report.results.append(result)
    report.load_average = (load_before, os.getloadavg()[0])
    return report


def import_pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend, or one line saying how to get it (checked before benchmarking)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EdgepackError("--plot needs matplotlib: pip install matplotlib (or edgepack[dev])") from exc
    return plt


def plot_latency(report: BenchReport, path: Path) -> None:
    """PNG of TTFT and decode latency against prompt length, one line per artifact."""
    plt = import_pyplot()
    fig, (ttft_ax, decode_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in report.results:
        points = r.runner["sweep"]
        lengths = [p["prompt_len"] for p in points]
        ttft_ax.plot(lengths, [p["ttft_ms"] for p in points], marker="o", label=r.artifact.name)
        decode_ax.plot(lengths, [p["decode_token_ms"] for p in points], marker="o", label=r.artifact.name)
    for ax, title in ((ttft_ax, "time to first token (ms)"), (decode_ax, "decode latency (ms/token)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    c = report.config
    fig.suptitle(
        f"edgepack bench: {c.threads or 'default'} threads, device {c.device}, medians of {c.runs} runs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
