"""The configuration of one dictionary, stored as `cfg.json` beside `sae_weights.safetensors`.

The file uses SAELens' keys (`architecture`, `d_in`, `d_sae`, `hook_name`, `model_name`, ...), so a
SAELens SAE folder loads here and ours loads there; our own fields sit beside them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architecture names as written in cfg.json. "standard" is SAELens' name for the ReLU SAE.
ARCHITECTURE_ALIASES = {"relu": "standard", "standard": "standard", "topk": "topk"}

_LAYER_PATTERN = re.compile(r"blocks\.(\d+)\.")


def layer_of_hook(hook_name: str) -> int | None:
    """The block index of a TransformerLens hook name (`blocks.12.hook_resid_post` -> 12)."""
    match = _LAYER_PATTERN.match(hook_name)
    return int(match.group(1)) if match else None


@dataclass
class DictionaryConfig:
    """What a dictionary is and where it attaches. Saved as `cfg.json`."""

    architecture: str  # "standard" (ReLU + L1), "topk", or a baseline: "pca", "ica", ...
    d_in: int
    d_sae: int
    hook_name: str = ""
    model_name: str = ""
    l1_coefficient: float = 0.0  # sparsity penalty, in the normalised loss (see sae/training.py)
    k: int | None = None  # active features for TopK
    tied: bool = False  # encoder weight is the transpose of the decoder weight
    apply_b_dec_to_input: bool = True  # encode (x - b_dec), as SAELens does
    dtype: str = "float32"
    exclude_bos: bool = True  # the BOS position was excluded from training and metrics
    activation_scale: float = 1.0  # the scale activations were divided by during training (folded in)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.architecture = ARCHITECTURE_ALIASES.get(self.architecture, self.architecture)
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")

    @property
    def hook_layer(self) -> int | None:
        return layer_of_hook(self.hook_name)

    def to_dict(self) -> dict[str, Any]:
        """cfg.json contents: our fields plus the SAELens (v5 and v6) keys its loaders expect."""
        data = dataclasses.asdict(self)
        data.update(
            {
                "hook_layer": self.hook_layer if self.hook_layer is not None else -1,
                "hook_head_index": None,
                "activation_fn_str": "topk" if self.architecture == "topk" else "relu",
                "activation_fn_kwargs": {"k": self.k} if self.architecture == "topk" else {},
                "normalize_activations": "none",
                "finetuning_scaling_factor": False,
                "prepend_bos": True,
                "device": "cpu",
                "metadata": {"model_name": self.model_name, "hook_name": self.hook_name,
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
        for key in ("hook_name", "model_name"):
            if not data.get(key) and metadata.get(key):
                data[key] = metadata[key]
        if "k" not in data or data["k"] is None:
            data["k"] = (data.get("activation_fn_kwargs") or {}).get("k")
        if data.get("architecture") in (None, ""):
            data["architecture"] = "topk" if data.get("activation_fn_str") == "topk" else "standard"
        if data["architecture"] == "standard" and data.get("activation_fn_str") == "topk":
            data["architecture"] = "topk"  # SAELens v5 wrote TopK SAEs as "standard" + activation_fn_str
        for key in ("d_in", "d_sae"):
            if key not in data:
                raise ValueError(f"cfg.json has no '{key}'; a dictionary config needs d_in and d_sae")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in known}
        kwargs.setdefault("extra", {})
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DictionaryConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); expected a dictionary cfg.json") from error
        return cls.from_dict(data)
