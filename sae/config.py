"""The configuration of one dictionary, stored as `cfg.json` beside `sae_weights.safetensors`.

The file uses SAELens' keys (`architecture`, `d_in`, `d_sae`, `hook_name`, `model_name`, ...), so a
SAELens SAE folder loads here and ours loads there; our own fields sit beside them. Every SAELens
option that changes the maths is either honoured or rejected here with an error naming it
(`check_saelens_options`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae.config_checks import ConfigError, check_field_types  # noqa: F401 (ConfigError re-exported)
from sae.finite import check_finite_number

# Architecture names as written in cfg.json. "standard" is SAELens' name for the ReLU SAE.
ARCHITECTURE_ALIASES = {"relu": "standard", "standard": "standard", "topk": "topk"}
# The SAELens version whose cfg.json layout we write: SAELens reads files claiming >= 6.0 without conversion.
SAELENS_LAYOUT_VERSION = "6.0.0"
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")


def layer_of_hook(hook_name: str) -> int | None:  # deprecated: use circuits.hooks.layer_of_hook
    return int(match.group(1)) if (match := re.match(r"blocks\.(\d+)\.", hook_name)) else None


@dataclass(frozen=True)
class SaelensOptions:
    """The SAELens options a loader must apply to the weights (the others are rejected or no-ops)."""

    rescale_acts_by_decoder_norm: bool = False  # codes = pre-activations x decoder row norm (folded on load)


def _reject(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"cfg.json sets {key}={value!r}, which this library does not support ({why}); "
                      "convert the SAE (e.g. fold it into the weights with sae_lens) or use another one")


def check_saelens_options(data: dict[str, Any]) -> SaelensOptions:
    """Honour or reject every SAELens cfg option that changes encode/decode; `data` is raw cfg.json."""
    metadata = data.get("metadata") or {}
    head = data.get("hook_head_index", metadata.get("hook_head_index"))
    if head is not None:
        raise _reject("hook_head_index", head, "SAEs on a single attention head's output")
    normalisation = data.get("normalize_activations")
    if normalisation in (True, "expected_average_only_in"):
        # As sae_lens' own load_from_disk: no run-time normalisation (its trainer folds the factor into the
        # weights on save); inputs are used as they are.
        warnings.warn("cfg.json sets normalize_activations='expected_average_only_in': as in sae_lens, no "
                      "normalisation is applied at run time (the factor must already be folded into the weights)",
                      stacklevel=3)
    elif normalisation not in (None, False, "none"):
        raise _reject("normalize_activations", normalisation, "run-time input normalisation")
    if (data.get("reshape_activations") or "none") != "none":
        raise _reject("reshape_activations", data["reshape_activations"], "per-head reshaping of hook_z")
    if data.get("finetuning_scaling_factor"):
        raise _reject("finetuning_scaling_factor", data["finetuning_scaling_factor"], "a fine-tuned code scale")
    activation_fn = data.get("activation_fn", data.get("activation_fn_str"))
    if activation_fn not in (None, "relu", "topk"):
        raise _reject("activation_fn", activation_fn, "only relu and topk activations")
    dtype = str(data.get("dtype") or "float32").removeprefix("torch.")
    if dtype not in FLOAT_DTYPES:
        raise _reject("dtype", data.get("dtype"), f"expected one of {list(FLOAT_DTYPES)}")
    return SaelensOptions(rescale_acts_by_decoder_norm=bool(data.get("rescale_acts_by_decoder_norm", False)))


@dataclass
class DictionaryConfig:
    """What a dictionary is and where it attaches. Saved as `cfg.json`."""

    architecture: str  # "standard" (ReLU + L1), "topk", "batchtopk", "jumprelu" (see sae/registry.py)
    d_in: int
    d_sae: int
    hook_name: str = ""
    model_name: str = ""
    l1_coefficient: float = 0.0  # sparsity penalty in the normalised loss: L1 (standard), L0 (jumprelu)
    k: int | None = None  # active features per token for TopK (on average over the batch for BatchTopK)
    tied: bool = False  # encoder weight is the transpose of the decoder weight
    apply_b_dec_to_input: bool = True  # encode (x - b_dec), as SAELens does
    dtype: str = "float32"
    exclude_bos: bool = True  # the BOS position was excluded from training and metrics
    activation_scale: float = 1.0  # the scale activations were divided by during training (folded in)
    seed: int = 0
    hook_layer: int | None = None  # the block index of hook_name, set by whoever builds the config
    extra: dict[str, Any] = field(default_factory=dict)  # architecture options and training records

    def __post_init__(self) -> None:
        self.architecture = ARCHITECTURE_ALIASES.get(self.architecture, self.architecture)
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        check_finite_number("l1_coefficient", self.l1_coefficient, minimum=0.0)
        check_finite_number("activation_scale", self.activation_scale)
        if self.hook_layer is not None and self.hook_layer < 0:
            self.hook_layer = None  # SAELens writes -1 for "unknown"

    def to_dict(self) -> dict[str, Any]:
        """cfg.json contents: our fields plus the SAELens (v5 and v6) keys its loaders expect."""
        data = dataclasses.asdict(self)
        data.update(
            {
                "hook_layer": self.hook_layer if self.hook_layer is not None else -1,
                "hook_head_index": None,
                "normalize_activations": "none",
                "reshape_activations": "none",
                "finetuning_scaling_factor": False,
                "prepend_bos": True,
                "device": "cpu",
                "metadata": {"model_name": self.model_name, "hook_name": self.hook_name, "hook_head_index": None,
                             "prepend_bos": True, "sae_lens_version": SAELENS_LAYOUT_VERSION,
                             "sae_lens_training_version": None},
                "library": "sparse-circuits",
            }
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DictionaryConfig":
        """Read our cfg.json or a SAELens one (v5 flat keys or v6 `metadata`)."""
        data = dict(data)
        metadata = data.get("metadata") or {}
        for key in ("hook_name", "model_name", "hook_layer"):
            if data.get(key) in (None, "") and metadata.get(key) not in (None, ""):
                data[key] = metadata[key]
        if "k" not in data or data["k"] is None:
            data["k"] = (data.get("activation_fn_kwargs") or {}).get("k")
        activation_fn = data.get("activation_fn", data.get("activation_fn_str"))
        if data.get("architecture") in (None, ""):
            data["architecture"] = "topk" if activation_fn == "topk" else "standard"
            warnings.warn(f"cfg.json has no 'architecture'; assuming '{data['architecture']}' (as SAELens does)",
                          stacklevel=2)
        if data["architecture"] == "standard" and activation_fn == "topk":
            data["architecture"] = "topk"  # SAELens v5 wrote TopK SAEs as "standard" + activation_fn_str
        for key in ("d_in", "d_sae"):
            if key not in data:
                raise ValueError(f"cfg.json has no '{key}'; a dictionary config needs d_in and d_sae")
        if isinstance(data.get("dtype"), str):
            data["dtype"] = data["dtype"].removeprefix("torch.")
        check_field_types(data)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in known}
        kwargs.setdefault("extra", {})
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DictionaryConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ConfigError(f"{path} is not valid JSON ({error}); expected a dictionary cfg.json") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; expected a dictionary "
                              "cfg.json")
        return cls.from_dict(data)
