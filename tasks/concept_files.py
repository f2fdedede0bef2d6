"""Concept JSON files, read and type-checked with the standard library alone, so that the command line can
check one before torch is imported; tasks.erasure builds its `Concept`s from what this returns.

A concept file: {"name", "positive_token", "negative_token", "train": {"positive": [...], "negative": [...]},
"test": {...}, optional "transfer": {... and optional tokens of its own}}.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from sae import textfiles

SPLITS = ("train", "test", "transfer")
REQUIRED = ("positive_token", "negative_token", "train", "test")


class ConceptSplitData(NamedTuple):
    positive_prompts: list[str]
    negative_prompts: list[str]
    positive_token: str
    negative_token: str


def _text(value, where: str, error: type[ValueError]) -> str:
    if not isinstance(value, str) or not value:
        raise error(f"{where} is {value!r}; expected a non-empty string")
    return value


def _prompts(value, where: str, error: type[ValueError]) -> list[str]:
    if not isinstance(value, list) or not value:
        raise error(f"{where} is {type(value).__name__} {value!r:.60}; expected a non-empty JSON list of prompt "
                    "strings")
    return [_text(prompt, f"{where}[{index}]", error) for index, prompt in enumerate(value)]


def read_concept_data(path: Path, error: type[ValueError] = ValueError) -> tuple[str, dict[str, ConceptSplitData]]:
    """(name, {split: its prompts and target tokens}) of a concept file, every field's type checked (a side given
    as one string is an error, not one prompt per character; the two sides need different tokens); each
    problem raises `error` naming the file and the field."""
    data = textfiles.read_json(path, "concept file", error)
    if not isinstance(data, dict):
        raise error(f"{path} is not a concept file: it holds a JSON {type(data).__name__}, not an object with "
                    "positive_token, negative_token, and train/test objects of positive and negative prompts")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise error(f"{path} is not a concept file: it has no {', '.join(missing)}; it needs positive_token, "
                    "negative_token, and train/test objects with positive and negative prompt lists")
    name = _text(data.get("name", Path(path).stem), f"{path}: 'name'", error)
    default_tokens = [_text(data[key], f"{path}: '{key}'", error) for key in ("positive_token", "negative_token")]
    splits = {}
    for split in SPLITS:
        if split not in data:
            continue
        part = data[split]
        if not isinstance(part, dict):
            raise error(f"{path}: '{split}' is a {type(part).__name__}; expected an object with 'positive' and "
                        "'negative' prompt lists")
        sides = [_prompts(part.get(side), f"{path}: {split}.{side}", error) for side in ("positive", "negative")]
        tokens = [_text(part.get(key, default), f"{path}: {split}.{key}", error)
                  for key, default in zip(("positive_token", "negative_token"), default_tokens)]
        if tokens[0] == tokens[1]:
            raise error(f"{path}: {split} uses {tokens[0]!r} as both the positive and the negative token; the two "
                        "sides need different target tokens")
        splits[split] = ConceptSplitData(*sides, *tokens)
    return name, splits
