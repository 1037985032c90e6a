#!/usr/bin/env python3
"""Benchmark one edgepack artifact with ONNX Runtime: prefill P tokens, then greedy-decode N through the KV cache.

Self-contained on purpose: it imports only the standard library, numpy and onnxruntime, because it is copied
verbatim into the Android/Linux hand-off bundle and must run there as

    python runner.py ARTIFACT_DIR --json out.json

With ``--prompt TEXT`` it continues a text instead (greedy, or sampled with ``--temperature``), by the token rules
the export recorded in manifest.json; only then does it import the ``tokenizers`` package, for tokenizer.json.

It verifies the artifact's checksums (manifest.json) before loading, loads ``model.ort`` when the folder has one
(else ``model.onnx``), and reports medians and spread of time to first token, prefill and decode tokens/s, the
process's own peak RSS, model load time and, on CUDA, GPU memory. A bad artifact or option prints one line on
stderr and exits with status 2.

It also drives other tools' decoders with the same I/O names (the onnxruntime-genai model builder's, with
``--no-verify``): the KV cache is fed in the layout the artifact declares. ``concat``: past (1, kv, T, D) in,
present (1, kv, T+S, D) out, fed back. ``shared``: genai_config.json's ``past_present_share_buffer`` (fused
GroupQueryAttention): one (1, kv, capacity, D) buffer per cache tensor, bound as both past and present, which the
kernel writes in place; the attention mask's sum says how much of it is valid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

RUNNER_VERSION = 1
MANIFEST_NAME = "manifest.json"
GENAI_CONFIG_NAME = "genai_config.json"
MODEL_FILES = ("model.ort", "model.onnx")  # load order: the mobile format first
PAST_NAME = re.compile(r"^past_key_values\.(.+)$")  # any KV layout: past_key_values.X is fed from present.X
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,  # quantized KV codes
    "tensor(int8)": np.int8,  # static per-channel int8 KV codes
    "tensor(int64)": np.int64,  # MiniCache retained positions
}
PREFILL_CHUNK = 256  # --context prefills in chunks, so attention scores stay (chunk x context)
PROMPT_SEED = 0


class RunnerError(Exception):
    """A bad artifact or option: one line naming the problem and the fix (printed, exit status 2)."""


@dataclass(frozen=True)
class RunConfig:
    """One benchmark: P prompt tokens, N greedy decode steps, repeated ``runs`` times after ``warmup`` runs."""

    threads: int = 0  # 0 = ONNX Runtime's default (one thread per physical core)
    prompt_len: int = 64
    gen: int = 32
    runs: int = 5
    warmup: int = 1
    device: str = "cpu"
    sweep: tuple[int, ...] = ()  # extra prompt lengths timed after the main runs (latency vs prompt length)
    contexts: tuple[int, ...] = ()  # contexts filled before timing decode (KV bytes, RSS, tok/s vs context)
    kv_layout: str = "auto"  # auto = what the artifact declares (see KV_LAYOUTS)


# ---------------------------------------------------------------------------------------------- artifact checks


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_dir(artifact_dir: Path) -> None:
    if not artifact_dir.is_dir():
        what = "is a file, not a folder" if artifact_dir.exists() else "does not exist"
        raise RunnerError(f"artifact folder {artifact_dir} {what}: pass the folder `edgepack export` wrote")


def artifact_files(artifact_dir: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Relative POSIX paths of every file and link under ``artifact_dir`` but manifest.json (and ``exclude``)."""
    found = []
    for path in sorted(artifact_dir.rglob("*")):
        name = path.relative_to(artifact_dir).as_posix()
        if name != MANIFEST_NAME and name not in exclude and (path.is_symlink() or not path.is_dir()):
            found.append(name)
    return found


def inside(artifact_dir: Path, name: object) -> Path | None:
    """``artifact_dir / name`` when ``name`` is a plain relative path that stays in the folder (links resolved)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return None
    rel = Path(name)
    if rel.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        return None
    path = artifact_dir / rel
    try:
        path.resolve().relative_to(artifact_dir.resolve())
    except (ValueError, OSError, RuntimeError):
        return None
    return path


def read_artifact_json(path: Path) -> object:
    """One of the artifact's JSON files, or a RunnerError naming it as corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunnerError(
            f"{path} is corrupt ({exc}): re-export the artifact with `edgepack export`"
        ) from exc


def read_manifest(artifact_dir: Path) -> dict:
    """manifest.json as a dict whose "files" maps relative paths to SHA-256 digests, or a RunnerError."""
    require_dir(artifact_dir)
    manifest_path = artifact_dir / MANIFEST_NAME
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise RunnerError(
            f"{artifact_dir} has no {MANIFEST_NAME}: pass the folder `edgepack export` wrote, not a bare ONNX folder"
        )
    manifest = read_artifact_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise RunnerError(
            f'{manifest_path} is not an edgepack manifest (no "files" table): re-export the artifact '
            "with `edgepack export`"
        )
    bad = sorted(
        str(name)
        for name, digest in files.items()
        if inside(artifact_dir, name) is None
        or name == MANIFEST_NAME
        or not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest))
    )
    if bad:
        raise RunnerError(
            f"{manifest_path} lists {', '.join(bad)}, which is not a SHA-256 of a file inside the folder: "
            "re-export the artifact with `edgepack export`"
        )
    return manifest


