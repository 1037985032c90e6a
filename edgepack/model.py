"""Load a local Hugging Face decoder folder (safetensors only) and describe its architecture.

Architectures are dispatched through the family registry (:mod:`edgepack.families`); anything not in it is
refused with one line listing what is supported, and so is a config value a family does not implement (an
unknown rope_type, say). Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError
from edgepack.families import Family, check_config, family_for, supported_architectures

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "assets" / "stories260k"
LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """The architecture a model folder declares (its *ForCausalLM class name) and the family that runs it."""

    name: str
    family: Family


@dataclass(frozen=True)
class DecoderDims:
    """Shapes of any supported decoder, read from its config (the few numbers the runtime side needs)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    tie_word_embeddings: bool
    sliding_window: int | None

    @classmethod
    def from_config(cls, config: Any) -> DecoderDims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(theta),
            max_positions=int(getattr(config, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
        )


def allowed_roots(model_dir: Path) -> list[Path]:
    """Where the model's files may really live: the folder, plus the hub cache's blobs/ for a snapshot folder."""
    real = Path(os.path.realpath(model_dir))
    roots = [real]
    if real.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/NAME -> ../../blobs/<sha>
        roots.append(real.parent.parent / "blobs")
    return roots


def inside_model(model_dir: Path, name: str, what: str) -> Path:
    """``model_dir / name`` after checking that the name and any link it is stay inside the model folder."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise EdgepackError(
            f"{what} {name!r} in {model_dir} leaves the model folder; name a file inside the folder"
        )
    path = Path(model_dir) / name
    real = Path(os.path.realpath(path))
    if not any(real == root or root in real.parents for root in allowed_roots(Path(model_dir))):
        raise EdgepackError(
            f"{path} links to {real}, outside the model folder; copy the real file into {model_dir}"
        )
    return path


def read_json(path: Path, fix: str = "fix or re-download it") -> Any:
    """A JSON file of the model folder, or one line naming the file and the parse error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else " (not UTF-8)"
        raise EdgepackError(f"{path} is not valid JSON{where}; {fix}") from e
    except IsADirectoryError as e:
        raise EdgepackError(f"{path} is a folder, not a file; {fix}") from e


def check_dims(raw: dict, cfg_file: Path) -> None:
    """Refuse shapes no decoder can have (zero/negative sizes, heads that do not divide the width)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EdgepackError(f"{cfg_file}: {key} = {value!r} must be a positive integer; fix config.json")
    heads = raw["num_attention_heads"]
    kv = raw.get("num_key_value_heads") or heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or heads % kv:
        raise EdgepackError(
            f"{cfg_file}: num_key_value_heads = {kv!r} must be a positive divisor of num_attention_heads = "
            f"{heads}; fix config.json"
        )
    if raw.get("head_dim") is None and raw["hidden_size"] % heads:
        raise EdgepackError(
            f"{cfg_file}: hidden_size = {raw['hidden_size']} is not divisible by num_attention_heads = {heads}; "
            "fix config.json (or give head_dim)"
        )


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files transformers will read (model.safetensors, else the index's shards), all inside."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file() or not index.exists():
        files = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
        return [inside_model(model_dir, p.name, "weights file") for p in files]
    inside_model(model_dir, index.name, "index")
    fix = "fix or re-download the index"
    data = read_json(index, fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) for v in weight_map.values())
    ):
        raise EdgepackError(f"{index} has no weight_map of tensor names to files; {fix}")
    files = [inside_model(model_dir, name, "weight_map entry") for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise EdgepackError(
            f"{index} names {', '.join(missing)}, missing from {model_dir}; copy the whole model"
        )
    return files


def checkpoint_shapes(files: list[Path]) -> dict[str, list[int]]:
    """{tensor name: shape} from the safetensors headers (no tensor data read); corrupt files are refused."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with safe_open(str(path), "np") as f:  # headers only: no torch import
                shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # SafetensorError: bad header, truncated file, not a safetensors file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EdgepackError(f"{path} is corrupt or truncated ({first}); re-download or re-save it") from e
    return shapes


def check_layers(raw: dict, shapes: dict[str, list[int]], cfg_file: Path) -> None:
    """Refuse a config whose layer count or widths disagree with the checkpoint, before anything loads."""
    layers = sorted({int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k))})
    n = raw["num_hidden_layers"]
    if layers != list(range(n)):
        held = (
            f"layers 0-{layers[-1]}"
            if layers == list(range(len(layers))) and layers
            else f"{len(layers)} layers"
        )
        raise EdgepackError(
            f"{cfg_file} says num_hidden_layers = {n} but the weights hold {held}; fix config.json to match "
            "the checkpoint"
        )
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and embed != [raw["vocab_size"], raw["hidden_size"]]:
        raise EdgepackError(
            f"{cfg_file} says vocab_size x hidden_size = {raw['vocab_size']} x {raw['hidden_size']} but "
            f"model.embed_tokens.weight is {embed[0]} x {embed[1]}; fix config.json to match the checkpoint"
        )


