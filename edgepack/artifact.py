"""The artifact format: weight names, bit-plane encode/decode/size per scale dtype, and a typed manifest view.

One module owns what the exporter writes and every reader parses:

- names: a quantized linear ``L`` stores ``L.qweight[.plane{j}]`` (compact planes, most significant first),
  ``L.qzeros[.plane{j}]`` (packed zero points, absent where they equal the kernel default), ``L.scales`` (one
  per block, in the target's activation dtype), ``L.bias``; a float linear ``L.weight`` (W^T) and ``L.bias``;
  norms of a folded run of positions exported as one Scan, ``<first position>.<norm>.weight.stacked``;
  projections of one input run as one matmul (the fused form's q/k/v and gate/up) are stored packed under
  :func:`packed_name` (``<prefix>.q_proj+k_proj+v_proj``), each tensor the parts' tensors concatenated along
  N, with the parts and their N recorded in the manifest (``packed``); :class:`PackedView` reads a part's
  tensors back under the part's own names.
- sizes: :func:`stored_bytes` counts exactly what the exporter stores for one weight at a scale dtype
  (float32 on cpu/android, float16 on cuda), which mixed precision budgets against.
- decode: :func:`decode_weight` recombines stored planes into codes, scales and zero points.
- :class:`Manifest` / :class:`QuantLayer`: typed access to manifest.json's fields that readers use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import EdgepackError

# Bytes of one stored scale / float weight element per target dtype (targets/profiles.py Target.dtype).
DTYPE_BYTES = {"float32": 4, "float16": 2}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a target dtype, or a one-line error."""
    if dtype not in DTYPE_BYTES:
        raise EdgepackError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# ---------------------------------------------------------------------------------------------- names


def plane_suffix(plane: int, planes: int) -> str:
    """'' for a single-plane weight, else '.plane{j}'."""
    return "" if planes == 1 else f".plane{plane}"


def qweight_name(layer: str, plane: int = 0, planes: int = 1) -> str:
    return f"{layer}.qweight{plane_suffix(plane, planes)}"


def qzeros_name(layer: str, plane: int = 0, planes: int = 1) -> str:
    return f"{layer}.qzeros{plane_suffix(plane, planes)}"


def scales_name(layer: str) -> str:
    return f"{layer}.scales"


def bias_name(layer: str) -> str:
    return f"{layer}.bias"


def weight_name(module: str) -> str:
    """A float tensor's name: a linear's W^T, a norm's scale, the embedding table."""
    return f"{module}.weight"


def stacked_name(module: str) -> str:
    """Per-position norms of a Scan run, stacked (positions, H), under the run's first position."""
    return f"{weight_name(module)}.stacked"


def packed_name(layers: Sequence[str]) -> str:
    """The stored name of projections packed into one matmul: their common module path, then the parts'
    own names joined by '+' (``model.layers.0.self_attn.q_proj+k_proj+v_proj``)."""
    split = [layer.split(".") for layer in layers]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    prefix = ".".join(split[0][:common])
    return (f"{prefix}." if prefix else "") + "+".join(".".join(s[common:]) for s in split)


@dataclass(frozen=True)
class Packed:
    """Projections stored as one tensor per kind: ``parts`` (module names) with ``sizes`` (their N) in order."""

    name: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"parts": list(self.parts), "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> Packed:
        return cls(name, tuple(d["parts"]), tuple(int(n) for n in d["sizes"]))

    def rows(self, part: int) -> tuple[int, int]:
        """[start, stop) of part ``part`` along the packed N."""
        start = sum(self.sizes[:part])
        return start, start + self.sizes[part]

    def slice(self, suffix: str, part: int, packed: np.ndarray) -> np.ndarray:
        """Part ``part``'s tensor from the packed tensor of one kind (``suffix``: '.qweight', '.scales', ...).

        A float weight is stored as W^T (K, N): its columns. Every other kind is row-major in N with the same
        number of leading elements per output row (codes, scales, zero points, bias): its rows.
        """
        start, stop = self.rows(part)
        if suffix == ".weight":
            return packed[:, start:stop]
        per_row = packed.shape[0] // sum(self.sizes)
        return packed[start * per_row : stop * per_row]


class PackedView:
    """Initializers read under every module's own names, packed projections included (sliced on demand)."""

    def __init__(
        self, get: Callable[[str], np.ndarray], has: Callable[[str], bool], packed: Sequence[Packed]
    ) -> None:
        self._get, self._has = get, has
        self._parts = {part: (p, i) for p in packed for i, part in enumerate(p.parts)}

    def _source(self, name: str) -> tuple[Packed, int, str] | None:
        for part, (p, i) in self._parts.items():
            if name.startswith(part + ".") and self._has(p.name + name[len(part) :]):
                return p, i, name[len(part) :]
        return None

    def __contains__(self, name: str) -> bool:
        return self._has(name) or self._source(name) is not None

    def get(self, name: str) -> np.ndarray:
        source = None if self._has(name) else self._source(name)
        if source is None:
            return self._get(name)  # its own tensor, or the reader's error for a missing one
        p, i, suffix = source
        return np.ascontiguousarray(p.slice(suffix, i, self._get(p.name + suffix)))


# ---------------------------------------------------------------------------------------------- sizes