def verify_artifact(artifact_dir: Path) -> dict:
    """Check that manifest.json lists exactly the folder's files, a model among them, each with its SHA-256."""
    manifest = read_manifest(artifact_dir)
    files = manifest["files"]
    if not any(name in files for name in MODEL_FILES):
        raise RunnerError(
            f"{artifact_dir / MANIFEST_NAME} lists no {' or '.join(MODEL_FILES)}: re-export the artifact "
            "with `edgepack export`"
        )
    unlisted = sorted(set(artifact_files(artifact_dir)) - set(files))
    if unlisted:
        raise RunnerError(
            f"{artifact_dir} holds {', '.join(unlisted)}, not listed in {MANIFEST_NAME}: remove "
            f"{'it' if len(unlisted) == 1 else 'them'} or re-export the artifact"
        )
    missing = sorted(
        name for name in files if (artifact_dir / name).is_symlink() or not (artifact_dir / name).is_file()
    )
    if missing:
        raise RunnerError(
            f"{artifact_dir} is missing {', '.join(missing)} listed in {MANIFEST_NAME}: copy the whole artifact folder"
        )
    bad = sorted(name for name, digest in files.items() if sha256_file(artifact_dir / name) != digest)
    if bad:
        raise RunnerError(
            f"checksum mismatch for {', '.join(bad)} in {artifact_dir}: the file was modified or corrupted; "
            "re-export or re-copy the artifact"
        )
    return manifest


def find_model_file(artifact_dir: Path, name: str | None = None, listed: dict | None = None) -> Path:
    """The model to load: ``name`` if given, else model.ort (the mobile format) if present, else model.onnx.

    ``listed`` is the verified manifest's file table: only files in it are candidates. ``name`` must be a
    plain path inside the folder either way.
    """
    if name is not None and inside(artifact_dir, name) is None:
        raise RunnerError(
            f"--model-file {name} is not a file inside {artifact_dir}: pass a name relative to the artifact "
            "folder, e.g. --model-file model.onnx"
        )
    candidates = [name] if name else list(MODEL_FILES)
    for candidate in candidates:
        path = artifact_dir / candidate
        if path.is_file() and not path.is_symlink() and (listed is None or candidate in listed):
            return path
    found = sorted(
        p for p in (listed or [p.name for p in artifact_dir.glob("*")]) if p.endswith((".onnx", ".ort"))
    )
    raise RunnerError(
        f"no {' or '.join(candidates)} in {artifact_dir} (found: {', '.join(found) or 'no .onnx/.ort files'}): "
        "pass an artifact folder or --model-file NAME"
    )


def model_bytes(model_path: Path) -> int:
    """Bytes of the model file plus its external-data file(s) (``model.onnx.data``)."""
    extra = [p for p in model_path.parent.glob(model_path.name + "*.data") if p.is_file()]
    return model_path.stat().st_size + sum(p.stat().st_size for p in extra)


def read_genai_config(artifact_dir: Path) -> dict:
    """genai_config.json of the artifact, or {} when it has none."""
    path = artifact_dir / GENAI_CONFIG_NAME
    if not path.is_file():
        return {}
    config = read_artifact_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
        raise RunnerError(f'{path} is not a genai config (no "model" table): re-export the artifact')
    return config


def context_length(artifact_dir: Path, manifest: dict | None = None) -> int | None:
    """The model's context length from genai_config.json, else from the manifest (an artifact with a compressed
    KV cache has no genai_config.json); None when neither records it. Verify the artifact first."""
    source = artifact_dir / GENAI_CONFIG_NAME
    value = read_genai_config(artifact_dir).get("model", {}).get("context_length")
    if value is None and manifest is not None:
        source, value = artifact_dir / MANIFEST_NAME, manifest.get("context_length")
    try:
        return int(value) if value else None
    except (ValueError, TypeError) as exc:
        raise RunnerError(
            f"{source} is corrupt ({exc}): re-export the artifact with `edgepack export`"
        ) from exc


# ---------------------------------------------------------------------------------------------- graph I/O


def empty_shape(dims: list) -> tuple[int, ...]:
    """A cache input at length 0: batch_size 1, every other symbolic axis 0, fixed axes as they are."""
    return tuple(1 if d == "batch_size" else (d if isinstance(d, int) else 0) for d in dims)


@dataclass(frozen=True)
class KVSlot:
    """One cache tensor: the past input it is fed through and the present output it comes back from."""

    past: str
    present: str
    empty_shape: tuple[int, ...]  # the past at length 0 (batch 1, every symbolic length 0)
    dtype: type

    @property
    def kv_heads(self) -> int:
        return self.empty_shape[1] if len(self.empty_shape) == 4 else 0

    @property
    def head_dim(self) -> int:
        return self.empty_shape[3] if len(self.empty_shape) == 4 else 0


@dataclass(frozen=True)
class DecoderIO:
    """The decoder's I/O as read from the session (names, KV shapes and dtypes are never hard-coded)."""

    has_attention_mask: bool
    has_position_ids: bool
    vocab_size: int | None
    kv: tuple[KVSlot, ...]

    @classmethod
    def from_session(cls, session: ort.InferenceSession, genai: dict | None = None) -> DecoderIO:
        """Read names and KV shapes from the graph; symbolic head sizes (the builder's) from genai_config.json."""
        decoder = (genai or {}).get("model", {}).get("decoder", {})
        declared = {"kv_heads": decoder.get("num_key_value_heads"), "head_dim": decoder.get("head_size")}
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if "input_ids" not in inputs or "logits" not in outputs:
            raise RunnerError(
                "the model has no input_ids input or logits output: pass an edgepack decoder artifact"
            )
        slots = []
        for name, info in inputs.items():
            match = PAST_NAME.match(name)
            if not match:
                continue
            present = f"present.{match.group(1)}"
            if present not in outputs:
                raise RunnerError(
                    f"{name} has no matching {present} output: re-export the artifact with `edgepack export`"
                )
            shape = list(info.shape)
            if len(shape) == 4:  # (B, kv, T, D): symbolic head sizes (the builder's) from genai_config.json
                shape[1] = shape[1] if isinstance(shape[1], int) else declared["kv_heads"]
                shape[3] = shape[3] if isinstance(shape[3], int) else declared["head_dim"]
                if not isinstance(shape[1], int) or not isinstance(shape[3], int):
                    raise RunnerError(
                        f"{name} has a symbolic head shape {info.shape} that genai_config.json does not resolve: "
                        "re-export the artifact with `edgepack export`"
                    )
            if info.type not in ORT_DTYPES:
                raise RunnerError(f"{name} has type {info.type}; the runner supports {', '.join(ORT_DTYPES)}")
            empty = empty_shape(shape)
            slots.append(KVSlot(name, present, empty, ORT_DTYPES[info.type]))
        slots.sort(
            key=lambda s: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._]", s.past)]
        )
        vocab = outputs["logits"].shape[-1]
        return cls(
            has_attention_mask="attention_mask" in inputs,
            has_position_ids="position_ids" in inputs,
            vocab_size=vocab if isinstance(vocab, int) else None,
            kv=tuple(slots),
        )


