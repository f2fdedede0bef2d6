"""The on-disk activation store: shards of activations at hook points, written and read back.

Harvesting (running a model) lives in circuits.harvest; this module only knows tensors at hooks.
Shards are safetensors files `shard_NNNNN.safetensors` holding `{hook: [tokens, d_in]}`; `manifest.json`
records the model, hooks, widths, dtype, and which contexts each shard holds. A shard is written
under a temporary name and renamed, then the manifest is rewritten the same way, so a kill or a full
disk leaves the store at its last complete shard; harvesting again with the same settings resumes.

Shard N always holds contexts [N c, (N+1) c) (c contexts per shard), whoever wrote it: the processes of a
data-parallel harvest write disjoint shards into one store, each recording its shards in the one manifest
under an exclusive lock (`.manifest.lock`), so the store is the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae.assets import atomic_write_text
from sae.batches import epoch_permutation
from sae.distributed import share_rows
from sae.finite import check_finite_rows

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MANIFEST = "manifest.json"


class StoreError(ValueError):
    """The activation store is missing, inconsistent, or does not match the request."""


class StoreWriter:
    """Appends shards to a store folder, resuming a partial store written with the same settings.

    `settings` (model, hooks, dtype, context size, BOS handling, ...) are what must match for a
    store to be resumed or reused; `metadata` (corpus, seed, ...) must match too for reuse.
    """

    def __init__(self, out_dir: str | Path, settings: dict, n_contexts: int, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.settings, self.n_contexts, self.metadata = settings, n_contexts, metadata
        self.manifest: dict | None = None

    def complete_superset(self) -> bool:
        """Whether the folder already holds a complete harvest of these contexts with these settings,
        at these hooks and maybe more (a store harvested for several hooks serves any of them)."""
        return _complete_superset(self.out_dir, self.settings, self.n_contexts, self.metadata)

    def start(self, *, first_writer: bool = True) -> set[int]:
        """Open (or resume) the store; returns the first contexts of the shards already harvested.

        The first writer (the only one, or rank 0 of a data-parallel harvest, before the others) checks an
        existing manifest against the request, removes half-written shards and writes the manifest; the
        others read it."""
        with _manifest_lock(self.out_dir):
            if first_writer:
                self.manifest = _load_or_start_manifest(self.out_dir, self.settings, self.n_contexts, self.metadata)
                atomic_write_text(self.out_dir / MANIFEST, json.dumps(self.manifest, indent=2))
            else:
                self.manifest = json.loads((self.out_dir / MANIFEST).read_text())
        return {int(shard["first_context"]) for shard in self.manifest["shards"]}

    def write(self, shard: dict[str, torch.Tensor], first_context: int, n_contexts: int, index: int | None = None) -> None:
        """Write shard number `index` {hook: [tokens, d]} atomically, then record it in the manifest."""
        self.manifest = _write_shard(self.out_dir, shard, first_context, n_contexts, index)

    def finish(self) -> "ActivationStore":
        """Mark the store complete (StoreError if some contexts were never harvested)."""
        with _manifest_lock(self.out_dir):
            manifest = json.loads((self.out_dir / MANIFEST).read_text())
            harvested = sum(shard["n_contexts"] for shard in manifest["shards"])
            if harvested != self.n_contexts:
                raise StoreError(f"{self.out_dir} holds {harvested} of {self.n_contexts} contexts after the harvest; "
                                 "harvest again with the same command to fill in the rest")
            manifest["complete"] = True
            atomic_write_text(self.out_dir / MANIFEST, json.dumps(manifest, indent=2))
        self.manifest = manifest
        return ActivationStore(self.out_dir)


def store_settings(model_name: str, hooks: list[str], dtype: str, context_size: int, exclude_bos: bool) -> dict:
    """The settings a store records and checks on resume."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {"model": model_name, "hooks": list(hooks), "dtype": dtype, "context_size": context_size,
            "exclude_bos": exclude_bos}


