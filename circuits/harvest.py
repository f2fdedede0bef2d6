"""Harvesting activations at several hook points in one pass, into an activation store (sae).

One forward pass per batch of contexts collects every requested hook point and stops after the
deepest one (`stop_at_layer`), so harvesting layer L of N costs about (L+1)/N of a full forward.
Shards are written through `sae.activation_store.StoreWriter`: a kill or a full disk leaves the store
at its last complete shard, and harvesting again with the same settings resumes. In a data-parallel run
(sae/distributed.py, under torchrun) rank r of W harvests the shards N with N % W == r into the one store.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from sae.progress import progress_bar

from circuits.hooks import stop_layer, validate_hooks
from sae.activation_store import DTYPES, ActivationStore, StoreError, StoreWriter, store_settings
from sae.distributed import Distributed
from sae.finite import check_finite_rows
from sae.locking import folder_lock


def collect_activations(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """{hook: [batch, pos, d]} for one batch of token ids, stopping after the deepest hook."""
    _, cache = model.run_with_cache(tokens, names_filter=list(hooks), stop_at_layer=stop_layer(hooks, model.cfg.n_layers))
    return {hook: cache[hook] for hook in hooks}


def harvest_activations(model, contexts: torch.Tensor, hooks: list[str], out_dir: str | Path, dtype: str = "float16",
                        *, batch_size: int = 16, exclude_bos: bool = True, contexts_per_shard: int = 256,
                        model_name: str = "", metadata: dict | None = None, progress: bool = True,
                        distributed: Distributed | None = None) -> ActivationStore:
    """Run `model` over `contexts` [n, ctx] and store activations at `hooks` (resumes a partial store).

    The store folder is locked while harvesting (sae.locking): a second harvest into it is refused. With
    `distributed`, every rank calls this with the same arguments and harvests its own shards (rank 0 holds the
    lock); the store is the one a single process would write."""
    distributed = distributed or Distributed()
    settings = store_settings(model_name, hooks, dtype, contexts.shape[1], exclude_bos)
    validate_hooks(model, hooks)
    with folder_lock(out_dir) if distributed.is_main else contextlib.nullcontext():
        store = _harvest_in_locked_folder(model, contexts, hooks, out_dir, dtype, settings=settings,
                                          batch_size=batch_size, exclude_bos=exclude_bos,
                                          contexts_per_shard=contexts_per_shard, metadata=metadata,
                                          progress=progress and distributed.is_main, distributed=distributed)
    distributed.barrier()  # rank 0 has marked the store complete
    return store if store is not None else ActivationStore(out_dir)


def check_storable(value: torch.Tensor, stored: torch.Tensor, dtype: str, where: str) -> None:
    """StoreError when finite activations became infinite in the store's dtype (float16 ends at 65,504;
    Gemma-3's residual stream goes past it), naming the largest value and the dtypes that hold it."""
    if dtype != "float16" or bool(torch.isfinite(stored).all()) or not bool(torch.isfinite(value).all()):
        return
    largest = float(value.abs().max())
    raise StoreError(f"{where}: activations reach {largest:,.0f}, beyond float16's largest value 65,504, so the "
                     "store cannot hold them; harvest with --store-dtype bfloat16 (float32's range, half the "
                     "disk) or float32 (no shard of them was written)")


def _harvest_in_locked_folder(model, contexts: torch.Tensor, hooks: list[str], out_dir: str | Path, dtype: str, *,
                              settings: dict, batch_size: int, exclude_bos: bool, contexts_per_shard: int,
                              metadata: dict | None, progress: bool, distributed: Distributed
                              ) -> ActivationStore | None:
    writer = StoreWriter(out_dir, settings, contexts.shape[0], metadata)
    if writer.complete_superset():
        return ActivationStore(out_dir)
    if distributed.is_main:
        writer.start()
    distributed.barrier()
    harvested = writer.start(first_writer=False)
    total = contexts.shape[0]
    firsts = [first for first in range(0, total, contexts_per_shard)
              if first not in harvested and (first // contexts_per_shard) % distributed.world_size == distributed.rank]
    mine = sum(min(contexts_per_shard, total - first) for first in firsts)
    device = next(model.parameters()).device
    where = f" (rank {distributed.rank} of {distributed.world_size})" if distributed.active else ""
    with progress_bar(total=mine, desc=f"harvest{where}", unit="ctx", enabled=progress) as bar, torch.inference_mode():
        for done in firsts:
            block = contexts[done : done + contexts_per_shard]
            pieces: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
            for start in range(0, block.shape[0], batch_size):
                batch = block[start : start + batch_size].to(device)
                for hook, value in collect_activations(model, batch, hooks).items():
                    value = value[:, 1:] if exclude_bos else value
                    stored = value.reshape(-1, value.shape[-1]).to("cpu", DTYPES[dtype])
                    first = done + start  # checked as stored: float16 can overflow to inf
                    where = f"harvesting contexts {first}-{first + batch.shape[0] - 1} of {total}, hook '{hook}'"
                    check_storable(value, stored, dtype, where)
                    check_finite_rows(stored, f"{where} (no shard of them was written)")
                    pieces[hook].append(stored)
                bar.update(batch.shape[0])
            writer.write({hook: torch.cat(parts).contiguous() for hook, parts in pieces.items()}, done, block.shape[0],
                         index=done // contexts_per_shard)
    distributed.barrier()  # every rank's shards are in the manifest
    return writer.finish() if distributed.is_main else None
