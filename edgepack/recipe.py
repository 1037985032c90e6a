"""A recipe: the ordered compression steps (one config dataclass each) applied before export.

Recipes round-trip through JSON/YAML as ``{"steps": [{"kind": "fold", ...}, {"kind": "quantize", ...}]}``
and are written into every artifact's manifest, so an artifact says exactly how it was made.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgepack.errors import EdgepackError


def step_types() -> dict[str, type]:
    """Registry of recipe step kinds -> config dataclass (imported lazily: torch-heavy modules)."""
    from edgepack.compressor.fold import FoldConfig
    from edgepack.compressor.minicache import KVCacheConfig
    from edgepack.compressor.quantize import QuantConfig

    return {"fold": FoldConfig, "quantize": QuantConfig, "kv": KVCacheConfig}


@dataclass
class Recipe:
    steps: list[Any] = field(default_factory=list)
    version: int = 1

    def to_dict(self) -> dict:
        return {"version": self.version, "steps": [{"kind": kind_of(s), **s.to_dict()} for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        if not isinstance(d, dict) or not isinstance(d.get("steps"), list):
            raise EdgepackError(
                'a recipe must be a mapping with a "steps" list, e.g. {"steps": [{"kind": "quantize", "wbits": 4}]}'
            )
        unknown = set(d) - {"steps", "version"}
        if unknown:
            raise EdgepackError(f"unknown recipe keys {sorted(unknown)}; allowed: steps, version")
        version = d.get("version", 1)
        if version != 1 or isinstance(version, bool):
            raise EdgepackError(
                f"recipe version {version!r} is not supported; write version: 1 (or leave it out)"
            )
        types = step_types()
        steps = []
        for raw in d["steps"]:
            if not isinstance(raw, dict):
                raise EdgepackError(
                    f"recipe step {raw!r} is not a mapping; write each step like {{kind: quantize, wbits: 4}}"
                )
            raw = dict(raw)
            kind = raw.pop("kind", None)
            if not isinstance(kind, str) or kind not in types:
                raise EdgepackError(f"recipe step kind {kind!r} is not known; use one of: {', '.join(types)}")
            check_types(kind, types[kind], raw)
            steps.append(types[kind].from_dict(raw))
        kinds = [kind_of(s) for s in steps]
        if kinds != sorted(kinds, key=["fold", "quantize", "kv"].index):
            raise EdgepackError(
                "recipe steps must fold before they quantize (quantized weights cannot be folded), "
                "and plan the KV cache (kind kv) last, on the final weights"
            )
        return cls(steps=steps, version=version)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if p.is_dir():
            raise EdgepackError(f"--recipe {p} is a folder; pass a .json or .yaml recipe file")
        if not p.is_file():
            raise EdgepackError(f"recipe file {p} does not exist; pass a .json or .yaml recipe")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except UnicodeDecodeError as e:
            raise EdgepackError(f"recipe {p} is not UTF-8 text; pass a .json or .yaml recipe file") from e
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            first = (str(e).strip().splitlines() or ["parse error"])[0]
            raise EdgepackError(
                f"recipe {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {first}; fix the file"
            ) from e
        return cls.from_dict(data)

    def find(self, kind: str) -> Any | None:
        return next((s for s in self.steps if kind_of(s) == kind), None)


def kind_of(step: Any) -> str:
    return next(k for k, t in step_types().items() if isinstance(step, t))


def matches(value: Any, hint: Any) -> bool:
    """Whether a recipe value has the type a config field declares (bool is not a number; int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return (
            isinstance(value, list) and all(matches(v, args[0]) for v in value)
            if args
            else isinstance(value, list)
        )
    if origin is dict:
        return isinstance(value, dict) and all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, origin or hint)


def type_name(hint: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
    }.get(hint, str(hint).replace("typing.", ""))


def check_types(kind: str, config_type: type, raw: dict) -> None:
    """Refuse a recipe value of the wrong type (e.g. ``skip: lm_head`` where a list is meant), naming the fix."""
    hints = typing.get_type_hints(config_type)
    for key, value in raw.items():
        hint = hints.get(key)
        if hint is None or matches(value, hint):
            continue
        if typing.get_origin(hint) is list and isinstance(value, str):
            raise EdgepackError(f"{kind} {key}: {value!r} must be a list; write {key}: [{value}]")
        raise EdgepackError(f"{kind} {key}: {value!r} must be {type_name(hint)}; fix the recipe")
