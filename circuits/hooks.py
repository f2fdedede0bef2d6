"""Hook names, the one place they are read: parse, validate, order, width, layer.

Hook names are TransformerLens names: `blocks.{layer}.{site}` (`blocks.12.hook_resid_post`,
`blocks.3.attn.hook_pattern`), or a name outside the blocks (`hook_embed`, `ln_final.hook_scale`).
Everything that needs to know where a hook sits in the forward pass (how far a run must go, where a
replay can start, which hooks come before which) asks this module.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, NamedTuple

_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")

# Order of the residual-stream sites within a block; other sites sit between resid_mid and mlp_out.
SITE_ORDER = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_resid_mid": 2, "hook_mlp_out": 3, "hook_resid_post": 4}
_MIDDLE = 2
RESIDUAL_SIZED = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


class HookName(NamedTuple):
    """A parsed hook name: its block (None outside the blocks) and the site within the block."""

    layer: int | None
    site: str


def parse_hook(hook: str) -> HookName:
    """`"blocks.12.hook_resid_post"` -> HookName(12, "hook_resid_post"); `"hook_embed"` -> (None, "hook_embed")."""
    if not isinstance(hook, str) or not hook.strip():
        raise ValueError(f"a hook name must be a non-empty string such as 'blocks.12.hook_resid_post', got {hook!r}")
    match = _BLOCK_HOOK.fullmatch(hook)
    if match is None:
        return HookName(None, hook)
    return HookName(int(match.group(1)), match.group(2))


def layer_of_hook(hook: str) -> int | None:
    """The block index of a hook (`blocks.12.hook_resid_post` -> 12), None outside the blocks."""
    return parse_hook(hook).layer


def hook_order(hook: str) -> tuple[int, int]:
    """Where a block hook sits in the forward pass: (block, place within the block)."""
    layer, site = parse_hook(hook)
    if layer is None:
        raise ValueError(f"hook {hook!r} is not inside a block (blocks.N.*); this needs block hook points")
    return layer, SITE_ORDER.get(site.rsplit(".", 1)[-1], _MIDDLE)


def sorted_hooks(hooks: Iterable[str]) -> list[str]:
    """Block hooks in forward order (hooks outside the blocks last, by name)."""
    return sorted(hooks, key=lambda hook: (layer_of_hook(hook) is None, hook_order(hook) if layer_of_hook(hook)
                                           is not None else (0, 0), hook))


def validate_hooks(model, hooks: Iterable[str]) -> None:
    """Every hook must be a hook point of `model`; unknown ones are named with close valid names."""
    valid = list(model.hook_dict.keys())
    for hook in hooks:
        if not isinstance(hook, str) or not hook.strip():
            raise ValueError(f"empty hook name {hook!r}; give a hook point such as 'blocks.0.hook_resid_post'")
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, valid, n=5, cutoff=0.6)
            hint = f"; close valid names: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown hook point {hook!r} for this model{hint} "
                             f"(the model has {model.cfg.n_layers} blocks, 0..{model.cfg.n_layers - 1})")


def hook_width(model, hook: str) -> int | None:
    """The activation width at a residual-stream-sized hook (d_model); None when not known without running."""
    return model.cfg.d_model if parse_hook(hook).site.endswith(RESIDUAL_SIZED) else None


def check_width(model, hook: str, d_in: int, what: str = "dictionary") -> None:
    """Fail before any compute when a `what` with input width d_in cannot sit at `hook` of `model`."""
    validate_hooks(model, [hook])
    width = hook_width(model, hook)
    if width is not None and width != d_in:
        raise ValueError(f"the {what} for {hook} has d_in={d_in} but this model's {hook} has width {width}; "
                         "use one trained on this model and hook point (--model)")


def stop_layer(hooks: Iterable[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that still computes every hook (None: some hook needs the whole model)."""
    layers = [layer_of_hook(hook) for hook in hooks]
    if not layers or any(layer is None for layer in layers):
        return None
    deepest = max(layers)
    return deepest + 1 if deepest + 1 < n_layers else None


def resume_block(hook: str) -> int | None:
    """The first block to run after an activation at `hook`; None when it is not a resid_pre/post hook."""
    layer, site = parse_hook(hook)
    if layer is None or site not in ("hook_resid_pre", "hook_resid_post"):
        return None
    return layer if site == "hook_resid_pre" else layer + 1
