"""Decode speed and memory of edgepack's artifacts against the onnxruntime-genai builder's and llama.cpp.

    python bench/speed.py [--models mix-llama-14m,qwen2.5-0.5b-random] [--threads 1,2] [--runs 5]
                          [--rounds 2] [--variant NAME=FLAGS ...] [--quick] [--out docs/results]

Every artifact is built in this run: edgepack's (one ``edgepack export`` per row of VARIANTS, plus any
``--variant NAME="--wbits 3 --group-size 64"``), the onnxruntime-genai model builder's fp32 and int4, and
llama.cpp's GGUF files (F32, Q4_0, Q3_K_M, Q2_K). Each ONNX artifact is then decoded, in a fresh process per
measurement (so peak RSS is its own), by two drivers: runtime/runner.py (one plain onnxruntime loop that feeds
each artifact the KV layout it declares: concatenated past/present, or the builder's shared buffer) and
onnxruntime-genai (bench/genai_decode.py, its C++ loop). llama.cpp runs through ``llama-bench -p P -n N``.
Prefill P tokens, then N greedy steps, medians over ``--runs``; the whole set is measured ``--rounds`` times
in turn, so every ratio (our W4 / builder int4, W3 / fp32, ...) is taken within one round, repeated.

The 0.5B model is Qwen2.5-0.5B's exact config with random weights (no hub), built once into the cache. Writes
speed.json and speed.md into ``--out`` (the page's prose lives in docs/results/speed.md around the table).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("speed")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CACHE = Path(os.environ.get("EDGEPACK_BENCH_CACHE", Path.home() / ".cache" / "edgepack-bench"))
RUNNER = ROOT / "runtime" / "runner.py"
GENAI_DRIVER = ROOT / "bench" / "genai_decode.py"
MIB = 2**20

# edgepack export flags per variant (RTN at the CLI defaults: group 64, MLP group 128, MSE ranges). Add lowering
# choices here or with --variant NAME="FLAGS"; every variant is exported for the cpu target in this run.
VARIANTS: dict[str, str] = {
    "fp32": "",
    "W8": "--wbits 8",
    "W4": "--wbits 4",
    "W3": "--wbits 3",
    "W2": "--wbits 2",
}
BUILDER_VARIANTS: dict[str, str] = {"fp32": "-p fp32", "int4": "-p int4"}
LLAMA_FORMATS: tuple[str, ...] = ("F32", "Q4_0", "Q3_K_M", "Q2_K")
DRIVERS: tuple[str, ...] = ("onnxruntime", "onnxruntime-genai")
QUICK_VARIANTS = ("fp32", "W4", "W3")
# A W4 layout under evaluation (pass it with --variant W4m128=...); its ratios appear when it was measured.
W4_CANDIDATE = "W4m128"


# ---------------------------------------------------------------------------------------------- models


def shared_model(name: str) -> Callable[[Path], Path]:
    """A model from ../shared/models, used in place."""

    def source(cache: Path) -> Path:
        path = SHARED / "models" / name
        if not (path / "config.json").is_file():
            raise SystemExit(f"error: {path} not found: run from a checkout with ../shared/models/{name}")
        return path

    return source


QWEN05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "max_window_layers": 24,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}


def random_qwen05b(cache: Path, tokenizer: Path = SHARED / "models" / "mix-llama-14m") -> Path:
    """Qwen2.5-0.5B's exact config with seeded random weights (bf16 safetensors), built once into the cache.

    The tokenizer is mix-llama-14m's byte-level BPE (8,192 ids, all below the model's 151,936): the cheapest one
    that edgepack, the genai builder and llama.cpp's converter accept; the ids it lacks are never fed (speed only).
    """
    out = cache / "models" / "qwen2.5-0.5b-random"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    log.info("building %s (random weights, Qwen2.5-0.5B config)", out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # our own staging folder from an interrupted build
    torch.manual_seed(0)
    config = Qwen2Config(
        **{k: v for k, v in QWEN05B_CONFIG.items() if k not in ("architectures", "model_type")}
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(staging, safe_serialization=True)
    config_path = (
        staging / "config.json"
    )  # transformers 5 writes rope_parameters only; older readers want this
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "rope_theta": QWEN05B_CONFIG["rope_theta"]}, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, staging / name)
    staging.rename(out)
    return out


MODELS: dict[str, Callable[[Path], Path]] = {
    "mix-llama-14m": shared_model("mix-llama-14m"),
    "qwen2.5-0.5b-random": random_qwen05b,
}


# ---------------------------------------------------------------------------------------------- artifacts


@dataclass
class Artifact:
    """One built model file and how it is decoded."""

    model: str
    tool: str  # edgepack | builder | llama.cpp
    variant: str
    path: Path | None
    flags: str = ""
    build_s: float | None = None
    file_mib: float | None = None
    error: str | None = None
    stored: dict | None = None  # llama.cpp: what the file holds (gguf_facts)

    @property
    def label(self) -> str:
        return f"{self.tool} {self.variant}"


# Linux's personality flag that turns address-space randomization off for the programs this process execs.
ADDR_NO_RANDOMIZE = 0x0040000


def fix_address_layout(keep_aslr: bool = False) -> str:
    """Have every process this bench starts from now on run at one fixed address layout (no ASLR), unless
    ``keep_aslr`` (the benches' ``--aslr``).

    Under ASLR one and the same artifact's peak RSS takes one of two values from process to process (W4 on
    mix-llama-14m: 109.4 or 112.9 MiB, the difference in glibc's heap), depending only on where the
    loader placed things; W3, W4 and the builder's int4 all show it. With the layout fixed a file's peak RSS
    moved by at most 0.3 MiB over a run's rounds (speed.md, thirteenth session; a few two-thread processes
    excepted), so the RSS ratios of a round compare the artifacts, not two draws of the layout. The flag is
    inherited across fork and exec. Returns what the JSON records.
    """
    if keep_aslr:
        return "randomized (--aslr)"
    if sys.platform != "linux":
        return f"randomized ({sys.platform}: no personality flag)"
    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)  # query
    if current == -1 or libc.personality(current | ADDR_NO_RANDOMIZE) == -1:
        return f"randomized (personality() refused: {os.strerror(ctypes.get_errno())})"
    return "fixed (ADDR_NO_RANDOMIZE)"


def run_logged(
    cmd: list[str], log_path: Path, timeout: float, env: dict | None = None, cwd: Path | None = None
) -> str | None:
    """Run ``cmd`` with output to ``log_path``; None on success, else the last line of its output."""
    log.debug("running %s", shlex.join(cmd))
    with open(log_path, "w") as f:
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=cwd)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
    if done.returncode == 0:
        return None
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return f"exit {done.returncode}: {lines[-1][:200] if lines else 'no output'}"


def folder_mib(path: Path, pattern: str = "model.onnx*") -> float:
    return sum(p.stat().st_size for p in path.glob(pattern)) / MIB


def build_edgepack(
    model: str,
    model_dir: Path,
    variant: str,
    flags: str,
    work: Path,
    timeout: float,
    target: str = "cpu",
    parity: bool = False,
    cwd: Path | None = None,
) -> Artifact:
    """``edgepack export --target TARGET --no-parity FLAGS`` (parity is the exporter's tests' job, not the
    bench's, unless ``parity``)."""
    out = work / model / f"edgepack-{variant}"
    no_parity = [] if parity else ["--no-parity"]
    # --eval none: no quality measurement (an RTN export would otherwise sample the model's own text for it),
    # so build times compare with the builder's, which measures none
    cmd = [sys.executable, "-m", "edgepack", "export", "--model", str(model_dir), "--target", target,
           "-o", str(out), *no_parity, "--eval", "none", "--force", *shlex.split(flags)]  # fmt: skip
    start = time.perf_counter()
    error = run_logged(cmd, work / model / f"edgepack-{variant}.log", timeout, cwd=cwd)
    art = Artifact(model, "edgepack", variant, None if error else out, flags, time.perf_counter() - start)
    art.error, art.file_mib = error, None if error else folder_mib(out)
    return art


def build_builder(
    model: str, model_dir: Path, variant: str, flags: str, work: Path, timeout: float, ep: str = "cpu"
) -> Artifact:
    """The onnxruntime-genai model builder for the ``ep`` execution provider (its --help crashes; arguments
    passed directly)."""
    out = work / model / f"builder-{variant}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
           *shlex.split(flags), "-e", ep, "-c", str(work / model / "builder-cache")]  # fmt: skip
    start = time.perf_counter()
    # run outside the checkout, whose kernels/ would shadow the Hugging Face package transformers imports
    error = run_logged(cmd, work / model / f"builder-{variant}.log", timeout, cwd=work)
    art = Artifact(model, "builder", variant, None if error else out, flags, time.perf_counter() - start)
    art.error, art.file_mib = error, None if error else folder_mib(out)
    return art


