"""Checks on arguments and input files that run before any model is loaded or any text is harvested.

Every check raises `InputError` (a ValueError: the CLI prints it as one `error:` line and exits 2) or,
for argparse types, `argparse.ArgumentTypeError`. Standard library only: `--help` and argument
mistakes must not import torch.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from sae import textfiles

MAX_IOI_PROMPTS = 10_000  # about 1 GB of prompts, caches and feature sets; more is a typo, not a run
MAX_BASELINE_TOKENS = 2_000_000  # activations held in memory to fit PCA/ICA: 4.6 GB at d_model 576 in float32


class InputError(ValueError):
    """An argument or input file that cannot work; the message names it and says what to give instead."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


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
    ancestor = _nearest_existing(path if path.is_dir() else path.parent)
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
    from sae.locking import check_not_in_use  # standard library only

    check_not_in_use(path)  # another command writing there: refused now, not after loading the model


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
        raise MissingInputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is a folder; give a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permission denied)")
    return path


def input_folder(path: Path, what: str, hint: str = "") -> Path:
    """An existing folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInputError(f"{what} {path} does not exist" + (f"; {hint}" if hint else ""))
    if not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder" + (f"; {hint}" if hint else ""))
    return path


# --------------------------------------------------------------------------- file contents


def utf8_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is reported with the file and line."""
    return textfiles.utf8_lines(path, what, InputError)


def read_json_file(path: Path, what: str):
    """A JSON file's value: UTF-8, not nested absurdly deep, valid JSON; each failure names the file."""
    return textfiles.read_json(path, what, InputError)


# --------------------------------------------------------------------------- corpus, dictionaries, concepts


def jsonl_text_lines(path: Path, what: str) -> None:
    """Every non-empty line of a .jsonl file is a JSON object with a string "text"."""
    for _ in textfiles.jsonl_text_records(path, what, InputError):
        pass


def corpus_spec(spec: str, flag: str = "--corpus") -> None:
    """'registry[:a,b]', hf:NAME[:SPLIT[:FIELD]], or a local .txt/.jsonl file or folder read through to its last
    line (UTF-8; JSON objects with a string "text"), so that a bad line is named now, before the model loads."""
    if spec == "registry" or spec.startswith("registry:"):
        return  # fetched and checksummed by the library
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) > 3 or not all(parts):
            raise InputError(f"{flag} {spec!r} is not of the form hf:NAME[:SPLIT[:FIELD]] (at most three non-empty "
                             "parts after 'hf:')")
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingInputError(f"{flag} {spec!r} does not exist; give 'registry', a .txt/.jsonl file or folder, or "
                         "hf:NAME[:SPLIT[:FIELD]]")
    files = sorted(path.glob("*.txt")) + sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{flag} folder {path} holds no .txt or .jsonl files")
    texts = [file for file in files if file.suffix != ".jsonl"]
    for file in texts or files:  # a folder with .txt files is read as text (as sae.corpus.load_corpus does)
        if file.suffix == ".jsonl":
            jsonl_text_lines(file, "corpus")
        elif not any(line.strip() for line in utf8_lines(file, "corpus")):
            raise InputError(f"corpus {file} holds no text")


def device(spec: str | None, flag: str = "--device") -> None:
    """A device this machine has ('auto' and 'cpu' always; torch is imported only to check any other), checked
    before the corpus and the model load: `--device cuda` without CUDA is one error line at once."""
    if spec in (None, "auto", "cpu"):
        return
    from circuits.models import DeviceError, resolve_device

    try:
        resolve_device(spec)
    except DeviceError as error:
        raise InputError(f"{flag}: {error}") from None


def hook_names(hooks: list[str] | None, flag: str = "--hook") -> None:
    """Each hook name is a non-empty name such as blocks.12.hook_resid_post (the model checks the rest)."""
    for hook in hooks or []:
        if not hook.strip():
            raise InputError(f"{flag} {hook!r}: a hook name must be a non-empty string such as "
                             "'blocks.12.hook_resid_post'")


