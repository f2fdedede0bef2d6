"""Splicing dictionaries into a model at hook points, exactly: reconstruction + error term.

At a spliced hook point the activation x is replaced by

    codes = encode(x)                     (zero at BOS when exclude_bos, and at massive activations when
                                           exclude_outliers: those positions are left alone)
    error = x - decode(codes)             (what the dictionary misses)
    out   = decode(codes') + error        (codes' = the codes after any hook edited them)

BOS and the massive activations are the engine's passed-through positions (circuits.engine.positions,
the one rule every experiment uses): their codes are zero, so the error term carries them unchanged
and no feature edit touches them.

So with nothing edited `out == x` (bit for bit: the unedited path returns x itself), and editing
feature i by delta changes the activation by exactly delta * feature_directions[i]. Each spliced
dictionary brings hook points of its own, named as SAELens names them, so `run_with_cache`,
`run_with_hooks` and `model.hooks` see them like any other hook point:

    {hook}.hook_sae_input   [batch, pos, d_in]        the activation arriving at the hook
    {hook}.hook_sae_acts_post  [batch, pos, n_features]  the feature activations (edit these)
    {hook}.hook_sae_recons  [batch, pos, d_in]        decode(codes')
    {hook}.hook_sae_error   [batch, pos, d_in]        x - decode(codes), the error node
    {hook}.hook_sae_output  [batch, pos, d_in]        what the model continues with

With `error_gradients=True` (the default, unlike SAELens) the error term stays in the autograd
graph: gradients reach `hook_sae_error` (error nodes get attributions) and the gradient flowing
upstream of the hook is the true model's. With False the error is detached, as in SAELens, and
upstream gradients flow through the dictionary's encoder only.

Use it as a context manager (`with splice_dictionaries(model, dictionaries): ...`) or keep the
returned `Splice` and call `.remove()` when done (the persistent option).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from circuits.engine.positions import encode_codes, passthrough_positions
from circuits.hooks import hook_width, validate_hooks
from sae.dictionary import Dictionary

SPLICE_HOOKS = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")

def check_dictionary_fits(model, hook: str, dictionary: Dictionary) -> None:
    """Fail before any compute when `hook` is not a hook point of `model` or the widths differ."""
    validate_hooks(model, [hook])
    width = hook_width(model, hook)
    if width is not None:
        dictionary.check_input_width(width, hook)
    recorded = dictionary.cfg.hook_name
    if recorded and recorded != hook:
        warnings.warn(f"splicing a dictionary trained at '{recorded}' into '{hook}'", stacklevel=3)


class SplicedDictionary(nn.Module):
    """One dictionary at one hook point, with its own hook points (see the module docstring)."""

    def __init__(self, dictionary: Dictionary, hook_name: str, exclude_bos: bool = True,
                 error_gradients: bool = True, exclude_outliers: bool = True):
        super().__init__()
        self.dictionary = dictionary
        self.hook_name = hook_name
        self.exclude_bos = exclude_bos
        self.exclude_outliers = exclude_outliers
        self.error_gradients = error_gradients
        for name in SPLICE_HOOKS:
            setattr(self, name, HookPoint())

    def hook_points(self) -> dict[str, HookPoint]:
        """{full hook name: HookPoint} for this dictionary's own hook points."""
        return {f"{self.hook_name}.{name}": getattr(self, name) for name in SPLICE_HOOKS}

    def codes_of(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_in] -> [batch, pos, n_features], zero at BOS when exclude_bos and at massive
        activations when exclude_outliers."""
        if x.ndim != 3:
            self.dictionary.check_input_width(x.shape[-1], self.hook_name)
            return self.dictionary.encode(x.to(next(self.dictionary.parameters()).dtype))
        passthrough = passthrough_positions(x, exclude_bos=self.exclude_bos, pass_massive=self.exclude_outliers)
        return encode_codes(self.dictionary, x, passthrough)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_sae_input(x)
        clean_codes = self.codes_of(x)
        clean_reconstruction = self.dictionary.decode(clean_codes).to(x.dtype)
        codes = self.hook_sae_acts_post(clean_codes)
        tracking = torch.is_grad_enabled() and x.requires_grad  # the activations are in an autograd graph
        if codes is clean_codes and not tracking:
            reconstruction = clean_reconstruction
        else:  # a separate decode keeps the codes node distinct from the error's, so gradients are right
            reconstruction = self.dictionary.decode(codes).to(x.dtype)
        reconstruction = self.hook_sae_recons(reconstruction)
        clean_error = x - clean_reconstruction
        if not self.error_gradients:
            clean_error = clean_error.detach()
        error = self.hook_sae_error(clean_error)
        if error is clean_error and not tracking:
            # The same value as reconstruction + error, without its rounding: x itself when unedited.
            output = x if reconstruction is clean_reconstruction else x + (reconstruction - clean_reconstruction)
        else:
            output = reconstruction + error
        return self.hook_sae_output(output)


class Splice:
    """Dictionaries attached to a model; `remove()` (or leaving the `with` block) detaches them."""

    def __init__(self, model, spliced: dict[str, SplicedDictionary]):
        self.model = model
        self.spliced = spliced
        self._handles: list[tuple[HookPoint, object]] = []
        self._registered: list[str] = []
        self.attached = False

    def attach(self) -> "Splice":
        registry = self.model._hook_registry
        taken = [name for part in self.spliced.values() for name in part.hook_points() if name in registry]
        if taken:
            raise ValueError(f"hook points {taken} already exist: a dictionary is already spliced there; "
                             "remove that splice first")
        hook_dict = self.model.hook_dict
        for hook, part in self.spliced.items():
            point = hook_dict[hook]
            handle = point.add_hook(_replacing(part), dir="fwd", is_permanent=True, prepend=True)
            self._handles.append((point, handle))
            for name, hook_point in part.hook_points().items():
                hook_point.name = name
                registry[name] = hook_point
                self._registered.append(name)
        self.attached = True
        return self

    def remove(self) -> None:
        """Detach every dictionary and forget its hook points (also their hooks); idempotent."""
        for point, handle in self._handles:
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)
        for name in self._registered:
            hook_point = self.model._hook_registry.pop(name, None)
            if hook_point is not None:
                hook_point.remove_hooks("both", including_permanent=True)
        self._handles, self._registered, self.attached = [], [], False

    def hook_name(self, hook: str, which: str = "hook_sae_acts_post") -> str:
        """The full name of one of a spliced dictionary's hook points, e.g. its feature activations."""
        if hook not in self.spliced:
            raise KeyError(f"no dictionary is spliced at '{hook}'; spliced: {sorted(self.spliced)}")
        if which not in SPLICE_HOOKS:
            raise KeyError(f"'{which}' is not a splice hook point; choose one of {SPLICE_HOOKS}")
        return f"{hook}.{which}"

    def __enter__(self) -> "Splice":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _replacing(part: SplicedDictionary):
    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        return part(activation)

    return hook


