"""Calibration and evaluation text: any local text file, tokenized into fixed-length samples."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgepack.errors import EdgepackError

if TYPE_CHECKING:
    import torch


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with a clear error when it is missing or empty."""
    p = Path(path)
    if p.is_dir():
        raise EdgepackError(f"{p} is a folder; pass a UTF-8 text file (e.g. --calib data.txt)")
    if not p.is_file():
        raise EdgepackError(
            f"text file {p} does not exist; pass a local UTF-8 text file (e.g. --calib data.txt)"
        )
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgepackError(
            f"{p} is not UTF-8 text (byte {e.start} is not valid UTF-8; a binary file?); pass a plain text file"
        ) from e
    if (
        "\0" in text
        or sum(not (c.isprintable() or c.isspace()) for c in text[:65536]) > len(text[:65536]) // 100
    ):
        raise EdgepackError(f"{p} holds control characters (a binary file?); pass a plain UTF-8 text file")
    if not text.strip():
        raise EdgepackError(f"text file {p} is empty; pass a file with calibration text")
    return text


def split_text(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """Split text into (train, held-out) at a line boundary near ``1 - held_out`` of its length."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - held_out)))
    cut = cut if cut > 0 else int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, truncated to ``max_tokens``."""
    import torch  # here, not at import: read_text runs in the CLI's checks before anything heavy

    # Tokenize in line chunks: fast tokenizers are slow on one huge string and tokens do not cross lines anyway.
    tokenizer.model_max_length = 1 << 30  # we window the ids ourselves; silence the length warning
    ids: list[int] = []
    chunk: list[str] = []
    for line in text.splitlines(keepends=True):
        chunk.append(line)
        if len(chunk) >= 256:
            ids.extend(tokenizer("".join(chunk), add_special_tokens=False)["input_ids"])
            chunk = []
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    if chunk:
        ids.extend(tokenizer("".join(chunk), add_special_tokens=False)["input_ids"])
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def calibration_samples(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from ``text``: a LongTensor (n_samples, seq_len)."""
    import torch

    ids = tokenize(tokenizer, text, max_tokens=max(200_000, n_samples * seq_len * 4))
    if len(ids) < seq_len + 1:
        raise EdgepackError(
            f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}; "
            "pass a longer text file or a smaller seq_len in the recipe step"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
