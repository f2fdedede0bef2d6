"""A bounded shuffling buffer for streaming training: batches drawn from activations as they are produced.

SAELens' mixing buffer holds a fixed number of tokens, shuffles, hands out half and refills; a token
can stay in it for arbitrarily long, so resuming after a kill means replaying the whole stream. Here the
stream is cut into chunks (a fixed number of contexts each) and every token lives for at most
`window_chunks` (M) rounds, which makes batch i a pure function of (seed, i, the chunk order) and lets a
resumed run rebuild the buffer from at most M chunks:

- when chunk l arrives, its rows are shuffled (seeded by (seed, l)) and dealt into M near-equal parts;
  part m is emitted in round l + m;
- round r emits part m of chunk r - m for m = 0..M-1 (so chunks r-M+1..r are held: at most M chunks),
  in a seeded random order; then chunk r-M+1 is spent and dropped;
- batches are consecutive slices of the rounds' rows (a batch may span two rounds), so every token is
  used exactly once and a batch mixes tokens of up to M chunks (M x chunk contexts).

Rounds 0..M-2 are smaller (the buffer fills while training already runs on it), as are the last M-1 (it
drains). The buffer holds at most M chunks (`buffer_rows`), plus one batch being assembled. What produces a
chunk (running a model, circuits.streaming) is passed in as `read_chunks`; this module needs no model.

Data parallelism: `batches(..., part=(rank, world_size))` gives this process `batch_size // world_size`
rows of each global batch, taken from the chunks c with c % world_size == rank only, so each process
produces a disjoint share of the stream (and runs its own rounds over it).
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterator

import torch

DEFAULT_WINDOW_CHUNKS = 16

# read_chunks(chunk ids in ascending order, hooks) -> (chunk id, {hook: [rows, d_in]}) lazily, in that order
ChunkReader = Callable[[list[int], list[str]], Iterator[tuple[int, dict[str, torch.Tensor]]]]


class StreamExhaustedError(ValueError):
    """More batches were asked of a stream than it holds (streaming uses each token once: no epochs)."""


def plan_chunks(n_contexts: int, rows_per_context: int, buffer_tokens: int,
                window_chunks: int = DEFAULT_WINDOW_CHUNKS) -> tuple[list[tuple[int, int]], int]:
    """Cut `n_contexts` into chunks of whole contexts so that `window_chunks` chunks hold at most `buffer_tokens`
    rows; returns ([(first context, end context) per chunk], the window in chunks, at most `window_chunks`)."""
    if buffer_tokens < rows_per_context:
        raise ValueError(f"a buffer of {buffer_tokens:,} tokens cannot hold one context of {rows_per_context} "
                         "activations; give a larger buffer")
    window = max(1, min(window_chunks, buffer_tokens // rows_per_context))
    per_chunk = buffer_tokens // (window * rows_per_context)
    return [(start, min(start + per_chunk, n_contexts)) for start in range(0, n_contexts, per_chunk)], window


def _generator(seed: int, *index: int) -> torch.Generator:
    value = seed
    for part in index:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class RoundSchedule:
    """Which rows of which chunk each round emits, for one process's chunks (sizes in rows), by index only."""

    def __init__(self, chunk_ids: list[int], chunk_rows: list[int], window: int, seed: int, part: tuple[int, int]):
        self.chunk_ids, self.chunk_rows, self.window, self.seed, self.part = chunk_ids, chunk_rows, window, seed, part
        self.n_rounds = len(chunk_rows) + window - 1 if chunk_rows else 0
        sizes = [sum(self._part_range(r - m, m)[1] - self._part_range(r - m, m)[0]
                     for m in range(window) if 0 <= r - m < len(chunk_rows)) for r in range(self.n_rounds)]
        self.round_starts = [0]
        for size in sizes:
            self.round_starts.append(self.round_starts[-1] + size)

    @property
    def n_rows(self) -> int:
        return self.round_starts[-1]

    def _part_range(self, local: int, m: int) -> tuple[int, int]:
        rows = self.chunk_rows[local]
        return rows * m // self.window, rows * (m + 1) // self.window

    def round_of_row(self, row: int) -> int:
        return bisect.bisect_right(self.round_starts, row) - 1

    def round_rows(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(local chunk index, row within the chunk) of every row round `r` emits, in emission order."""
        slots, rows = [], []
        for m in range(self.window):
            local = r - m
            if not 0 <= local < len(self.chunk_rows):
                continue
            order = torch.randperm(self.chunk_rows[local], generator=_generator(self.seed, 0, self.chunk_ids[local]))
            low, high = self._part_range(local, m)
            rows.append(order[low:high])
            slots.append(torch.full((high - low,), local, dtype=torch.long))
        slot, row = torch.cat(slots), torch.cat(rows)
        mix = torch.randperm(slot.shape[0], generator=_generator(self.seed, 1, self.part[1], self.part[0], r))
        return slot[mix], row[mix]


class MixingBufferSource:
    """A `BatchSource` (sae/batches.py) over a stream of chunks read on demand through `read_chunks`.

    `chunk_rows[c]` is the number of activations chunk c yields; `window_chunks` chunks are held at most."""

    def __init__(self, hooks: list[str], widths: dict[str, int], chunk_rows: list[int], window_chunks: int,
                 read_chunks: ChunkReader):
        if window_chunks < 1:
            raise ValueError(f"window_chunks must be at least 1, got {window_chunks}")
        self.hooks, self.widths, self.chunk_rows = list(hooks), dict(widths), list(chunk_rows)
        self.window_chunks, self.read_chunks = window_chunks, read_chunks
        self.peak_buffer_rows = 0  # the most activation rows held at once by any batches() so far

    @property
    def n_tokens(self) -> int:
        return sum(self.chunk_rows)

    @property
    def buffer_rows(self) -> int:
        """The most activation rows the buffer holds (M chunks of the largest size)."""
        return self.window_chunks * max(self.chunk_rows, default=0)

    def d_in(self, hook: str) -> int:
        if hook not in self.widths:
            raise ValueError(f"hook {hook!r} is not streamed; the stream has {', '.join(self.hooks)}")
        return self.widths[hook]

    def schedule(self, seed: int, part: tuple[int, int] = (0, 1)) -> RoundSchedule:
        rank, world = _check_part(part)
        ids = list(range(rank, len(self.chunk_rows), world))
        return RoundSchedule(ids, [self.chunk_rows[c] for c in ids], self.window_chunks, seed, (rank, world))

    def steps_available(self, batch_size: int, world_size: int = 1) -> int:
        """Global batches of `batch_size` the stream holds when split over `world_size` processes (the fewest
        any process can make: every process takes the same number of steps)."""
        local = _local_batch_size(batch_size, world_size)
        return min(self.schedule(0, (rank, world_size)).n_rows // local for rank in range(world_size))

    def batches(self, hooks: list[str], batch_size: int, seed: int, start_batch: int = 0,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
        """fp32 batches {hook: [batch_size // world_size, d_in]} from batch `start_batch` on; re-reads only the
        (at most window_chunks) chunks batch `start_batch` needs. Raises StreamExhaustedError past the end."""
        for hook in hooks:
            self.d_in(hook)
        rank, world = _check_part(part)
        size = _local_batch_size(batch_size, world)
        plan = self.schedule(seed, (rank, world))
        total = plan.n_rows // size
        if total == 0:
            raise ValueError(f"batch size {batch_size} is larger than the {self.n_tokens} streamed tokens")
        if start_batch < 0:
            raise ValueError(f"start_batch must be at least 0, got {start_batch}")
        return self._batches(plan, hooks, size, start_batch, total, batch_size)

    def _batches(self, plan: RoundSchedule, hooks: list[str], size: int, start_batch: int, total: int,
                 batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        if start_batch >= total:  # raised when a batch is asked for: a run resumed at its last step asks none
            raise StreamExhaustedError(self._exhausted(start_batch, total, batch_size))
        first_row = start_batch * size
        first_round = plan.round_of_row(first_row)
        first_local = max(0, first_round - plan.window + 1)
        reader = self.read_chunks(plan.chunk_ids[first_local:], hooks)
        held: dict[int, dict[str, torch.Tensor]] = {}
        next_local = first_local
        batch, fill, index = self._empty(hooks, size), 0, start_batch
        for r in range(first_round, plan.n_rounds):
            while next_local <= min(r, len(plan.chunk_rows) - 1):
                chunk_id, tensors = next(reader)
                if chunk_id != plan.chunk_ids[next_local]:
                    raise RuntimeError(f"the chunk reader gave chunk {chunk_id}, expected {plan.chunk_ids[next_local]}")
                held[next_local] = tensors
                next_local += 1
            self.peak_buffer_rows = max(self.peak_buffer_rows, sum(plan.chunk_rows[local] for local in held))
            slots, rows = plan.round_rows(r)
            position = first_row - plan.round_starts[r] if r == first_round else 0
            while position < slots.shape[0]:
                take = min(size - fill, slots.shape[0] - position)
                _gather(batch, fill, held, slots[position : position + take], rows[position : position + take])
                fill, position = fill + take, position + take
                if fill == size:
                    yield batch
                    index += 1
                    if index == total:
                        raise StreamExhaustedError(self._exhausted(index, total, batch_size))
                    batch, fill = self._empty(hooks, size), 0
            held.pop(r - plan.window + 1, None)  # its last part was emitted in this round
        raise StreamExhaustedError(self._exhausted(index, total, batch_size))

    def _empty(self, hooks: list[str], size: int) -> dict[str, torch.Tensor]:
        return {hook: torch.empty(size, self.widths[hook], dtype=torch.float32) for hook in hooks}

    def _exhausted(self, index: int, total: int, batch_size: int) -> str:
        return (f"batch {index} was asked of a stream of {total} batches of {batch_size} (streaming uses each "
                "token once: train for at most that many steps, or harvest to disk to train several epochs)")


def _gather(batch: dict[str, torch.Tensor], fill: int, held: dict[int, dict[str, torch.Tensor]],
            slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy the rows (slot, row) into batch[fill : fill + len(rows)] as fp32."""
    for slot in torch.unique(slots).tolist():
        where = (slots == slot).nonzero().squeeze(1)
        for hook, out in batch.items():
            out[fill + where] = held[slot][hook][rows[where]].float()


def _check_part(part: tuple[int, int]) -> tuple[int, int]:
    rank, world = (int(value) for value in part)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"part must be (rank, world_size) with 0 <= rank < world_size, got {tuple(part)}")
    return rank, world


def _local_batch_size(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes; give a "
                         f"multiple of {world_size}")
    return batch_size // world_size
