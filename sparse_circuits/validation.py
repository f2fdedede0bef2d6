"""Checks on arguments and input files that run before any model is loaded or any text is harvested.

Every check raises `InputError` (a ValueError: the CLI prints it as one `error:` line and exits 2) or,
for argparse types, `argparse.ArgumentTypeError`. Standard library only: `--help` and argument
mistakes must not import torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

MAX_IOI_PROMPTS = 10_000  # about 1 GB of prompts, caches and feature sets; more is a typo, not a run


class InputError(ValueError):
    """An argument or input file that cannot work; the message names it and says what to give instead."""


# --------------------------------------------------------------------------- argparse types


def _number(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r} (NaN and infinity are not accepted)")
    return value


def finite_float(text: str) -> float:
    """argparse type: any finite number."""
    return _number(text, "a finite number")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a fraction in (0, 1]."""
    value = _number(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def bounded_int(maximum: int, what: str):
    """argparse type: an integer in [1, maximum]; the message names the limit."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected 1 to {maximum:,} {what}, got {value:,}")
        return value

    parse.__name__ = f"at_most_{maximum}"
    return parse


# --------------------------------------------------------------------------- paths


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_below(path: Path, flag: str) -> None:
    """The deepest existing ancestor of `path` must be a folder we may write in."""
    ancestor = _nearest_existing(path.parent if not path.exists() else path)
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a folder; choose a path under a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: no permission to write in {ancestor}; choose a folder you can write")


def output_folder(path: Path | None, flag: str = "--out") -> None:
    """An output folder: absent (it will be created) or an existing folder, writable either way."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is an existing file; give a folder (new or existing) instead")
    _check_writable_below(path, flag)


def output_file(path: Path | None, flag: str = "--out") -> None:
    """An output file: not an existing folder, under a folder we may write in."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'graph.json'}")
    _check_writable_below(path, flag)


def input_file(path: Path, what: str) -> Path:
    """An existing, readable file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is a folder; give a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permission denied)")
    return path


def input_folder(path: Path, what: str, hint: str = "") -> Path:
    """An existing folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} {path} does not exist" + (f"; {hint}" if hint else ""))
    if not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder" + (f"; {hint}" if hint else ""))
    return path


# --------------------------------------------------------------------------- file contents


def utf8_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is reported with the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"{what} {path}:{line} is not UTF-8 text (byte 0x{data[error.start]:02x}); "
                         "save it as UTF-8") from None


def read_json_file(path: Path, what: str):
    """A JSON file's value: UTF-8, not nested absurdly deep, valid JSON; each failure names the file."""
    text = "\n".join(utf8_lines(path, what))
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} {path}:{error.lineno} is not valid JSON ({error.msg})") from None
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to read; it is not a file this tool wrote") from None


# --------------------------------------------------------------------------- library-backed checks (import torch)


def checked_corpus(spec: str, fetch_registry: bool = True):
    """The corpus for `spec`, with a local file or folder read through once (UTF-8, JSON lines with a string
    "text") so that a bad line is reported now, before the model loads, with its file and line. With
    `fetch_registry=False` the registry corpus is not fetched (None is returned for it)."""
    from sae.corpus import CorpusError, load_corpus

    if spec == "registry" or spec.startswith("registry:"):
        return load_corpus(spec) if fetch_registry else None
    if spec.startswith("hf:"):
        return load_corpus(spec)  # hf: the form is checked; the dataset itself is only reachable later
    if not Path(spec).expanduser().exists():
        raise CorpusError(f"--corpus {spec!r} does not exist; give 'registry', a .txt/.jsonl file or folder, or "
                          "hf:NAME[:SPLIT[:FIELD]]")
    corpus = load_corpus(spec)
    if sum(1 for _ in corpus.documents()) == 0:  # every line read: a bad one is reported now
        raise CorpusError(f"--corpus {spec} holds no text")
    return corpus


def hook_names(hooks: list[str] | None, flag: str = "--hook") -> None:
    """Each hook name has the form blocks.L.SITE (whether the model has it is checked once it is loaded)."""
    from circuits.hooks import parse_hook

    for hook in hooks or []:
        try:
            parse_hook(hook)
        except ValueError as error:
            raise InputError(f"{flag} {hook!r}: {error}") from None


def dictionary_configs(folder: Path, flag: str = "--sae") -> list[Path]:
    """Every dictionary folder under `folder` (or `folder` itself), each cfg.json read and type-checked now."""
    from sae.io import WEIGHTS_FILE, find_dictionary_folders, read_dictionary_config, read_safetensors_header

    input_folder(folder, flag, "pass a folder written by `sparse-circuits train`")
    folders = find_dictionary_folders(folder)
    if not folders:
        raise InputError(f"{flag} {folder} holds no dictionary folder (sae_weights.safetensors + cfg.json); "
                         "pass a folder written by `sparse-circuits train`")
    for each in folders:
        read_dictionary_config(each)
        read_safetensors_header(each / WEIGHTS_FILE)
    return folders
