"""Training sparse autoencoders on activations, many at once from one pass over the data.

Loss scaling. For each hook, a scalar s = sqrt(mean_tokens ||x||^2 / d_in) is measured on the first
batch (batch 0 of the seed), and every SAE on that hook trains on x / s, so a learning rate means the same
thing at every layer and model. A sparsity coefficient does not: the L0 it gives depends on the model,
the layer and the run's length (alpha 1e-3 gives L0 183 at SmolLM2 blocks.12 and L0 31 at Gemma-3-270M's
middle layer), so `train --target-l0` asks for an L0 instead (sae/training/calibration.py chooses the
coefficient; TrainingConfig.target_l0 can hold L0 during a long run, sae/training/control.py). In that normalised space each architecture
computes its own loss (`training_loss`; the formulas are in sae/relu.py, topk.py, batchtopk.py, jumprelu.py),
with decoder rows held at unit norm (the gradient along each row is removed before the Adam step and
rows are renormalised after it), so a sparsity penalty cannot be dodged by shrinking codes. The sparsity
coefficient ramps up linearly over l1_warmup_steps; the learning rate warms up, then decays linearly to 0.
SAEs with free decoder rows (SAELens' recipe) also clip the gradient's norm at 1 / d_in (grad_clip_norm "auto":
SAELens' clip at 1.0, whose loss sums over the d_in dimensions where this one averages).
This loop knows no architecture: it asks the registry to build one and the SAE for its loss.

When training ends, s is folded into the weights (`fold_input_scale_`: b_enc, b_dec and any threshold
multiplied by s; W_enc, W_dec unchanged), so a saved SAE takes raw activations and reconstructs them exactly as the normalised one
did, its codes being s times larger; s is recorded in cfg.activation_scale. Logged mse and l1 are in
the normalised space; fvu does not depend on s.

Massive activations. A few tokens in ten thousand (attention sinks: in SmolLM2 the first token of a
context that starts mid-document, residual norm ~18,000-25,000 against ~150) would, squared, outweigh
all the others in the loss: in one measured run (blocks.12, 800k tokens, alpha 3e-3) training on them
gave L0 58 / FVU 0.60 on held-out typical tokens, leaving them out L0 30 / FVU 0.42. By default
(`exclude_outliers`) each batch drops its tokens whose norm exceeds 10x the batch median
(sae.metrics.typical_token_mask) before the step; a spliced dictionary passes such positions
through unedited, as it does BOS (circuits.engine.passthrough_positions).

Checkpoints (sae/training/checkpoints.py) make a resumed run equal bit for bit to an uninterrupted one.

Non-finite values. Every batch's activations, every step's loss and every weight after the step are checked:
a NaN or infinity raises NonFiniteError naming the step, the SAE and the hook, before any checkpoint or
dictionary is written from that state, so the last good checkpoint is what a rerun resumes from.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import torch

from sae import io as dictionary_io
from sae.batches import BatchSource
from sae.config import DictionaryConfig
from sae.dictionary import Dictionary, TrainingLoss, TrainingState
from sae.distributed import Distributed
from sae.metrics import fraction_unexplained, l0, typical_token_mask
from sae.progress import progress_bar
from sae.registry import architecture_class, build_dictionary, is_trainable
from sae.locking import folder_lock
from sae.training.checkpoints import (CHECKPOINT_FOLDER, Trainee, latest_checkpoint, remove_stale_temporaries,
                                      restore_checkpoint, run_fingerprint, write_checkpoint)
from sae.training.config import TrainingConfig
from sae.training.control import controlled_coefficient, next_log_factor, steers
from sae.training.guards import check_finite_step, next_batch, stopped_on_nonfinite
from sae.training import parallel
from sae.training.initialisation import initial_decoder_bias, scale_initial_rows_
from sae.training.precision import (autocast_region, check_autocast, new_grad_scaler, optimizer_step, scaled_loss,
                                    to_training_device, unscale_gradients)
from sae.training.resampling import resample_dead_features, resampling_generator

LOG_FILE = "training_log.csv"
LOG_COLUMNS = ["step", "tokens", "loss", "mse", "l1", "l0", "fvu", "dead_fraction", "lr", "dense_fraction"]


@dataclasses.dataclass
class TrainResult:
    name: str
    folder: Path
    metrics: dict[str, float]  # the last logged row, plus activation_scale
    dictionary: Dictionary | None = None  # the saved (scale-folded) dictionary, on CPU


# ---------------------------------------------------------------------------------------------
# setup


def default_names(configs: list[DictionaryConfig]) -> list[str]:
    """The hook name; where several configs share a hook, suffixes for what tells them apart
    (`blocks.3.hook_resid_post__l1_0.001`, `__k_32`, then `__d_4096`, `__tied`, `__seed_1` if needed)."""
    describers = [lambda cfg: architecture_class(cfg.architecture).describe(cfg),
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


def _check_inputs(source: BatchSource, configs: list[DictionaryConfig], names: list[str],
                  training: TrainingConfig) -> None:
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
        if not is_trainable(cfg.architecture):
            raise ValueError(f"architecture '{cfg.architecture}' has no training loss; train_dictionaries trains "
                             "SAEs (sae.dictionary.SparseAutoencoder subclasses)")
        built = build_dictionary(cfg)  # the architecture checks its own options (k, ...)
        if training.unit_norm_decoder is False and (cfg.tied or not built.supports_free_decoder):
            raise ValueError(f"unit_norm_decoder=False (free decoder rows) needs an untied SAE of an architecture that "
                             f"supports it (standard, topk); '{cfg.hook_name}' is {cfg.architecture}"
                             f"{', tied' if cfg.tied else ''}. Set unit_norm_decoder=True")


def _new_trainee(name: str, cfg: DictionaryConfig, training: TrainingConfig, device: torch.device) -> Trainee:
    sae = build_dictionary(copy.deepcopy(cfg))
    norm = training.initial_row_norm(free_rows(training, sae))
    if norm is not None:
        scale_initial_rows_(sae, norm)
    sae = sae.to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=training.lr, betas=tuple(training.adam_betas))
    counters = torch.zeros(cfg.d_sae, dtype=torch.int64, device=device)
    return Trainee(name, cfg.hook_name, sae, optimizer, counters, scaler=new_grad_scaler(training.autocast, device))


def free_rows(training: TrainingConfig, sae: Dictionary) -> bool:
    """Whether this SAE trains with free decoder rows (TrainingConfig.unit_norm_decoder)."""
    return training.free_decoder_rows(sae.cfg.tied, getattr(sae, "supports_free_decoder", False))


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


def _training_step(trainee: Trainee, x: torch.Tensor, step: int, training: TrainingConfig,
                   distributed: Distributed, rows: int) -> TrainingLoss:
    """One optimizer step on x, this rank's share of a batch of `rows` rows (all of it in a single process)."""
    sae = trainee.sae
    unit = not free_rows(training, sae)
    share = x.shape[0] / rows
    state = TrainingState(step=step, sparsity_ramp=training.sparsity_ramp(step) * math.exp(trainee.log_sparsity_factor),
                          dead=trainee.tokens_since_fired >= training.dead_window_tokens,
                          aux_k_coefficient=training.aux_k_coefficient,
                          decoder_norms=None if unit else sae.W_dec.norm(dim=1), batch_share=share,
                          distributed=distributed)
    with autocast_region(training.autocast, x.device):  # fp32 master weights; see sae/training/precision.py
        out = sae.training_loss(x, state)
    lr = training.learning_rate(step)
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    trainee.optimizer.zero_grad(set_to_none=True)
    scaled_loss(out.loss * share if distributed.active else out.loss, trainee.scaler).backward()
    distributed.sum_gradients_(sae.parameters())  # the whole batch's gradient on every rank (before unscaling,
    unscale_gradients(trainee.optimizer, trainee.scaler)  # so an fp16 overflow on one rank skips the step on all)
    if unit:
        remove_parallel_decoder_gradient(sae.W_dec)
    clip = training.clip_norm(sae.cfg.d_in, free_rows=not unit)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
    optimizer_step(trainee.optimizer, trainee.scaler)
    if unit:
        normalize_decoder_rows(sae.W_dec)

    with torch.no_grad():
        trainee.tokens_since_fired += rows
        trainee.tokens_since_fired.masked_fill_(parallel.fired_features(out.codes, distributed), 0)
        if steers(sae.sparsity_setting, training.target_l0) and training.l0_control_active(step):
            trainee.log_sparsity_factor = next_log_factor(
                trainee.log_sparsity_factor, float(parallel.mean_over_batch(l0(out.codes), share, distributed)),
                training.target_l0,
                gain=training.l0_control_gain, lr_fraction=lr / training.lr if training.lr > 0 else 0.0)
    return out.detached()