def _complete_superset(out_dir: Path, settings: dict, n_contexts: int, metadata: dict | None) -> bool:
    """Whether `out_dir` already holds a complete harvest of the same contexts with the same settings
    at these hooks and maybe more (a store harvested for several hooks serves any of them)."""
    path = out_dir / MANIFEST
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    same = all(manifest.get(key) == value for key, value in settings.items() if key != "hooks")
    covers = set(settings["hooks"]) <= set(manifest.get("hooks", [])) and settings["hooks"] != manifest.get("hooks")
    harvested = sum(shard["n_contexts"] for shard in manifest.get("shards", []))
    same_text = metadata is None or manifest.get("metadata") == json.loads(json.dumps(metadata))
    return bool(manifest.get("complete")) and same and covers and harvested == n_contexts and same_text


def _differences(manifest: dict, settings: dict, n_contexts: int, metadata: dict | None) -> list[str]:
    """What an existing store was made with that differs from this request ("context count 620, not 310")."""
    wanted = {**settings, "n_contexts_requested": n_contexts}
    if metadata is not None:
        wanted["metadata"] = json.loads(json.dumps(metadata))
    names = {"n_contexts_requested": "context count (from --tokens)", "metadata": "corpus and seed"}
    return [f"{names.get(key, key)} {manifest.get(key)!r}, not {value!r}" for key, value in wanted.items()
            if manifest.get(key) != value]


def _load_or_start_manifest(out_dir: Path, settings: dict, n_contexts: int, metadata: dict | None) -> dict:
    """Resume the store's manifest when it was made for exactly this request, else refuse (StoreError).

    The context count and the corpus/seed are part of the request: a store of 40k tokens never silently
    serves a request for 20k (training sizes itself from the store), nor is extended with other text."""
    for stray in out_dir.glob(".shard_*"):  # leftovers of an interrupted write
        stray.unlink()
    path = out_dir / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        differences = _differences(manifest, settings, n_contexts, metadata)
        if differences:
            raise StoreError(f"{out_dir} already holds an activation store made with other settings: "
                             f"{'; '.join(differences)}. Use another folder (--out or --activations), or delete "
                             "it to harvest again")
        manifest["complete"] = False
        return manifest
    return {**settings, "d_in": {}, "shards": [], "complete": False, "n_contexts_requested": n_contexts,
            "metadata": metadata or {}}


@contextlib.contextmanager
def _manifest_lock(out_dir: Path):
    """An exclusive lock on the store's manifest, held while it is read and rewritten."""
    with open(out_dir / ".manifest.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_shard(out_dir: Path, shard: dict[str, torch.Tensor], first_context: int, n_contexts: int,
                 index: int | None) -> dict:
    """Write a shard file, then add it to the manifest on disk (kept in context order); returns the manifest."""
    with _manifest_lock(out_dir):
        manifest = json.loads((out_dir / MANIFEST).read_text())
    name = f"shard_{len(manifest['shards']) if index is None else index:05d}.safetensors"
    temp = out_dir / f".{name}.tmp"
    save_file(shard, str(temp))
    os.replace(temp, out_dir / name)
    n_tokens = int(next(iter(shard.values())).shape[0])
    with _manifest_lock(out_dir):
        manifest = json.loads((out_dir / MANIFEST).read_text())
        manifest["d_in"] = {hook: int(value.shape[1]) for hook, value in shard.items()}
        manifest["shards"] = sorted([*[entry for entry in manifest["shards"] if entry["file"] != name],
                                     {"file": name, "n_tokens": n_tokens, "first_context": first_context,
                                      "n_contexts": n_contexts}], key=lambda entry: entry["first_context"])
        atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


