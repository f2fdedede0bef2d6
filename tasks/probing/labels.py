"""What the probes predict: part-of-speech tags of the Brown corpus and binary concepts made of several tags.

A label is a set of normalised Brown tags (sae.tagged_corpus.normalise_tag); a token is positive when its
word's tag is in the set. A plain tag (`nn`) is the set of itself; a concept (`proper_noun`) is a named set.
By default the probes predict the most frequent word tags of the train split and every concept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

# Concepts across tags (Brown gives be / have / do their own tags; * marks a negated form such as didn't).
CONCEPTS: dict[str, frozenset[str]] = {
    "proper_noun": frozenset({"np", "np$", "nps", "nps$"}),
    "past_tense_verb": frozenset({"vbd", "bed", "bedz", "hvd", "dod", "bed*", "bedz*", "hvd*", "dod*"}),
    "plural_noun": frozenset({"nns", "nns$", "nps", "nps$"}),
    "adjective": frozenset({"jj", "jjr", "jjs", "jjt"}),
}
DEFAULT_FREQUENT_TAGS = 8
MIN_TRAIN_POSITIVES = 20
MIN_HELD_OUT_POSITIVES = 5


class LabelError(ValueError):
    """A label set that cannot be probed (empty, unknown tags, too few examples); the message says what to do."""


@dataclass(frozen=True)
class ProbeLabel:
    name: str  # a tag (nn) or a concept (proper_noun)
    tags: frozenset[str]

    def of(self, tags: list[str]) -> torch.Tensor:
        """[n] bool: which of the tokens' tags belong to this label."""
        return torch.tensor([tag in self.tags for tag in tags], dtype=torch.bool)


def is_word_tag(tag: str) -> bool:
    """A tag of words rather than punctuation (it starts with a letter)."""
    return tag[:1].isalpha()


def frequent_tags(tag_counts: Counter, n: int = DEFAULT_FREQUENT_TAGS) -> list[str]:
    """The `n` most frequent word tags (punctuation left out), most frequent first, ties by name."""
    counts = [(tag, count) for tag, count in tag_counts.items() if is_word_tag(tag)]
    return [tag for tag, _ in sorted(counts, key=lambda item: (-item[1], item[0]))[:n]]


def parse_label_names(spec: str | list[str] | None) -> list[str] | None:
    """`nn,vbd,proper_noun` (or a list) -> names; None or 'auto' -> None (the default set). An empty set is an error."""
    if spec is None or spec == "auto" or spec == ["auto"]:
        return None
    parts = spec.split(",") if isinstance(spec, str) else [piece for item in spec for piece in item.split(",")]
    names = list(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not names:
        raise LabelError("the label set is empty: name at least one Brown tag (such as nn, vbd, np) or concept "
                         f"({', '.join(CONCEPTS)}), or leave the option out for the default set")
    return names


def resolve_labels(names: list[str] | None, tag_counts: Counter,
                   n_frequent: int = DEFAULT_FREQUENT_TAGS) -> list[ProbeLabel]:
    """The labels for `names` (None: the `n_frequent` most frequent word tags and every concept).

    `tag_counts`: the corpus's tags and their counts. A name must be a concept or one of those tags; unknown
    names are an error listing the frequent tags."""
    if names is None:
        names = frequent_tags(tag_counts, n_frequent) + list(CONCEPTS)
    unknown = [name for name in names if name not in CONCEPTS and name.lower() not in tag_counts]
    if unknown:
        raise LabelError(f"unknown tag(s) {', '.join(unknown)}: a label is a normalised Brown tag (lower case, "
                         f"suffixes such as -tl dropped; the corpus has {len(tag_counts)}, the most frequent "
                         f"{', '.join(frequent_tags(tag_counts, 15))}) or a concept ({', '.join(CONCEPTS)})")
    return [ProbeLabel(name, CONCEPTS[name]) if name in CONCEPTS
            else ProbeLabel(name.lower(), frozenset({name.lower()})) for name in names]


def check_label_counts(labels: list[ProbeLabel], train_tags: list[str], held_out_tags: list[str]) -> None:
    """Every label needs MIN_TRAIN_POSITIVES positives in train, MIN_HELD_OUT_POSITIVES held out, and negatives."""
    problems = []
    for label in labels:
        train, held = int(label.of(train_tags).sum()), int(label.of(held_out_tags).sum())
        if train < MIN_TRAIN_POSITIVES or held < MIN_HELD_OUT_POSITIVES:
            problems.append(f"{label.name} ({train} train / {held} held-out tokens)")
        elif train == len(train_tags) or held == len(held_out_tags):
            problems.append(f"{label.name} (every token is positive)")
    if problems:
        raise LabelError(f"too few examples to probe {', '.join(problems)}: each label needs at least "
                         f"{MIN_TRAIN_POSITIVES} train and {MIN_HELD_OUT_POSITIVES} held-out tokens, and some "
                         "negatives; probe more tokens (--tokens) or choose more frequent tags")
