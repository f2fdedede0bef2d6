"""Data parallelism on PyTorch's own distributed engine (torch.distributed), for harvest and training.

`torchrun --nproc_per_node=N ...` starts N processes and sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `Distributed.from_environment` joins them into one
process group (gloo on CPU, nccl on CUDA, chosen from the device). Without those variables it is a
world of one, whose collectives return their input: a single process runs the same code.

Training splits every global batch of B rows into W contiguous shares of B / W rows, one per rank
(rank r takes rows [r B/W, (r+1) B/W)), so that gathering the shares in rank order gives back the
batch a single process would have seen. The training loop (sae/training/loop.py) uses the
collectives below to make every batch-level statistic (the outlier median, the activation scale,
dead-feature counts, BatchTopK's selection, AuxK's normaliser) that of the global batch; gradients are
summed over ranks, each rank's loss weighted by its share of the batch's rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(ValueError):
    """The process group cannot be formed as asked (a user mistake: say what to change)."""


def environment_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun); DistributedSetupError if it is not a positive int."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise DistributedSetupError(f"WORLD_SIZE={value!r} is not a positive integer; launch with torchrun "
                                    "--nproc_per_node=N (which sets it) or unset it")
    return size


@dataclass
class Distributed:
    """This process's place in a data-parallel run; the default is a world of one (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @classmethod
    def from_environment(cls, device: str | torch.device = "cpu") -> "Distributed":
        """Join the process group torchrun describes (or a world of one without torchrun)."""
        world_size = environment_world_size()
        if world_size == 1:
            return cls()
        missing = [name for name in ENVIRONMENT if name not in os.environ]
        if missing:
            raise DistributedSetupError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with "
                                        "torchrun, which sets all of them")
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        local_rank = int(os.environ["LOCAL_RANK"])
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), backend=backend)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world_size): the `part` a BatchSource serves this process."""
        return self.rank, self.world_size

    def device(self, requested: str | torch.device) -> torch.device:
        """The device this rank uses: cuda:LOCAL_RANK when CUDA was asked for in a multi-process run."""
        requested = torch.device(requested)
        if self.active and requested.type == "cuda" and requested.index is None:
            return torch.device("cuda", self.local_rank)
        return requested

    # --- collectives (identities in a world of one) ------------------------------------------------------
    # nccl moves CUDA tensors only and gloo CPU tensors; each collective takes its input to that device
    # (`wire`) and gives the result back on the input's device.

    @property
    def wire(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _reduce_(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.active:
            sent = tensor.to(self.wire)
            dist.all_reduce(sent, op=op)
            if sent is not tensor:
                tensor.copy_(sent)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        return self._reduce_(tensor, dist.ReduceOp.SUM)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce_(tensor, dist.ReduceOp.MAX)

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce_(tensor, dist.ReduceOp.MIN)

    def total(self, count: int) -> int:
        """An integer summed over ranks."""
        return int(self.sum_(torch.tensor([count], dtype=torch.int64))[0]) if self.active else count

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows [n_r, ...] concatenated in rank order (n_r may differ between ranks)."""
        if not self.active:
            return tensor
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.wire) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.int64, device=self.wire))
        counts = [int(size[0]) for size in sizes]
        padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=self.wire)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(tensor.device)

    def sum_gradients_(self, parameters) -> None:
        """Sum every parameter's gradient over ranks (one collective: the gradients are flattened into one buffer).
        A parameter without a gradient counts as zero, so every rank takes part with the same buffer."""
        if not self.active:
            return
        parameters = list(parameters)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
        self._reduce_(flat, dist.ReduceOp.SUM)
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            parameter.grad = flat[offset : offset + size].view_as(parameter).clone()
            offset += size

    def same_everywhere(self, value: int, what: str) -> None:
        """ValueError on every rank unless `value` is the same on all ranks (e.g. a resumed step)."""
        if not self.active:
            return
        low = self.min_(torch.tensor([value], dtype=torch.int64))
        high = self.max_(torch.tensor([value], dtype=torch.int64))
        if int(low[0]) != int(high[0]):
            raise ValueError(f"the ranks disagree on {what} ({int(low[0])} to {int(high[0])}); every rank must "
                             "see the same folder: use a shared file system, or rerun to start over")

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def share_rows(batch_size: int, part: tuple[int, int]) -> slice:
    """The rows of a global batch that rank `part[0]` of `part[1]` trains on (a contiguous slice)."""
    rank, world_size = part
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"part must be (rank, world_size) with 0 <= rank < world_size, got {part}")
    if batch_size % world_size:
        raise ValueError(f"the batch size {batch_size} does not divide among {world_size} processes; use a batch "
                         f"size that is a multiple of {world_size}")
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)