def stored_bytes(
    n: int,
    k: int,
    bits: int,
    block: int,
    symmetric: bool,
    dtype: str,
    kernel: int | None = None,
    storage: str = "planes",
) -> int:
    """Exact bytes the exporter stores for one (N, K) quantized weight with scales in ``dtype``."""
    from edgepack.kernels.packing import lowered_bytes

    return lowered_bytes(n, k, bits, block, symmetric, dtype_bytes(dtype), kernel, storage)


# ---------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class QuantLayer:
    """One quantized weight as the manifest lists it (``compression.quantize.layers``)."""

    name: str  # stored name (its first use)
    shape: tuple[int, int]  # (N, K)
    bits: int
    block: int
    planes: tuple[int, ...]  # logical bits per stored plane, most significant first
    kernel_bits: int | None  # widened onto one kernel of this width; None: one kernel per plane
    uses: tuple[str, ...]  # module names that use it (folded positions share it)
    abits: int = 16
    storage: str = "planes"  # kernels.packing.storage_of: "kernel", "compact" or "planes"

    @classmethod
    def from_dict(cls, d: dict) -> QuantLayer:
        n, k = d["shape"]
        return cls(
            d["name"],
            (int(n), int(k)),
            int(d["bits"]),
            int(d["block"]),
            tuple(d["planes"]),
            d.get("kernel_bits"),
            tuple(d.get("uses", [d["name"]])),
            int(d.get("abits", 16)),
            d.get("storage", "planes"),
        )


@dataclass(frozen=True)
class Manifest:
    """Typed view of an artifact's manifest.json (the dict stays available as ``raw``)."""

    raw: dict

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """The manifest of ``folder`` after checking every listed file's SHA-256, or a one-line error."""
        from edgepack.inspect import load_manifest

        return cls(load_manifest(Path(folder)))

    @property
    def architecture(self) -> str:
        return self.raw["source"]["architecture"]

    @property
    def quant_layers(self) -> list[QuantLayer]:
        return [
            QuantLayer.from_dict(d)
            for d in self.raw.get("compression", {}).get("quantize", {}).get("layers", [])
        ]

    @property
    def packed(self) -> list[Packed]:
        """Projections stored packed (absent in artifacts from before packing was stored on disk)."""
        return [Packed.from_dict(name, d) for name, d in self.raw.get("packed", {}).items()]

    @property
    def aliases(self) -> dict[str, str]:
        """{initializer name: the name it is stored under}, for weights deduplication stored once."""
        return self.raw.get("aliases", {})

    @property
    def fold_groups(self) -> list[list[int]]:
        return self.raw.get("compression", {}).get("fold", {}).get("groups", [])

    @property
    def target_dtype(self) -> str:
        return self.raw["target"]["dtype"]


# ---------------------------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class DecodedWeight:
    """Codes uint8 (N, K), scales float32 (N, k_blocks), zero points uint8 (N, k_blocks)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block: int


def decode_weight(
    get: Callable[[str], np.ndarray], has: Callable[[str], bool], layer: QuantLayer
) -> DecodedWeight:
    """Codes and zero points of a quantized layer, recombined from its stored planes.

    Plane j (logical width b_j, most significant first) holds bits shift_j.. of the code; a 1-bit plane is
    stored 8 per byte, wider ones in MatMulNBits layout; a plane without zero points has the kernel default
    2**(storage_bits - 1). "kernel" storage is one plane in the kernel's layout; "compact" storage keeps the
    planes with one set of zero points at the kernel width. Scales are per block (per-channel weights repeat
    their one scale per block).
    """
    from edgepack.kernels.packing import unpack_nbits

    name, bits, block = layer.name, layer.bits, layer.block
    n, k = layer.shape
    k_blocks = -(-k // block)
    codes = None  # uint8 (N, K): a sum of shifted planes wraps as the low byte of the int32 sum would
    zeros = np.zeros((n, k_blocks), np.int32)
    kernel = layer.kernel_bits
    widened = layer.storage == "compact"
    shift = sum(layer.planes)  # the code's stored width: bits, or the kernel's ("kernel" storage)
    planes = len(layer.planes)
    for j, plane_bits in enumerate(layer.planes):
        shift -= plane_bits
        storage = max(plane_bits, 2)
        raw = get(qweight_name(name, j, planes))
        if plane_bits == 1:
            plane = np.unpackbits(raw.reshape(n, -1), axis=1, bitorder="little")[:, :k]
        else:
            plane = unpack_nbits(raw, storage, k)
        part = plane if shift == 0 else plane << np.uint8(shift)
        codes = part if codes is None else codes + part
        if widened:
            continue
        zp_name = qzeros_name(name, j, planes)
        if has(zp_name):
            plane_zeros = unpack_nbits(get(zp_name).reshape(n, 1, -1), storage, k_blocks)
        else:
            plane_zeros = np.full((n, k_blocks), 2 ** (storage - 1), np.int32)
        zeros += plane_zeros.astype(np.int32) << shift
    if widened:  # one set of zero points at the kernel width
        zeros = unpack_nbits(get(qzeros_name(name)).reshape(n, 1, -1), kernel, k_blocks).astype(np.int32)
    if zeros.min() < 0 or zeros.max() > 255:
        raise EdgepackError(f"{name}: zero points outside 0..255 after recombining planes; re-export it")
    scales = get(scales_name(name)).astype(np.float32).reshape(n, k_blocks)
    return DecodedWeight(np.ascontiguousarray(codes), scales, zeros.astype(np.uint8), bits, block)