@torch.no_grad()
def _log_row(trainee: Trainee, x: torch.Tensor, out: TrainingLoss, step: int, training: TrainingConfig
             ) -> dict[str, float]:
    typical = typical_token_mask(x)  # as in evaluation: massive activations would dominate
    fvu = fraction_unexplained(out.residual[typical], x[typical])
    dead = (trainee.tokens_since_fired >= training.dead_window_tokens).float().mean()
    dense = ((out.codes != 0).float().mean(dim=0) > training.dense_threshold).float().mean()  # in this batch
    l1 = out.l1 if out.l1 is not None else out.codes.sum(dim=-1).mean()
    values = torch.stack([out.loss, out.mse, l1, l0(out.codes), fvu, dead, dense]).tolist()
    row = {"step": step, "tokens": step * training.batch_size}
    row.update(zip(["loss", "mse", "l1", "l0", "fvu", "dead_fraction", "dense_fraction"], values))
    row["lr"] = training.learning_rate(step - 1)
    return row


# ---------------------------------------------------------------------------------------------
# outputs


def _save_result(trainee: Trainee, scale: float, out_dir: Path, step: int, training: TrainingConfig, *,
                 write: bool = True) -> TrainResult:
    """Fold the scale into a copy of the SAE and write its folder and training log (unless `write` is off:
    the other ranks of a data-parallel run hold the same weights as rank 0, which writes them)."""
    final = copy.deepcopy(trainee.sae).cpu().eval()
    if free_rows(training, final):  # free rows: fold their norms into the codes (same reconstructions)
        final.scale_features_(final.W_dec.detach().norm(dim=1).clamp_min(1e-12))
    final.fold_input_scale_(scale)
    if steers(final.sparsity_setting, training.target_l0):  # record the coefficient the controller ended at
        final.cfg.extra["l0_control"] = {"target_l0": training.target_l0, "start_coefficient": final.cfg.l1_coefficient,
                                         "log_factor": trainee.log_sparsity_factor}
        final.cfg.l1_coefficient = controlled_coefficient(final.cfg.l1_coefficient, trainee.log_sparsity_factor)
    final.cfg.extra = {**final.cfg.extra, "trained_steps": step, "trained_tokens": step * training.batch_size,
                       "training_complete": step >= training.total_steps,
                       "training": json.loads(json.dumps(dataclasses.asdict(training)))}
    log = pd.DataFrame(trainee.log_rows, columns=LOG_COLUMNS)
    folder = out_dir / trainee.name
    if write:
        folder = dictionary_io.save_dictionary(final, folder, extra_files={LOG_FILE: log.to_csv(index=False)})
    metrics = dict(trainee.log_rows[-1]) if trainee.log_rows else {}
    metrics["activation_scale"] = scale
    return TrainResult(trainee.name, folder, metrics, final)


