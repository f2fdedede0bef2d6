"""Sparsity set by a target L0 instead of a coefficient: `calibrate_sparsity`.

A coefficient does not transfer between models and layers (measured: L1 alpha 1e-3 gives L0 183 at
SmolLM2-135M blocks.12 and L0 31, half the features dead, at Gemma-3-270M's middle layer), so
`train --target-l0 N` asks for the L0 and this module finds the setting that gives it:

- architectures whose sparsity setting is k (TopK, BatchTopK): k = N; no pilot is needed (TopK's L0 is
  k by construction, BatchTopK's is k on average over a batch);
- architectures with a coefficient (ReLU + L1, JumpReLU's L0 weight): short pilot trainings of several
  coefficients at once (one pass over the first `pilot_tokens` of the same batches, the same schedule
  shape), each measured on a sample of typical tokens (massive activations left out, as in training);
  log L0 is interpolated linearly in log coefficient between the two trials that bracket N, and a second
  round trains three coefficients close to that estimate. That estimate is only a start: L0 keeps moving
  as training goes on (Gemma-3-270M blocks.9, tied ReLU: the coefficient that gave L0 40 after 128 steps
  gave L0 17 after the run's 293; SmolLM2 blocks.10/20 drifted by under 10%), so three pilots as long as
  the run itself (0.5x, 1x, 2x the estimate, one pass, side by side) are trained and the coefficient is
  interpolated between the two of them that bracket N (if none do, three more past the extreme).

The cost is about four trainings of one dictionary beside the run's own (the short pilots add about one
more). Pilot dictionaries are trained in a scratch folder that is removed afterwards; the trials are
returned (and recorded by the caller in cfg.json). A long run can instead hold L0 during training
(TrainingConfig.target_l0, sae/training/control.py); on runs of a few hundred steps that controller
overshoots (L0 responds to the coefficient with a lag of tens of steps), so `train --target-l0` does not use it.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import torch

from sae.batches import BatchSource
from sae.config import DictionaryConfig
from sae.distributed import Distributed
from sae.metrics import l0, typical_token_mask
from sae.registry import architecture_class
from sae.training.config import TrainingConfig

MIN_PILOT_TOKENS = 1 << 18
PILOT_FRACTION = 0.25
FIRST_ROUND_FACTORS = (1 / 3, 1.0, 3.0, 9.0)  # times the starting coefficient
SECOND_ROUND_FACTORS = (0.8, 1.0, 1.25)  # times the first round's estimate
FULL_ROUND_FACTORS = (0.5, 1.0, 2.0)  # times the short pilots' estimate, trained as long as the run
MEASURE_SEED = 1_000_003  # the L0 sample is drawn with its own seed, not the training order
MEASURE_ROWS = 8192
MIN_L0 = 1e-2  # a pilot with no active feature counts as this L0 in the log-log interpolation
COARSE_BRACKET = 4.0  # a full-length bracketing pair whose L0s differ by more than this gets a finer round


@dataclasses.dataclass
class Calibration:
    """What `calibrate_sparsity` chose for one hook, and the trials behind it."""

    hook: str
    architecture: str
    target_l0: float
    setting: str  # "l1_coefficient" or "k"
    chosen: float
    pilot_tokens: int
    trials: list[tuple[float, float]]  # (coefficient, measured pilot L0), in the order trained
    # (coefficient, measured L0) of pilots as long as the run itself; the choice interpolates these when present
    full_trials: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def record(self) -> dict:
        """The JSON form kept in cfg.json extra.calibration."""
        return {"target_l0": self.target_l0, "setting": self.setting, "chosen": self.chosen,
                "pilot_tokens": self.pilot_tokens, "trials": [[value, l0_] for value, l0_ in self.trials],
                "full_length_trials": [[value, l0_] for value, l0_ in self.full_trials]}

    def describe(self) -> str:
        if not self.trials:
            return f"{self.hook}: {self.setting} {self.chosen:g} for target L0 {self.target_l0:g} (exact by construction)"
        tried = ", ".join(f"{value:.3g} -> L0 {measured:.1f}" for value, measured in self.trials)
        full = ", ".join(f"{value:.3g} -> L0 {measured:.1f}" for value, measured in self.full_trials)
        return (f"{self.hook}: {self.setting} {self.chosen:.4g} for target L0 {self.target_l0:g} "
                f"(pilots on {self.pilot_tokens:,} tokens: {tried}" + (f"; as long as the run: {full})" if full else ")"))


def default_pilot_tokens(total_tokens: int) -> int:
    """A quarter of the run, at least 2^18 tokens, never more than the run."""
    return min(total_tokens, max(MIN_PILOT_TOKENS, int(PILOT_FRACTION * total_tokens)))


def pilot_training(training: TrainingConfig, pilot_tokens: int) -> TrainingConfig:
    """The run's schedule shrunk to `pilot_tokens` (warm-up and decay keep their share of the steps)."""
    full_steps = training.total_steps
    pilot = dataclasses.replace(training, total_tokens=max(training.batch_size, pilot_tokens), checkpoint_every=None,
                                resample_dead=False, log_every=max(1, training.log_every), target_l0=None)
    share = pilot.total_steps / full_steps
    warmup = max(1, round(training.lr_warmup_steps * share)) if training.lr_warmup_steps else 0
    l1_warmup = None if training.l1_warmup_steps is None else max(1, round(training.l1_warmup_steps * share))
    return dataclasses.replace(pilot, lr_warmup_steps=warmup, l1_warmup_steps=l1_warmup)


