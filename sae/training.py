"""Training sparse autoencoders on activations, many at once from one pass over the data.

Loss scaling. For each hook, a scalar s = sqrt(mean_tokens ||x||^2 / d_in) is measured on the first
batch (batch 0 of the seed), and every SAE on that hook trains on x / s, so one L1 coefficient and
learning rate mean the same thing at every layer and model. In that normalised space:

    ReLU SAE:  loss = mean_batch ||x_hat - x||^2 / d_in  +  alpha * mean_batch ||codes||_1
    TopK SAE:  loss = mean_batch ||x_hat - x||^2 / d_in  +  aux_k_coefficient * AuxK

with decoder rows held at unit norm (the gradient along each row is removed before the Adam step and
rows are renormalised after it), so the L1 penalty cannot be dodged by shrinking codes. alpha ramps up
linearly over l1_warmup_steps; the learning rate warms up, then decays linearly to 0 at the end.
AuxK (Gao et al. 2024; only while some latents are dead) = sum ||e - e_hat||^2 / sum ||e - mean(e)||^2,
where e = x - x_hat (detached) and e_hat is e reconstructed from the d_in/2 largest dead latents alone.

When training ends, s is folded into the weights (b_enc and b_dec multiplied by s; W_enc, W_dec
unchanged), so a saved SAE takes raw activations and reconstructs them exactly as the normalised one
did, its codes being s times larger; s is recorded in cfg.activation_scale. Logged mse and l1 are in
the normalised space; fvu does not depend on s.

Massive activations. A few tokens in ten thousand (attention sinks: in SmolLM2 the first token of a
context that starts mid-document, residual norm ~18,000-25,000 against ~150) would, squared, outweigh
all the others in the loss: in one measured run (blocks.12, 800k tokens, alpha 3e-3) training on them
gave L0 58 / FVU 0.60 on held-out typical tokens, leaving them out L0 30 / FVU 0.42. By default
(`exclude_outliers`) each batch drops its tokens whose norm exceeds 10x the batch median
(sae.metrics.typical_token_mask) before the step; a spliced dictionary passes such positions
through unedited, as it does BOS (circuits/splicing.py).

Checkpoints (parameters, Adam moments, dead-feature counters, in safetensors) make a resumed run equal
bit for bit to an uninterrupted one, since batch i of the source is the same whichever step started.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from sae import io as dictionary_io
from sae.assets import atomic_write_text
from sae.batches import BatchSource
from sae.metrics import typical_token_mask
from sae.config import DictionaryConfig
from sae.dictionary import Dictionary
from sae.registry import build_dictionary
from sae.relu import ReluSAE
from sae.topk import TopKSAE

CHECKPOINT_FOLDER = "checkpoints"
LOG_FILE = "training_log.csv"
LOG_COLUMNS = ["step", "tokens", "loss", "mse", "l1", "l0", "fvu", "dead_fraction", "lr", "dense_fraction"]
CHECKPOINTS_KEPT = 2
RESAMPLED_ENCODER_NORM = 0.2  # a resampled encoder column's norm, relative to the mean alive one


@dataclass
class TrainingConfig:
    """How to train; what to train is in each DictionaryConfig."""

    total_tokens: int
    batch_size: int = 4096
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 0  # linear ramp of the learning rate from 0
    lr_decay_fraction: float = 0.2  # linear decay to 0 over this last fraction of the steps
    l1_warmup_steps: int | None = None  # L1 coefficient ramps 0 -> alpha; None: 5% of the steps
    checkpoint_every: int | None = 1000  # steps; None: no periodic checkpoints
    log_every: int = 100  # steps
    seed: int = 0  # batch order and resampling
    dead_window_tokens: int = 10_000_000  # a feature that did not fire in this many tokens is dead
    resample_dead: bool = False  # give dead features new directions (Bricken et al. 2023)
    resample_every: int = 25_000  # steps; never during the final learning-rate decay
    aux_k_coefficient: float = 1 / 32  # TopK only; 0 disables AuxK
    dense_threshold: float = 0.1  # logged dense_fraction: features firing on more than this fraction of a batch
    exclude_outliers: bool = True  # leave massive activations (norm > 10x the batch median) out of every step

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.total_tokens < 1:
            raise ValueError(f"total_tokens and batch_size must be positive, got total_tokens={self.total_tokens}, "
                             f"batch_size={self.batch_size}")
        if not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise ValueError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        for name in ("log_every", "resample_every", "dead_window_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 or None, got {self.checkpoint_every}")

    @property
    def total_steps(self) -> int:
        """total_tokens // batch_size, at least one step."""
        return max(1, self.total_tokens // self.batch_size)

    @property
    def l1_warmup(self) -> int:
        if self.l1_warmup_steps is not None:
            return self.l1_warmup_steps
        return max(1, round(0.05 * self.total_steps))

    @property
    def decay_start(self) -> int:
        """The first step of the final learning-rate decay (total_steps if there is none)."""
        return self.total_steps - int(self.total_steps * self.lr_decay_fraction)

    def learning_rate(self, step: int) -> float:
        """The learning rate of the step with 0-based index `step`."""
        factor = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps > 0 else 1.0
        if step >= self.decay_start:
            factor *= (self.total_steps - step) / (self.total_steps - self.decay_start)
        return self.lr * factor

    def resamples_after(self, steps_done: int) -> bool:
        """Resample at multiples of resample_every, but not in the final decay (no time left to learn)."""
        return self.resample_dead and steps_done % self.resample_every == 0 and steps_done < self.decay_start

    def l1_coefficient(self, alpha: float, step: int) -> float:
        return alpha * min(1.0, (step + 1) / self.l1_warmup) if self.l1_warmup > 0 else alpha


@dataclass
class TrainResult:
    name: str
    folder: Path
    metrics: dict[str, float]  # the last logged row, plus activation_scale
    dictionary: Dictionary | None = None  # the saved (scale-folded) dictionary, on CPU


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


@dataclass
class _Trainee:
    """One SAE being trained, with its optimizer and bookkeeping."""

    name: str
    hook: str
    sae: ReluSAE
    optimizer: torch.optim.Adam
    tokens_since_fired: torch.Tensor  # [d_sae] int64
    log_rows: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# setup


def default_names(configs: list[DictionaryConfig]) -> list[str]:
    """The hook name; where several configs share a hook, suffixes for what tells them apart
    (`blocks.3.hook_resid_post__l1_0.001`, `__k_32`, then `__d_4096`, `__tied`, `__seed_1` if needed)."""
    describers = [lambda cfg: f"k_{cfg.k}" if cfg.architecture == "topk" else f"l1_{cfg.l1_coefficient:g}",
                  lambda cfg: f"d_{cfg.d_sae}", lambda cfg: "tied" if cfg.tied else "untied",
                  lambda cfg: f"seed_{cfg.seed}"]
    names = [cfg.hook_name for cfg in configs]
    for describe in describers:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(names):
            groups[name].append(index)
        for indices in groups.values():
            descriptions = [describe(configs[index]) for index in indices]
            if len(set(descriptions)) > 1:
                for index, description in zip(indices, descriptions):
                    names[index] = f"{names[index]}__{description}"
    counts, seen = Counter(names), Counter()
    for index, name in enumerate(list(names)):
        if counts[name] > 1:  # identical configs: number them
            names[index] = f"{name}__{seen[name]}"
            seen[name] += 1
    return names


def _check_inputs(source: BatchSource, configs: list[DictionaryConfig], names: list[str]) -> None:
    """Everything that can be wrong with the request, before any compute."""
    if not configs:
        raise ValueError("train_dictionaries needs at least one DictionaryConfig")
    if len(names) != len(configs) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per config, got {names} for {len(configs)} configs")
    for name in names:
        if not name or "/" in name or os.sep in name or name.startswith(".") or name == CHECKPOINT_FOLDER:
            raise ValueError(f"'{name}' cannot be a folder name for a dictionary; pass other names")
    for cfg in configs:
        if cfg.hook_name not in source.hooks:
            raise ValueError(f"config hook '{cfg.hook_name}' is not in the activation source, which has "
                             f"{source.hooks}; harvest that hook or fix the config")
        width = source.d_in(cfg.hook_name)
        if width != cfg.d_in:
            raise ValueError(f"config for '{cfg.hook_name}' has d_in={cfg.d_in}, but the activations there have "
                             f"width {width}; set d_in={width}")
        if cfg.architecture not in ("standard", "topk"):
            raise ValueError(f"train_dictionaries trains 'standard' and 'topk' SAEs, not '{cfg.architecture}'")


def _new_trainee(name: str, cfg: DictionaryConfig, training: TrainingConfig, device: torch.device) -> _Trainee:
    sae = build_dictionary(copy.deepcopy(cfg)).to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=training.lr, betas=tuple(training.adam_betas))
    counters = torch.zeros(cfg.d_sae, dtype=torch.int64, device=device)
    return _Trainee(name, cfg.hook_name, sae, optimizer, counters)


