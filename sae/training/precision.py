"""Mixed precision and host-to-device transfer for training (TrainingConfig.autocast, `train --autocast`).

Master weights and Adam moments stay float32; only the SAE's forward and loss run under
`torch.autocast(device, bf16 | fp16)`, so the matmuls (encoder, decoder, AuxK) run in the low precision
while the mse and the other reductions are taken in float32 (the residual x - x_hat is float32 since x
is, and sae.dictionary's sparse decode gathers in the autocast dtype). fp16 has a narrow exponent range,
so its loss is multiplied by a dynamic factor (torch.amp.GradScaler) before backward; the gradients
are unscaled before the decoder-gradient projection and the gradient clipping, and a step whose
gradients overflowed is skipped (the scaler halves its factor). The scaler's state is checkpointed
(sae/training/checkpoints.py), so a resumed fp16 run equals an uninterrupted one.

CPU autocast is bf16 only here: fp16 is for CUDA devices.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The device types fp16 autocast is allowed on (a GradScaler keeps its small exponent range usable).
FP16_DEVICE_TYPES = ("cuda",)


def check_autocast(autocast: str | None, device: torch.device) -> None:
    """ValueError naming what to change when `autocast` cannot run on `device`."""
    if autocast is None:
        return
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {autocast!r}")
    if autocast == "fp16" and device.type not in FP16_DEVICE_TYPES:
        raise ValueError(f"autocast 'fp16' needs a CUDA device, but training runs on '{device}'; CPU autocast "
                         "supports bf16 only: use autocast 'bf16' (or none) on CPU")
    if autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"autocast 'bf16' is not supported by the GPU at '{device}'; use autocast 'fp16'")


def autocast_region(autocast: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The region the SAE's forward and loss run in: torch.autocast in the requested dtype, or nothing."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[autocast])


def new_grad_scaler(autocast: str | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (one per SAE, as each has its own optimizer); None otherwise."""
    return torch.amp.GradScaler(device.type) if autocast == "fp16" else None


def scaled_loss(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """The loss to call backward on: times the scaler's factor under fp16."""
    return loss if scaler is None else scaler.scale(loss)


def unscale_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Divide the gradients by the scaler's factor, in place, before anything reads them (projection, clipping)."""
    if scaler is not None:
        scaler.unscale_(optimizer)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """optimizer.step(); under fp16 skipped when the gradients overflowed, and the scaler's factor updated."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


def to_training_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch [batch, d_in] on `device` in float32. To CUDA it is copied from page-locked memory without
    blocking the host (it can then prepare the next batch while the copy runs); on CPU only the dtype changes."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x if x.is_pinned() else x.pin_memory()
        return x.to(device, non_blocking=True).to(torch.float32)
    return x.to(device, torch.float32)