# ---------------------------------------------------------------------------------------------- decoding


class Decoder(ABC):
    """Runs prefill/decode steps for one sequence, keeping the KV cache between them."""

    kv_cache: str  # how the cache is held between steps, for the report

    def __init__(self, session: ort.InferenceSession, io: DecoderIO) -> None:
        self.session = session
        self.io = io
        self.length = 0  # cached positions
        self.empty_past = {s.past: np.zeros(s.empty_shape, s.dtype) for s in io.kv}

    def reset(self) -> None:
        """Start a new sequence (empty cache)."""
        self.length = 0

    def int_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """input_ids (1, S) plus the attention mask (1, past+S) and position ids (1, S) the graph takes."""
        seq = ids.shape[1]
        feeds = {"input_ids": ids}
        if self.io.has_attention_mask:
            feeds["attention_mask"] = np.ones((1, self.length + seq), np.int64)
        if self.io.has_position_ids:
            feeds["position_ids"] = np.arange(self.length, self.length + seq, dtype=np.int64)[None]
        return feeds

    @abstractmethod
    def step(self, ids: np.ndarray, all_positions: bool = False) -> np.ndarray:
        """Feed ``ids`` (1, S) after the cached context; return the last position's logits (V,), or every
        position's (S, V) with ``all_positions`` (parity compares them all)."""

    @abstractmethod
    def kv_bytes(self) -> int:
        """Bytes the KV cache holds now (every past tensor, whatever the layout)."""


class RunDecoder(Decoder):
    """CPU: plain ``session.run``; the numpy presents are fed back as the next past.

    On the CPU EP this has the least per-step overhead (measured ~0.15 ms/step less than IOBinding on
    stories260k, whose decode step is ~0.6 ms), and ORT reads numpy inputs in place.
    """

    kv_cache = "host numpy, session.run"

    def __init__(self, session: ort.InferenceSession, io: DecoderIO) -> None:
        super().__init__(session, io)
        self.outputs = ["logits", *(s.present for s in io.kv)]
        self.past = dict(self.empty_past)

    def reset(self) -> None:
        super().reset()
        self.past = dict(self.empty_past)

    def step(self, ids: np.ndarray, all_positions: bool = False) -> np.ndarray:
        logits, *presents = self.session.run(self.outputs, {**self.int_feeds(ids), **self.past})
        self.past = {slot.past: presents[i] for i, slot in enumerate(self.io.kv)}  # not zip(strict=): py3.8
        self.length += ids.shape[1]
        return logits[0] if all_positions else logits[0, -1]

    def kv_bytes(self) -> int:
        return sum(v.nbytes for v in self.past.values())


class BindingDecoder(Decoder):
    """IOBinding: the KV cache never leaves ``kv_device`` (the GPU on CUDA).

    Each step binds the presents as device-resident outputs and feeds those same OrtValues back as the next
    step's past, so no cache bytes cross PCIe; only the last logits come to the host, into one reused buffer
    during decode. The binding object is reused across steps; the presents grow by one position per step, so
    ORT's arena recycles their blocks rather than the runner reusing fixed buffers.
    """

    kv_cache = "IOBinding, device-resident"

    def __init__(self, session: ort.InferenceSession, io: DecoderIO, kv_device: str) -> None:
        super().__init__(session, io)
        self.kv_device = kv_device
        self.binding = session.io_binding()
        self.past: list[ort.OrtValue] | None = None
        self.decode_logits: np.ndarray | None = None

    def reset(self) -> None:
        super().reset()
        self.past = None

    def kv_bytes(self) -> int:
        if self.past is None:
            return 0
        sizes = {v.past: np.dtype(v.dtype).itemsize for v in self.io.kv}
        return sum(
            int(np.prod(v.shape())) * sizes[s.past] for v, s in zip(self.past, self.io.kv, strict=True)
        )

    def step(self, ids: np.ndarray, all_positions: bool = False) -> np.ndarray:
        b = self.binding  # binding a name again replaces it, so nothing needs clearing between steps
        for name, value in self.int_feeds(ids).items():
            b.bind_cpu_input(name, value)
        for i, slot in enumerate(self.io.kv):
            if self.past is None:
                b.bind_cpu_input(slot.past, self.empty_past[slot.past])
            else:
                b.bind_ortvalue_input(slot.past, self.past[i])
        buffer = self.decode_logits if ids.shape[1] == 1 and not all_positions else None
        if buffer is not None:
            b.bind_output("logits", "cpu", 0, buffer.dtype.type, list(buffer.shape), buffer.ctypes.data)
        else:
            b.bind_output("logits", "cpu")
        for slot in self.io.kv:
            b.bind_output(slot.present, self.kv_device)
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs()
        self.past = list(outputs[1:])
        self.length += ids.shape[1]
        if buffer is not None:
            return buffer[0, -1]
        logits = outputs[0].numpy()  # (1, S, V)
        if self.decode_logits is None:
            self.decode_logits = np.empty((1, 1, logits.shape[-1]), logits.dtype)
        return logits[0] if all_positions else logits[0, -1]