def _progress_postfix(trainees: list[Trainee]) -> dict[str, str]:
    rows = [trainee.log_rows[-1] for trainee in trainees if trainee.log_rows]
    if not rows:
        return {}
    if len(rows) == 1:
        return {"loss": f"{rows[0]['loss']:.4g}", "L0": f"{rows[0]['l0']:.1f}", "FVU": f"{rows[0]['fvu']:.3f}"}
    return {"L0": "/".join(f"{row['l0']:.0f}" for row in rows), "FVU": "/".join(f"{row['fvu']:.2f}" for row in rows)}


# ---------------------------------------------------------------------------------------------
# the loop


def train_dictionaries(source: BatchSource, configs: list[DictionaryConfig], training: TrainingConfig,
                       out_dir: str | Path, *, names: list[str] | None = None, progress: bool = True,
                       stop_after_steps: int | None = None, device: str | torch.device = "cpu",
                       distributed: Distributed | None = None) -> list[TrainResult]:
    """Train one SAE per config, all stepping on the same batches (read once), resuming if possible.

    Writes `out_dir/<name>/` (sae_weights.safetensors, cfg.json, training_log.csv) per SAE and
    checkpoints under `out_dir/checkpoints/`. `stop_after_steps` stops early after checkpointing.
    `out_dir` is locked for the run (sae.locking: a second writer is refused), and what a killed run left
    half-written there is removed first.

    `distributed` (sae/distributed.py): in a data-parallel run every rank calls this with the same arguments;
    each trains on its share of every batch, gradients are summed over ranks, and rank 0 alone locks the
    folder and writes checkpoints and dictionaries. The result equals a single process's with the same
    batch size and seed, up to the order of floating-point sums.
    """
    distributed = distributed or Distributed()
    with folder_lock(out_dir) if distributed.is_main else contextlib.nullcontext():
        if distributed.is_main:
            remove_stale_temporaries(Path(out_dir))
        distributed.barrier()
        results = _train_in_locked_folder(source, configs, training, out_dir, names=names, progress=progress,
                                          stop_after_steps=stop_after_steps, device=device, distributed=distributed)
        distributed.barrier()  # rank 0's files are written when any rank returns
        return results


