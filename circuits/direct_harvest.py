"""Residual-stream harvesting through the plain Hugging Face modules under a TransformerBridge.

The bridge wraps every HF submodule in place (a hook point on each, attention re-implemented to expose its
pattern) and cannot stop before the unembedding when the deepest hook is in the last block; measured on
SmolLM2 on CPU that made a harvest at layer 29 of 30 cost 1.3x a plain full forward (results/harvest_speed.md).
At block boundaries (`blocks.L.hook_resid_pre`, `blocks.L.hook_resid_post`) the activations are exactly the
inputs and outputs of the HF decoder layers, so this module runs a *plain view* of the model: the same HF
modules and parameters (shared, nothing copied), with each bridge component swapped back for the module it
wraps, records those tensors with forward hooks, and stops by raising after the last one is recorded (no
later block, no final norm, no unembedding).

`collect_direct` returns None where the view cannot stand in for the bridge (other hooks, hooks attached to the
bridge's hook points, weights processed by compatibility mode, a wrapper that patched its module's forward, an
attention the bridge computes differently from HF, such as GPT-2's fused QKV);
the caller then runs the bridge.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict

import torch

from circuits.hooks import parse_hook

DIRECT_SITES = ("hook_resid_pre", "hook_resid_post")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_VIEWS: "weakref.WeakKeyDictionary[torch.nn.Module, PlainView | None]" = weakref.WeakKeyDictionary()


class _Unsupported(Exception):
    """The plain view cannot be built for this model (the bridge path is used instead)."""


class _Recorded(Exception):
    """Raised by the last recording hook: every requested activation is in hand, stop the forward."""


class PlainView:
    """The HF model with the bridge's wrappers removed: `root` (the causal LM) and its decoder `layers`."""

    def __init__(self, root: torch.nn.Module, layers: list[torch.nn.Module]):
        self.root, self.layers = root, layers


def supports_direct(hooks: list[str], n_layers: int) -> bool:
    """True when every hook is a block-boundary residual hook the plain view records."""
    for hook in hooks:
        layer, site = parse_hook(hook)
        if layer is None or site not in DIRECT_SITES or not 0 <= layer < n_layers:
            return False
    return bool(hooks)


def bridge_hooks_attached(model) -> bool:
    """Whether any hook point of the bridge has a hook on it (a plain view would silently skip it)."""
    return any(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
               for point in model.hook_dict.values())


def plain_view(model) -> PlainView | None:
    """The bridge's plain view, built once per model (None where it cannot stand in for the bridge)."""
    if model in _VIEWS:
        return _VIEWS[model]
    try:
        view = _build_view(model)
    except _Unsupported:
        view = None
    _VIEWS[model] = view
    return view


def _build_view(model) -> PlainView:
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    if getattr(model, "compatibility_mode", False) or getattr(model, "_weights_processed", False):
        raise _Unsupported("weights processed by the bridge")
    original = getattr(model, "original_model", None)
    if original is None or not hasattr(model, "blocks"):
        raise _Unsupported("no HF model or no blocks")
    if not all(type(getattr(block, "attn", None)) is _exact_attention() for block in model.blocks):
        # The bridge re-implements attention; only its rotary (position-embeddings) attention is HF's eager math
        # step by step (bit-identical, tests/test_direct_harvest.py). GPT-2's fused-QKV one differs by ~1e-8,
        # enough to move a discrete search downstream (IOI baselines), so those models stay on the bridge.
        raise _Unsupported("attention not bit-identical to HF eager")
    memo: dict[int, torch.nn.Module] = {}

    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        while isinstance(module, GeneralizedComponent):
            inner = module.original_component
            if inner is None:
                raise _Unsupported(f"{type(module).__name__} wraps no module")
            module = inner
        if id(module) in memo:
            return memo[id(module)]
        if "forward" in module.__dict__:  # a wrapper patched this module's forward: it may route through the bridge
            raise _Unsupported(f"{type(module).__name__}.forward is patched")
        clone = copy.copy(module)  # shares parameters, buffers and config; own children and hook tables
        memo[id(module)] = clone
        for table in _HOOK_DICTS:
            if table in module.__dict__:
                clone.__dict__[table] = OrderedDict()
        clone.__dict__["_modules"] = {name: None if child is None else unwrap(child)
                                      for name, child in module._modules.items()}
        return clone

    root = unwrap(original)
    layers = []
    for block in model.blocks:
        layer = block.original_component
        if layer is None or id(layer) not in memo:
            raise _Unsupported("a block is not inside the HF model")
        layers.append(memo[id(layer)])
    return PlainView(root, layers)


def _exact_attention() -> type:
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge)

    return PositionEmbeddingsAttentionBridge


def collect_direct(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor] | None:
    """{hook: [batch, pos, d_model]} through the plain view, or None when the bridge must run instead."""
    if not supports_direct(hooks, model.cfg.n_layers) or bridge_hooks_attached(model):
        return None
    view = plain_view(model)
    if view is None:
        return None
    captured: dict[str, torch.Tensor] = {}
    wanted = set(hooks)

    def keep(hook: str, value) -> None:
        captured[hook] = (value[0] if isinstance(value, (tuple, list)) else value).detach()
        if wanted.issubset(captured):
            raise _Recorded

    handles = []
    try:
        for hook in wanted:
            layer, site = parse_hook(hook)
            module = view.layers[layer]
            if site == "hook_resid_pre":
                handles.append(module.register_forward_pre_hook(
                    lambda _, args, kwargs, hook=hook: keep(hook, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(lambda _, args, output, hook=hook: keep(hook, output)))
        try:
            view.root(input_ids=tokens, use_cache=False)
        except _Recorded:
            pass
    finally:
        for handle in handles:
            handle.remove()
    if not wanted.issubset(captured):
        return None
    return {hook: captured[hook] for hook in hooks}
