"""The contexts a trace runs on: right-padded token rows, where the target is measured, and the
positions left alone.

Besides BOS, a trace leaves alone every position the engine passes through (massive activations,
`circuits.engine.passthrough_positions`) at ANY of the traced hooks on the clean run: such a
position is never edited and never measured, at every hook, so that all of a trace's numbers are
taken over the same positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch

from circuits.engine import passthrough_positions
from circuits.features import FeatureScan, context_entry, max_activating_examples
from circuits.tracing.targets import FeatureTarget, LogitTarget, Target


@dataclass
class TraceContexts:
    """Token rows to trace on, right-padded, with the positions where the target is measured."""

    tokens: torch.Tensor  # [n, pos] token ids, BOS first
    lengths: torch.Tensor  # [n] real tokens per row (the rest is padding)
    measure: torch.Tensor  # [n, pos] bool: where the target is measured
    entries: list[dict] = field(default_factory=list)  # graph-schema contexts shown on the target node
    protected: torch.Tensor | None = None  # [n, pos] bool: positions besides BOS left alone (pass-through)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0:
            raise ValueError(f"contexts need tokens [n, pos] with n >= 1, got {tuple(self.tokens.shape)}")
        if self.measure.shape != self.tokens.shape:
            raise ValueError("contexts: measure must have the shape of tokens")
        if not bool(self.measure.any(dim=1).all()):
            raise ValueError("every context needs at least one position where the target is measured")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """[n, pos] bool: real tokens other than BOS and the protected ones (where features are
        ablated and nodes measured)."""
        positions = torch.arange(self.tokens.shape[1])
        valid = (positions[None, :] >= 1) & (positions[None, :] < self.lengths[:, None])
        return valid if self.protected is None else valid & ~self.protected

    def subset(self, indices: list[int]) -> "TraceContexts":
        """These contexts only, with the padding only they need."""
        index = torch.tensor(indices, dtype=torch.long)
        width = int(self.lengths[index].max())
        protected = None if self.protected is None else self.protected[index, :width]
        return TraceContexts(self.tokens[index, :width], self.lengths[index], self.measure[index, :width],
                             [self.entries[i] for i in indices] if self.entries else [], protected)

    def row(self, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, measure, valid) of one context without its padding."""
        length = int(self.lengths[context])
        return self.tokens[context, :length], self.measure[context, :length], self.valid[context, :length]


def protect_passthrough(contexts: TraceContexts, activations: Iterable[torch.Tensor]) -> TraceContexts:
    """The contexts with every position the engine passes through at any of `activations` ([n, pos, d]
    each, from the clean run) protected like BOS (neither edited nor measured), on top of those the
    caller protected already (not edited; the target's `measure` is the caller's). Where that would
    leave a context no measured position, its measured positions stay as they were."""
    passed = torch.zeros_like(contexts.tokens, dtype=torch.bool)
    for activation in activations:
        passed |= passthrough_positions(activation, contexts.lengths, exclude_bos=False).cpu()
    measure = contexts.measure & ~passed
    emptied = ~measure.any(dim=1)
    measure[emptied] = contexts.measure[emptied]
    protected = passed if contexts.protected is None else passed | contexts.protected
    return replace(contexts, measure=measure, protected=protected)


def pad_rows(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token rows into [n, max_len]; padding after a row never changes it (causal)."""
    lengths = torch.tensor([len(row) for row in rows])
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for number, row in enumerate(rows):
        tokens[number, : len(row)] = row
    return tokens, lengths


def pad_token_id(model) -> int:
    """The id used to right-pad token rows: pad, else EOS, else 0."""
    tokenizer = model.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def contexts_from_texts(model, texts: list[str], target: Target) -> TraceContexts:
    """Given texts (BOS prepended): a feature target is measured at every token but BOS, a logit target
    at the last token."""
    if not texts:
        raise ValueError("no context texts given; pass at least one text, or find contexts in the corpus")
    rows = [model.to_tokens(text)[0].cpu() for text in texts]
    short = [text for text, row in zip(texts, rows) if len(row) < 2]
    if short:
        raise ValueError(f"context text {short[0]!r} has no tokens besides BOS; give non-empty texts")
    tokens, lengths = pad_rows(rows, pad_token_id(model))
    positions = torch.arange(tokens.shape[1])
    if isinstance(target, LogitTarget):
        measure = positions[None, :] == (lengths[:, None] - 1)
    else:
        measure = (positions[None, :] >= 1) & (positions[None, :] < lengths[:, None])
    tokenizer = model.tokenizer
    entries = [context_entry(tokenizer, row, len(row) - 1, 0.0, before=len(row)) for row in rows]
    return TraceContexts(tokens, lengths, measure, entries)


def find_target_contexts(scan: FeatureScan, target: FeatureTarget, tokenizer, *, n_contexts: int = 20,
                         band: tuple[float, float] | None = (0.5, 1.0), seed: int = 0, truncate: bool = True,
                         pad_id: int = 0) -> TraceContexts:
    """Scanned contexts where the target fires strongly (a seeded sample of those between half and all
    of its maximum, as in the paper), each measured at its activating token and, with `truncate`,
    cut just after it (later tokens cannot matter)."""
    examples = max_activating_examples(scan, target.hook, target.index, n=n_contexts, band=band, seed=seed)
    if not examples:
        raise ValueError(f"feature {target.index} at {target.hook} never fires on the {scan.tokens.shape[0]} scanned "
                         "contexts; scan more text, or pick a feature that is active")
    rows = [scan.tokens[e.context, : e.position + 1] if truncate else scan.tokens[e.context] for e in examples]
    tokens, lengths = pad_rows(rows, pad_id)
    measure = torch.zeros_like(tokens, dtype=torch.bool)
    for number, example in enumerate(examples):
        measure[number, example.position] = True
    entries = [context_entry(tokenizer, scan.tokens[e.context], e.position, e.activation) for e in examples]
    return TraceContexts(tokens, lengths, measure, entries)


def length_buckets(lengths: torch.Tensor, max_buckets: int = 3) -> list[list[int]]:
    """Context indices split into at most `max_buckets` groups of similar length: the split of the
    sorted lengths that pads least (each group is padded to its longest), using fewer groups when
    that costs at most 10% more tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    sizes = [int(lengths[i]) for i in order]
    n = len(sizes)
    # best[k][j]: least padded tokens for the first j sorted contexts in k groups; cut[k][j]: where the last begins
    best = [[math.inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for groups in range(1, max_buckets + 1):
        for end in range(1, n + 1):
            for start in range(groups - 1, end):
                cost = best[groups - 1][start] + (end - start) * sizes[end - 1]
                if cost < best[groups][end]:
                    best[groups][end], cut[groups][end] = cost, start
    fewest = min(best[k][n] for k in range(1, max_buckets + 1))
    groups = min(k for k in range(1, max_buckets + 1) if best[k][n] <= 1.1 * fewest)  # a group costs a forward
    buckets, end = [], n
    for k in range(groups, 0, -1):
        start = cut[k][end]
        buckets.append(sorted(order[start:end]))
        end = start
    return [bucket for bucket in reversed(buckets) if bucket]
