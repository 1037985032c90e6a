"""Keep an artifact's manifest.json file list in step with the folder after a target adds files to it."""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.runtime.runner import MANIFEST_NAME, sha256_file

from edgepack.errors import EdgepackError


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
    paths = sorted(p for p in artifact_dir.rglob("*") if p.is_file() and p != manifest_path)
    manifest["files"] = {p.relative_to(artifact_dir).as_posix(): sha256_file(p) for p in paths}
    if "file_bytes" in manifest:
        manifest["file_bytes"] = {p.relative_to(artifact_dir).as_posix(): p.stat().st_size for p in paths}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest["files"]
