"""A training run on fixed synthetic activations, for tests/test_distributed.py: run it as a single process
(`python tests/distributed_worker.py OUT`) or under torchrun (`python -m torch.distributed.run
--nproc_per_node=2 tests/distributed_worker.py OUT`); both must give the same weights.

The activations are sparse combinations of random directions with a few massive rows (so the outlier rule
matters), at two hooks; one SAE of each architecture trains, with resampling and AuxK active."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from sae.batches import TensorBatchSource
from sae.config import DictionaryConfig
from sae.distributed import Distributed
from sae.training import TrainingConfig, train_dictionaries

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
D_IN, D_SAE, TOKENS = 16, 256, 4096


def activations(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(64, D_IN, generator=generator)
    codes = torch.rand(TOKENS, 64, generator=generator) * (torch.rand(TOKENS, 64, generator=generator) < 0.05)
    x = codes @ directions + 0.1 * torch.randn(TOKENS, D_IN, generator=generator)
    x[::500] *= 200.0  # massive activations: left out by the outlier rule
    return x


def configs() -> list[DictionaryConfig]:
    a, b = HOOKS
    return [DictionaryConfig("standard", D_IN, D_SAE, hook_name=a, l1_coefficient=3e-3, tied=True),
            DictionaryConfig("standard", D_IN, D_SAE, hook_name=b, l1_coefficient=3e-3),
            DictionaryConfig("topk", D_IN, D_SAE, hook_name=a, k=4),
            DictionaryConfig("batchtopk", D_IN, D_SAE, hook_name=b, k=4),
            DictionaryConfig("jumprelu", D_IN, D_SAE, hook_name=a, l1_coefficient=1e-3)]


class SlowSource(TensorBatchSource):
    """Waits DISTRIBUTED_WORKER_DELAY seconds before each batch, so a test can kill a rank mid-run."""

    def batches(self, *args, **kwargs):
        for batch in super().batches(*args, **kwargs):
            time.sleep(float(os.environ.get("DISTRIBUTED_WORKER_DELAY", "0")))
            yield batch


def main(out_dir: str, stop_after_steps: int | None = None) -> None:
    torch.set_num_threads(1)
    distributed = Distributed.from_environment("cpu")
    if "DISTRIBUTED_WORKER_PIDS" in os.environ:  # where a test finds each rank's pid
        Path(os.environ["DISTRIBUTED_WORKER_PIDS"], f"rank{distributed.rank}.pid").write_text(str(os.getpid()))
    source = SlowSource({hook: activations(index) for index, hook in enumerate(HOOKS)})
    training = TrainingConfig(total_tokens=40 * 256, batch_size=256, lr=3e-3, log_every=5, checkpoint_every=10,
                              dead_window_tokens=768, resample_dead=True, resample_every=15, seed=3)
    train_dictionaries(source, configs(), training, out_dir, progress=False, stop_after_steps=stop_after_steps,
                       distributed=distributed)
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
