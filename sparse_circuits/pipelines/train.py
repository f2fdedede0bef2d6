"""Harvest activations at the requested hook points in one pass and train every requested SAE from it.

`TrainRequest` is what `sparse-circuits train` asks for; `train_on_model` takes a loaded model, so
notebooks and the demo call it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from circuits.harvest import harvest_activations
from circuits.hooks import layer_of_hook, validate_hooks
from circuits.models import model_name_of
from sae.activation_store import ActivationStore
from sae.config import DictionaryConfig
from sae.corpus import Corpus, tokenize_contexts
from sae.distributed import Distributed
from sae.io import WEIGHTS_FILE, read_dictionary_config, read_safetensors_header
from sae.locking import folder_lock
from sae.assets import atomic_write_text
from sae.textfiles import read_json
from sae.training import TrainingConfig, TrainResult, train_dictionaries
from sae.training.calibration import calibrate_sparsity, default_pilot_tokens
from sae.training.precision import check_autocast


@dataclass
class TrainRequest:
    """What `sparse-circuits train` asks for."""

    hooks: list[str]
    tokens: int = 2_000_000  # activations harvested (unique training tokens)
    architecture: str = "standard"  # a registered architecture: "standard" (ReLU + L1), "topk", "batchtopk", "jumprelu"
    expansion: int = 4  # dictionary size ratio R = d_sae / d_in
    l1_coefficients: list[float] = field(default_factory=lambda: [1e-3])
    k_values: list[int] = field(default_factory=lambda: [32])
    tied: bool = True
    epochs: float = 1.0  # training tokens = epochs * tokens
    context_size: int = 128
    batch_size: int = 4096
    lr: float = 1e-3
    store_dtype: str = "float16"
    harvest_batch_size: int = 16
    harvest_autocast: str = "off"  # mixed precision for the harvest's forward: "off", "bf16", "fp16"
    seed: int = 0
    checkpoint_every: int = 200
    resample_dead: bool = False
    resample_every: int = 2000
    activations_dir: Path | None = None  # the activation store; None: <out_dir>/activations
    store_memory_mb: int | None = None  # activations held for shuffling (None: the store's default, 8 GiB)
    target_l0: float | None = None  # calibrate alpha (or k) per hook to this L0 instead of using the settings above
    pilot_tokens: int | None = None  # tokens per calibration pilot; None: a quarter of the run (at least 2^18)
    autocast: str | None = None  # "bf16" / "fp16" (CUDA): TrainingConfig.autocast; None: float32
    grad_clip_norm: float | str | None = "auto"  # TrainingConfig.grad_clip_norm ("auto": SAELens' clip, free rows)

    def dictionary_configs(self, d_in_of, model_name: str) -> list[DictionaryConfig]:
        """One config per (hook, sparsity setting: the coefficients or the k values, whichever the architecture
        uses); `d_in_of(hook)` gives each hook's width."""
        from sae.registry import architecture_class

        uses_k = getattr(architecture_class(self.architecture), "sparsity_setting", "l1_coefficient") == "k"
        configs = []
        for hook in self.hooks:
            d_in = d_in_of(hook)
            for setting in (self.k_values if uses_k else self.l1_coefficients):
                configs.append(DictionaryConfig(
                    architecture=self.architecture, d_in=d_in, d_sae=self.expansion * d_in, hook_name=hook,
                    hook_layer=layer_of_hook(hook), model_name=model_name, tied=self.tied, seed=self.seed,
                    l1_coefficient=0.0 if uses_k else float(setting), k=int(setting) if uses_k else None,
                ))
        return configs


def contexts_for_tokens(tokens: int, context_size: int, exclude_bos: bool = True) -> int:
    """How many contexts give at least `tokens` activations (BOS positions are not stored)."""
    per_context = context_size - (1 if exclude_bos else 0)
    return max(1, math.ceil(tokens / per_context))