class ActivationStore:
    """A harvested store, read back for training: a `BatchSource` (see sae/batches.py)."""

    def __init__(self, folder: str | Path, memory_budget_bytes: int = 8 << 30):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.exists():
            raise StoreError(f"{self.folder} is not an activation store (no {MANIFEST}); harvest first")
        self.manifest = json.loads(path.read_text())
        self.shards = self.manifest["shards"]
        if not self.shards:
            raise StoreError(f"{self.folder} holds no complete shard yet")
        self.hooks = list(self.manifest["hooks"])
        self.memory_budget_bytes = memory_budget_bytes

    @property
    def n_tokens(self) -> int:
        return sum(shard["n_tokens"] for shard in self.shards)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def d_in(self, hook: str) -> int:
        if hook not in self.manifest["d_in"]:
            raise StoreError(f"hook {hook!r} is not in the store at {self.folder}; it holds {', '.join(self.hooks)}")
        return int(self.manifest["d_in"][hook])

    def read_shard(self, index: int, hooks: list[str]) -> dict[str, torch.Tensor]:
        path = self.folder / self.shards[index]["file"]
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors = {hook: handle.get_tensor(hook) for hook in hooks}
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise StoreError(f"shard {path} is unreadable ({error}); delete the store and harvest again") from error
        for hook, tensor in tensors.items():  # NonFiniteError: never train on NaN rows
            check_finite_rows(tensor, f"shard {path}, hook '{hook}'")
        return tensors

    def _shards_per_block(self, hooks: list[str]) -> int:
        bytes_per_token = sum(self.d_in(hook) for hook in hooks) * torch.finfo(DTYPES[self.manifest["dtype"]]).bits // 8
        tokens_per_shard = max(shard["n_tokens"] for shard in self.shards)
        return max(1, min(len(self.shards), self.memory_budget_bytes // max(1, bytes_per_token * tokens_per_shard)))

    def batches(self, hooks: list[str], batch_size: int, seed: int, start_batch: int = 0,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
        """Endless fp32 batches; each epoch shuffles shard order, then tokens within blocks of shards
        that fit the memory budget (the whole store when it fits: a full shuffle). Deterministic.
        `part`: this process's share of each batch (sae.batches.BatchSource)."""
        share = share_rows(batch_size, part)
        for hook in hooks:
            self.d_in(hook)
        per_block = self._shards_per_block(hooks)
        plan = self._epoch_plan(per_block, batch_size, seed)
        per_epoch = sum(len(batches) for _, batches in plan(0))
        if per_epoch == 0:
            raise StoreError(f"batch size {batch_size} exceeds the tokens in one block of the store")
        epoch, skip = divmod(start_batch, per_epoch)
        cached: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None
        while True:
            for shard_ids, batch_rows in plan(epoch):
                if skip >= len(batch_rows):
                    skip -= len(batch_rows)
                    continue
                if cached is None or cached[0] != shard_ids:
                    parts = [self.read_shard(index, hooks) for index in shard_ids]
                    cached = (shard_ids, {hook: torch.cat([part[hook] for part in parts]) for hook in hooks})
                for rows in batch_rows[skip:]:
                    yield {hook: cached[1][hook][rows[share]].float() for hook in hooks}
                skip = 0
            epoch += 1

    def _epoch_plan(self, per_block: int, batch_size: int, seed: int):
        sizes = [shard["n_tokens"] for shard in self.shards]

        def plan(epoch: int) -> list[tuple[tuple[int, ...], list[torch.Tensor]]]:
            order = epoch_permutation(len(sizes), seed, epoch).tolist()
            blocks = []
            for start in range(0, len(order), per_block):
                shard_ids = tuple(order[start : start + per_block])
                n_tokens = sum(sizes[index] for index in shard_ids)
                rows = epoch_permutation(n_tokens, seed + 7919 * (start + 1), epoch)
                batch_rows = [rows[i : i + batch_size] for i in range(0, n_tokens - batch_size + 1, batch_size)]
                blocks.append((shard_ids, batch_rows))
            return blocks

        return plan