def measured_l0(dictionary, rows: torch.Tensor) -> float:
    """Mean active features per typical token (massive activations left out, as training leaves them out)."""
    rows = rows[typical_token_mask(rows)]
    with torch.no_grad():
        return float(l0(dictionary.encode(rows)).mean())


def measurement_rows(source: BatchSource, hook: str, batch_size: int) -> torch.Tensor:
    """About MEASURE_ROWS activations at `hook`, drawn in the run's batch size with a seed of their own."""
    batches = source.batches([hook], batch_size, MEASURE_SEED)
    parts = [next(batches)[hook].float() for _ in range(max(1, math.ceil(MEASURE_ROWS / batch_size)))]
    return torch.cat(parts)


def _log_points(trials: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Trials sorted by coefficient, positive coefficients only, L0 floored at MIN_L0 (so logs exist)."""
    return sorted((value, max(measured, MIN_L0)) for value, measured in trials if value > 0)


def interpolate_setting(trials: list[tuple[float, float]], target_l0: float) -> float | None:
    """The coefficient at which log L0 reaches log target, linear in log coefficient between the closest
    bracketing pair of trials (L0 falls as the coefficient grows); None when no pair brackets the target."""
    points = _log_points(trials)
    best = None
    for (low, l0_low), (high, l0_high) in zip(points, points[1:]):
        if not (l0_low >= target_l0 >= l0_high) or l0_low == l0_high:
            continue
        t = (math.log(l0_low) - math.log(target_l0)) / (math.log(l0_low) - math.log(l0_high))
        estimate = math.exp(math.log(low) + t * (math.log(high) - math.log(low)))
        width = math.log(high / low)
        if best is None or width < best[0]:
            best = (width, estimate)
    return None if best is None else best[1]


def calibrate_sparsity(source: BatchSource, config: DictionaryConfig, training: TrainingConfig, target_l0: float,
                       scratch_dir: str | Path, *, pilot_tokens: int | None = None, progress: bool = True,
                       device: str | torch.device = "cpu", max_rounds: int = 4, full_length: bool = True,
                       distributed: Distributed | None = None) -> Calibration:
    """Find the sparsity setting of `config`'s architecture that gives L0 `target_l0` at its hook.

    In a data-parallel run every rank calls this alike: the pilots train data-parallel, every rank measures
    the same (identical) pilot weights on the same rows, so all choose the same setting."""
    distributed = distributed or Distributed()
    from sae.training.loop import train_dictionaries  # the loop imports nothing from here

    if not (math.isfinite(target_l0) and 0 < target_l0 < config.d_sae):
        raise ValueError(f"target L0 must be above 0 and below the dictionary width {config.d_sae}, got {target_l0}")
    setting = getattr(architecture_class(config.architecture), "sparsity_setting", "l1_coefficient")
    hook = config.hook_name
    if setting == "k":
        return Calibration(hook, config.architecture, target_l0, "k", float(max(1, round(target_l0))), 0, [])
    pilot_tokens = default_pilot_tokens(training.total_tokens) if pilot_tokens is None else pilot_tokens
    pilot = pilot_training(training, pilot_tokens)
    rows = measurement_rows(source, hook, training.batch_size)
    start = config.l1_coefficient if config.l1_coefficient > 0 else 1e-3
    scratch = Path(scratch_dir)
    trials: list[tuple[float, float]] = []

    full_trials: list[tuple[float, float]] = []
    full = dataclasses.replace(training, checkpoint_every=None, target_l0=None)

    def train_round(schedule: TrainingConfig, folder_name: str, values: list[float],
                    into: list[tuple[float, float]]) -> None:
        """Train one pilot per coefficient side by side on `schedule`; append (coefficient, L0) to `into`."""
        configs = [dataclasses.replace(config, l1_coefficient=float(value), extra={}) for value in values]
        names = [f"pilot_{position}" for position in range(len(configs))]
        folder = scratch / folder_name
        if distributed.is_main:
            shutil.rmtree(folder, ignore_errors=True)
        distributed.barrier()
        results = train_dictionaries(source, configs, schedule, folder, names=names, progress=progress, device=device,
                                     distributed=distributed)
        into.extend((float(value), measured_l0(result.dictionary, rows)) for value, result in zip(values, results))

    def run_round(index: int, values: list[float]) -> None:
        train_round(pilot, f"round_{index}", values, trials)

    def run_full_round(index: int, values: list[float]) -> None:
        train_round(full, f"full_round_{index}", values, full_trials)

    try:
        run_round(0, [start * factor for factor in FIRST_ROUND_FACTORS])
        for index in range(1, max_rounds):
            estimate = interpolate_setting(trials, target_l0)
            if estimate is None:  # every trial on one side: move past the extreme trial
                run_round(index, beyond_extreme(trials, target_l0, step=9.0))
                continue
            run_round(index, [estimate * factor for factor in SECOND_ROUND_FACTORS])
            break
        estimate = interpolate_setting(trials, target_l0)
        if estimate is not None and full_length and pilot.total_steps < training.total_steps:
            run_full_round(0, [estimate * factor for factor in FULL_ROUND_FACTORS])
            finer = interpolate_setting(full_trials, target_l0)
            if finer is None:
                run_full_round(1, beyond_extreme(full_trials, target_l0, step=4.0))
            elif bracket_ratio(full_trials, target_l0) > COARSE_BRACKET:  # a cliff (L0 collapsing): look closer
                run_full_round(1, [finer * factor for factor in SECOND_ROUND_FACTORS])
    finally:
        distributed.barrier()
        if distributed.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
    chosen = interpolate_setting(full_trials or trials, target_l0)
    if chosen is None:
        tried = full_trials or trials
        value, measured = min(tried, key=lambda trial: abs(math.log(trial[1] / target_l0)) if trial[1] > 0 else math.inf)
        raise ValueError(f"could not reach L0 {target_l0:g} at '{hook}': the closest pilot ({setting} {value:.3g}) gave "
                         f"L0 {measured:.1f}; trials: {trials}; full-length trials: {full_trials}")
    return Calibration(hook, config.architecture, target_l0, setting, chosen, pilot.total_tokens, trials, full_trials)


def bracket_ratio(trials: list[tuple[float, float]], target_l0: float) -> float:
    """L0 ratio of the closest pair of neighbouring trials that brackets the target (inf: none does)."""
    points = _log_points(trials)
    ratios = [low_l0 / high_l0 for (_, low_l0), (_, high_l0) in zip(points, points[1:])
              if low_l0 >= target_l0 >= high_l0 and high_l0 > 0]
    return min(ratios, default=math.inf)


def beyond_extreme(trials: list[tuple[float, float]], target_l0: float, *, step: float) -> list[float]:
    """Three coefficients past the extreme trial when every trial is on one side of the target."""
    values = [value for value, _ in trials]
    too_dense = all(measured > target_l0 for _, measured in trials)
    extreme = max(values) if too_dense else min(values)
    centre = extreme * (step if too_dense else 1 / step)
    return [centre * factor for factor in (1 / math.sqrt(step), 1.0, math.sqrt(step))]
