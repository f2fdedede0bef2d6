"""How to train: the schedule (learning rate, sparsity warm-up), dead-feature windows, resampling."""

from __future__ import annotations

from dataclasses import dataclass

from sae.finite import check_finite_number

B_DEC_INITS = ("mean", "geometric_median", "zero")
AUTOCAST_SETTINGS = ("bf16", "fp16")  # TrainingConfig.autocast (sae/training/precision.py)
AUTO_DECODER_INIT_NORM = 0.1  # decoder_init_norm "auto" with free rows
# grad_clip_norm "auto": SAELens clips its gradient's norm at 1.0, and its loss (squared error summed over the d_in
# dimensions) is d_in times ours (averaged over them), so the same clip is AUTO_GRAD_CLIP / d_in here. At 146 steps
# on SmolLM2 blocks.12 it took ReLU+L1 from L0 149 / FVU 0.193 to L0 100 / FVU 0.190 and TopK k=60 from FVU 0.183
# to 0.178 (results/saelens/ablation_clip.md): Adam's second moments no longer carry the first steps' large gradients.
AUTO_GRAD_CLIP = 1.0


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
    aux_k_coefficient: float = 1 / 32  # AuxK weight for the architectures that use it (TopK, BatchTopK); 0: off
    dense_threshold: float = 0.1  # logged dense_fraction: features firing on more than this fraction of a batch
    exclude_outliers: bool = True  # leave massive activations (norm > 10x the batch median) out of every step
    # The recipe (see the module docstring of sae/training/loop.py and results/saelens/ablation.md):
    b_dec_init: str = "mean"  # decoder bias at step 0: "mean" / "geometric_median" of batch 0's typical rows, or "zero"
    # True: decoder rows held at norm 1 (the paper); False: free rows, sparsity measured on codes x row norm
    # (SAELens); None: free for untied SAEs of architectures that support it (standard, topk), else unit.
    unit_norm_decoder: bool | None = None
    # initial decoder row norm (the encoder starts as the decoder's transpose); None: 1; "auto": 0.1 (SAELens,
    # Anthropic's April 2024 update) for SAEs trained with free rows, 1 for the others.
    decoder_init_norm: float | str | None = "auto"
    # clip each SAE's gradient (global norm) at this value before each step; "auto": AUTO_GRAD_CLIP / d_in (SAELens'
    # clip, in our loss's units) for SAEs trained with free rows (SAELens' recipe), none for the others; None: off
    grad_clip_norm: float | str | None = "auto"
    # Hold L0 at this target by steering the sparsity coefficient during the run (sae/training/control.py;
    # architectures with a coefficient only: TopK/BatchTopK get their L0 from k). None: the coefficient is fixed.
    target_l0: float | None = None
    l0_control_gain: float = 0.03  # the controller's step, log coefficient per unit of log L0 error
    l0_control_start: float = 0.0  # fraction of the steps before the controller starts (it never starts before
    # the sparsity warm-up ends)
    # Mixed precision of the SAE's forward and loss (sae/training/precision.py): "bf16", "fp16" (CUDA only, with a
    # loss scaler) or None (float32). Master weights and Adam moments stay float32 either way.
    autocast: str | None = None

    def __post_init__(self) -> None:
        check_finite_number("total_tokens", self.total_tokens)
        check_finite_number("lr", self.lr, minimum=0.0)
        check_finite_number("aux_k_coefficient", self.aux_k_coefficient, minimum=0.0)
        check_finite_number("dense_threshold", self.dense_threshold)
        for index, beta in enumerate(self.adam_betas):
            check_finite_number(f"adam_betas[{index}]", beta, minimum=0.0)
            if beta >= 1:
                raise ValueError(f"adam_betas[{index}] must be below 1, got {beta}")
        if self.batch_size < 1 or self.total_tokens < 1:
            raise ValueError(f"total_tokens and batch_size must be positive, got total_tokens={self.total_tokens}, "
                             f"batch_size={self.batch_size}")
        if not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise ValueError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        for name in ("log_every", "resample_every", "dead_window_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {list(B_DEC_INITS)}, got {self.b_dec_init!r}")
        for name in ("decoder_init_norm", "grad_clip_norm"):
            value = getattr(self, name)
            if value is None or value == "auto":
                continue
            check_finite_number(name, value, minimum=0.0)
            if value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.target_l0 is not None:
            check_finite_number("target_l0", self.target_l0, minimum=0.0)
            if self.target_l0 <= 0:
                raise ValueError(f"target_l0 must be positive or None, got {self.target_l0}")
        check_finite_number("l0_control_gain", self.l0_control_gain, minimum=0.0)
        if not 0.0 <= self.l0_control_start < 1.0:
            raise ValueError(f"l0_control_start must be in [0, 1), got {self.l0_control_start}")
        if self.autocast is not None and self.autocast not in AUTOCAST_SETTINGS:
            raise ValueError(f"autocast must be one of {list(AUTOCAST_SETTINGS)} or None, got {self.autocast!r}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 or None, got {self.checkpoint_every}")

    def free_decoder_rows(self, tied: bool, supported: bool) -> bool:
        """Whether an SAE (tied or not, its architecture supporting free rows or not) trains with free decoder rows."""
        if self.unit_norm_decoder is None:
            return supported and not tied
        return not self.unit_norm_decoder

    def initial_row_norm(self, free_rows: bool) -> float | None:
        """The decoder row norm an SAE starts at (None: unit rows as built)."""
        if self.decoder_init_norm == "auto":
            return AUTO_DECODER_INIT_NORM if free_rows else None
        return self.decoder_init_norm

    def clip_norm(self, d_in: int, free_rows: bool) -> float | None:
        """The gradient-norm clip of an SAE with d_in inputs, trained with free decoder rows or not (None: none)."""
        if self.grad_clip_norm == "auto":
            return AUTO_GRAD_CLIP / d_in if free_rows else None
        return self.grad_clip_norm

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

    def l0_control_active(self, step: int) -> bool:
        """Whether the L0 controller acts after the step with 0-based index `step` (see sae/training/control.py)."""
        return (self.target_l0 is not None and step + 1 >= self.l1_warmup
                and step >= self.l0_control_start * self.total_steps)

    def sparsity_ramp(self, step: int) -> float:
        """The warm-up factor (0..1] of the sparsity coefficient at 0-based `step`."""
        return min(1.0, (step + 1) / self.l1_warmup) if self.l1_warmup > 0 else 1.0

    def l1_coefficient(self, alpha: float, step: int) -> float:
        return alpha * self.sparsity_ramp(step)
