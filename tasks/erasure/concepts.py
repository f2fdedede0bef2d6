"""Binary concepts for concept erasure: two sets of prompts and the target tokens whose prediction expresses it.

A concept such as gender is the pair (positive prompts, negative prompts) with the tokens that the
model should predict after each (" female" / " male"). Erasure experiments fit on a train split,
measure on a test split whose subjects (names) are disjoint from train, and check transfer to a
different surface task (pronouns " she" / " he" after a named subject).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from tasks.ioi import final_position_logits, single_token_id

MAX_IMBALANCE = 0.1  # largest allowed relative difference between the two sides' sizes

FEMALE_NAMES: tuple[str, ...] = tuple(
    """Mary Anna Sarah Emma Lisa Alice Kate Rose Jennifer Linda Elizabeth Susan Jessica Karen Nancy Betty
    Helen Sandra Carol Ruth Sharon Michelle Laura Amy Emily Rachel Amanda Julie Maria Grace Jane Claire Lucy
    Sophie Olivia Hannah Victoria Rebecca Katie Martha Diana Eva Nina Ellen Lily Ella Julia Jenny Molly Joan""".split()
)
MALE_NAMES: tuple[str, ...] = tuple(
    """John Tom James David Paul Mark Bob Peter Michael Robert William Richard Thomas Daniel Matthew Andrew
    Joseph Charles Steven Kevin Brian George Edward Jason Ryan Jacob Eric Adam Henry Jack Frank Scott Patrick
    Ben Luke Joe Mike Tim Jeff Nick Simon Carl Roger Harry Fred Ian Oliver Tony Bill Jim Nathan Bruce""".split()
)

FEW_SHOT_LINE = "My name is {name} and I am a{answer}."
PRONOUN_TEMPLATES: tuple[str, ...] = (
    "Yesterday {name} went to the market because",
    "When {name} got home from work,",
    "Everyone could see that {name} was tired, so",
    "At the station, {name} missed the last train, so",
    "The teacher asked {name} why",
    "On Monday morning {name} called the office and said that",
)


class ConceptError(ValueError):
    """A concept whose prompts or target tokens cannot measure it; the message says what to change."""


@dataclass
class Concept:
    """Two prompt sets and the tokens (with leading space) whose prediction expresses the concept."""

    name: str
    positive_prompts: list[str]
    negative_prompts: list[str]
    positive_token: str  # e.g. " female"
    negative_token: str  # e.g. " male"
    split: str = "all"  # "train", "test", "transfer" or "all"
    positive_subjects: list[str] = field(default_factory=list)  # e.g. the names the prompts are about
    negative_subjects: list[str] = field(default_factory=list)

    @property
    def subjects(self) -> set[str]:
        return set(self.positive_subjects) | set(self.negative_subjects)

    def prompts_and_labels(self) -> tuple[list[str], torch.Tensor]:
        """All prompts, positives first, with labels [n] (1 positive, 0 negative)."""
        labels = [1] * len(self.positive_prompts) + [0] * len(self.negative_prompts)
        return self.positive_prompts + self.negative_prompts, torch.tensor(labels, dtype=torch.long)


class ConceptSplits(NamedTuple):
    train: Concept
    test: Concept  # subjects disjoint from train
    transfer: Concept  # the same concept expressed by another task


# ----------------------------------------------------------------------------------------------
# Validation


def target_token_ids(concept: Concept, tokenizer) -> tuple[int, int]:
    """(positive, negative) first token ids of the two target tokens."""
    ids = []
    for side, text in (("positive", concept.positive_token), ("negative", concept.negative_token)):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if not encoded or encoded[0] == tokenizer.unk_token_id:
            raise ConceptError(f"concept '{concept.name}': the {side} token {text!r} is empty or unknown to the "
                               "tokenizer; pick a word in its vocabulary (with its leading space)")
        ids.append(encoded[0])
    return ids[0], ids[1]


def validate_concept(concept: Concept, tokenizer, max_imbalance: float = MAX_IMBALANCE) -> tuple[int, int]:
    """Check a concept can be measured; returns the (positive, negative) target token ids."""
    for side, prompts in (("positive", concept.positive_prompts), ("negative", concept.negative_prompts)):
        if not prompts:
            raise ConceptError(f"concept '{concept.name}' ({concept.split}) has no {side} prompts; "
                               "both sides need prompts")
    positive_id, negative_id = target_token_ids(concept, tokenizer)
    if positive_id == negative_id:
        raise ConceptError(
            f"concept '{concept.name}': {concept.positive_token!r} and {concept.negative_token!r} start with the "
            f"same token ({tokenizer.convert_ids_to_tokens(positive_id)!r}), so their prediction cannot tell the "
            "sides apart; choose target words whose first tokens differ")
    n_positive, n_negative = len(concept.positive_prompts), len(concept.negative_prompts)
    if abs(n_positive - n_negative) > max_imbalance * max(n_positive, n_negative):
        smaller = min(n_positive, n_negative)
        raise ConceptError(
            f"concept '{concept.name}' ({concept.split}) is unbalanced: {n_positive} positive vs {n_negative} "
            f"negative prompts (more than {max_imbalance:.0%} apart). Add prompts to the smaller side or "
            f"subsample both to {smaller}")
    return positive_id, negative_id


# ----------------------------------------------------------------------------------------------
# The gender concept


def _single_token_names(tokenizer, names: Sequence[str]) -> list[str]:
    return [name for name in names if single_token_id(tokenizer, name) is not None]


def _few_shot_prompt(subject: str, female_examples: Sequence[str], male_examples: Sequence[str],
                     female_last: bool, rng: random.Random) -> str:
    """Examples in shuffled order, the last one of the gender asked for (so neither order nor recency tells)."""
    examples = [(name, " female") for name in female_examples] + [(name, " male") for name in male_examples]
    rng.shuffle(examples)
    wanted = " female" if female_last else " male"
    if examples[-1][1] != wanted:
        swap = rng.choice([index for index, (_, answer) in enumerate(examples) if answer == wanted])
        examples[swap], examples[-1] = examples[-1], examples[swap]
    lines = [FEW_SHOT_LINE.format(name=name, answer=answer) for name, answer in examples]
    return " ".join(lines) + f" My name is {subject} and I am a"


def _few_shot_prompts(subjects: list[str], female_names: list[str], male_names: list[str], n_shots: int,
                      rng: random.Random) -> list[str]:
    """Two prompts per subject, with `n_shots` examples per side: one ending on a female example, one on a male."""
    return [_few_shot_prompt(subject, rng.sample(female_names, n_shots), rng.sample(male_names, n_shots),
                             female_last, rng)
            for subject in subjects for female_last in (True, False)]


def _pronoun_prompts(subjects: list[str]) -> list[str]:
    return [template.format(name=subject) for subject in subjects for template in PRONOUN_TEMPLATES]


def gender_concept(tokenizer, seed: int = 0, *, n_names_per_side: int | None = None, test_fraction: float = 0.5,
                   n_shots_per_side: int = 2, n_example_names: int = 3) -> ConceptSplits:
    """Gender as predicted " female" / " male" after few-shot "My name is X and I am a" prompts.

    Names are single tokens (with a leading space) under `tokenizer`. Per side, `n_example_names`
    names are kept for the few-shot examples (each prompt shows `n_shots_per_side` of them per side);
    the others are split into train and test subjects (disjoint). The transfer split asks for
    " she" / " he" after the test names.
    """
    if not 0 < test_fraction < 1:
        raise ConceptError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if not 1 <= n_shots_per_side <= n_example_names:
        raise ConceptError(f"n_shots_per_side must be between 1 and n_example_names={n_example_names}, "
                           f"got {n_shots_per_side}")
    rng = random.Random(seed)
    female = _single_token_names(tokenizer, FEMALE_NAMES)
    male = _single_token_names(tokenizer, MALE_NAMES)
    available = min(len(female), len(male)) - n_example_names
    wanted = available if n_names_per_side is None else n_names_per_side
    if available < 2 or not 2 <= wanted <= available:
        raise ConceptError(
            f"the tokenizer has {len(female)} female and {len(male)} male single-token names; with "
            f"{n_example_names} kept for examples per side, {max(available, 0)} subjects per side remain but "
            f"{wanted} were asked for (at least 2, for train and test). Lower n_names_per_side.")
    rng.shuffle(female)
    rng.shuffle(male)
    female_examples, male_examples = female[:n_example_names], male[:n_example_names]
    female, male = female[n_example_names:][:wanted], male[n_example_names:][:wanted]
    n_test = min(wanted - 1, max(1, round(wanted * test_fraction)))
    splits = {"train": (female[n_test:], male[n_test:]), "test": (female[:n_test], male[:n_test])}

    concepts = {}
    for split, (female_subjects, male_subjects) in splits.items():
        concepts[split] = Concept(
            name="gender", split=split, positive_token=" female", negative_token=" male",
            positive_prompts=_few_shot_prompts(female_subjects, female_examples, male_examples, n_shots_per_side, rng),
            negative_prompts=_few_shot_prompts(male_subjects, female_examples, male_examples, n_shots_per_side, rng),
            positive_subjects=female_subjects, negative_subjects=male_subjects)
    female_test, male_test = splits["test"]
    concepts["transfer"] = Concept(
        name="gender", split="transfer", positive_token=" she", negative_token=" he",
        positive_prompts=_pronoun_prompts(female_test), negative_prompts=_pronoun_prompts(male_test),
        positive_subjects=female_test, negative_subjects=male_test)
    for concept in concepts.values():
        validate_concept(concept, tokenizer)
    return ConceptSplits(concepts["train"], concepts["test"], concepts["transfer"])


# ----------------------------------------------------------------------------------------------
# Measuring a model on a concept


def tokenize_prompts(tokenizer, prompts: Sequence[str], prepend_bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [n, pos] (BOS first when the tokenizer has one) and each prompt's last position [n]."""
    prefix = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    rows = [prefix + tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokens = torch.full((len(rows), max(len(row) for row in rows)), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row)
    return tokens, torch.tensor([len(row) - 1 for row in rows], dtype=torch.long)


def concept_logit_diffs(model, concept: Concept, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """logit[positive token] - logit[negative token] at each prompt's end [n], with labels [n]."""
    positive_id, negative_id = validate_concept(concept, model.tokenizer)
    prompts, labels = concept.prompts_and_labels()
    tokens, final_positions = tokenize_prompts(model.tokenizer, prompts)
    logits = final_position_logits(model, tokens, final_positions, batch_size)  # [n, vocab]
    return logits[:, positive_id] - logits[:, negative_id], labels


def concept_accuracy(model, concept: Concept, batch_size: int = 16) -> float:
    """Fraction of prompts where the model prefers its own side's target token over the other side's."""
    diffs, labels = concept_logit_diffs(model, concept, batch_size)
    return ((diffs > 0).long() == labels).float().mean().item()