# ---------------------------------------------------------------------------------------------- llama.cpp


LLAMA_TREE = CACHE / "llama.cpp"
LLAMA_BIN = LLAMA_TREE / "build" / "bin"
# Run in a child interpreter: the converter refuses BPE pre-tokenizers it has no hash for (our models'). The
# pre-tokenizer only changes how text is split into tokens, never the graph or the decode cost, so an
# unrecognised one is recorded as "gpt-2" (byte-level BPE) for this speed-only comparison.
CONVERT_WITH_PRETOKENIZER_FALLBACK = """
import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion.base import TextModel
original = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_missing() -> str | None:
    """Why llama.cpp cannot run here (no cached build, no converter), or None."""
    needed = [LLAMA_BIN / "llama-bench", LLAMA_BIN / "llama-quantize", LLAMA_TREE / "convert_hf_to_gguf.py"]
    missing = [str(p) for p in needed if not p.is_file()]
    if not missing:
        return None
    toolchain = all(shutil.which(t) for t in ("cmake", "c++"))
    how = (
        "build it once as docs/results/speed.md describes (cmake + ninja, ~25 min on 2 cores)"
        if toolchain
        else "no C++ toolchain (cmake, c++) on this host to build it"
    )
    return f"llama.cpp skipped: {', '.join(missing)} not found; {how}"


def gguf_module():
    """llama.cpp's gguf-py from the cached tree (the same tree as the converter that writes the files)."""
    tree = str(LLAMA_TREE / "gguf-py")
    if tree not in sys.path:
        sys.path.insert(0, tree)
    import gguf

    return gguf


