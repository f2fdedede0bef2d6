"""Saving and loading dictionaries as SAELens-style folders: `sae_weights.safetensors` + `cfg.json`.

Loading checks everything it can before building a module: both files present, cfg.json parses,
the safetensors header is whole and its tensor shapes agree with cfg.json (and with the width the
caller expects). A broken file is reported as `DictionaryFileError`, never a raw parser panic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from sae.assets import atomic_write_bytes, atomic_write_text, sha256_of
from sae.config import DictionaryConfig, check_saelens_options
from sae.folders import (CONFIG_FILE, WEIGHTS_FILE, DictionaryFileError, MissingDictionaryFileError,  # noqa: F401
                         broken_safetensors, find_dictionary_folders, read_safetensors_header)
from sae.dictionary import Dictionary
from sae.options import OptionError
from sae.registry import architecture_class, build_dictionary

WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")  # every SAE's; an architecture may add more (threshold)

# ---------------------------------------------------------------------------------------------
# safetensors files


def write_tensor_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors as safetensors atomically (temp file, then rename)."""
    atomic_write_bytes(Path(path), save_safetensors_bytes(tensors))


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (checked first), as CPU tensors."""
    path = Path(path)
    read_safetensors_header(path)
    try:
        return load_safetensors_bytes(path.read_bytes())
    except BaseException as error:  # the Rust parser may raise a PanicException (a BaseException)
        if isinstance(error, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise broken_safetensors(path, f"{type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------
# dictionary folders


def save_dictionary(dictionary: Dictionary, folder: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write `folder/sae_weights.safetensors` (float32) and `folder/cfg.json` in SAELens' layout (plus
    `extra_files`, {name: text}), atomically as a whole: into a temporary folder beside it, then renamed.

    A kill leaves either the old folder or the new one, never weights without cfg.json; an existing folder
    is replaced (with whatever else it held: an eval.json of old weights is stale). The architecture decides
    what is written (`saelens_tensors`, `saelens_cfg`): a BatchTopK SAE, for one, is written as SAELens
    writes it, a JumpReLU SAE with its global threshold."""
    if not hasattr(dictionary, "saelens_tensors"):
        raise TypeError(f"{type(dictionary).__name__} has no saelens_tensors(); only SAE-layout dictionaries "
                        "(sae.dictionary.SparseAutoencoder) can be saved")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous().clone()
               for name, tensor in dictionary.saelens_tensors().items()}
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        write_tensor_file(tensors, temporary / WEIGHTS_FILE)
        files = {CONFIG_FILE: json.dumps(dictionary.saelens_cfg(), indent=2, sort_keys=True) + "\n",
                 **(extra_files or {})}
        for name, text in files.items():
            atomic_write_text(temporary / name, text)
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes 0700; results are meant to be shared
        _replace_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _replace_folder(new: Path, folder: Path) -> None:
    """Put the complete folder `new` at `folder`: a rename, after moving an existing one aside."""
    if folder.is_dir() and not folder.is_symlink():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old.tmp"))
        os.replace(folder, old)  # the empty placeholder is replaced by the old folder
        os.replace(new, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, folder)


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, str(name).removeprefix("torch."))  # checked by check_saelens_options


