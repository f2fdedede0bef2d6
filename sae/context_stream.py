"""Token contexts produced lazily, in the order `sae.corpus.tokenize_contexts` returns them.

`tokenize_contexts` builds every row at once ([n_contexts, context_size] ids, and on the way a Python list of
all of them): fine for a harvest to disk, not for streaming training, whose memory must not grow with the
token count. `ContextStream` yields the same rows (tests/test_streaming.py checks they are equal) while holding
only the tokens of one batch of 256 documents; skipping to a later context re-tokenizes the text before it
(tokenizing is thousands of times cheaper than running the model) instead of keeping ids in memory.
"""

from __future__ import annotations

from typing import Iterator

import torch

from sae.corpus import Corpus, CorpusError, shuffled_documents

DOCUMENTS_PER_CALL = 256  # as tokenize_contexts: the documents tokenized per tokenizer call


class ContextStream:
    """Rows of `context_size` token ids (BOS first when `prepend_bos`): documents of the split in their seeded
    order, packed and separated by EOS, exactly as `tokenize_contexts(corpus, tokenizer, context_size, n, ...)`."""

    def __init__(self, corpus: Corpus, tokenizer, context_size: int, split: str = "train", seed: int = 0,
                 held_out_fraction: float = 0.02, prepend_bos: bool = True):
        if context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {context_size}")
        self.corpus, self.tokenizer, self.context_size = corpus, tokenizer, context_size
        self.split, self.seed, self.held_out_fraction = split, seed, held_out_fraction
        self.bos = tokenizer.bos_token_id if prepend_bos else None
        self.body = context_size - (1 if self.bos is not None else 0)

    def rows(self, n_contexts: int) -> Iterator[torch.Tensor]:
        """Up to `n_contexts` rows [context_size] (fewer when the split runs out of text), one at a time."""
        separator = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        documents = shuffled_documents(self.corpus, self.split, self.seed, self.held_out_fraction)
        pending: list[int] = []
        made = 0
        for start in range(0, len(documents), DOCUMENTS_PER_CALL):
            batch = [doc.text for doc in documents[start : start + DOCUMENTS_PER_CALL]]
            for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]:
                pending.extend(ids)
                pending.extend(separator)
            usable = (len(pending) // self.body) * self.body
            block = torch.tensor(pending[:usable], dtype=torch.long).view(-1, self.body)
            del pending[:usable]
            for row in block:
                if made == n_contexts:
                    return
                yield self._with_bos(row)
                made += 1
            if made == n_contexts:
                return
        if made == 0:
            raise CorpusError(f"the corpus split '{self.split}' has fewer than {self.body} tokens")

    def count(self, n_contexts: int) -> int:
        """How many of `n_contexts` the split holds (a tokenizing pass; nothing kept)."""
        return sum(1 for _ in self.rows(n_contexts))

    def blocks(self, ranges: Iterator[tuple[int, int]], n_contexts: int) -> Iterator[tuple[int, torch.Tensor]]:
        """For ascending, disjoint context ranges [start, stop), yield (start, rows [stop - start, context_size]);
        the contexts between ranges are tokenized and dropped."""
        wanted = iter(ranges)
        current = next(wanted, None)
        rows: list[torch.Tensor] = []
        for index, row in enumerate(self.rows(n_contexts)):
            while current is not None and index >= current[1]:  # an empty range: skip it
                current = next(wanted, None)
            if current is None:
                return
            if index >= current[0]:
                rows.append(row)
                if index + 1 == current[1]:
                    yield current[0], torch.stack(rows)
                    rows, current = [], next(wanted, None)
        if rows:
            yield current[0], torch.stack(rows)  # the split ran out inside the range

    def _with_bos(self, row: torch.Tensor) -> torch.Tensor:
        if self.bos is None:
            return row.clone()
        return torch.cat([torch.tensor([self.bos], dtype=torch.long), row])
