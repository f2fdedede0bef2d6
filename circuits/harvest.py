"""Harvesting activations at several hook points in one pass, into an activation store (sae).

One forward pass per batch of contexts collects every requested hook point and stops as soon as the last
of them is recorded, so harvesting layer L of N costs the embedding and L+1 blocks: no later block, no final
norm, no unembedding. Block-boundary residual hooks (`blocks.L.hook_resid_pre/post`) are read from the plain
Hugging Face modules under the bridge (circuits.direct_harvest: the same values, without the bridge's hook
machinery); any other hook runs through the bridge. `autocast` runs the forward in bf16/fp16 mixed precision.
Shards are written through `sae.activation_store.StoreWriter`: a kill or a full disk leaves the store
at its last complete shard, and harvesting again with the same settings resumes. In a data-parallel run
(sae/distributed.py, under torchrun) rank r of W harvests the shards N with N % W == r into the one store.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from sae.progress import progress_bar

from circuits.direct_harvest import collect_direct
from circuits.hooks import stop_layer, validate_hooks
from sae.activation_store import DTYPES, ActivationStore, StoreError, StoreWriter, store_settings
from sae.distributed import Distributed
from sae.finite import check_finite_rows
from sae.locking import folder_lock


AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def collect_activations(model, tokens: torch.Tensor, hooks: list[str], *, autocast: str = "off"
                        ) -> dict[str, torch.Tensor]:
    """{hook: [batch, pos, d]} for one batch of token ids, stopping once the last hook is recorded.

    autocast: "off" (the model's dtype), "bf16" or "fp16" (torch.autocast on the model's device)."""
    with autocast_context(model, autocast):
        direct = collect_direct(model, tokens, list(hooks))
        return direct if direct is not None else _collect_through_bridge(model, tokens, list(hooks))


def autocast_context(model, autocast: str = "off"):
    """torch.autocast for `model`'s device in the named dtype; a no-op context for "off"."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast {autocast!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
    if AUTOCAST_DTYPES[autocast] is None:
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    if device_type == "cuda" and autocast == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("autocast bf16: this GPU has no bfloat16 support; use fp16 or off")
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[autocast])


def _collect_through_bridge(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """The bridge's hook points, stopping (StopAtLayerException, which the bridge's forward catches) once every
    hook is recorded; run_with_cache with stop_at_layer ran the final norm and unembedding for a hook in the last
    block."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    captured: dict[str, torch.Tensor] = {}
    wanted = set(hooks)

    def record(value, hook, name):
        captured[name] = (value[0] if isinstance(value, tuple) else value).detach()
        if wanted.issubset(captured):
            raise StopAtLayerException(captured[name])
        return value

    fwd_hooks = [(name, functools.partial(record, name=name)) for name in wanted]
    model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=stop_layer(hooks, model.cfg.n_layers))
    missing = wanted.difference(captured)
    if missing:
        raise ValueError(f"hook point(s) {', '.join(sorted(missing))} did not fire in the forward pass of this model")
    return {hook: captured[hook] for hook in hooks}


def host_copies(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of activations: from CUDA into pinned memory with non-blocking copies and one synchronisation
    for them all (the transfer overlaps the other copies); CPU tensors are returned as they are."""
    if not any(value.is_cuda for value in values.values()):
        return values
    copies = {}
    for hook, value in values.items():
        copies[hook] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        copies[hook].copy_(value, non_blocking=True)
    torch.cuda.current_stream(next(iter(values.values())).device).synchronize()
    return copies


def harvest_activations(model, contexts: torch.Tensor, hooks: list[str], out_dir: str | Path, dtype: str = "float16",
                        *, batch_size: int = 16, exclude_bos: bool = True, contexts_per_shard: int = 256,
                        model_name: str = "", metadata: dict | None = None, progress: bool = True,
                        autocast: str = "off", distributed: Distributed | None = None) -> ActivationStore:
    """Run `model` over `contexts` [n, ctx] and store activations at `hooks` (resumes a partial store).

    The store folder is locked while harvesting (sae.locking): a second harvest into it is refused. `autocast`
    ("off", "bf16", "fp16") runs the model's forward in mixed precision (collect_activations). With
    `distributed`, every rank calls this with the same arguments and harvests its own shards (rank 0 holds the
    lock); the store is the one a single process would write."""
    distributed = distributed or Distributed()
    settings = store_settings(model_name, hooks, dtype, contexts.shape[1], exclude_bos)
    validate_hooks(model, hooks)
    autocast_context(model, autocast)  # an unknown autocast name fails here, before the folder is touched
    with folder_lock(out_dir) if distributed.is_main else contextlib.nullcontext():
        store = _harvest_in_locked_folder(model, contexts, hooks, out_dir, dtype, settings=settings,
                                          batch_size=batch_size, exclude_bos=exclude_bos,
                                          contexts_per_shard=contexts_per_shard, metadata=metadata,
                                          progress=progress and distributed.is_main, distributed=distributed,
                                          autocast=autocast)
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
                              metadata: dict | None, progress: bool, distributed: Distributed, autocast: str = "off"
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
                for hook, value in host_copies(collect_activations(model, batch, hooks, autocast=autocast)).items():
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