def read_dictionary_config(folder: str | Path) -> DictionaryConfig:
    """The cfg.json of a dictionary folder, with a clear error if the folder or file is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingDictionaryFileError(f"dictionary folder {folder} does not exist; "
                                         "train one or check the path")
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise MissingDictionaryFileError(f"dictionary folder {folder} has no {' and no '.join(missing)}; "
                                         f"a dictionary folder needs both {WEIGHTS_FILE} and {CONFIG_FILE}")
    try:
        return DictionaryConfig.load(folder / CONFIG_FILE)
    except (ValueError, TypeError, AttributeError) as error:
        raise DictionaryFileError(f"{folder / CONFIG_FILE} is not a valid dictionary config: {error}") from error


def _check_weight_shapes(path: Path, cfg: DictionaryConfig, header: dict[str, tuple[str, list[int]]]) -> None:
    shapes = architecture_class(cfg.architecture).saelens_shapes(cfg)
    required = [name for name in shapes if not (cfg.tied and name == "W_enc")]
    absent = [name for name in required if name not in header]
    if absent:
        raise DictionaryFileError(f"{path} has no tensor(s) {absent}; a '{cfg.architecture}' dictionary needs "
                                  f"{list(shapes)}")
    for name, shape in shapes.items():
        if name in header and header[name][1] != shape:
            raise DictionaryFileError(
                f"{path}: {name} has shape {header[name][1]} but cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}) "
                f"needs {shape}; the weights and cfg.json belong to different dictionaries")
    ignored = sorted(set(header) - set(shapes))
    if ignored:
        warnings.warn(f"{path}: ignoring tensors this library does not use: {ignored}", stacklevel=3)


def _check_expected_width(folder: Path, cfg: DictionaryConfig, expected_d_in: int | None) -> None:
    if expected_d_in is not None and expected_d_in != cfg.d_in:
        raise ValueError(
            f"dictionary {folder} for hook '{cfg.hook_name}' (model '{cfg.model_name}') has d_in={cfg.d_in}, "
            f"but the activations there have width {expected_d_in}; load a dictionary trained on this "
            "model and hook point, or train one")


def load_dictionary(folder: str | Path, expected_d_in: int | None = None, device: str | torch.device = "cpu"
                    ) -> Dictionary:
    """A dictionary from a folder written by `save_dictionary` or by SAELens.

    SAELens options that change the maths are honoured (`rescale_acts_by_decoder_norm` is folded into
    the weights: same codes and reconstructions, unit decoder rows) or rejected with a DictionaryFileError."""
    folder = Path(folder)
    cfg = read_dictionary_config(folder)
    try:
        options = check_saelens_options(json.loads((folder / CONFIG_FILE).read_text()))
        architecture_class(cfg.architecture)
    except ValueError as error:
        raise DictionaryFileError(f"{folder}: {error}") from error
    _check_expected_width(folder, cfg, expected_d_in)
    weights_path = folder / WEIGHTS_FILE
    _check_weight_shapes(weights_path, cfg, read_safetensors_header(weights_path))
    tensors = read_tensor_file(weights_path)
    nonfinite = [name for name, tensor in tensors.items()
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if nonfinite:
        raise DictionaryFileError(f"{weights_path}: {nonfinite} hold NaN or infinite values; this dictionary cannot be "
                                  "used: train it again")
    dictionary = build_dictionary(cfg)
    try:
        dictionary.load_saelens_tensors(tensors)
    except ValueError as error:
        raise DictionaryFileError(f"{weights_path}: {error}") from error
    if options.rescale_acts_by_decoder_norm:
        dictionary.scale_features_(dictionary.W_dec.detach().norm(dim=-1))
    dictionary.weights_file = weights_path  # its provenance: dictionary_sha256 hashes this file
    return dictionary.to(device=device, dtype=_torch_dtype(cfg.dtype)).eval()


def dictionary_sha256(dictionary_or_folder: Dictionary | str | Path) -> str:
    """The sha256 identifying a dictionary in results: of its sae_weights.safetensors when it is a folder or was
    loaded from one (streamed, once per file version), else of its tensors (float32, in name order, each with its
    name and shape)."""
    if isinstance(dictionary_or_folder, (str, Path)):
        return file_sha256(Path(dictionary_or_folder) / WEIGHTS_FILE)
    weights_file = getattr(dictionary_or_folder, "weights_file", None)
    if weights_file is not None and Path(weights_file).is_file():
        return file_sha256(Path(weights_file))
    module = dictionary_or_folder
    tensors = module.saelens_tensors() if hasattr(module, "saelens_tensors") else module.state_dict()
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{list(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered for its (path, size, modification time) so a file is read once."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_of(path)
    return _FILE_HASHES[key]


def load_dictionaries(folder_or_parent: str | Path, device: str | torch.device = "cpu") -> dict[str, Dictionary]:
    """{hook_name: dictionary} for every dictionary folder at or under the path."""
    folders = find_dictionary_folders(folder_or_parent)
    if not folders:
        raise MissingDictionaryFileError(f"no dictionary folders (with {CONFIG_FILE}) under {folder_or_parent}")
    dictionaries: dict[str, Dictionary] = {}
    origins: dict[str, Path] = {}
    for folder in folders:
        dictionary = load_dictionary(folder, device=device)
        hook = dictionary.cfg.hook_name
        if hook in dictionaries:
            raise OptionError("folder_or_parent", "two dictionaries for hook {hook!r}: {first} and {second}; "
                              "{option} must hold one dictionary per hook (a folder of per-hook dictionary folders, "
                              "as train writes); move or delete the extra one", hook=hook, first=str(origins[hook]),
                              second=str(folder))
        dictionaries[hook], origins[hook] = dictionary, folder
    return dictionaries
