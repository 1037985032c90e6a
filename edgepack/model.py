"""Load a local Hugging Face decoder folder (safetensors only) and describe its architecture.

Architectures are dispatched through the family registry (:mod:`edgepack.families`); anything not in it is
refused with one line listing what is supported, and so is a config value a family does not implement (an
unknown rope_type, say). Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError
from edgepack.families import Family, check_config, family_for, supported_architectures

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "assets" / "stories260k"


@dataclass(frozen=True)
class Architecture:
    """The architecture a model folder declares (its *ForCausalLM class name) and the family that runs it."""

    name: str
    family: Family


@dataclass(frozen=True)
class DecoderDims:
    """Shapes of a Llama-family decoder, read from its config (nanoGPT-style: the few numbers that matter)."""

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


def read_config(model_dir: str | Path) -> tuple[dict, Architecture]:
    """Validate a model folder and return its raw config and architecture, or raise EdgepackError."""
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
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise EdgepackError(
            f"{cfg_file} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it"
        ) from e
    archs = raw.get("architectures") or []
    family = family_for(archs)
    if family is None:
        name = ", ".join(archs) or raw.get("model_type", "unknown")
        raise EdgepackError(
            f"unsupported architecture {name}; supported: {', '.join(supported_architectures())}"
        )
    check_config(family, hf_config(path))
    if not list(path.glob("*.safetensors")):
        raise EdgepackError(
            f"{path} has no *.safetensors weights; edgepack loads safetensors only "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
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


def load_model(model_dir: str | Path, *, trust_remote_code: bool = False):
    """Load a causal LM in float32 with eager attention from a local folder (safetensors only, offline)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    read_config(model_dir)
    hf_logging.disable_progress_bar()  # our own progress and logging; one line per error
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=torch.float32,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="eager",
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgepackError(f"could not load the model in {model_dir}: {first}") from e
    model.eval()
    return model


def load_tokenizer(model_dir: str | Path):
    """The model folder's fast tokenizer (tokenizer.json), offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise EdgepackError(f"could not load a tokenizer from {model_dir}; it needs tokenizer.json") from e
