"""Holding L0 at a target while a coefficient-sparsity SAE trains (TrainingConfig.target_l0).

A sparsity coefficient found on a short pilot (sae.training.calibration) does not give the same L0 in
the full run: L0 keeps moving as training goes on (measured on a synthetic test: the coefficient that gave
L0 6 after half the steps gave 9.2 after all of them), and the drift differs by recipe, layer and model.
So when a target is set, the coefficient is steered during the run:

    log c  <-  log c + gain * (lr_t / lr) * (log L0_batch - log target)

after every step past the sparsity warm-up, where L0_batch is the mean active features of the step's
training rows (typical tokens) and the effective coefficient is alpha * c. It is an integral controller
on log L0: a batch denser than the target raises the coefficient a little. The step is scaled by the
learning-rate schedule's factor, so the coefficient moves only as fast as the weights can answer it and
stops moving when the learning rate reaches 0 (no wind-up in the final decay). The state (log c per SAE)
is saved in checkpoints, so a resumed run takes the same steps.

Architectures whose sparsity setting is k (TopK, BatchTopK) hit an L0 by construction and are not steered.
"""

from __future__ import annotations

import math


MAX_ERROR = 1.0  # log L0 error counted per step at most
MAX_LOG_FACTOR = math.log(1e3)  # the controller never moves the coefficient more than 1000x either way


def steers(sparsity_setting: str, target_l0: float | None) -> bool:
    """Whether an SAE with this sparsity setting is steered toward `target_l0`."""
    return target_l0 is not None and sparsity_setting != "k"


def next_log_factor(log_factor: float, batch_l0: float, target_l0: float, *, gain: float, lr_fraction: float
                    ) -> float:
    """One controller step (see the module docstring). The error is clipped to +-MAX_ERROR (a factor e in L0), so a
    transient collapse (all features silent for a few steps) or burst cannot wind the coefficient far away."""
    error = math.log(max(batch_l0, 1e-2)) - math.log(target_l0)
    error = min(MAX_ERROR, max(-MAX_ERROR, error))
    return min(MAX_LOG_FACTOR, max(-MAX_LOG_FACTOR, log_factor + gain * lr_fraction * error))


def controlled_coefficient(alpha: float, log_factor: float) -> float:
    """The coefficient in effect: the configured alpha times the controller's factor."""
    return alpha * math.exp(log_factor)