def _train_in_locked_folder(source: BatchSource, configs: list[DictionaryConfig], training: TrainingConfig,
                            out_dir: str | Path, *, names: list[str] | None, progress: bool,
                            stop_after_steps: int | None, device: str | torch.device,
                            distributed: Distributed) -> list[TrainResult]:
    names = list(names) if names is not None else default_names(configs)
    _check_inputs(source, configs, names, training)
    if training.batch_size % distributed.world_size:
        raise ValueError(f"the batch size {training.batch_size} does not divide among {distributed.world_size} "
                         f"processes; use a batch size that is a multiple of {distributed.world_size}")
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ValueError(f"stop_after_steps must be at least 1, got {stop_after_steps}")
    out_dir, device = Path(out_dir), torch.device(device)
    check_autocast(training.autocast, device)
    trainees = [_new_trainee(name, cfg, training, device) for name, cfg in zip(names, configs)]
    fingerprint = run_fingerprint(names, configs, training)
    hooks = list(dict.fromkeys(cfg.hook_name for cfg in configs))

    start_step, scales = 0, {}
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        start_step, scales = restore_checkpoint(checkpoint, trainees, fingerprint, world_size=distributed.world_size)
    distributed.same_everywhere(start_step, "the step to resume from")
    end_step = training.total_steps if stop_after_steps is None else min(stop_after_steps, training.total_steps)
    part = {"part": distributed.part} if distributed.active else {}  # a single process: any BatchSource
    batches = source.batches(hooks, training.batch_size, training.seed, start_batch=start_step, **part)

    step = start_step
    with progress_bar(total=training.total_steps, initial=start_step, enabled=progress and distributed.is_main,
                      desc="training SAEs", unit="step") as bar, stopped_on_nonfinite(out_dir):
        while step < end_step:
            raw = next_batch(batches, hooks, step + 1)
            if step == 0:
                scales = _initialise_from_first_batch(parallel.whole_batch(raw, distributed), trainees, device,
                                                      training)
            inputs = {hook: to_training_device(_training_rows(raw[hook], training, distributed), device) / scales[hook]
                      for hook in hooks}
            step = _step_all(trainees, inputs, step, training, distributed)
            if step % training.log_every == 0 or step == end_step:
                bar.set_postfix(_progress_postfix(trainees), refresh=False)
            bar.update(1)
            if distributed.is_main and ((training.checkpoint_every and step % training.checkpoint_every == 0) or (
                    step == end_step and (training.checkpoint_every or end_step < training.total_steps))):
                write_checkpoint(out_dir, step, scales, trainees, fingerprint, batch_size=training.batch_size,
                                 world_size=distributed.world_size)
    return [_save_result(trainee, scales[trainee.hook], out_dir, step, training, write=distributed.is_main)
            for trainee in trainees]


def _training_rows(x: torch.Tensor, training: TrainingConfig, distributed: Distributed) -> torch.Tensor:
    """The rows of one batch [batch, d_in] (this rank's share) that an SAE trains on: all, or the typical ones
    (see module docstring; the median is the whole batch's)."""
    return x[parallel.typical_rows(x, distributed)] if training.exclude_outliers else x


def _initialise_from_first_batch(raw: dict[str, torch.Tensor], trainees: list[Trainee], device: torch.device,
                                 training: TrainingConfig) -> dict[str, float]:
    """Measure each hook's scale on batch 0 and start every b_dec from its (normalised) typical tokens
    (training.b_dec_init: their mean, their geometric median, or zero)."""
    scales = {hook: activation_scale(tensor) for hook, tensor in raw.items()}
    for hook, scale in scales.items():
        if not math.isfinite(scale) or scale == 0:
            raise ValueError(f"the first batch of activations at '{hook}' has scale {scale} (all zero, inf or nan); "
                             "check the harvested activations")
    with torch.no_grad():
        for trainee in trainees:
            rows = raw[trainee.hook][typical_token_mask(raw[trainee.hook])]
            rows = rows.to(device, torch.float32) / scales[trainee.hook]
            trainee.sae.b_dec.copy_(initial_decoder_bias(rows, training.b_dec_init))
    return scales


def _step_all(trainees: list[Trainee], inputs: dict[str, torch.Tensor], step: int, training: TrainingConfig,
              distributed: Distributed) -> int:
    """One optimizer step of every SAE on this batch; returns the number of steps done."""
    done = step + 1
    rows = {hook: distributed.total(x.shape[0]) for hook, x in inputs.items()}  # the whole batch's training rows
    for index, trainee in enumerate(trainees):
        x = inputs[trainee.hook]
        out = _training_step(trainee, x, step, training, distributed, rows[trainee.hook])
        check_finite_step(trainee, out, done, training.learning_rate(step))
        if done % training.log_every == 0 or done == training.total_steps:
            trainee.log_rows.append(_log_row(trainee, *parallel.global_output(x, out, x.shape[0] / rows[trainee.hook],
                                                                              distributed), done, training))
        if training.resamples_after(done):
            dead = trainee.tokens_since_fired >= training.dead_window_tokens
            generator = resampling_generator(training.seed, done, index)
            residual = distributed.gather_rows(out.residual)
            if resample_dead_features(trainee.sae, trainee.optimizer, dead, residual, generator):
                trainee.tokens_since_fired.masked_fill_(dead, 0)
    return done
