"""A recipe: the ordered compression steps (one config dataclass each) applied before export.

Recipes round-trip through JSON/YAML as ``{"steps": [{"kind": "fold", ...}, {"kind": "quantize", ...}]}``
and are written into every artifact's manifest, so an artifact says exactly how it was made.
"""

from __future__ import annotations

import json
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
        types = step_types()
        steps = []
        for raw in d["steps"]:
            raw = dict(raw)
            kind = raw.pop("kind", None)
            if kind not in types:
                raise EdgepackError(f"recipe step kind {kind!r} is not known; use one of: {', '.join(types)}")
            steps.append(types[kind].from_dict(raw))
        kinds = [kind_of(s) for s in steps]
        if kinds != sorted(kinds, key=["fold", "quantize", "kv"].index):
            raise EdgepackError(
                "recipe steps must fold before they quantize (quantized weights cannot be folded), "
                "and plan the KV cache (kind kv) last, on the final weights"
            )
        return cls(steps=steps, version=int(d.get("version", 1)))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise EdgepackError(f"recipe file {p} does not exist; pass a .json or .yaml recipe")
        try:
            data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise EdgepackError(
                f"recipe {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {str(e).splitlines()[0]}"
            ) from e
        return cls.from_dict(data)

    def find(self, kind: str) -> Any | None:
        return next((s for s in self.steps if kind_of(s) == kind), None)


def kind_of(step: Any) -> str:
    return next(k for k, t in step_types().items() if isinstance(step, t))
