"""Harvesting activations at several hook points in one pass, into an on-disk store of shards.

One forward pass per batch of contexts collects every requested hook point and stops after the
deepest one (`stop_at_layer`), so harvesting layer L of N costs about (L+1)/N of a full forward.
Shards are safetensors files `shard_NNNNN.safetensors` holding `{hook: [tokens, d_in]}`; `manifest.json`
records the model, hooks, widths, dtype, and which contexts each shard holds. A shard is written
under a temporary name and renamed, then the manifest is rewritten the same way, so a kill or a full
disk leaves the store at its last complete shard; harvesting again with the same settings resumes.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sae.assets import atomic_write_text
from sae.batches import epoch_permutation
from sae.config import layer_of_hook

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MANIFEST = "manifest.json"


class StoreError(ValueError):
    """The activation store is missing, inconsistent, or does not match the request."""


def validate_hooks(model, hooks: list[str]) -> None:
    """Every hook must be a hook point of `model`; unknown ones are named with close valid names."""
    valid = list(model.hook_dict.keys())
    for hook in hooks:
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, valid, n=5, cutoff=0.6)
            hint = f"; close valid names: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown hook point {hook!r} for this model{hint} "
                             f"(the model has {model.cfg.n_layers} blocks, 0..{model.cfg.n_layers - 1})")


def stop_layer_for(hooks: list[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that still computes every hook (None: a hook past the blocks needs all)."""
    layers = [layer_of_hook(hook) for hook in hooks]
    if any(layer is None for layer in layers):
        return None
    deepest = max(layers)
    return deepest + 1 if deepest + 1 < n_layers else None


def collect_activations(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """{hook: [batch, pos, d]} for one batch of token ids, stopping after the deepest hook."""
    stop = stop_layer_for(hooks, model.cfg.n_layers)
    _, cache = model.run_with_cache(tokens, names_filter=list(hooks), stop_at_layer=stop)
    return {hook: cache[hook] for hook in hooks}


def _manifest_settings(model_name: str, hooks: list[str], dtype: str, context_size: int, exclude_bos: bool) -> dict:
    return {"model": model_name, "hooks": list(hooks), "dtype": dtype, "context_size": context_size,
            "exclude_bos": exclude_bos}


def harvest_activations(
    model,
    contexts: torch.Tensor,
    hooks: list[str],
    out_dir: str | Path,
    dtype: str = "float16",
    batch_size: int = 16,
    exclude_bos: bool = True,
    contexts_per_shard: int = 256,
    model_name: str = "",
    metadata: dict | None = None,
    progress: bool = True,
) -> "ActivationStore":
    """Run `model` over `contexts` [n, ctx] and store activations at `hooks` (resumes a partial store)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    validate_hooks(model, hooks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _manifest_settings(model_name, hooks, dtype, contexts.shape[1], exclude_bos)
    if _complete_superset(out_dir, settings, contexts.shape[0], metadata):
        return ActivationStore(out_dir)
    manifest = _load_or_start_manifest(out_dir, settings, contexts.shape[0], metadata)
    done = sum(shard["n_contexts"] for shard in manifest["shards"])
    total = contexts.shape[0]
    bar = tqdm(total=total, initial=done, desc="harvest", unit="ctx", disable=not progress)
    device = next(model.parameters()).device
    with torch.inference_mode():
        while done < total:
            block = contexts[done : done + contexts_per_shard]
            pieces: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
            for start in range(0, block.shape[0], batch_size):
                batch = block[start : start + batch_size].to(device)
                for hook, value in collect_activations(model, batch, hooks).items():
                    value = value[:, 1:] if exclude_bos else value
                    pieces[hook].append(value.reshape(-1, value.shape[-1]).to("cpu", DTYPES[dtype]))
                bar.update(batch.shape[0])
            shard = {hook: torch.cat(parts).contiguous() for hook, parts in pieces.items()}
            _write_shard(out_dir, manifest, shard, done, block.shape[0])
            done += block.shape[0]
    bar.close()
    manifest["complete"] = True
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))
    return ActivationStore(out_dir)


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


def _load_or_start_manifest(out_dir: Path, settings: dict, n_contexts: int, metadata: dict | None) -> dict:
    path = out_dir / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        existing = {key: manifest.get(key) for key in settings}
        if existing != settings:
            raise StoreError(f"{out_dir} already holds a store made with {existing}, not {settings}; "
                             "use another folder or delete it")
        manifest["n_contexts_requested"] = n_contexts
        manifest["complete"] = False
        for stray in out_dir.glob(".shard_*"):  # leftovers of an interrupted write
            stray.unlink()
        return manifest
    return {**settings, "d_in": {}, "shards": [], "complete": False, "n_contexts_requested": n_contexts,
            "metadata": metadata or {}}


def _write_shard(out_dir: Path, manifest: dict, shard: dict[str, torch.Tensor], first_context: int, n_contexts: int) -> None:
    name = f"shard_{len(manifest['shards']):05d}.safetensors"
    temp = out_dir / f".{name}.tmp"
    save_file(shard, str(temp))
    os.replace(temp, out_dir / name)
    manifest["d_in"] = {hook: int(value.shape[1]) for hook, value in shard.items()}
    n_tokens = int(next(iter(shard.values())).shape[0])
    manifest["shards"].append({"file": name, "n_tokens": n_tokens, "first_context": first_context,
                               "n_contexts": n_contexts})
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))


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
                return {hook: handle.get_tensor(hook) for hook in hooks}
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise StoreError(f"shard {path} is unreadable ({error}); delete the store and harvest again") from error

    def _shards_per_block(self, hooks: list[str]) -> int:
        bytes_per_token = sum(self.d_in(hook) for hook in hooks) * torch.finfo(DTYPES[self.manifest["dtype"]]).bits // 8
        tokens_per_shard = max(shard["n_tokens"] for shard in self.shards)
        return max(1, min(len(self.shards), self.memory_budget_bytes // max(1, bytes_per_token * tokens_per_shard)))

    def batches(self, hooks: list[str], batch_size: int, seed: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless fp32 batches; each epoch shuffles shard order, then tokens within blocks of shards
        that fit the memory budget (the whole store when it fits: a full shuffle). Deterministic."""
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
                    yield {hook: cached[1][hook][rows].float() for hook in hooks}
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