def dictionary_folders(folder: Path, flag: str = "--sae") -> dict[Path, dict]:
    """{folder: cfg.json contents} for every dictionary folder at or under `folder`, each cfg.json type-checked
    and each weights file's header read (standard library only: before torch is imported)."""
    from sae.config_checks import ConfigError, check_cfg_json
    from sae.folders import DictionaryFileError, find_dictionary_folders, read_safetensors_header

    folder = input_folder(folder, flag, "pass a folder written by `sparse-circuits train`")
    folders = find_dictionary_folders(folder)
    if not folders:
        raise InputError(f"{flag} {folder} holds no dictionary folder (sae_weights.safetensors + cfg.json); "
                         "pass a folder written by `sparse-circuits train`")
    configs = {}
    for each in folders:
        weights = each / "sae_weights.safetensors"
        if not weights.is_file():
            raise InputError(f"dictionary folder {each} has no sae_weights.safetensors; train it again")
        configs[each] = read_json_file(each / "cfg.json", "dictionary config")
        try:
            check_cfg_json(configs[each])
        except ConfigError as error:
            raise InputError(f"{each / 'cfg.json'} is not a valid dictionary config: {error}") from None
        try:
            read_safetensors_header(weights)
        except DictionaryFileError as error:
            raise InputError(str(error)) from None
    return configs


