"""Dictionary folders and safetensors headers, read with the standard library alone: finding the
dictionary folders under a path and checking a weights file is whole from its header. sae.io loads the
tensors; the command line uses this module to check files before torch is imported."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"

# Bytes per element of each safetensors dtype code.
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class DictionaryFileError(ValueError):
    """A dictionary file is missing, truncated or inconsistent; the message says which and what to do."""


class MissingDictionaryFileError(DictionaryFileError, FileNotFoundError):
    """The folder or one of its two files does not exist."""


def broken_safetensors(path: Path, why: str) -> DictionaryFileError:
    """The error for a weights file that is truncated or not safetensors, saying why."""
    return DictionaryFileError(f"{path} is truncated or not a safetensors file ({why}); re-save or re-download it")


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype code, shape)} from the header alone, after checking the file is whole."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise broken_safetensors(path, f"only {size} bytes")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise broken_safetensors(path, f"header of {header_bytes} bytes in a {size}-byte file")
        try:
            header = json.loads(stream.read(header_bytes).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise broken_safetensors(path, f"unreadable header: {error}") from error
    if not isinstance(header, dict):
        raise broken_safetensors(path, "header is not a JSON object")
    data_bytes = size - 8 - header_bytes
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _check_header_entry(path, name, entry, data_bytes)
    return entries


def _check_header_entry(path: Path, name: str, entry, data_bytes: int) -> tuple[str, list[int]]:
    try:
        dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as error:
        raise broken_safetensors(path, f"malformed entry for '{name}'") from error
    if dtype not in _DTYPE_SIZES:
        raise broken_safetensors(path, f"'{name}' has unknown dtype {dtype!r}")
    expected = math.prod(shape) * _DTYPE_SIZES[dtype]
    if end - begin != expected or begin < 0:
        raise broken_safetensors(path, f"'{name}' spans {end - begin} bytes but shape {shape} needs {expected}")
    if end > data_bytes:
        raise broken_safetensors(path, f"'{name}' ends at byte {end} of the data but only {data_bytes} bytes are there")
    return dtype, shape


def find_dictionary_folders(parent: str | Path) -> list[Path]:
    """`parent` itself if it is a dictionary folder, else every folder below it holding a cfg.json."""
    parent = Path(parent)
    if (parent / CONFIG_FILE).is_file():
        return [parent]
    if not parent.is_dir():
        raise MissingDictionaryFileError(f"{parent} does not exist; expected a dictionary folder or a parent of some")
    found, seen = [], set()
    for root, folders, files in os.walk(parent, followlinks=True):  # a symlinked dictionary folder counts too
        real = os.path.realpath(root)
        if real in seen:  # a link cycle
            folders.clear()
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".") and name != "checkpoints"]
        if CONFIG_FILE in files:
            found.append(Path(root))
    return sorted(found)
