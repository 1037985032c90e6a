"""The artifact's file table: one owner for listing and hashing its files (runner.py verifies with the same code)."""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.runtime.runner import MANIFEST_NAME, artifact_files, sha256_file

from edgepack.errors import EdgepackError


def file_table(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under ``folder`` but manifest.json (and ``exclude``)."""
    return {name: sha256_file(folder / name) for name in artifact_files(folder, exclude)}


def file_sizes(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """{relative POSIX path: bytes} of the same files as :func:`file_table`."""
    return {name: (folder / name).stat().st_size for name in artifact_files(folder, exclude)}


def update_manifest_files(artifact_dir: Path) -> dict[str, str]:
    """Set manifest.json "files" to the SHA-256 of every file under ``artifact_dir`` (but the manifest itself).

    "file_bytes" is refreshed too when the manifest has it; other keys are kept. Call it after every file is
    written; returns the new file list.
    """
    manifest_path = artifact_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise EdgepackError(
            f"{artifact_dir} has no {MANIFEST_NAME}: write the manifest before adding target files"
        )
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = file_table(artifact_dir)
    if "file_bytes" in manifest:
        manifest["file_bytes"] = file_sizes(artifact_dir)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest["files"]
