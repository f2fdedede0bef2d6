"""Streaming training's source: the model run over the corpus on demand, feeding a bounded mixing buffer.

`streaming_source` returns a `sae.mixing_buffer.MixingBufferSource` whose chunks are harvested when the
buffer needs them: contexts come from `sae.context_stream.ContextStream` (the rows `tokenize_contexts`
gives, in the same order, never all held), activations from `circuits.harvest.collect_activations`, BOS
dropped as the activation store drops it. Nothing is written to disk; memory is bounded by the buffer
(`buffer_tokens` activations of every hook in `dtype`) plus the model and one harvest batch. Resuming at
batch i re-harvests at most the buffer's window of chunks (sae/mixing_buffer.py explains why).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from circuits.harvest import check_storable, collect_activations
from circuits.hooks import hook_width, validate_hooks
from sae.activation_store import DTYPES
from sae.context_stream import ContextStream
from sae.corpus import Corpus
from sae.finite import check_finite_rows
from sae.mixing_buffer import DEFAULT_WINDOW_CHUNKS, MixingBufferSource, plan_chunks

DEFAULT_BUFFER_TOKENS = 1 << 20


class ModelChunkReader:
    """`read_chunks` for MixingBufferSource: runs `model` over the contexts of the requested chunks."""

    def __init__(self, model, contexts: ContextStream, chunk_ranges: list[tuple[int, int]], n_contexts: int, *,
                 dtype: str, batch_size: int, exclude_bos: bool):
        self.model, self.contexts, self.chunk_ranges, self.n_contexts = model, contexts, chunk_ranges, n_contexts
        self.dtype, self.batch_size, self.exclude_bos = dtype, batch_size, exclude_bos

    def __call__(self, chunk_ids: list[int], hooks: list[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        starts = {self.chunk_ranges[c][0]: c for c in chunk_ids}
        ranges = (self.chunk_ranges[c] for c in chunk_ids)
        for start, block in self.contexts.blocks(ranges, self.n_contexts):  # the training bar shows progress
            yield starts[start], self._harvest(block, start, hooks)

    @torch.inference_mode()
    def _harvest(self, block: torch.Tensor, first: int, hooks: list[str]) -> dict[str, torch.Tensor]:
        """{hook: [rows, d] in the buffer dtype} for contexts [n, context_size], filled in place (no concatenation
        copy, so a chunk costs its own size once)."""
        device = next(self.model.parameters()).device
        out: dict[str, torch.Tensor] = {}
        filled = 0
        for start in range(0, block.shape[0], self.batch_size):
            batch = block[start : start + self.batch_size].to(device)
            for hook, value in collect_activations(self.model, batch, hooks).items():
                value = value[:, 1:] if self.exclude_bos else value
                rows = value.reshape(-1, value.shape[-1])
                if hook not in out:
                    per_context = value.shape[1]
                    out[hook] = torch.empty(block.shape[0] * per_context, rows.shape[1], dtype=DTYPES[self.dtype])
                stored = rows.to("cpu", DTYPES[self.dtype])
                where = (f"streaming contexts {first + start}-{first + start + batch.shape[0] - 1}, hook '{hook}'")
                check_storable(rows, stored, self.dtype, where)
                check_finite_rows(stored, where)
                out[hook][filled : filled + stored.shape[0]] = stored
            filled += batch.shape[0] * (block.shape[1] - (1 if self.exclude_bos else 0))
        return out


def streaming_source(model, corpus: Corpus, hooks: list[str], n_tokens: int, *, context_size: int = 128,
                     buffer_tokens: int = DEFAULT_BUFFER_TOKENS, buffer_bytes: int | None = None, seed: int = 0,
                     dtype: str = "float16",
                     harvest_batch_size: int = 16, exclude_bos: bool = True,
                     window_chunks: int = DEFAULT_WINDOW_CHUNKS, progress: bool = True) -> MixingBufferSource:
    """A BatchSource of about `n_tokens` activations at `hooks`, harvested as training consumes them.

    The contexts are the train split's, in the order `harvest_for_training` would store them (same corpus,
    seed and context size). The buffer holds at most `buffer_tokens` activations, or when `buffer_bytes` is
    given as many as fit in it (every hook, in `dtype`). Counting the contexts the corpus holds is one tokenizing
    pass (nothing kept)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    validate_hooks(model, hooks)
    contexts = ContextStream(corpus, model.tokenizer, context_size, split="train", seed=seed)
    rows_per_context = context_size - (1 if exclude_bos else 0)
    wanted = max(1, math.ceil(n_tokens / rows_per_context))
    available = contexts.count(wanted)
    if available < wanted and progress:
        print(f"note: the corpus train split gave {available} contexts, fewer than the {wanted} asked for; "
              "streaming all of it")
    widths = _widths(model, contexts, hooks)
    if buffer_bytes is not None:
        buffer_tokens = buffer_bytes // (sum(widths.values()) * DTYPES[dtype].itemsize)
    ranges, window = plan_chunks(available, rows_per_context, buffer_tokens, window_chunks)
    reader = ModelChunkReader(model, contexts, ranges, available, dtype=dtype, batch_size=harvest_batch_size,
                              exclude_bos=exclude_bos)
    source = MixingBufferSource(hooks, widths, [(end - start) * rows_per_context for start, end in ranges], window,
                                reader)
    source.n_contexts = available
    source.contexts_per_chunk = ranges[0][1] - ranges[0][0]
    return source


def _widths(model, contexts: ContextStream, hooks: list[str]) -> dict[str, int]:
    """Each hook's activation width: d_model where the hook says so, else measured on one short context."""
    widths = {hook: hook_width(model, hook) for hook in hooks}
    unknown = [hook for hook, width in widths.items() if width is None]
    if unknown:
        first = next(iter(contexts.rows(1)))[None, :2].to(next(model.parameters()).device)
        with torch.inference_mode():
            widths.update({hook: int(value.shape[-1]) for hook, value in collect_activations(model, first, unknown).items()})
    return widths
