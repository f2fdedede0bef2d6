"""Architectures by the name stored in cfg.json's `architecture` key."""

from __future__ import annotations

from typing import Callable

from sae.config import DictionaryConfig
from sae.dictionary import Dictionary
from sae.relu import ReluSAE
from sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[Dictionary]] = {}


def register_architecture(name: str) -> Callable[[type[Dictionary]], type[Dictionary]]:
    """Class decorator: `@register_architecture("gated")` makes cfg.architecture == "gated" build it."""

    def register(cls: type[Dictionary]) -> type[Dictionary]:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture '{name}' is already registered to {ARCHITECTURES[name].__name__}")
        ARCHITECTURES[name] = cls
        return cls

    return register


def build_dictionary(cfg: DictionaryConfig) -> Dictionary:
    """A freshly initialised dictionary of the architecture cfg names."""
    cls = ARCHITECTURES.get(cfg.architecture)
    if cls is None:
        raise ValueError(f"unknown dictionary architecture '{cfg.architecture}'; known: {sorted(ARCHITECTURES)}. "
                         "Register it with sae.registry.register_architecture")
    return cls(cfg)


register_architecture("standard")(ReluSAE)
register_architecture("topk")(TopKSAE)