def dictionary_config_at_hook(folder: Path, hook: str | None, flag: str = "--sae") -> dict:
    """The cfg.json of the dictionary at `hook` under `folder` (any hook when `hook` is None and the folder
    holds one hook); InputError when it holds several and none is chosen, or none at `hook`."""
    configs = dictionary_folders(folder, flag)
    hooks = {(cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")): cfg for cfg in configs.values()}
    if hook is None and len(hooks) > 1:
        raise InputError(f"{flag} {folder} holds dictionaries at {len(hooks)} hooks "
                         f"({', '.join(sorted(map(str, hooks)))}); choose one with --hook")
    if hook is not None and hook not in hooks:
        raise InputError(f"--hook {hook}: {flag} {folder} has no dictionary there; it holds "
                         f"{', '.join(sorted(map(str, hooks)))}")
    return hooks[hook] if hook is not None else next(iter(hooks.values()))


def feature_target(spec: str, configs: dict[Path, dict]) -> None:
    """A --feature HOOK:INDEX (or auto, HOOK:auto) whose hook has a dictionary and whose index is in range."""
    hook, _, index = spec.rpartition(":")
    if spec == "auto":
        return
    if not hook or not (index == "auto" or index.isdigit()):
        raise InputError(f"--feature {spec!r} is not HOOK:INDEX, HOOK:auto or auto (e.g. blocks.7.hook_resid_post:123)")
    widths = {}
    for cfg in configs.values():
        name = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
        widths[name] = cfg["d_sae"]
    if hook not in widths:
        raise InputError(f"--feature {spec}: no dictionary at {hook}; the folder holds {', '.join(sorted(widths))}")
    if index != "auto" and int(index) >= widths[hook]:
        raise InputError(f"--feature {spec}: index {index} is out of range; the dictionary at {hook} has "
                         f"{widths[hook]:,} features (0 to {widths[hook] - 1:,})")


def seed(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**63 - 1, got {text}")
    return value


def concept_file(spec: str) -> None:
    """A concept JSON file, every field's type checked before torch loads, by the same reader the library uses
    (tasks.concept_files, standard library only)."""
    from tasks.concept_files import read_concept_data

    path = Path(spec).expanduser()
    if not path.is_file():
        raise MissingInputError(f"unknown concept {spec!r}: use 'gender' or a JSON file of prompts (see "
                                "tasks.erasure.read_concept_file)")
    read_concept_data(path, InputError)


def ioi_template_file(path: Path, flag: str = "--templates") -> None:
    """An IOI template file: UTF-8, one template per line (blank and '#' lines skipped), each with the placeholders
    the IOI data module requires ({A}, {B} once each, {S}); an error names the file and line."""
    from tasks.ioi_templates import read_template_file  # standard library only

    read_template_file(input_file(path, f"{flag} file"), InputError)


def feature_selection(spec: str, n_features: int | None = None, flag: str = "--features") -> list[int] | str | None:
    """--features: 'all' (None), 'auto' (the features that fire), or indices and ranges such as '0-199,512';
    each index checked against `n_features` when known. Returns None, 'auto' or the sorted unique indices."""
    spec = spec.strip()
    if spec in ("all", "auto"):
        return None if spec == "all" else "auto"
    indices: set[int] = set()
    for part in spec.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise InputError(f"{flag} {spec!r}: {part.strip()!r} is not an index or a range such as 0-199; give "
                             "'all', 'auto' or indices and ranges separated by commas")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise InputError(f"{flag} {spec!r}: the range {part.strip()} is empty (it ends before it starts)")
        if n_features is not None and last >= n_features:
            raise InputError(f"{flag} {spec!r}: index {last:,} is out of range; the dictionary has {n_features:,} "
                             f"features (0 to {n_features - 1:,})")
        if last - first > 10_000_000:
            raise InputError(f"{flag} {spec!r}: the range {part.strip()} is larger than any dictionary")
        indices.update(range(first, last + 1))
    return sorted(indices)


def dashboard_site_folder(path: Path, flag: str = "--out") -> None:
    """A site folder for `dashboard --out`: absent, empty or an earlier site (replaced whole), writable, not in use."""
    from circuits.dashboard.folders import SiteError, check_site_folder  # standard library only

    try:
        check_site_folder(Path(path).expanduser(), flag)
    except SiteError as error:
        raise InputError(str(error)) from None
    output_folder(path, flag)


def dashboard_site(path: Path, flag: str = "--dashboard") -> None:
    """An existing dashboard site whose pages circuit pages link to."""
    from circuits.dashboard.folders import SiteError, read_site  # standard library only

    input_folder(path, f"{flag} site", "build one with `sparse-circuits dashboard`")
    try:
        read_site(Path(path).expanduser(), flag)
    except SiteError as error:
        raise InputError(str(error)) from None


IOI_SEARCHES = ("attribution", "greedy")  # = tasks.ioi.SEARCHES
IOI_GREEDY_ORDERS = ("attribution", "random")  # = tasks.ioi.GREEDY_ORDERS


def ioi_thresholds(text: str | None, flag: str = "--thresholds") -> tuple[float, ...] | None:
    """Comma-separated greedy thresholds: finite, > 0 (a removal is kept when it raises KL by less)."""
    if text is None:
        return None
    values = []
    for item in [part.strip() for part in text.split(",") if part.strip()]:
        try:
            value = float(item)
        except ValueError:
            raise InputError(f"{flag} {text!r}: {item!r} is not a number; give numbers > 0, e.g. 1e-4,1e-3,1e-2") from None
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"{flag} {text!r}: {item} is not a finite number > 0 (a threshold bounds how much one "
                             "removal may raise KL)")
        values.append(value)
    if not values:
        raise InputError(f"{flag} {text!r}: give at least one threshold, e.g. 1e-4,1e-3,1e-2")
    return tuple(sorted(set(values)))


def ioi_search_options(args) -> None:
    """The IOI search's options together: what the greedy search cannot do, and flags that exclude each other."""
    if args.search not in IOI_SEARCHES:
        raise InputError(f"--search {args.search!r}: choose one of {', '.join(IOI_SEARCHES)}")
    if args.greedy_order not in IOI_GREEDY_ORDERS:
        raise InputError(f"--greedy-order {args.greedy_order!r}: choose one of {', '.join(IOI_GREEDY_ORDERS)}")
    ioi_thresholds(args.thresholds)
    if args.search == "greedy" and args.per_prompt:
        raise InputError("--per-prompt: the greedy search finds one set shared by all prompts; use --search "
                         "attribution for per-prompt sets")
    if args.error_node and args.patch_error:
        raise InputError("--error-node and --patch-error exclude each other: --error-node patches the error term "
                         "as one node the search counts (and greedy may remove); --patch-error patches it in every "
                         "set without counting it. Give one")
    if args.search != "greedy":
        given = [flag for flag, value in (("--thresholds", args.thresholds), ("--greedy-start", args.greedy_start))
                 if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --search greedy")


def launcher_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun), checked without importing torch."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"WORLD_SIZE={text!r} is not a positive integer; launch with torchrun --nproc_per_node=N "
                         "(which sets it) or unset it")
    return int(text)