class SharedBufferDecoder(Decoder):
    """Shared past/present buffer (onnxruntime-genai's ``past_present_share_buffer``), through IOBinding.

    Each cache tensor is one (1, kv, capacity, D) OrtValue bound as both the past input and the present output;
    GroupQueryAttention sees the same address on both and appends the new positions in place, so no step copies
    the cache. The attention mask (1, cached + S) tells the kernel how many positions are valid.
    """

    kv_cache = "shared past/present buffer, IOBinding"

    def __init__(self, session: ort.InferenceSession, io: DecoderIO, capacity: int, kv_device: str) -> None:
        super().__init__(session, io)
        if not io.has_attention_mask:
            raise RunnerError(
                "a shared past/present buffer needs an attention_mask input (it carries the valid length): "
                "pass --kv-layout concat"
            )
        self.capacity = capacity
        self.binding = session.io_binding()
        self.buffers = [
            ort.OrtValue.ortvalue_from_numpy(
                np.zeros((1, s.kv_heads, capacity, s.head_dim), s.dtype), kv_device
            )
            for s in io.kv
        ]
        self.binding.bind_output("logits", "cpu")  # first, so it stays get_outputs()[0] when bound again
        # Bound once: the same buffers serve every step (indexed, not zip(strict=): py3.8).
        for i, slot in enumerate(io.kv):
            self.binding.bind_ortvalue_input(slot.past, self.buffers[i])
            self.binding.bind_ortvalue_output(slot.present, self.buffers[i])

    def kv_bytes(self) -> int:
        """The shared buffers' allocation: fixed at ``capacity`` positions from the first step."""
        kv = self.io.kv  # indexed, not zip(strict=): the runner also runs on older Pythons
        return sum(
            int(np.prod(b.shape())) * np.dtype(kv[i].dtype).itemsize for i, b in enumerate(self.buffers)
        )

    def step(self, ids: np.ndarray, all_positions: bool = False) -> np.ndarray:
        if self.length + ids.shape[1] > self.capacity:
            raise RunnerError(f"the shared KV buffer holds {self.capacity} positions: raise its capacity")
        for name, value in self.int_feeds(ids).items():
            self.binding.bind_cpu_input(name, value)
        self.binding.bind_output("logits", "cpu")  # again each step: a bound output keeps its first shape
        self.session.run_with_iobinding(self.binding)
        self.length += ids.shape[1]
        logits = self.binding.get_outputs()[0].numpy()[0]
        return logits if all_positions else logits[-1]


@dataclass(frozen=True)
class KVLayout:
    """How the KV cache travels between steps, and the decoder that implements it on a device."""

    description: str
    decoder: Callable[[ort.InferenceSession, DecoderIO, RunConfig], Decoder]


KV_LAYOUTS: dict[str, KVLayout] = {
    "concat": KVLayout(
        "past (1, kv, T, D) in, present (1, kv, T+S, D) out, fed back",
        lambda session, io, config: DEVICES[config.device].decoder(session, io),
    ),
    "shared": KVLayout(
        "one (1, kv, capacity, D) buffer per cache tensor, bound as past and present (in-place append)",
        lambda session, io, config: SharedBufferDecoder(
            session, io, capacity_needed(config), DEVICES[config.device].kv_device
        ),
    ),
}


def capacity_needed(config: RunConfig) -> int:
    """Positions a shared buffer must hold: the longest prompt or context plus the decode steps and the first
    token."""
    return max((config.prompt_len, *config.sweep, *config.contexts)) + config.gen + 1


def declared_kv_layout(genai: dict, io: DecoderIO) -> str:
    """``shared`` when genai_config.json asks for a shared past/present buffer and the graph can take one."""
    shared = bool(genai.get("search", {}).get("past_present_share_buffer", False))
    return "shared" if shared and io.has_attention_mask and io.kv else "concat"


@dataclass(frozen=True)
class DeviceSpec:
    """How one ``--device`` runs: its execution provider and the decoder that keeps its KV cache."""

    provider: str
    decoder: Callable[[ort.InferenceSession, DecoderIO], Decoder]
    kv_device: str  # where a shared KV buffer lives


DEVICES: dict[str, DeviceSpec] = {
    "cpu": DeviceSpec(provider="CPUExecutionProvider", decoder=RunDecoder, kv_device="cpu"),
    "cuda": DeviceSpec(
        provider="CUDAExecutionProvider", decoder=partial(BindingDecoder, kv_device="cuda"), kv_device="cuda"
    ),
}


@dataclass
class RunTiming:
    """One measured run: prefill time and every decode step's time, in seconds, plus the tokens generated."""

    prefill_s: float
    step_s: list[float]
    tokens: list[int]


def generate(decoder: Decoder, prompt: np.ndarray, steps: int) -> RunTiming:
    """Prefill ``prompt`` (1, P), then ``steps`` greedy decode steps; time each call including the argmax."""
    decoder.reset()
    start = time.perf_counter()
    token = int(np.argmax(decoder.step(prompt)))
    prefill_s = time.perf_counter() - start
    tokens, step_s = [token], []
    for _ in range(steps):
        start = time.perf_counter()
        token = int(np.argmax(decoder.step(np.array([[token]], np.int64))))
        step_s.append(time.perf_counter() - start)
        tokens.append(token)
    return RunTiming(prefill_s, step_s, tokens)


# ---------------------------------------------------------------------------------------------- memory