def activation_scale(x: torch.Tensor) -> float:
    """s = sqrt(mean ||x||^2 / d_in) over the typical tokens of x [tokens, d_in].

    Tokens whose norm exceeds 10x the median are left out (sae.metrics.typical_token_mask): a single massive
    activation (an attention-sink token, norm ~25,000 against ~150 in SmolLM2) would otherwise
    set the scale by itself, and make it depend on whether batch 0 happened to hold one."""
    rows = x.double()
    typical = rows[typical_token_mask(rows)]
    return math.sqrt(typical.pow(2).mean().item())


# ---------------------------------------------------------------------------------------------
# the training step


@torch.no_grad()
def remove_parallel_decoder_gradient(decoder: torch.Tensor) -> None:
    """Project out the gradient component along each (unit) decoder row, in place."""
    if decoder.grad is not None:
        parallel = (decoder.grad * decoder).sum(dim=1, keepdim=True)
        decoder.grad.sub_(parallel * decoder)


@torch.no_grad()
def normalize_decoder_rows(decoder: torch.Tensor) -> None:
    decoder.div_(decoder.norm(dim=1, keepdim=True).clamp_min(1e-12))


def aux_k_loss(sae: ReluSAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK (Gao et al. 2024): how well the top dead latents reconstruct the residual, normalised.

    pre [batch, d_sae] pre-activations; residual [batch, d_in] = x - x_hat (detached); dead [d_sae] bool.
    """
    k_aux = min(max(sae.d_in // 2, 1), sae.n_features)
    candidates = torch.relu(pre) * dead
    top = candidates.topk(k_aux, dim=-1, sorted=False)
    codes = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    residual_hat = codes @ sae.W_dec
    total = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return (residual_hat - residual).pow(2).sum() / total


@dataclass
class _StepOutput:
    loss: torch.Tensor
    mse: torch.Tensor
    l1: torch.Tensor | None
    codes: torch.Tensor
    residual: torch.Tensor  # x - x_hat, detached


def _training_step(trainee: _Trainee, x: torch.Tensor, step: int, training: TrainingConfig) -> _StepOutput:
    sae, cfg = trainee.sae, trainee.sae.cfg
    pre = sae.pre_activations(x)
    codes = sae.activation(pre)
    residual = x - sae.decode(codes)
    mse = residual.pow(2).mean()  # = mean_batch ||x_hat - x||^2 / d_in
    l1 = None  # TopK: computed only when logged
    if isinstance(sae, TopKSAE):
        loss = mse
        if training.aux_k_coefficient > 0:
            dead = trainee.tokens_since_fired >= training.dead_window_tokens
            if bool(dead.any()):
                loss = loss + training.aux_k_coefficient * aux_k_loss(sae, pre, residual.detach(), dead)
    else:
        l1 = codes.sum(dim=-1).mean()  # codes are nonnegative
        loss = mse + training.l1_coefficient(cfg.l1_coefficient, step) * l1

    lr = training.learning_rate(step)
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    remove_parallel_decoder_gradient(sae.W_dec)
    trainee.optimizer.step()
    normalize_decoder_rows(sae.W_dec)

    with torch.no_grad():
        trainee.tokens_since_fired += x.shape[0]
        trainee.tokens_since_fired.masked_fill_((codes > 0).any(dim=0), 0)
    return _StepOutput(loss.detach(), mse.detach(), None if l1 is None else l1.detach(), codes.detach(),
                       residual.detach())


@torch.no_grad()
def _log_row(trainee: _Trainee, x: torch.Tensor, out: _StepOutput, step: int, training: TrainingConfig
             ) -> dict[str, float]:
    typical = typical_token_mask(x)  # as in evaluation: massive activations would dominate
    fvu = out.residual[typical].pow(2).sum() / (x[typical] - x[typical].mean(dim=0)).pow(2).sum()
    dead = (trainee.tokens_since_fired >= training.dead_window_tokens).float().mean()
    l0 = (out.codes != 0).sum(dim=-1).float().mean()
    dense = ((out.codes != 0).float().mean(dim=0) > training.dense_threshold).float().mean()  # in this batch
    l1 = out.l1 if out.l1 is not None else out.codes.sum(dim=-1).mean()
    values = torch.stack([out.loss, out.mse, l1, l0, fvu, dead, dense]).tolist()
    row = {"step": step, "tokens": step * training.batch_size}
    row.update(zip(["loss", "mse", "l1", "l0", "fvu", "dead_fraction", "dense_fraction"], values))
    row["lr"] = training.learning_rate(step - 1)
    return row


# ---------------------------------------------------------------------------------------------
# resampling dead features


@torch.no_grad()
def resample_dead_features(sae: ReluSAE, optimizer: torch.optim.Optimizer, dead: torch.Tensor,
                           residual: torch.Tensor, generator: torch.Generator) -> int:
    """Point dead features at poorly reconstructed inputs; returns how many were resampled.

    New decoder row = a residual (x - x_hat) drawn with probability proportional to its squared norm,
    normalised; encoder column = that direction at 0.2 x the mean alive encoder norm (tied: the row
    itself); b_enc = 0; their Adam moments are reset. dead [d_sae] bool, residual [batch, d_in].
    """
    indices = dead.nonzero().squeeze(1)
    weights = residual.pow(2).sum(dim=-1).double().cpu()
    if indices.numel() == 0 or weights.sum() <= 0:
        return 0
    rows = torch.multinomial(weights, indices.numel(), replacement=True, generator=generator)
    directions = residual[rows.to(residual.device)]
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sae.W_dec[indices] = directions
    if not sae.cfg.tied:
        alive = ~dead
        alive_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        sae.W_enc[:, indices] = directions.T * (RESAMPLED_ENCODER_NORM * alive_norm)
    sae.b_enc[indices] = 0.0
    _reset_adam_moments(sae, optimizer, indices)
    return indices.numel()


def _reset_adam_moments(sae: ReluSAE, optimizer: torch.optim.Optimizer, indices: torch.Tensor) -> None:
    selectors = {"W_dec": (indices,), "W_enc": (slice(None), indices), "b_enc": (indices,)}
    for name, parameter in sae.named_parameters():
        state = optimizer.state.get(parameter, {})
        if name in selectors:
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state:
                    state[moment][selectors[name]] = 0.0


def _resampling_generator(seed: int, step: int, sae_index: int) -> torch.Generator:
    """A generator that is a pure function of (seed, step, SAE): resume needs no RNG state."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + sae_index) % (2**63))


# ---------------------------------------------------------------------------------------------
# checkpoints


def _fingerprint(names: list[str], configs: list[DictionaryConfig], training: TrainingConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: everything that shapes the trajectory."""
    settings = dataclasses.asdict(training)
    for key in ("checkpoint_every", "log_every"):
        settings.pop(key)
    return json.loads(json.dumps({"names": names, "configs": [cfg.to_dict() for cfg in configs],
                                  "training": settings}))


def _checkpoint_state(trainee: _Trainee) -> dict[str, torch.Tensor]:
    tensors = {"tokens_since_fired": trainee.tokens_since_fired.cpu()}
    for name, parameter in trainee.sae.named_parameters():
        tensors[f"param.{name}"] = parameter.detach().cpu()
        for key, value in trainee.optimizer.state.get(parameter, {}).items():
            tensors[f"adam.{name}.{key}"] = value.detach().cpu()
    return {key: value.contiguous().clone() for key, value in tensors.items()}


def write_checkpoint(out_dir: Path, step: int, scales: dict[str, float], trainees: list[_Trainee],
                     fingerprint: dict[str, Any], batch_size: int) -> Path:
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
                 "log_rows": {trainee.name: trainee.log_rows for trainee in trainees}}
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


def latest_checkpoint(out_dir: Path) -> Path | None:
    complete = [path for path in sorted((Path(out_dir) / CHECKPOINT_FOLDER).glob("step_*"))
                if (path / "state.json").is_file()]
    return complete[-1] if complete else None


def _restore_checkpoint(folder: Path, trainees: list[_Trainee], fingerprint: dict[str, Any]
                        ) -> tuple[int, dict[str, float]]:
    """Load parameters, Adam state, counters and logs into the trainees; returns (step, scales)."""
    state = json.loads((folder / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        differing = sorted(key for key in fingerprint if state["fingerprint"].get(key) != fingerprint[key])
        raise ValueError(f"{folder.parent} holds checkpoints of a different run (differs in: {differing}); "
                         f"use another out_dir, or delete {folder.parent} to start over")
    for trainee in trainees:
        tensors = dictionary_io.read_tensor_file(folder / f"{trainee.name}.safetensors")
        _load_trainee_state(trainee, tensors)
        trainee.log_rows = state["log_rows"][trainee.name]
    return state["step"], state["scales"]


def _load_trainee_state(trainee: _Trainee, tensors: dict[str, torch.Tensor]) -> None:
    names = [name for name, _ in trainee.sae.named_parameters()]
    trainee.sae.load_state_dict({name: tensors[f"param.{name}"] for name in names}, strict=True)
    optimizer_state = trainee.optimizer.state_dict()
    optimizer_state["state"] = {
        index: {key: tensors[f"adam.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
        for index, name in enumerate(names) if f"adam.{name}.step" in tensors}
    trainee.optimizer.load_state_dict(optimizer_state)
    trainee.tokens_since_fired.copy_(tensors["tokens_since_fired"])


# ---------------------------------------------------------------------------------------------
# outputs


def _save_result(trainee: _Trainee, scale: float, out_dir: Path, step: int, training: TrainingConfig
                 ) -> TrainResult:
    """Fold the scale into a copy of the SAE and write its folder and training log."""
    final = copy.deepcopy(trainee.sae).cpu().eval()
    final.fold_input_scale_(scale)
    final.cfg.extra = {**final.cfg.extra, "trained_steps": step, "trained_tokens": step * training.batch_size,
                       "training_complete": step >= training.total_steps,
                       "training": json.loads(json.dumps(dataclasses.asdict(training)))}
    folder = dictionary_io.save_dictionary(final, out_dir / trainee.name)
    log = pd.DataFrame(trainee.log_rows, columns=LOG_COLUMNS)
    atomic_write_text(folder / LOG_FILE, log.to_csv(index=False))
    metrics = dict(trainee.log_rows[-1]) if trainee.log_rows else {}
    metrics["activation_scale"] = scale
    return TrainResult(trainee.name, folder, metrics, final)


def _progress_postfix(trainees: list[_Trainee]) -> dict[str, str]:
    rows = [trainee.log_rows[-1] for trainee in trainees if trainee.log_rows]
    if not rows:
        return {}
    if len(rows) == 1:
        return {"loss": f"{rows[0]['loss']:.4g}", "L0": f"{rows[0]['l0']:.1f}", "FVU": f"{rows[0]['fvu']:.3f}"}
    return {"L0": "/".join(f"{row['l0']:.0f}" for row in rows), "FVU": "/".join(f"{row['fvu']:.2f}" for row in rows)}


# ---------------------------------------------------------------------------------------------
# the loop


def train_dictionaries(source: BatchSource, configs: list[DictionaryConfig], training: TrainingConfig,
                       out_dir: str | Path, names: list[str] | None = None, progress: bool = True,
                       stop_after_steps: int | None = None, device: str | torch.device = "cpu"
                       ) -> list[TrainResult]:
    """Train one SAE per config, all stepping on the same batches (read once), resuming if possible.

    Writes `out_dir/<name>/` (sae_weights.safetensors, cfg.json, training_log.csv) per SAE and
    checkpoints under `out_dir/checkpoints/`. `stop_after_steps` stops early after checkpointing.
    """
    names = list(names) if names is not None else default_names(configs)
    _check_inputs(source, configs, names)
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ValueError(f"stop_after_steps must be at least 1, got {stop_after_steps}")
    out_dir, device = Path(out_dir), torch.device(device)
    trainees = [_new_trainee(name, cfg, training, device) for name, cfg in zip(names, configs)]
    fingerprint = _fingerprint(names, configs, training)
    hooks = list(dict.fromkeys(cfg.hook_name for cfg in configs))

    start_step, scales = 0, {}
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        start_step, scales = _restore_checkpoint(checkpoint, trainees, fingerprint)
    end_step = training.total_steps if stop_after_steps is None else min(stop_after_steps, training.total_steps)
    batches = source.batches(hooks, training.batch_size, training.seed, start_batch=start_step)

    step = start_step
    with tqdm(total=training.total_steps, initial=start_step, disable=not progress, desc="training SAEs",
              unit="step") as bar:
        while step < end_step:
            raw = next(batches)
            if step == 0:
                scales = _initialise_from_first_batch(raw, trainees, device)
            inputs = {hook: _training_rows(raw[hook], training).to(device, torch.float32) / scales[hook]
                      for hook in hooks}
            step = _step_all(trainees, inputs, step, training)
            if step % training.log_every == 0 or step == end_step:
                bar.set_postfix(_progress_postfix(trainees), refresh=False)
            bar.update(1)
            if (training.checkpoint_every and step % training.checkpoint_every == 0) or (
                    step == end_step and (training.checkpoint_every or end_step < training.total_steps)):
                write_checkpoint(out_dir, step, scales, trainees, fingerprint, training.batch_size)
    return [_save_result(trainee, scales[trainee.hook], out_dir, step, training) for trainee in trainees]


def _training_rows(x: torch.Tensor, training: TrainingConfig) -> torch.Tensor:
    """The rows of one batch [batch, d_in] that an SAE trains on: all, or the typical ones (see module docstring)."""
    return x[typical_token_mask(x)] if training.exclude_outliers else x


def _initialise_from_first_batch(raw: dict[str, torch.Tensor], trainees: list[_Trainee], device: torch.device
                                 ) -> dict[str, float]:
    """Measure each hook's scale on batch 0 and start every b_dec at the (normalised) mean of its typical tokens."""
    scales = {hook: activation_scale(tensor) for hook, tensor in raw.items()}
    for hook, scale in scales.items():
        if not math.isfinite(scale) or scale == 0:
            raise ValueError(f"the first batch of activations at '{hook}' has scale {scale} (all zero, inf or nan); "
                             "check the harvested activations")
    with torch.no_grad():
        for trainee in trainees:
            rows = raw[trainee.hook][typical_token_mask(raw[trainee.hook])]
            mean = rows.to(device, torch.float32).mean(dim=0) / scales[trainee.hook]
            trainee.sae.b_dec.copy_(mean)
    return scales


def _step_all(trainees: list[_Trainee], inputs: dict[str, torch.Tensor], step: int, training: TrainingConfig
              ) -> int:
    """One optimizer step of every SAE on this batch; returns the number of steps done."""
    done = step + 1
    for index, trainee in enumerate(trainees):
        x = inputs[trainee.hook]
        out = _training_step(trainee, x, step, training)
        if done % training.log_every == 0 or done == training.total_steps:
            trainee.log_rows.append(_log_row(trainee, x, out, done, training))
        if training.resamples_after(done):
            dead = trainee.tokens_since_fired >= training.dead_window_tokens
            generator = _resampling_generator(training.seed, done, index)
            if resample_dead_features(trainee.sae, trainee.optimizer, dead, out.residual, generator):
                trainee.tokens_since_fired.masked_fill_(dead, 0)
    return done