def gguf_facts(path: Path) -> dict:
    """What a GGUF file stores: its 2-D tensors counted by type, the output head's type, the tensors' bytes.
    llama-quantize falls back to another type where a tensor's K is not a multiple of the format's block
    (256 for k-quants, 32 for the legacy formats), so a small model's "Q3_K_M" is mostly 4- and 5-bit."""
    tensors = gguf_module().GGUFReader(str(path)).tensors
    names = {t.name: t for t in tensors}
    head = names.get("output.weight", names.get("token_embd.weight"))
    return {
        "matrices": dict(Counter(t.tensor_type.name for t in tensors if len(t.shape) == 2)),
        "head": head.tensor_type.name if head is not None else None,
        "tensor_bytes": sum(int(t.n_bytes) for t in tensors),
    }


def stored_line(stored: dict) -> str:
    """``Q4_0 x48, Q5_0 x22; head Q8_0``."""
    return ", ".join(f"{k} x{v}" for k, v in sorted(stored["matrices"].items())) + f"; head {stored['head']}"


def build_gguf(
    model: str, model_dir: Path, formats: tuple[str, ...], work: Path, timeout: float
) -> list[Artifact]:
    """convert_hf_to_gguf.py to F32, then llama-quantize to each other format."""
    base = work / model / "llama-F32.gguf"
    start = time.perf_counter()
    cmd = [sys.executable, "-c", CONVERT_WITH_PRETOKENIZER_FALLBACK, str(LLAMA_TREE), str(model_dir),
           "--outtype", "f32", "--outfile", str(base)]  # fmt: skip
    error = run_logged(cmd, work / model / "llama-convert.log", timeout)
    convert_s = time.perf_counter() - start
    arts = []
    for fmt in formats:
        path = work / model / f"llama-{fmt}.gguf"
        start = time.perf_counter()
        err = error
        if err is None and fmt != "F32":
            cmd = [str(LLAMA_BIN / "llama-quantize"), str(base), str(path), fmt]
            err = run_logged(cmd, work / model / f"llama-quantize-{fmt}.log", timeout)
        art = Artifact(model, "llama.cpp", fmt, None if err else path, error=err)
        art.build_s = convert_s + time.perf_counter() - start
        art.file_mib = None if err else path.stat().st_size / MIB
        art.stored = None if err else gguf_facts(path)
        arts.append(art)
    return arts


# ---------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Settings:
    """One bench invocation's decode settings."""

    prompt_len: int = 64
    gen: int = 32
    runs: int = 5
    warmup: int = 1
    timeout: float = 900.0  # per measured process


@dataclass
class Measurement:
    """One artifact, one driver, one thread count, one round: medians over ``runs`` sequences."""

    model: str
    tool: str
    variant: str
    driver: str
    threads: int
    round: int
    file_mib: float | None
    load_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    decode_tok_s_min: float | None = None
    decode_tok_s_max: float | None = None
    peak_rss_mib: float | None = None
    kv_layout: str | None = None
    load_average: float | None = None  # host 1-minute load average when the measurement started
    generated_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.tool} {self.variant}"


