"""Training sparse autoencoders on activations: `train_dictionaries(source, configs, training, out_dir)`.

loop.py (the loop, logging, outputs), config.py (TrainingConfig), checkpoints.py (exact resume),
resampling.py (dead features). The loop knows no architecture: each SAE owns its training loss.
"""

from sae.topk import aux_k_loss  # noqa: F401  (here before the split into a package)
from sae.training.checkpoints import (CHECKPOINT_FOLDER, CHECKPOINTS_KEPT, CheckpointWriteError, latest_checkpoint,
                                      write_checkpoint)
from sae.training.config import TrainingConfig
from sae.training.loop import (LOG_COLUMNS, LOG_FILE, TrainResult, activation_scale, default_names,
                               normalize_decoder_rows, remove_parallel_decoder_gradient, train_dictionaries)
from sae.training.resampling import RESAMPLED_ENCODER_NORM, resample_dead_features

__all__ = ["CHECKPOINT_FOLDER", "CHECKPOINTS_KEPT", "LOG_COLUMNS", "LOG_FILE", "RESAMPLED_ENCODER_NORM",
           "CheckpointWriteError", "TrainResult", "TrainingConfig", "activation_scale", "aux_k_loss", "default_names",
           "latest_checkpoint", "normalize_decoder_rows", "remove_parallel_decoder_gradient", "resample_dead_features",
           "train_dictionaries", "write_checkpoint"]