def _proc_status_mib(field: str) -> float | None:
    """A ``VmHWM``/``VmRSS`` line of /proc/self/status in MiB (Linux and Android)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mib() -> float | None:
    """This process's peak resident set size: VmHWM, else getrusage (KiB on Linux, bytes on macOS)."""
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def _nvidia_smi(*query: str) -> list[list[str]]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run(
            [smi, *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def gpu_used_mib() -> float | None:
    """Memory in use on GPU 0 as nvidia-smi reports it (all processes), or None without nvidia-smi."""
    rows = _nvidia_smi("--query-gpu=memory.used", "--id=0")
    return float(rows[0][0]) if rows else None


def gpu_process_mib() -> float | None:
    """GPU memory this process holds per nvidia-smi (None where it cannot see our PID, e.g. in a container)."""
    for row in _nvidia_smi("--query-compute-apps=pid,used_memory"):
        if len(row) == 2 and row[0] == str(os.getpid()):
            return float(row[1])
    return None


def gpu_memory(used_before_load: float | None) -> tuple[float | None, str]:
    """GPU memory of this process after the runs (ORT's arena keeps its peak), and where the number came from."""
    own = gpu_process_mib()
    if own is not None:
        return own, "nvidia-smi, this process"
    now = gpu_used_mib()
    if now is not None and used_before_load is not None:
        return now - used_before_load, "nvidia-smi, GPU 0 used minus used before load"
    return None, "unavailable (no nvidia-smi)"


# ---------------------------------------------------------------------------------------------- benchmark


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentiles(values: list[float]) -> dict[str, float]:
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"median": float(p50), "p10": float(p10), "p90": float(p90)}


def make_session(model_path: Path, config: RunConfig) -> ort.InferenceSession:
    """An InferenceSession on ``config.device``; one clear line when that device is not available."""
    device = DEVICES[config.device]
    available = ort.get_available_providers()
    if device.provider not in available:
        raise RunnerError(
            f"--device {config.device} needs {device.provider}, but this onnxruntime {ort.__version__} has only "
            f"{', '.join(available)}: install onnxruntime-gpu on a machine with an NVIDIA driver, or use --device cpu"
        )
    if config.device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = list(dict.fromkeys([device.provider, "CPUExecutionProvider"]))
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for unreadable models
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunnerError(
            f"ONNX Runtime cannot load {model_path.name} ({first[:200]}): re-export the artifact"
        ) from exc
    if session.get_providers()[0] != device.provider:
        raise RunnerError(
            f"{device.provider} failed to initialise (missing CUDA/cuDNN libraries?): "
            "check `nvidia-smi` and the onnxruntime-gpu install, or use --device cpu"
        )
    return session


def make_prompt(length: int, vocab: int | None) -> np.ndarray:
    """Deterministic synthetic prompt ids (1, P); token content does not change the cost of a dense decoder."""
    rng = np.random.default_rng(PROMPT_SEED)
    return rng.integers(0, vocab or 32, size=(1, length), dtype=np.int64)


def max_threads() -> int:
    """The most intra-op threads a run may ask for: twice the host's CPUs (more only thrashes the host)."""
    return 2 * (os.cpu_count() or 1)


def check_config(config: RunConfig, context: int | None) -> None:
    if config.device not in DEVICES:
        raise RunnerError(f"unknown --device {config.device}: use one of {', '.join(DEVICES)}")
    if not 0 <= config.threads <= max_threads():
        raise RunnerError(
            f"--threads {config.threads} is outside 0..{max_threads()} (this host has {os.cpu_count()} CPUs): "
            "pass 0 for ONNX Runtime's default or at most twice the CPU count"
        )
    if config.warmup < 0:
        raise RunnerError("--warmup must be 0 or more")
    if any(length < 1 for length in config.sweep):
        raise RunnerError("--sweep prompt lengths must be at least 1")
    if config.kv_layout != "auto" and config.kv_layout not in KV_LAYOUTS:
        raise RunnerError(
            f"unknown --kv-layout {config.kv_layout}: use auto or one of {', '.join(KV_LAYOUTS)}"
        )
    for name in ("prompt_len", "gen", "runs"):
        if getattr(config, name) < 1:
            raise RunnerError(f"--{name.replace('_', '-')} must be at least 1")
    longest = max((config.prompt_len, *config.sweep, *config.contexts)) + config.gen
    if context is not None and longest > context:
        raise RunnerError(
            f"the longest sequence (prompt length, sweep or --context, + gen) = {longest} exceeds the model's "
            f"context_length {context}: lower --prompt-len, --gen, the sweep or --context"
        )


def run_benchmark(
    artifact_dir: Path, config: RunConfig, verify: bool = True, model_file: str | None = None
) -> dict:
    """Verify, load and benchmark one artifact; return the JSON-ready report."""
    require_dir(artifact_dir)
    check_config(config, None)
    manifest = verify_artifact(artifact_dir) if verify else None
    listed = manifest["files"] if manifest else None
    verified = len(listed) if listed else 0
    check_config(config, context_length(artifact_dir, manifest))
    model_path = find_model_file(artifact_dir, model_file, listed)
    rss_before = _proc_status_mib("VmRSS")
    gpu_before = gpu_used_mib() if config.device == "cuda" else None

    start = time.perf_counter()
    session = make_session(model_path, config)
    load_s = time.perf_counter() - start
    rss_after_load = _proc_status_mib("VmRSS")
    genai = read_genai_config(artifact_dir)
    io = DecoderIO.from_session(session, genai)
    layout = declared_kv_layout(genai, io) if config.kv_layout == "auto" else config.kv_layout
    decoder = KV_LAYOUTS[layout].decoder(session, io, config)
    prompt = make_prompt(config.prompt_len, io.vocab_size)

    for _ in range(config.warmup):
        generate(decoder, prompt, config.gen)
    timings = [generate(decoder, prompt, config.gen) for _ in range(config.runs)]
    kv_now = decoder.kv_bytes()  # the cache after prompt + gen - 1 fed tokens
    peak_rss = peak_rss_mib()
    gpu_mib, gpu_source = gpu_memory(gpu_before) if config.device == "cuda" else (None, None)

    report = {
        "runner_version": RUNNER_VERSION,
        "artifact": str(artifact_dir.resolve()),
        "model_file": model_path.name,
        "model_bytes": model_bytes(model_path),
        "verified_files": verified,
        "device": config.device,
        "provider": session.get_providers()[0],
        "kv_cache": decoder.kv_cache,
        "kv_layout": layout,
        "threads": config.threads,
        "prompt_len": config.prompt_len,
        "gen": config.gen,
        "runs": config.runs,
        "warmup": config.warmup,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kv": {
            "layers": len(io.kv) // 2,  # past tensors / 2 (a compressed layout has several per layer)
            "kv_heads": io.kv[0].kv_heads if io.kv else 0,
            "head_dim": io.kv[0].head_dim if io.kv else 0,
            "dtype": np.dtype(io.kv[0].dtype).name if io.kv else None,
            "bytes_per_position": kv_now / max(1, decoder.length),  # measured: exact for any layout
        },
        "kv_bytes": kv_now,
        "load_s": load_s,
        "ttft_ms": spread([t.prefill_s * 1e3 for t in timings]),
        "prefill_tok_s": spread([config.prompt_len / t.prefill_s for t in timings]),
        "decode_tok_s": spread([config.gen / sum(t.step_s) for t in timings]),
        "decode_token_ms": percentiles([s * 1e3 for t in timings for s in t.step_s]),
        "rss_before_load_mib": rss_before,
        "rss_after_load_mib": rss_after_load,
        "peak_rss_mib": peak_rss,
        "gpu_memory_mib": gpu_mib,
        "gpu_memory_source": gpu_source,
        "generated_ids": timings[0].tokens,
    }
    if config.sweep:
        report["sweep"] = [sweep_point(decoder, length, io.vocab_size, config) for length in config.sweep]
    if config.contexts:
        report["contexts"] = [
            context_point(decoder, c, io.vocab_size, config) for c in sorted(config.contexts)
        ]
    return report