def measure_onnx(art: Artifact, driver: str, threads: int, s: Settings, tmp: Path) -> dict:
    """runner.py or genai_decode.py on one artifact in a fresh process; returns its JSON report."""
    out = tmp / "report.json"
    common = [f"--threads={threads}", f"--prompt-len={s.prompt_len}", f"--gen={s.gen}", f"--runs={s.runs}",
              f"--warmup={s.warmup}", "--json", str(out)]  # fmt: skip
    if driver == "onnxruntime":
        verify = [] if art.tool == "edgepack" else ["--no-verify"]  # the builder writes no manifest
        cmd = [sys.executable, str(RUNNER), str(art.path), *verify, *common]
    else:
        cmd = [sys.executable, str(GENAI_DRIVER), str(art.path), *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    error = run_logged(cmd, tmp / "driver.log", s.timeout, env)
    if error:
        raise RuntimeError(error)
    return json.loads(out.read_text())


def parse_llama_bench(rows: list[dict], s: Settings) -> tuple[float | None, float | None, list[float]]:
    """(prefill tok/s, decode tok/s, decode samples) from ``llama-bench -o json`` rows: medians of the samples
    (as the ONNX drivers report), its mean ``avg_ts`` where a row has no samples."""

    def median_ts(row: dict) -> float:
        samples = row.get("samples_ts") or []
        return statistics.median(samples) if samples else row["avg_ts"]

    prefill = decode = None
    samples: list[float] = []
    for row in rows:
        if row.get("n_prompt") == s.prompt_len and row.get("n_gen") == 0:
            prefill = median_ts(row)
        elif row.get("n_gen") == s.gen and row.get("n_prompt") == 0:
            decode, samples = median_ts(row), list(row.get("samples_ts") or [])
    return prefill, decode, samples


# A fork starts with a copy of its parent's memory, and Linux carries that copy's peak into the child's
# ru_maxrss across exec: read directly, a child of this (large) bench process reports the bench's own RSS as
# its floor. So the child is started by a small fresh interpreter, whose rusage of its own child it writes out.
RUSAGE_LAUNCHER = """
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_with_peak_rss(cmd: list[str], stdout, stderr, timeout: float, tmp: Path) -> tuple[int, float]:
    """Run ``cmd`` (output to the open files); its exit code and its own peak RSS in MiB."""
    report = tmp / "rusage.json"
    report.unlink(missing_ok=True)
    launcher = [sys.executable, "-c", RUSAGE_LAUNCHER, str(report), *cmd]
    proc = subprocess.Popen(launcher, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s") from None
    if not report.is_file():
        raise RuntimeError(f"{Path(cmd[0]).name} could not be started (launcher exit {proc.returncode})")
    usage = json.loads(report.read_text())
    return usage["exit"], usage["maxrss_kib"] / 1024  # KiB on Linux


def measure_llama(art: Artifact, threads: int, s: Settings, tmp: Path) -> dict:
    """``llama-bench -t T -p P -n N -r runs -o json``; peak RSS from its rusage (``run_with_peak_rss``)."""
    cmd = [str(LLAMA_BIN / "llama-bench"), "-m", str(art.path), "-t", str(threads), "-p", str(s.prompt_len),
           "-n", str(s.gen), "-r", str(s.runs), "-o", "json"]  # fmt: skip
    with open(tmp / "llama.json", "w") as out, open(tmp / "llama.log", "w") as err:
        code, peak = run_with_peak_rss(cmd, out, err, s.timeout, tmp)
    if code != 0:
        lines = (tmp / "llama.log").read_text(errors="replace").strip().splitlines() or ["no output"]
        hint = (
            " (SIGILL: the build runs an instruction this CPU faults on, e.g. AMX in a GGML_NATIVE build;"
            " rebuild with the flags in docs/results/speed.md, 'llama.cpp: build once')"
            if code == -signal.SIGILL
            else ""
        )
        raise RuntimeError(f"llama-bench exit {code}: {lines[-1][:200]}{hint}")
    prefill, decode, samples = parse_llama_bench(json.loads((tmp / "llama.json").read_text()), s)
    return {
        "prefill_tok_s": {"median": prefill},
        "decode_tok_s": {
            "median": decode,
            "min": min(samples, default=decode),
            "max": max(samples, default=decode),
        },
        "peak_rss_mib": peak,
        "load_s": None,
        "kv_layout": "llama.cpp",
    }


def measure(art: Artifact, driver: str, threads: int, rnd: int, s: Settings) -> Measurement:
    """One measurement; a failure is recorded in the row (the peer's own failure is a result too)."""
    m = Measurement(art.model, art.tool, art.variant, driver, threads, rnd, art.file_mib)
    m.load_average = os.getloadavg()[0]
    if art.error:
        m.error = f"build failed: {art.error}"
        return m
    with tempfile.TemporaryDirectory(prefix="edgepack-speed-") as tmp:
        try:
            if driver == "llama-bench":
                report = measure_llama(art, threads, s, Path(tmp))
            else:
                report = measure_onnx(art, driver, threads, s, Path(tmp))
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            m.error = str(exc)
            return m
    m.load_s = report.get("load_s")
    m.prefill_tok_s = report["prefill_tok_s"]["median"]
    d = report["decode_tok_s"]
    m.decode_tok_s, m.decode_tok_s_min, m.decode_tok_s_max = d["median"], d.get("min"), d.get("max")
    m.peak_rss_mib = report.get("peak_rss_mib")
    m.kv_layout = report.get("kv_layout")
    m.generated_ids = report.get("generated_ids", [])
    return m


# ---------------------------------------------------------------------------------------------- ratios


@dataclass(frozen=True)
class Ratio:
    """A goal-relevant ratio of two rows measured in the same round (``driver`` None = each row's own)."""

    name: str
    metric: str  # decode_tok_s | prefill_tok_s | peak_rss_mib
    num: tuple[str, str, str | None]  # (tool, variant, driver)
    den: tuple[str, str, str | None]
    goal: str = ""


def ratio_table() -> list[Ratio]:
    """The issue's goals as ratios: ours vs the builder per driver, low-bit vs fp32 and W4, vs llama.cpp."""
    ratios = []
    for driver in DRIVERS:
        ratios += [
            Ratio(f"W4 / builder int4 decode ({driver})", "decode_tok_s",
                  ("edgepack", "W4", driver), ("builder", "int4", driver), ">= 1.1"),
            Ratio(f"W4 / builder int4 prefill ({driver})", "prefill_tok_s",
                  ("edgepack", "W4", driver), ("builder", "int4", driver), ">= 1.0"),
            Ratio(f"W4 / builder int4 peak RSS ({driver})", "peak_rss_mib",
                  ("edgepack", "W4", driver), ("builder", "int4", driver), ""),
            Ratio(f"{W4_CANDIDATE} / builder int4 decode ({driver})", "decode_tok_s",
                  ("edgepack", W4_CANDIDATE, driver), ("builder", "int4", driver), ">= 1.1"),
            Ratio(f"{W4_CANDIDATE} / W4 decode ({driver})", "decode_tok_s",
                  ("edgepack", W4_CANDIDATE, driver), ("edgepack", "W4", driver), ""),
        ]  # fmt: skip
    for width in ("W8", "W3", "W2"):
        goal = ">= 2" if width != "W8" else ""
        ratios.append(Ratio(f"{width} / fp32 decode", "decode_tok_s", ("edgepack", width, "onnxruntime"),
                            ("edgepack", "fp32", "onnxruntime"), goal))  # fmt: skip
    for width in ("W3", "W2"):
        ratios.append(Ratio(f"{width} / W4 decode", "decode_tok_s", ("edgepack", width, "onnxruntime"),
                            ("edgepack", "W4", "onnxruntime"), ">= 0.8"))  # fmt: skip
    for width in ("W8", "W4", "W3", "W2"):
        ratios.append(Ratio(f"{width} / fp32 peak RSS", "peak_rss_mib", ("edgepack", width, "onnxruntime"),
                            ("edgepack", "fp32", "onnxruntime"), "< 1"))  # fmt: skip
    ratios.append(Ratio("W3 / W4 peak RSS", "peak_rss_mib", ("edgepack", "W3", "onnxruntime"),
                        ("edgepack", "W4", "onnxruntime"), "<= 1"))  # fmt: skip
    for width, fmt, goal in (("W4", "Q4_0", ">= 0.9"), ("W3", "Q3_K_M", ">= 0.9"), ("W2", "Q2_K", "")):
        ratios.append(Ratio(f"{width} (genai) / llama.cpp {fmt} decode", "decode_tok_s",
                            ("edgepack", width, "onnxruntime-genai"), ("llama.cpp", fmt, "llama-bench"), goal))  # fmt: skip
    return ratios


def compute_ratios(rows: list[Measurement], ratios: list[Ratio]) -> list[dict]:
    """Each ratio per (model, threads), one value per round in which both rows were measured."""
    index = {(r.model, r.tool, r.variant, r.driver, r.threads, r.round): r for r in rows if not r.error}
    keys = sorted({(r.model, r.threads) for r in rows})
    rounds = sorted({r.round for r in rows})
    out = []
    for model, threads in keys:
        for ratio in ratios:
            values = []
            for rnd in rounds:
                a = index.get((model, *ratio.num, threads, rnd))
                b = index.get((model, *ratio.den, threads, rnd))
                va, vb = (getattr(a, ratio.metric), getattr(b, ratio.metric)) if a and b else (None, None)
                if va is not None and vb:
                    values.append(va / vb)
            if values:
                out.append({"model": model, "threads": threads, "ratio": ratio.name, "metric": ratio.metric,
                            "goal": ratio.goal, "per_round": values})  # fmt: skip
    return out


def driver_agreement(rows: list[Measurement]) -> list[dict]:
    """Per ONNX artifact, thread count and round: do runner.py and onnxruntime-genai generate the same ids?"""
    by_key: dict[tuple, dict[str, list[int]]] = {}
    for r in rows:
        if r.driver in DRIVERS and not r.error:
            by_key.setdefault((r.model, r.label, r.threads, r.round), {})[r.driver] = r.generated_ids
    return [
        {
            "model": k[0],
            "artifact": k[1],
            "threads": k[2],
            "round": k[3],
            "same_tokens": ids[DRIVERS[0]] == ids[DRIVERS[1]],
        }  # fmt: skip
        for k, ids in by_key.items()
        if len(ids) == len(DRIVERS)
    ]


# ---------------------------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_values(values: list[float | None], digits: int = 1) -> str:
    """Per-round values joined by '/', e.g. '103 / 111'."""
    present = [v for v in values if v is not None]
    return " / ".join(fmt(v, digits) for v in present) if present else "—"


GOAL_TESTS = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}


def at_goal(values: list[float | None], goal: str) -> str:
    """How many of the per-round ``values`` meet ``goal`` (e.g. ">= 1.1"), as 'k of n'; '—' without a goal.
    A ratio at the edge of a goal is decided by the host's noise round by round; the count says how often."""
    present = [float(v) for v in values if v is not None]
    if not goal or not present:
        return "—"
    op, bound = goal.split()
    return f"{sum(GOAL_TESTS[op](v, float(bound)) for v in present)} of {len(present)}"


def median_of(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return fmt(statistics.median(present), 3) if present else "—"  # 3 digits: a goal edge reads true


def markdown(result: dict) -> str:
    """The results tables: one per model and thread count (one column group per round), then the ratios."""
    rows = [Measurement(**r) for r in result["measurements"]]
    lines, described = [], set()
    for model, threads in sorted({(r.model, r.threads) for r in rows}):
        subset = [r for r in rows if r.model == model and r.threads == threads]
        loads = [r.load_average for r in subset if r.load_average is not None]
        lines += [
            f"### {model}, {threads} thread{'s' if threads > 1 else ''}",
            "",
            f"Host load average during these measurements: {min(loads):.1f}-{max(loads):.1f} "
            f"on {result['host']['cpus']} CPUs. Values per round, separated by '/'.",
            "",
            "| artifact | driver | file MiB | load ms | prefill tok/s | decode tok/s | peak RSS MiB | KV layout |",
            "|---|---|---|---|---|---|---|---|",
        ]
        seen = []
        for r in subset:
            if (r.label, r.driver) not in seen:
                seen.append((r.label, r.driver))
        for label, driver in seen:
            group = sorted(
                (r for r in subset if r.label == label and r.driver == driver), key=lambda r: r.round
            )
            first = group[0]
            errors = [r.error for r in group if r.error]
            if errors and len(errors) == len(group):
                lines.append(
                    f"| {label} | {driver} | {fmt(first.file_mib, 2)} | failed: {errors[0][:120]} |||||"
                )
                continue
            loads_ms = [r.load_s * 1e3 if r.load_s is not None else None for r in group]
            lines.append(
                f"| {label} | {driver} | {fmt(first.file_mib, 2)} | {fmt_values(loads_ms, 0)} | "
                f"{fmt_values([r.prefill_tok_s for r in group], 0)} | "
                f"{fmt_values([r.decode_tok_s for r in group])} | {fmt_values([r.peak_rss_mib for r in group], 0)} | "
                f"{first.kv_layout or '—'} |"
            )
        lines.append("")
        ratios = [x for x in result["ratios"] if x["model"] == model and x["threads"] == threads]
        if ratios:
            lines += [
                "| ratio (same round) | per round | median | rounds at goal | goal |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {x['ratio']} | {fmt_values(x['per_round'], 2)} | {median_of(x['per_round'])} | "
                f"{at_goal(x['per_round'], x['goal'])} | {x['goal'] or '—'} |"
                for x in ratios
            ]
            lines.append("")
        agree = [
            x for x in result.get("driver_agreement", []) if x["model"] == model and x["threads"] == threads
        ]
        differ = sorted({x["artifact"] for x in agree if not x["same_tokens"]})
        if agree:
            lines.append(
                "Greedy tokens, runner.py vs onnxruntime-genai: "
                + (f"differ for {', '.join(differ)}." if differ else f"identical for all {len(agree)} pairs.")
            )
            lines.append("")
        stored = [a for a in result.get("artifacts", []) if a["model"] == model and a.get("stored")]
        if stored and model not in described:
            described.add(model)
            lines.append("llama.cpp files as stored (2-D tensors by type; `bench/speed.py` `gguf_facts`): "
                         + "; ".join(f"{a['variant']}: {stored_line(a['stored'])}" for a in stored) + ".")  # fmt: skip
            lines.append("")
    return "\n".join(lines)


def text_table(rows: list[Measurement]) -> str:
    """A compact terminal table of every measurement."""
    header = f"{'model':<22}{'artifact':<20}{'driver':<19}{'T':>2}{'rd':>3}{'prefill':>9}{'decode':>9}{'RSS':>7}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<22}{r.label:<20}{r.driver:<19}{r.threads:>2}{r.round:>3}{fmt(r.prefill_tok_s, 0):>9}"
            f"{fmt(r.decode_tok_s):>9}{fmt(r.peak_rss_mib, 0):>7}  {r.error or ''}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parse_variant(text: str) -> tuple[str, str]:
    """``NAME=FLAGS`` (FLAGS: edgepack export options, e.g. "--wbits 3 --group-size 64")."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: write NAME=FLAGS, e.g. W3g64='--wbits 3 --group-size 64'"
        )
    return name.strip(), flags.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mix-llama-14m", help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--runs", type=int, default=5, help="timed sequences per measurement (median)")
    p.add_argument("--rounds", type=int, default=2, help="times the whole set is measured (ratios per round)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument(
        "--variant", type=parse_variant, action="append", default=[], help="extra edgepack NAME=FLAGS"
    )
    p.add_argument("--only", default="", help="comma-separated edgepack variants to keep (default: all)")
    p.add_argument(
        "--builder", default=",".join(BUILDER_VARIANTS), help="comma-separated builder variants to build"
    )
    p.add_argument("--drivers", default="onnxruntime,onnxruntime-genai,llama-bench")
    p.add_argument(
        "--llama-formats", default=",".join(LLAMA_FORMATS), help="comma-separated llama.cpp quantizations"
    )
    p.add_argument(
        "--quick", action="store_true", help=f"1 thread, 1 round, 2 runs, variants {QUICK_VARIANTS}"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per build or measured process")
    p.add_argument("--work", type=Path, default=None, help="keep artifacts here (default: a temp folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--tag", default="", help="suffix for speed<tag>.json / .md")
    p.add_argument(
        "--render", type=Path, default=None, help="only redo the tables (and ratios) of a speed JSON"
    )
    p.add_argument(
        "--aslr", action="store_true", help="keep address-space randomization in the measured processes"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def selected_variants(args: argparse.Namespace) -> dict[str, str]:
    variants = {**VARIANTS, **dict(args.variant)}
    keep = [v for v in args.only.split(",") if v] or (list(QUICK_VARIANTS) if args.quick else list(variants))
    unknown = [v for v in keep if v not in variants]
    if unknown:
        raise SystemExit(
            f"error: --only {', '.join(unknown)} unknown: use {', '.join(variants)} or add --variant"
        )
    return {name: variants[name] for name in keep}


def build_all(models: dict[str, Path], variants: dict[str, str], builder: dict[str, str], drivers: list[str],
              work: Path, timeout: float, llama_formats: tuple[str, ...] = LLAMA_FORMATS) -> list[Artifact]:  # fmt: skip
    """Every artifact of every model, built in this run."""
    arts = []
    jobs = [(m, "edgepack", v, f) for m in models for v, f in variants.items()]
    jobs += [(m, "builder", v, f) for m in models for v, f in builder.items()]
    for model, tool, variant, flags in tqdm(jobs, desc="build", unit="artifact"):
        (work / model).mkdir(parents=True, exist_ok=True)
        build = build_edgepack if tool == "edgepack" else build_builder
        art = build(model, models[model], variant, flags, work, timeout)
        log.info("%s %s: %s", model, art.label, art.error or f"{art.file_mib:.2f} MiB in {art.build_s:.0f} s")
        arts.append(art)
    if "llama-bench" in drivers:
        reason = llama_missing()
        if reason:
            log.warning(reason)
        else:
            for model, path in models.items():
                arts += build_gguf(model, path, llama_formats, work, timeout)
    return arts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    if args.render is not None:
        return render(args.render)
    if args.quick:
        args.threads, args.rounds, args.runs = "1", 1, 2
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        print(f"error: unknown --models {', '.join(unknown)}: use {', '.join(MODELS)}", file=sys.stderr)
        return 2
    drivers = [d for d in args.drivers.split(",") if d]
    args.llama_formats = tuple(f for f in args.llama_formats.split(",") if f)
    threads = [int(t) for t in args.threads.split(",")]
    settings = Settings(args.prompt_len, args.gen, args.runs, 1, args.timeout)
    variants = selected_variants(args)
    unknown = [v for v in args.builder.split(",") if v and v not in BUILDER_VARIANTS]
    if unknown:
        print(
            f"error: unknown --builder {', '.join(unknown)}: use {', '.join(BUILDER_VARIANTS)}",
            file=sys.stderr,
        )
        return 2
    builder = {v: BUILDER_VARIANTS[v] for v in args.builder.split(",") if v}
    work_ctx = tempfile.TemporaryDirectory(prefix="edgepack-speed-") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    layout = fix_address_layout(args.aslr)
    models = {name: MODELS[name](CACHE) for name in args.models.split(",")}
    artifacts = build_all(models, variants, builder, drivers, work, args.timeout, args.llama_formats)
    jobs = []
    for rnd in range(args.rounds):
        for art in artifacts:
            art_drivers = (
                ["llama-bench"] if art.tool == "llama.cpp" else [d for d in drivers if d != "llama-bench"]
            )
            jobs += [(art, d, t, rnd) for t in threads for d in art_drivers]
    rows = []
    for art, driver, t, rnd in tqdm(jobs, desc="measure", unit="run"):
        m = measure(art, driver, t, rnd, settings)
        log.info("%s %s %s t=%d round %d: %s", m.model, m.label, driver, t, rnd,
                 m.error or f"decode {m.decode_tok_s:.1f} tok/s, prefill {m.prefill_tok_s:.0f}")  # fmt: skip
        rows.append(m)
    result = {
        "command": "python bench/speed.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": asdict(settings),
        "rounds": args.rounds,
        "threads": threads,
        "variants": variants,
        "builder_variants": builder,
        "llama_formats": list(args.llama_formats),
        "llama_skipped": llama_missing() if "llama-bench" in drivers else "not requested",
        "artifacts": [{**asdict(a), "path": str(a.path) if a.path else None} for a in artifacts],
        "measurements": [asdict(r) for r in rows],
        "ratios": compute_ratios(rows, ratio_table()),
        "driver_agreement": driver_agreement(rows),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "address_layout": layout,
            "cpu": cpu_facts(),
            "versions": versions(),
        },  # fmt: skip
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"speed{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"speed{args.tag}.tables.md").write_text(markdown(result) + "\n")
    print(text_table(rows))
    print(f"wrote {args.out / f'speed{args.tag}.json'} and speed{args.tag}.tables.md")
    if work_ctx:
        work_ctx.cleanup()
    return 0


def render(path: Path) -> int:
    """Recompute ratios and driver agreement of a saved speed JSON and rewrite it and its tables beside it."""
    result = json.loads(path.read_text())
    rows = [Measurement(**r) for r in result["measurements"]]
    result["ratios"] = compute_ratios(rows, ratio_table())
    result["driver_agreement"] = driver_agreement(rows)
    path.write_text(json.dumps(result, indent=1) + "\n")
    tables = path.with_name(path.stem + ".tables.md")
    tables.write_text(markdown(result) + "\n")
    print(f"wrote {path} and {tables}")
    return 0


def cpu_facts() -> dict[str, str]:
    """The CPU's model name and the vector extensions the kernels of either tool may pick (Linux), so runs on
    different hosts can be told apart."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or "unknown"}
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimddp", "sve", "i8mm")
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "model": fields.get("model name", "unknown"),
        "extensions": " ".join(f for f in wanted if f in flags),
    }


def versions() -> dict[str, str]:
    """Versions of the runtimes compared."""
    out = {}
    for name in ("onnxruntime", "onnxruntime_genai", "onnx", "torch", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    source = CACHE / "SOURCE"  # one line naming the tree the cached build came from (speed.md, "build once")
    if source.is_file():
        out["llama.cpp"] = source.read_text().strip()
    else:
        out["llama.cpp"] = (
            "not built" if llama_missing() else f"built in {LLAMA_TREE}, source not recorded in {source}"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
