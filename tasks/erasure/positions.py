"""Where an erasure is fitted and applied in a prompt: the three settings of the fair protocol.

Every method (feature removal, LEACE, the mean projection and the controls) is fitted and applied at the
same positions, one setting at a time, and each setting is reported on its own:

- `name`: the subject's name token (the last occurrence in the prompt of one of the concept's single-token
  subjects: for the gender prompts the name in "My name is X and I am a", not the few-shot examples');
- `final`: the prompt's final position, where the concept token is predicted;
- `all`: applied at every position from the first after BOS to the final one; fitted on the positions from
  the subject's name to the final one, the only ones the prompt's label describes (a few-shot example's
  positions are about another person; the old `*_all_positions` fits gave them the prompt's label).
  A concept without subjects (a concept file) fits on every applied position.

The engine's passed-through positions (BOS and massive activations) are removed from every mask by the edits
themselves (circuits.engine.edits), the same way for every method. On held-out text, where nobody knows
where the names are, every method edits every position: the collateral damage is that of the eraser as it
would be deployed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.erasure.concepts import Concept, ConceptError
from tasks.ioi import single_token_id

SETTINGS = ("name", "final", "all")


@dataclass
class PositionMasks:
    """[n, pos] bool masks for a batch of prompts under one setting (`fit` is a subset of `apply`)."""

    apply: torch.Tensor
    fit: torch.Tensor
    names: torch.Tensor | None  # [n] each prompt's subject position (None: the concept names no subjects)


def check_settings(settings, concept: Concept | None = None) -> list[str]:
    """The settings in the documented order; unknown names, or `name` for a concept without subjects, are errors."""
    settings = list(settings)
    unknown = [setting for setting in settings if setting not in SETTINGS]
    if unknown or not settings:
        raise ValueError(f"unknown position setting(s) {unknown}; choose among {', '.join(SETTINGS)}")
    if concept is not None and "name" in settings and not concept.subjects:
        raise ConceptError(f"the 'name' position setting needs the concept's subjects (the names its prompts are "
                           f"about); concept '{concept.name}' ({concept.split}) has none, as a concept file has "
                           "none: use the settings final and all")
    return [setting for setting in SETTINGS if setting in settings]


def subject_token_ids(concept: Concept, tokenizer) -> torch.Tensor:
    """The token ids of the concept's single-token subjects (with their leading space), sorted; empty if none."""
    ids = {single_token_id(tokenizer, subject) for subject in concept.subjects}
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


def subject_positions(tokens: torch.Tensor, finals: torch.Tensor, subject_ids: torch.Tensor,
                      start: int = 0) -> torch.Tensor:
    """[n]: the last position in start..final of each prompt holding a subject token; a prompt with none is an
    error naming it (its name would not be a single token, or the prompt does not mention a subject)."""
    positions = torch.arange(tokens.shape[1])[None, :]
    inside = (positions >= start) & (positions <= finals[:, None])
    hit = torch.isin(tokens.cpu(), subject_ids) & inside
    missing = (~hit.any(1)).nonzero().flatten()
    if len(missing):
        raise ConceptError(f"{len(missing)} prompt(s) (first: row {int(missing[0])}) hold none of the concept's "
                           "single-token subjects, so the 'name' setting has no position there")
    return torch.where(hit, positions, -1).max(1).values


def position_masks(setting: str, tokens: torch.Tensor, finals: torch.Tensor, start: int,
                   subject_ids: torch.Tensor) -> PositionMasks:
    """The apply and fit masks of `setting` for prompts tokens [n, pos] with final positions [n]."""
    n, length = tokens.shape
    positions = torch.arange(length)[None, :]
    finals = finals.cpu()
    names = subject_positions(tokens, finals, subject_ids, start) if len(subject_ids) else None
    if setting == "final":
        final = positions == finals[:, None]
        return PositionMasks(final, final, names)
    if setting == "name":
        if names is None:
            raise ConceptError("the 'name' position setting needs the concept's subjects; this concept has none")
        name = positions == names[:, None]
        return PositionMasks(name, name, names)
    if setting == "all":
        applied = (positions >= start) & (positions <= finals[:, None])
        fitted = applied if names is None else applied & (positions >= names[:, None])
        return PositionMasks(applied, fitted, names)
    raise ValueError(f"unknown position setting {setting!r}; choose among {', '.join(SETTINGS)}")