# ---------------------------------------------------------------------------------------------- text in, text out


@dataclass(frozen=True)
class TokenRules:
    """What the decoder is fed and when it stops: manifest.json's "tokens" (edgepack writes it at export)."""

    bos_id: int | None
    add_bos: bool  # transformers' tokenizer puts BOS first: so does this runner
    eos_ids: tuple[int, ...]
    context_length: int

    @classmethod
    def from_manifest(cls, manifest: dict, artifact_dir: Path) -> TokenRules:
        tokens = manifest.get("tokens")
        if not isinstance(tokens, dict):
            raise RunnerError(
                f"{artifact_dir / MANIFEST_NAME} records no token rules (BOS, EOS): the artifact was exported by "
                "an older edgepack; re-export it to generate text from a prompt"
            )
        try:
            bos = tokens["bos_id"]
            return cls(
                bos_id=None if bos is None else int(bos),
                add_bos=bool(tokens["add_bos"]),
                eos_ids=tuple(int(i) for i in tokens["eos_ids"]),
                context_length=int(tokens["context_length"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RunnerError(
                f"{artifact_dir / MANIFEST_NAME} has corrupt token rules ({exc!r}): re-export the artifact"
            ) from exc


def load_tokenizer(artifact_dir: Path):
    """The artifact's tokenizer.json through the ``tokenizers`` package (the one import outside numpy and
    onnxruntime, and only for --prompt)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise RunnerError(
            "--prompt needs the tokenizers package to read tokenizer.json: pip install tokenizers"
        ) from exc
    path = artifact_dir / "tokenizer.json"
    if not path.is_file():
        raise RunnerError(
            f"{artifact_dir} has no tokenizer.json: re-export the artifact with `edgepack export`"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type for an unreadable file
        raise RunnerError(f"{path} cannot be read ({exc}): re-export the artifact") from exc


def encode_prompt(tokenizer, rules: TokenRules, text: str) -> list[int]:
    """The ids transformers' tokenizer gives ``text``: BOS (when the model's tokenizer adds it), then the text."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([rules.bos_id] if rules.add_bos and rules.bos_id is not None else []) + list(ids)


def next_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else a sample from softmax(logits / T) cut to the top-p nucleus."""
    if temperature == 0:
        return int(np.argmax(logits))
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    z = (logits - logits.max()) / temperature
    probs = np.exp(z)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)  # the smallest prefix holding top_p
    kept = order[:keep]
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))


@dataclass
class Completion:
    """One prompt's continuation: its ids, why it stopped, and how long prefill and each step took."""

    prompt_ids: list[int]
    ids: list[int]
    stop: str  # "eos", "max_new_tokens" or "context"
    prefill_s: float
    step_s: list[float]


def complete(
    decoder: Decoder,
    prompt_ids: list[int],
    rules: TokenRules,
    max_new: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_token: Callable[[list[int]], None] | None = None,
) -> Completion:
    """Prefill the prompt, then decode up to ``max_new`` tokens: stop before an EOS id (not emitted) or at the
    context length, as the app README's stop rule says. ``on_token`` sees the ids so far after each new one
    (outside the timed calls)."""
    rng = np.random.default_rng(seed)
    decoder.reset()
    start = time.perf_counter()
    token = next_token(decoder.step(np.array([prompt_ids], np.int64)), temperature, top_p, rng)
    prefill_s, step_s, ids = time.perf_counter() - start, [], []
    while True:
        if token in rules.eos_ids:
            return Completion(prompt_ids, ids, "eos", prefill_s, step_s)
        ids.append(token)
        if on_token is not None:
            on_token(ids)
        if len(ids) == max_new:
            return Completion(prompt_ids, ids, "max_new_tokens", prefill_s, step_s)
        if len(prompt_ids) + len(ids) >= rules.context_length:  # the next step has no position left
            return Completion(prompt_ids, ids, "context", prefill_s, step_s)
        start = time.perf_counter()
        token = next_token(decoder.step(np.array([[token]], np.int64)), temperature, top_p, rng)
        step_s.append(time.perf_counter() - start)


def run_prompt(
    artifact_dir: Path,
    text: str,
    config: RunConfig,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    verify: bool = True,
    model_file: str | None = None,
    stream: Callable[[str], None] | None = None,
) -> dict:
    """Verify and load one artifact, then continue ``text`` (up to ``config.gen`` new tokens): the report holds
    the continuation's text and ids, why it stopped, TTFT and decode tokens/s. ``stream`` receives the
    continuation piece by piece as it is decoded (held back while a multi-byte character is incomplete)."""
    require_dir(artifact_dir)
    if not temperature >= 0:
        raise RunnerError(f"--temperature {temperature} must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise RunnerError(f"--top-p {top_p} must be in (0, 1], e.g. 0.9")
    if config.gen < 1:
        raise RunnerError("--gen (the most new tokens) must be at least 1")
    manifest = verify_artifact(artifact_dir) if verify else read_manifest(artifact_dir)
    rules = TokenRules.from_manifest(manifest, artifact_dir)
    tokenizer = load_tokenizer(artifact_dir)
    prompt_ids = encode_prompt(tokenizer, rules, text)
    if not prompt_ids:
        raise RunnerError(
            "--prompt is empty and this model's tokenizer adds no BOS token to start from: pass some text"
        )
    if len(prompt_ids) >= rules.context_length:
        raise RunnerError(
            f"the prompt is {len(prompt_ids)} tokens, and the model's context is {rules.context_length}: "
            "pass a shorter --prompt"
        )
    config = replace(config, prompt_len=len(prompt_ids), runs=1, warmup=0)
    check_config(config, None)
    model_path = find_model_file(artifact_dir, model_file, manifest["files"] if verify else None)
    session = make_session(model_path, config)
    genai = read_genai_config(artifact_dir)
    io = DecoderIO.from_session(session, genai)
    layout = declared_kv_layout(genai, io) if config.kv_layout == "auto" else config.kv_layout
    # a shared KV buffer holds the prompt and at most what the context leaves for new tokens
    capacity = replace(config, gen=min(config.gen, rules.context_length - len(prompt_ids)))
    decoder = KV_LAYOUTS[layout].decoder(session, io, capacity)
    shown = [""]

    def show(ids: list[int]) -> None:
        now = continuation(tokenizer, prompt_ids, ids)
        if not now.endswith("\ufffd") and now.startswith(shown[0]):  # complete characters, and append-only
            stream(now[len(shown[0]) :])
            shown[0] = now

    done = complete(
        decoder, prompt_ids, rules, config.gen, temperature, top_p, seed, show if stream is not None else None
    )
    final = continuation(tokenizer, done.prompt_ids, done.ids)
    if stream is not None and final.startswith(shown[0]):
        stream(final[len(shown[0]) :])
    return {
        "runner_version": RUNNER_VERSION,
        "artifact": str(artifact_dir.resolve()),
        "model_file": model_path.name,
        "provider": session.get_providers()[0],
        "threads": config.threads,
        "prompt": text,
        "prompt_ids": done.prompt_ids,
        "ids": done.ids,
        "text": final,
        "stop": done.stop,
        "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed} if temperature else "greedy",
        "ttft_ms": done.prefill_s * 1e3,
        "decode_tok_s": len(done.step_s) / sum(done.step_s) if done.step_s else None,
    }


class PromptStream:
    """Writes the prompt once the artifact is verified and loaded, then each piece of the continuation
    (``run_prompt``'s ``stream``); ``end_line`` closes a streamed line before an error line."""

    def __init__(self, prompt: str, write: Callable[[str], None]):
        self.prompt, self.write, self.started = prompt, write, False

    def __call__(self, piece: str) -> None:
        if not self.started:
            self.write(self.prompt)
            self.started = True
        self.write(piece)

    def end_line(self) -> None:
        if self.started:
            self.write("\n")


def continuation(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after the prompt: decoded with the prompt, so a word-initial space that a
    SentencePiece-style decoder drops at the start of a sequence is kept."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(ids, skip_special_tokens=True)


def prompt_summary(report: dict, streamed: bool = False) -> str:
    """The prompt and its continuation (unless ``streamed`` already showed them), then one line of counts and
    speed."""
    speed = f", decode {report['decode_tok_s']:.1f} tok/s" if report["decode_tok_s"] else ""
    return (
        ("" if streamed else f"{report['prompt']}{report['text']}") + "\n"
        f"-- {len(report['ids'])} new tokens ({report['stop']}; prompt {len(report['prompt_ids'])} tokens), "
        f"TTFT {report['ttft_ms']:.1f} ms{speed}, {report['sampling'] if isinstance(report['sampling'], str) else 'sampled'}"
    )


def context_point(decoder: Decoder, context: int, vocab: int | None, config: RunConfig) -> dict:
    """Fill ``context`` tokens (chunked prefill), then time ``gen`` decode steps: KV bytes, peak RSS, tok/s."""
    decoder.reset()
    prompt = make_prompt(context, vocab)
    start = time.perf_counter()
    for s in range(0, context, PREFILL_CHUNK):
        logits = decoder.step(prompt[:, s : s + PREFILL_CHUNK])
    prefill_s = time.perf_counter() - start
    kv = decoder.kv_bytes()
    token, step_s = int(np.argmax(logits)), []
    for _ in range(config.gen):
        start = time.perf_counter()
        token = int(np.argmax(decoder.step(np.array([[token]], np.int64))))
        step_s.append(time.perf_counter() - start)
    return {
        "context": context,
        "prefill_s": prefill_s,
        "kv_bytes": kv,
        "kv_bytes_per_token": kv / context,
        "decode_tok_s": len(step_s) / sum(step_s),
        "decode_token_ms": percentiles([t * 1e3 for t in step_s]),
        "peak_rss_mib": peak_rss_mib(),
    }


def sweep_point(decoder: Decoder, length: int, vocab: int | None, config: RunConfig) -> dict:
    """Median TTFT and decode latency at one prompt length (after the main runs, so peak RSS is unaffected)."""
    prompt = make_prompt(length, vocab)
    steps = min(config.gen, 8)
    generate(decoder, prompt, steps)
    timings = [generate(decoder, prompt, steps) for _ in range(config.runs)]
    return {
        "prompt_len": length,
        "ttft_ms": statistics.median(t.prefill_s * 1e3 for t in timings),
        "decode_token_ms": statistics.median(s * 1e3 for t in timings for s in t.step_s),
    }


def summary(report: dict) -> str:
    """A few human-readable lines for the terminal."""
    peak = report["peak_rss_mib"]
    lines = [
        f"{report['artifact']} ({report['model_file']}, {report['model_bytes'] / 2**20:.1f} MiB) on "
        f"{report['provider']}, {report['threads'] or 'default'} threads, ORT {report['onnxruntime']}",
        f"load {report['load_s'] * 1e3:.0f} ms | TTFT {report['ttft_ms']['median']:.2f} ms "
        f"(P={report['prompt_len']}) | prefill {report['prefill_tok_s']['median']:.0f} tok/s | "
        f"decode {report['decode_tok_s']['median']:.1f} tok/s (N={report['gen']}) | "
        + (f"peak RSS {peak:.0f} MiB" if peak is not None else "peak RSS n/a"),
    ]
    if report["gpu_memory_mib"] is not None:
        lines.append(f"GPU memory {report['gpu_memory_mib']:.0f} MiB ({report['gpu_memory_source']})")
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one ``error:`` line (exit 2) like every other runner error."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message}: see `python runner.py --help`", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "artifact", type=Path, help="artifact folder (manifest.json, model.onnx or model.ort)"
    )
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ONNX Runtime default)")
    parser.add_argument("--prompt-len", type=int, default=RunConfig.prompt_len, help="prompt tokens P")
    parser.add_argument("--gen", type=int, default=RunConfig.gen, help="greedy decode steps N after prefill")
    parser.add_argument("--runs", type=int, default=RunConfig.runs, help="measured repetitions")
    parser.add_argument("--warmup", type=int, default=RunConfig.warmup, help="unmeasured repetitions first")
    parser.add_argument("--device", choices=sorted(DEVICES), default="cpu")
    parser.add_argument(
        "--sweep", default="", help="comma-separated extra prompt lengths (latency vs length)"
    )
    parser.add_argument(
        "--context", default="", help="comma-separated contexts: KV bytes, peak RSS and decode tok/s at each"
    )
    parser.add_argument(
        "--model-file", default=None, help="model file inside the folder (default model.ort/.onnx)"
    )
    parser.add_argument(
        "--kv-layout",
        choices=["auto", *KV_LAYOUTS],
        default="auto",
        help="KV cache layout (auto = genai_config.json's past_present_share_buffer: shared, else concat)",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="continue this text instead of benchmarking (up to --gen new tokens; needs the tokenizers package)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="--prompt: 0 = greedy, else sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="--prompt: nucleus when sampling")
    parser.add_argument("--seed", type=int, default=0, help="--prompt: sampling seed")
    parser.add_argument("--no-verify", action="store_true", help="skip the manifest.json checksum check")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = tuple(int(v) for v in args.sweep.split(",") if v.strip())
        contexts = tuple(int(v) for v in args.context.split(",") if v.strip())
    except ValueError:
        print(
            f"error: --sweep/--context {args.sweep or args.context!r} is not a comma-separated list of integers",
            file=sys.stderr,
        )
        return 2
    config = RunConfig(
        args.threads,
        args.prompt_len,
        args.gen,
        args.runs,
        args.warmup,
        args.device,
        sweep,
        contexts,
        args.kv_layout,
    )
    stream = PromptStream(args.prompt, partial(print, end="", flush=True))
    try:
        if args.json is not None:
            check_output_file(args.json, "--json", (args.artifact,))
        if args.prompt is not None:
            report = run_prompt(
                args.artifact,
                args.prompt,
                config,
                args.temperature,
                args.top_p,
                args.seed,
                verify=not args.no_verify,
                model_file=args.model_file,
                stream=stream,
            )
        else:
            report = run_benchmark(
                args.artifact, config, verify=not args.no_verify, model_file=args.model_file
            )
        if args.json is not None:
            write_report(args.json, report)
    except RunnerError as exc:
        stream.end_line()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        stream("")  # the prompt, when no piece was streamed
    print(prompt_summary(report, streamed=True) if args.prompt is not None else summary(report))
    return 0


def check_output_file(path: Path, flag: str, artifacts: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, a report path that is a folder, sits in a missing or read-only folder, or
    inside an artifact (where it would be an unlisted file that the next verification refuses)."""
    parent = path.parent if str(path.parent) else Path(".")
    for artifact in artifacts:
        if inside(artifact, os.path.relpath(os.path.abspath(path), os.path.abspath(artifact))) is not None:
            raise RunnerError(
                f"{flag} {path} is inside the artifact folder {artifact}, whose files must all be in its "
                f"manifest: write it elsewhere, e.g. {flag} {Path(artifact).resolve().parent / path.name}"
            )
    if path.is_dir():
        raise RunnerError(f"{flag} {path} is a folder: pass a file path, e.g. {flag} {path / 'report.json'}")
    if not parent.is_dir():
        raise RunnerError(f"{flag} {path}: folder {parent} does not exist; create it or pick another path")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RunnerError(f"{flag} {path} is not writable; pick a path in a folder you can write to")


def write_report(path: Path, report: dict) -> None:
    """Write the JSON report whole or not at all (temp file + rename); a full disk is one RunnerError line."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunnerError(
            f"cannot write --json {path} ({exc.strerror}): free space or pick another path"
        ) from exc


if __name__ == "__main__":
    sys.exit(main())
