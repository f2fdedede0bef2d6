"""Type checks on a cfg.json's fields, standard library only, so that the app can check a dictionary folder
before torch is imported; `sae.config.DictionaryConfig.from_dict` runs the same checks."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A cfg.json whose fields have the wrong type or value; the message names the field."""


# The type every cfg.json field must have (None allowed where the dataclass default is None).
_FIELD_TYPES = {"architecture": str, "d_in": int, "d_sae": int, "hook_name": str, "model_name": str,
                "l1_coefficient": (int, float), "k": int, "tied": bool, "apply_b_dec_to_input": bool, "dtype": str,
                "exclude_bos": bool, "activation_scale": (int, float), "seed": int, "hook_layer": int, "extra": dict}
_MAY_BE_NONE = {"k", "hook_layer"}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object",
               (int, float): "a number"}


def check_field_types(data: dict[str, Any]) -> None:
    """ConfigError naming the first field of `data` whose JSON type is wrong (e.g. "d_in": "576")."""
    for key, expected in _FIELD_TYPES.items():
        if key not in data or (data[key] is None and key in _MAY_BE_NONE):
            continue
        value = data[key]
        is_bool = isinstance(value, bool)
        wrong = (not isinstance(value, expected) or (is_bool and expected is not bool))
        if wrong:
            raise ConfigError(f"cfg.json field '{key}' is {value!r} ({type(value).__name__}); expected "
                              f"{_TYPE_NAMES[expected]}")


def check_cfg_json(data: Any) -> None:
    """ConfigError unless raw cfg.json contents are an object whose fields have the right types and which names
    its hook point (SAELens v6 keeps hook_name under `metadata`: it counts when the top-level one is empty)."""
    if not isinstance(data, dict):
        raise ConfigError(f"cfg.json holds a JSON {type(data).__name__}, not an object")
    data = dict(data)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    if data.get("hook_name") in (None, "") and metadata.get("hook_name") not in (None, ""):
        data["hook_name"] = metadata["hook_name"]
    for key in ("d_in", "d_sae"):
        if key not in data:
            raise ConfigError(f"cfg.json has no '{key}'; a dictionary config needs d_in and d_sae")
    check_field_types(data)
    if not str(data.get("hook_name", "")).strip():  # a folder the app loads must say where it attaches
        raise ConfigError("cfg.json field 'hook_name' is empty or missing; it must name the hook point, e.g. "
                          "blocks.12.hook_resid_post")