def harvest_for_training(model, corpus: Corpus, request: TrainRequest, store_dir: Path, progress: bool = True,
                         distributed: Distributed | None = None) -> ActivationStore:
    """Tokenize the train split and harvest every requested hook in one pass (resumes; with `distributed`,
    each rank harvests its share of the shards)."""
    validate_hooks(model, request.hooks)
    n_contexts = contexts_for_tokens(request.tokens, request.context_size)
    contexts = tokenize_contexts(corpus, model.tokenizer, request.context_size, n_contexts, split="train",
                                 seed=request.seed)
    if contexts.shape[0] < n_contexts and progress and (distributed is None or distributed.is_main):
        print(f"note: the corpus train split gave {contexts.shape[0]} contexts, fewer than the {n_contexts} "
              "asked for; training on all of it")
    metadata = {"corpus": corpus.describe(), "seed": request.seed}
    if request.harvest_autocast != "off":  # recorded, so a store is never resumed in another precision
        metadata["autocast"] = request.harvest_autocast
    return harvest_activations(model, contexts, request.hooks, store_dir, dtype=request.store_dtype,
                               batch_size=request.harvest_batch_size, model_name=model_name_of(model),
                               metadata=metadata, progress=progress, autocast=request.harvest_autocast,
                               distributed=distributed)


def request_record(request: TrainRequest, corpus: Corpus | None) -> dict:
    """What a trained dictionary records of the request that made it (cfg.json extra.request), for reuse checks
    (without the corpus when it is None)."""
    record = {"tokens": request.tokens, "epochs": request.epochs, "context_size": request.context_size,
              "store_dtype": request.store_dtype}
    if request.target_l0 is not None:
        record["target_l0"] = request.target_l0
    if corpus is not None:
        record["corpus"] = corpus.describe()
    return json.loads(json.dumps(record))


def dictionary_folder_problem(folder: Path, *, hook: str, model_name: str) -> str | None:
    """Why `folder` is not a complete trained dictionary for this model and hook (None: it is): both files,
    a whole safetensors header, the same model and hook, training finished."""
    try:
        cfg = read_dictionary_config(folder)
        read_safetensors_header(folder / WEIGHTS_FILE)
    except (ValueError, OSError) as error:
        return str(error)
    if (cfg.model_name, cfg.hook_name) != (model_name, hook):
        return f"{folder} was trained on model {cfg.model_name!r} at '{cfg.hook_name}', not {model_name!r} at '{hook}'"
    if cfg.extra.get("training_complete") is False:
        return f"{folder} records that its training did not finish"
    return None


