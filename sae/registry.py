"""Architectures by the name stored in cfg.json's `architecture` key.

Adding an architecture is one file (a `SparseAutoencoder` subclass) and one line in `_BUILT_IN`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from sae.config import DictionaryConfig
from sae.dictionary import Dictionary

ARCHITECTURES: dict[str, type[Dictionary]] = {}

_BUILT_IN = {  # architecture name -> "module:class"
    "standard": "sae.relu:ReluSAE",
    "topk": "sae.topk:TopKSAE",
    "jumprelu": "sae.jumprelu:JumpReLUSAE",
    "batchtopk": "sae.batchtopk:BatchTopKSAE",
}


def register_architecture(name: str) -> Callable[[type[Dictionary]], type[Dictionary]]:
    """Class decorator: `@register_architecture("gated")` makes cfg.architecture == "gated" build it."""

    def register(cls: type[Dictionary]) -> type[Dictionary]:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture '{name}' is already registered to {ARCHITECTURES[name].__name__}")
        ARCHITECTURES[name] = cls
        return cls

    return register


def architecture_class(name: str) -> type[Dictionary]:
    """The class registered under `name`, with an error listing the known names."""
    cls = ARCHITECTURES.get(name)
    if cls is None:
        raise ValueError(f"unknown dictionary architecture '{name}'; known: {sorted(ARCHITECTURES)}. "
                         "Register it with sae.registry.register_architecture")
    return cls


def is_trainable(name: str) -> bool:
    """Whether the architecture defines a training loss (every registered SAE does)."""
    return callable(getattr(architecture_class(name), "training_loss", None))


def build_dictionary(cfg: DictionaryConfig) -> Dictionary:
    """A freshly initialised dictionary of the architecture cfg names."""
    return architecture_class(cfg.architecture)(cfg)


for _name, _target in _BUILT_IN.items():
    _module, _class = _target.split(":")
    register_architecture(_name)(getattr(importlib.import_module(_module), _class))
