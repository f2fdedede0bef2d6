"""Guards of the training loop against NaN and infinity: in the activations of every batch, in every step's
loss and in every weight after the step. A NonFiniteError names the step, the SAE and the hook, and is raised
before any checkpoint or dictionary is written from that state, so the last good checkpoint is what a rerun
resumes from (sae/training/loop.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sae.dictionary import TrainingLoss
from sae.finite import NonFiniteError, check_finite_rows
from sae.training.checkpoints import Trainee, latest_checkpoint


def next_batch(batches, hooks: list[str], step: int) -> dict[str, torch.Tensor]:
    """The next batch, its activations checked for NaN and infinity (the store names a damaged shard)."""
    try:
        raw = next(batches)
    except NonFiniteError as error:
        raise NonFiniteError(f"training step {step}: {error}") from None
    for hook in hooks:
        check_finite_rows(raw[hook], f"training step {step}, the batch of activations at hook '{hook}'")
    return raw


@contextlib.contextmanager
def stopped_on_nonfinite(out_dir: Path):
    """Add to a NonFiniteError what was kept: the last good checkpoint, and that no dictionary was written."""
    try:
        yield
    except NonFiniteError as error:
        checkpoint = latest_checkpoint(out_dir)
        kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint else "no checkpoint had been written"
        raise NonFiniteError(f"{error}; training stopped, no dictionary was written and {kept}. Check the "
                             "activations and the settings (learning rate, sparsity coefficient), then rerun "
                             "(it resumes from that checkpoint) or start a new --out") from None


@torch.no_grad()
def check_finite_step(trainee: Trainee, out: TrainingLoss, step: int, lr: float) -> None:
    """NonFiniteError naming the step, SAE and hook if this step's loss or any weight after it is not finite."""
    parameters = dict(trainee.sae.named_parameters())
    flags = torch.stack([torch.isfinite(out.loss).all()] + [torch.isfinite(p).all() for p in parameters.values()])
    if bool(flags.all()):
        return
    where = f"training step {step} of '{trainee.name}' (hook '{trainee.hook}', learning rate {lr:.3g})"
    if not bool(flags[0]):
        raise NonFiniteError(f"{where}: the loss is {out.loss.item()}")
    bad = [name for name, ok in zip(parameters, flags[1:].tolist()) if not ok]
    raise NonFiniteError(f"{where}: the weights {bad} hold NaN or infinite values after the optimizer step")