def check_tokenizer_files(path: Path) -> None:
    """tokenizer.json must be a file of the folder and no tokenizer file may link outside it.

    (load_tokenizer passes that tokenizer.json explicitly, so a tokenizer_config.json "tokenizer_file" entry,
    often a stale absolute path from the machine that saved it, is never followed.)
    """
    from edgepack.pipeline import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (path / name).exists() or (path / name).is_symlink():
            inside_model(path, name, "tokenizer file")
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise EdgepackError(
            f"{path} has no tokenizer.json; save the fast tokenizer into the model folder "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )


def read_config(model_dir: str | Path) -> tuple[dict, Architecture]:
    """Validate a model folder (config, weights, tokenizer) and return its raw config and architecture."""
    path = Path(model_dir)
    if not path.exists():
        raise EdgepackError(
            f"model folder {path} does not exist; pass --model with a local Hugging Face model folder"
        )
    if not path.is_dir():
        raise EdgepackError(f"{path} is not a folder; pass --model with a local Hugging Face model folder")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise EdgepackError(
            f"{path} has no config.json; pass a Hugging Face model folder (config.json + *.safetensors)"
        )
    inside_model(path, "config.json", "config")
    raw = read_json(cfg_file)
    if not isinstance(raw, dict):
        raise EdgepackError(f"{cfg_file} is not a JSON object; fix or re-download it")
    archs = raw.get("architectures") or []
    family = family_for(archs)
    if family is None:
        name = ", ".join(map(str, archs)) or raw.get("model_type", "unknown")
        raise EdgepackError(
            f"unsupported architecture {name}; supported: {', '.join(supported_architectures())}"
        )
    check_dims(raw, cfg_file)
    files = weight_files(path)
    if not files:
        raise EdgepackError(
            f"{path} has no *.safetensors weights; edgepack loads safetensors only "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    check_layers(raw, checkpoint_shapes(files), cfg_file)
    check_tokenizer_files(path)
    check_config(family, hf_config(path))  # last: it imports transformers
    arch = next(a for a in archs if family_for(a) is family)
    return raw, Architecture(arch, family)


def hf_config(path: Path) -> Any:
    """The transformers config of a folder (standardized rope fields), offline, or a one-line error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgepackError(f"could not read the config in {path}: {first}") from e


def load_model(model_dir: str | Path, *, trust_remote_code: bool = False, dtype: Any = None):
    """Load a causal LM in float32 (or ``dtype``; "auto": the checkpoint's own) with eager attention from a local
    folder (safetensors only, offline).

    Every checkpoint tensor must be used and every model weight loaded: transformers' missing/unexpected/
    mismatched keys are an error naming them, never a randomly initialised or silently truncated model.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    read_config(model_dir)
    hf_logging.disable_progress_bar()  # our own progress and logging; one line per error
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=torch.float32 if dtype is None else dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="eager",
            output_loading_info=True,
        )
    except Exception as e:  # transformers/safetensors raise many types for a folder that does not load
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgepackError(
            f"could not load the model in {model_dir}: {first[:300]}; check that config.json matches the weights"
        ) from e
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            raise EdgepackError(
                f"the weights in {model_dir} do not match config.json: {kind.replace('_', ' ')} {shown}; "
                "fix config.json or use the checkpoint it belongs to"
            )
    model.eval()
    return model


def load_tokenizer(model_dir: str | Path):
    """The model folder's fast tokenizer (tokenizer.json), offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, tokenizer_file=str(Path(model_dir) / "tokenizer.json")
        )
    except Exception as e:  # tokenizers' own exception types for a corrupt tokenizer.json
        raise EdgepackError(f"could not load a tokenizer from {model_dir}; it needs tokenizer.json") from e
