"""Replay from a layer: run edited activations through the later blocks only, from a cached prefix.

During one full forward, the inputs each block from `start_block` on receives (attention mask,
rotary embeddings, position ids, ...) are recorded. An edited activation at the hook just before
`start_block` is then run through those blocks with the recorded inputs, so the prefix is never
recomputed. (The bridge's own `start_at_layer` still executes every block below the start and
discards it.) `reproduces` checks the replay against the full forward's logits; callers fall back to
a full forward with a replacing hook where it does not (an architecture whose blocks cannot be
replayed, or a hook that is not on the residual stream).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from circuits.hooks import resume_block

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")
REPLAY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


def map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply `fn` to every tensor inside nested tuples, lists and dicts (other values pass through)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(item, fn) for item in value)
    if isinstance(value, list):
        return [map_tensors(item, fn) for item in value]
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    return value


def tile_rows(value, copies: int, rows: int):
    """Repeat every tensor whose first dimension is `rows` `copies` times (copy-major)."""
    if copies == 1:
        return value
    return map_tensors(value, lambda t: t.repeat(copies, *([1] * (t.ndim - 1)))
                       if t.ndim >= 2 and t.shape[0] == rows else t)


def take_rows(value, keep: int, rows: int):
    """The first `keep` rows of every tensor whose first dimension is `rows`."""
    return map_tensors(value, lambda t: t[:keep] if t.ndim >= 2 and t.shape[0] == rows and rows > 1 else t)


def _is_cache(key: str, value) -> bool:
    """A key/value cache passed to a block: replayed blocks must not read or grow it."""
    return key in _CACHE_KWARGS or type(value).__name__.endswith("Cache")


def _recorder(store: list, offset: int):
    def record(module, args, kwargs):
        args = tuple(None if _is_cache("", value) else value for value in args)
        kwargs = {key: (None if _is_cache(key, value) else value) for key, value in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        store[offset] = (args, kwargs)

    return record


class PrefixReplay:
    """The recorded inputs of blocks start_block.. for one batch of `rows` prompts."""

    def __init__(self, model, start_block: int, block_inputs: list, rows: int):
        self.model, self.start_block, self.block_inputs, self.rows = model, start_block, block_inputs, rows

    @staticmethod
    def start_for(model, hook: str) -> int | None:
        """The block a replay after `hook` starts at (None: not replayable, e.g. not a residual hook)."""
        start = resume_block(hook)
        return start if start is not None and start <= model.cfg.n_layers else None

    @classmethod
    def recording(cls, model, start_block: int):
        """A context manager recording block inputs during a forward; `.replay` is set on exit."""
        return _Recording(model, start_block)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run hidden [copies * rows, pos, d] (copies of this batch, copy-major) through the later blocks."""
        copies = hidden.shape[0] // self.rows
        for block, (args, kwargs) in zip(self.model.blocks[self.start_block:], self.block_inputs):
            args, kwargs = tile_rows((args, kwargs), copies, self.rows)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
            output = block(*args, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden

    def logits_at(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] at one position per row (positions [n]) after replaying hidden [n, pos, d]."""
        final = self.final_hidden(hidden)
        rows = torch.arange(final.shape[0], device=final.device)
        last = final[rows, positions.to(final.device)][:, None]  # [n, 1, d]
        return self.model.unembed(self.model.ln_final(last))[:, 0]

    def first_rows(self, keep: int) -> "PrefixReplay":
        return PrefixReplay(self.model, self.start_block,
                            [take_rows(inputs, keep, self.rows) for inputs in self.block_inputs], min(keep, self.rows))

    @torch.no_grad()
    def reproduces(self, hidden: torch.Tensor, positions: torch.Tensor, expected: torch.Tensor, where: str) -> bool:
        """Whether replaying the clean hidden [rows, pos, d] gives the full forward's logits `expected` [rows, vocab]."""
        try:
            replayed = self.logits_at(hidden, positions).cpu()
        except Exception as error:  # an architecture whose blocks cannot be replayed: fall back to hooks
            warnings.warn(f"running from {where} onward failed ({type(error).__name__}: {error}); "
                          "using full forwards with hooks instead", stacklevel=3)
            return False
        tolerance = REPLAY_TOLERANCE.get(expected.dtype, 1e-2) * max(1.0, expected.abs().max().item())
        difference = (replayed.to(expected.dtype) - expected).abs().max().item()
        if difference > tolerance:
            warnings.warn(f"running from {where} onward differs from the full forward by {difference:.2e}; "
                          "using full forwards with hooks instead", stacklevel=3)
            return False
        return True


class _Recording:
    def __init__(self, model, start_block: int):
        self.model, self.start_block = model, start_block
        self.inputs: list = [None] * (model.cfg.n_layers - start_block)
        self.handles: list = []
        self.replay: PrefixReplay | None = None

    def __enter__(self) -> "_Recording":
        for offset, block in enumerate(self.model.blocks[self.start_block:]):
            self.handles.append(block.register_forward_pre_hook(_recorder(self.inputs, offset), with_kwargs=True))
        return self

    def finish(self, rows: int) -> PrefixReplay:
        self.replay = PrefixReplay(self.model, self.start_block, self.inputs, rows)
        return self.replay

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