def reuse_mismatch(folder: Path, request: TrainRequest, *, hook: str, model_name: str,
                   corpus: Corpus | None = None) -> str | None:
    """Why the dictionary folder cannot stand for what `request` would train at `hook` (None: it can).

    The folder must be complete (both files, a whole safetensors header, training finished) and record the
    same model, hook, architecture, sparsity, tying, width ratio, batch size, learning rate and seed; folders
    that record the request (extra.request) must match its token budget, epochs and corpus too."""
    problem = dictionary_folder_problem(folder, hook=hook, model_name=model_name)
    if problem is not None:
        return problem
    cfg = read_dictionary_config(folder)
    training = cfg.extra.get("training") or {}
    sparsity = cfg.k if cfg.k is not None else cfg.l1_coefficient
    expected = {"architecture": (cfg.architecture, request.architecture),
                "expansion": (cfg.d_sae // cfg.d_in, request.expansion), "tied": (cfg.tied, request.tied),
                "batch size": (training.get("batch_size"), request.batch_size), "lr": (training.get("lr"), request.lr),
                "seed": (training.get("seed"), request.seed)}
    recorded = cfg.extra.get("request")
    if recorded is not None:
        expected.update({key: (recorded.get(key), value) for key, value in request_record(request, corpus).items()})
    differing = [f"{name} {have!r}, not {want!r}" for name, (have, want) in expected.items() if have != want]
    if request.target_l0 is None and sparsity not in [*request.l1_coefficients, *request.k_values]:
        differing.append(f"sparsity setting {sparsity!r}, not one of the requested")
    return f"{folder} differs from the request: {'; '.join(differing)}" if differing else None


def train_on_model(model, corpus: Corpus, request: TrainRequest, out_dir: str | Path, progress: bool = True,
                   distributed: Distributed | None = None) -> list[TrainResult]:
    """Harvest activations at `request.hooks`, then train every requested SAE from that one harvest.

    `out_dir` is locked for the whole command (sae.locking): a second `train` into it is refused at once.
    With `distributed` (torchrun), every rank runs this alike: harvest and training are data-parallel and
    rank 0 holds the lock and writes what is shared."""
    distributed = distributed or Distributed()
    with folder_lock(out_dir) if distributed.is_main else contextlib.nullcontext():
        return _train_on_model_locked(model, corpus, request, Path(out_dir), progress, distributed)


def _train_on_model_locked(model, corpus: Corpus, request: TrainRequest, out_dir: Path, progress: bool,
                           distributed: Distributed) -> list[TrainResult]:
    device = next(model.parameters()).device  # the SAEs train where the model runs
    check_autocast(request.autocast, device)  # before the harvest: fp16 on CPU is refused at once
    store_dir = Path(request.activations_dir) if request.activations_dir is not None else out_dir / "activations"
    progress = progress and distributed.is_main
    store = harvest_for_training(model, corpus, request, store_dir, progress, distributed)
    if request.store_memory_mb is not None:  # the shuffling block's size, which sets the batch order
        store.memory_budget_bytes = request.store_memory_mb << 20
    training = training_schedule(request, store.n_tokens)
    if training.total_tokens < request.batch_size:
        raise ValueError(f"only {store.n_tokens} tokens were harvested, less than one batch of "
                         f"{request.batch_size}; ask for more --tokens or a smaller --batch-size")
    configs = request.dictionary_configs(store.d_in, model_name_of(model))
    if request.target_l0 is not None:
        configs = calibrated_configs(store, configs, training, request, out_dir, progress=progress,
                                     distributed=distributed, device=device)
    for config in configs:
        config.extra["request"] = request_record(request, corpus)
    return train_dictionaries(store, configs, training, out_dir, progress=progress, distributed=distributed,
                              device=device)


def training_schedule(request: TrainRequest, harvested_tokens: int) -> TrainingConfig:
    """How `request` trains on `harvested_tokens` unique tokens (request.epochs passes over them): the one
    schedule of `train`, from a store or a stream."""
    return TrainingConfig(
        total_tokens=int(request.epochs * harvested_tokens), batch_size=request.batch_size, lr=request.lr,
        seed=request.seed, checkpoint_every=request.checkpoint_every, log_every=25,
        resample_dead=request.resample_dead, resample_every=request.resample_every,
        lr_warmup_steps=min(100, max(1, int(0.05 * request.epochs * harvested_tokens / request.batch_size))),
        dead_window_tokens=min(10_000_000, harvested_tokens), autocast=request.autocast,
        grad_clip_norm=request.grad_clip_norm,
    )


CALIBRATION_FILE = "calibration.json"


def calibrated_configs(store, configs: list[DictionaryConfig], training: TrainingConfig, request: TrainRequest,
                       out_dir: Path, *, progress: bool = True, distributed: Distributed | None = None,
                       device="cpu") -> list[DictionaryConfig]:
    """One config per hook with its sparsity calibrated to `request.target_l0` (sae.training.calibration).

    The choice is kept in OUT/calibration.json (written atomically) and reused by a rerun with the same
    request, so a resumed run trains the same dictionary without repeating the pilots."""
    pilot_tokens = request.pilot_tokens if request.pilot_tokens is not None else default_pilot_tokens(training.total_tokens)
    path = out_dir / CALIBRATION_FILE
    kept = read_json(path, "calibration file") if path.exists() else {}
    kept = kept if isinstance(kept, dict) else {}
    chosen_configs = []
    for hook in dict.fromkeys(config.hook_name for config in configs):
        config = next(config for config in configs if config.hook_name == hook)
        key = json.dumps({"hook": hook, "architecture": config.architecture, "d_sae": config.d_sae, "tied": config.tied,
                          "seed": config.seed, "target_l0": request.target_l0, "pilot_tokens": pilot_tokens,
                          "total_tokens": training.total_tokens, "batch_size": training.batch_size, "lr": training.lr,
                          "method": "short and full-length pilots"},
                         sort_keys=True)
        record = kept.get(key)
        if record is None:
            calibration = calibrate_sparsity(store, config, training, request.target_l0, out_dir / "calibration_pilots",
                                             pilot_tokens=pilot_tokens, progress=progress, distributed=distributed,
                                             device=device)
            record = kept[key] = calibration.record()
            if distributed is None or distributed.is_main:
                atomic_write_text(path, json.dumps(kept, indent=1))
            if progress:
                print(f"calibrated {calibration.describe()}")
        elif progress:
            print(f"calibrated {hook}: {record['setting']} {record['chosen']:.4g} for target L0 {request.target_l0:g} "
                  f"(kept in {path})")
        value = record["chosen"]
        uses_k = record["setting"] == "k"
        chosen_configs.append(dataclasses.replace(
            config, l1_coefficient=0.0 if uses_k else float(value), k=int(value) if uses_k else None,
            extra={**config.extra, "calibration": record}))
    return chosen_configs
