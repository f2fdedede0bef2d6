"""Checkpoints of a training run: parameters, buffers, Adam moments, dead-feature counters, logs and the fp16
loss scaler's state, in safetensors and JSON, written atomically; the last two are kept. A resumed run equals an
uninterrupted one bit for bit, since batch i of the source is the same whichever step started."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae import io as dictionary_io
from sae.assets import atomic_write_text
from sae.config import DictionaryConfig
from sae.dictionary import SparseAutoencoder
from sae.training.config import TrainingConfig

CHECKPOINT_FOLDER = "checkpoints"
CHECKPOINTS_KEPT = 2


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


@dataclass
class Trainee:
    """One SAE being trained, with its optimizer and bookkeeping."""

    name: str
    hook: str
    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    tokens_since_fired: torch.Tensor  # [d_sae] int64
    log_rows: list[dict[str, float]] = field(default_factory=list)
    log_sparsity_factor: float = 0.0  # the L0 controller's state (sae.training.control); 0: coefficient as set
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast's loss scaler (sae.training.precision); else None


def run_fingerprint(names: list[str], configs: list[DictionaryConfig], training: TrainingConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: everything that shapes the trajectory."""
    settings = dataclasses.asdict(training)
    for key in ("checkpoint_every", "log_every"):
        settings.pop(key)
    if settings.get("autocast") is None:  # float32 runs: the same fingerprint as before the setting existed
        settings.pop("autocast", None)
    return json.loads(json.dumps({"names": names, "configs": [cfg.to_dict() for cfg in configs],
                                  "training": settings}))


def _checkpoint_state(trainee: Trainee) -> dict[str, torch.Tensor]:
    tensors = {"tokens_since_fired": trainee.tokens_since_fired.cpu()}
    for name, buffer in trainee.sae.named_buffers():  # e.g. BatchTopK's running threshold
        tensors[f"buffer.{name}"] = buffer.detach().cpu()
    for name, parameter in trainee.sae.named_parameters():
        tensors[f"param.{name}"] = parameter.detach().cpu()
        for key, value in trainee.optimizer.state.get(parameter, {}).items():
            tensors[f"adam.{name}.{key}"] = value.detach().cpu()
    return {key: value.contiguous().clone() for key, value in tensors.items()}


def write_checkpoint(out_dir: Path, step: int, scales: dict[str, float], trainees: list[Trainee],
                     fingerprint: dict[str, Any], *, batch_size: int, world_size: int = 1) -> Path:
    """Write `out_dir/checkpoints/step_N/` via a temporary folder and a rename; keep the last two."""
    root = out_dir / CHECKPOINT_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.exists():
        return final  # same run, same step: its contents are already these
    temporary = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        for trainee in trainees:
            dictionary_io.write_tensor_file(_checkpoint_state(trainee), temporary / f"{trainee.name}.safetensors")
        state = {"step": step, "tokens": step * batch_size, "scales": scales, "fingerprint": fingerprint,
                 "world_size": world_size,
                 "log_rows": {trainee.name: trainee.log_rows for trainee in trainees},
                 "log_sparsity_factors": {trainee.name: trainee.log_sparsity_factor for trainee in trainees},
                 "grad_scalers": {trainee.name: trainee.scaler.state_dict() for trainee in trainees
                                  if trainee.scaler is not None}}
        atomic_write_text(temporary / "state.json", json.dumps(state, indent=1))
        os.replace(temporary, final)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            previous = latest_checkpoint(out_dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write checkpoint for step {step} under {root}: {error}; "
                                       f"{kept}. Free disk space (or fix permissions) and rerun to resume") from error
        raise
    for old in sorted(root.glob("step_*"))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove what a killed run left half-written: `checkpoints/.step_*.tmp` folders and the `.*.tmp`
    files or folders of dictionary writes (call it while holding the folder's lock)."""
    out_dir = Path(out_dir)
    for stray in [*(out_dir / CHECKPOINT_FOLDER).glob(".step_*.tmp"), *out_dir.glob(".*.tmp"), *out_dir.glob("*/.*.tmp")]:
        if stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    complete = [path for path in sorted((Path(out_dir) / CHECKPOINT_FOLDER).glob("step_*"))
                if (path / "state.json").is_file()]
    return complete[-1] if complete else None


def restore_checkpoint(folder: Path, trainees: list[Trainee], fingerprint: dict[str, Any], *, world_size: int = 1
                       ) -> tuple[int, dict[str, float]]:
    """Load parameters, Adam state, counters and logs into the trainees; returns (step, scales).

    A run resumes at the number of processes that wrote the checkpoint (another count would sum the
    gradients in another order, so the resumed run would not be the one that was interrupted)."""
    state = json.loads((folder / "state.json").read_text())
    written_by = int(state.get("world_size", 1))
    if written_by != world_size:
        raise ValueError(f"{folder} was written by a run of {written_by} process(es) and this run has {world_size}; "
                         f"resume it with torchrun --nproc_per_node={written_by} (or {written_by} process(es) in "
                         "all), or use another output folder to start a new run")
    if state["fingerprint"] != fingerprint:
        differing = sorted(key for key in fingerprint if state["fingerprint"].get(key) != fingerprint[key])
        raise ValueError(f"{folder.parent} holds checkpoints of a different run (differs in: {differing}); "
                         f"use another out_dir, or delete {folder.parent} to start over")
    for trainee in trainees:
        tensors = dictionary_io.read_tensor_file(folder / f"{trainee.name}.safetensors")
        _load_trainee_state(trainee, tensors)
        trainee.log_rows = state["log_rows"][trainee.name]
        trainee.log_sparsity_factor = float(state.get("log_sparsity_factors", {}).get(trainee.name, 0.0))
        if trainee.scaler is not None:  # fp16: the loss scale and its growth counter, so the resumed steps match
            trainee.scaler.load_state_dict(state["grad_scalers"][trainee.name])
    return state["step"], state["scales"]


def _load_trainee_state(trainee: Trainee, tensors: dict[str, torch.Tensor]) -> None:
    names = [name for name, _ in trainee.sae.named_parameters()]
    state = {name: tensors[f"param.{name}"] for name in names}
    state.update({name: tensors[f"buffer.{name}"] for name, _ in trainee.sae.named_buffers()})
    trainee.sae.load_state_dict(state, strict=True)
    optimizer_state = trainee.optimizer.state_dict()
    optimizer_state["state"] = {
        index: {key: tensors[f"adam.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
        for index, name in enumerate(names) if f"adam.{name}.step" in tensors}
    trainee.optimizer.load_state_dict(optimizer_state)
    trainee.tokens_since_fired.copy_(tensors["tokens_since_fired"])