def _as_mapping(dictionaries: Mapping[str, Dictionary] | Iterable[Dictionary] | Dictionary) -> dict[str, Dictionary]:
    if isinstance(dictionaries, Dictionary):
        dictionaries = [dictionaries]
    if isinstance(dictionaries, Mapping):
        return dict(dictionaries)
    mapping: dict[str, Dictionary] = {}
    for dictionary in dictionaries:
        hook = dictionary.cfg.hook_name
        if not hook:
            raise ValueError("a dictionary without cfg.hook_name needs an explicit hook: pass {hook: dictionary}")
        if hook in mapping:
            raise ValueError(f"two dictionaries for hook '{hook}'; splice one dictionary per hook point")
        mapping[hook] = dictionary
    return mapping


def splice_dictionaries(model, dictionaries: Mapping[str, Dictionary] | Iterable[Dictionary] | Dictionary,
                        exclude_bos: bool = True, error_gradients: bool = True, exclude_outliers: bool = True
                        ) -> Splice:
    """Attach dictionaries ({hook: dictionary}, or dictionaries naming their hook in cfg) and return the Splice.

    Every hook and width is checked before anything is attached. The splice stays until `.remove()`;
    use it in a `with` block to detach on exit.
    """
    mapping = _as_mapping(dictionaries)
    if not mapping:
        raise ValueError("no dictionaries to splice")
    for hook, dictionary in mapping.items():
        check_dictionary_fits(model, hook, dictionary)
    spliced = {hook: SplicedDictionary(dictionary, hook, exclude_bos, error_gradients, exclude_outliers)
               for hook, dictionary in mapping.items()}
    return Splice(model, spliced).attach()


def spliced(model, dictionaries, exclude_bos: bool = True, error_gradients: bool = True,
            exclude_outliers: bool = True) -> Splice:
    """Alias of `splice_dictionaries` that reads well in `with spliced(model, saes): ...`."""
    return splice_dictionaries(model, dictionaries, exclude_bos=exclude_bos, error_gradients=error_gradients,
                               exclude_outliers=exclude_outliers)
