"""One forward with edits, recordings, gradient leaves and detached hooks: the engine's run.

    run = run_with_edits(model, tokens, edits={hook: HookEdit}, record=[hooks], leaves=[hooks],
                         detach=[hooks], stop_at_layer=None)

At each hook, in this order: the edit (if any) replaces the activation; a zero leaf that requires
grad is added (if the hook is in `leaves`), so d metric / d leaf is the gradient at that hook; the
value is recorded (if in `record`: the value the model continues with, in the autograd graph when
gradients are on). Hooks in `detach` continue with a detached value (direct effects: attention
patterns and norm scales). A batch with a single shared prefix is expanded by the first edit that
makes several rows, so the blocks before it run once.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Mapping, NamedTuple

import torch

from circuits.engine.edits import HookEdit
from sae.finite import NonFiniteError


class EngineRun(NamedTuple):
    output: torch.Tensor  # logits [rows, pos, vocab], or the residual when stopped early
    recorded: dict[str, torch.Tensor]  # hook -> the activation the model continued with
    leaves: dict[str, torch.Tensor]  # hook -> the zero leaf added there (its .grad / autograd.grad target)


def _hook_function(name: str, edit: HookEdit | None, leaf: bool, keep: bool, recorded: dict, leaves: dict):
    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        if edit is not None:
            activation = edit(activation)
        if leaf:
            leaves[name] = torch.zeros_like(activation, requires_grad=True)
            activation = activation + leaves[name]
        if keep:
            recorded[name] = activation
        return activation

    return hook


def _detach(activation: torch.Tensor, hook=None) -> torch.Tensor:
    return activation.detach()


def run_with_edits(model, tokens: torch.Tensor, edits: Mapping[str, HookEdit] | None = None,
                   record: Iterable[str] = (), leaves: Iterable[str] = (), detach: Iterable[str] = (),
                   stop_at_layer: int | None = None, final_residual: bool = False) -> EngineRun:
    """Run `tokens` [rows, pos] through `model` with `edits` applied (see the module docstring).

    With `final_residual` the forward stops after the last block and `output` is its residual stream
    [rows, pos, d_model] (before the final norm): `unembed_positions` turns positions of it into logits,
    so a caller never holds [rows, pos, vocab] at once."""
    edits = dict(edits or {})
    record, leaves, detach = list(record), list(leaves), list(detach)
    recorded: dict[str, torch.Tensor] = {}
    leaf_tensors: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys(list(edits) + leaves + record))
    fwd_hooks = [(name, _hook_function(name, edits.get(name), name in leaves, name in record, recorded,
                                       leaf_tensors)) for name in names]
    fwd_hooks += [(name, _detach) for name in detach]
    tokens = tokens.to(next(model.parameters()).device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hook_scale.*")  # the bridge notes edited norm hooks
        if final_residual:
            output = _final_residual(model, tokens, fwd_hooks)
        else:
            output = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=stop_at_layer)
    _check_finite_output(output, edits)
    return EngineRun(output, recorded, leaf_tensors)


def _check_finite_output(output: torch.Tensor, edits: Mapping[str, HookEdit]) -> None:
    """NonFiniteError if the run's output holds NaN or infinity: no experiment measures or writes from it."""
    finite = torch.isfinite(output.detach()).reshape(output.shape[0], -1).all(dim=1)  # [rows]
    if not bool(finite.all()):
        where = f"with edits at {sorted(edits)}" if edits else "with no edit"
        raise NonFiniteError(f"the model's output {where} holds NaN or infinite values in {int((~finite).sum())} of "
                             f"{finite.numel()} rows; stopped before measuring or writing anything from it (check "
                             "the dictionaries' weights and the edit values)")


class _FinalResidual(Exception):
    """Raised by the last block's hook to stop a forward before the unembedding."""

    def __init__(self, residual: torch.Tensor):
        super().__init__("final residual captured")
        self.residual = residual


def _stop_with_residual(activation: torch.Tensor, hook=None):
    raise _FinalResidual(activation)


def _final_residual(model, tokens: torch.Tensor, fwd_hooks: Iterable) -> torch.Tensor:
    """The residual [rows, pos, d_model] after the last block of a forward with `fwd_hooks`, stopping there."""
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    try:
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (last, _stop_with_residual)])
    except _FinalResidual as captured:
        return captured.residual
    raise RuntimeError(f"the forward did not reach '{last}'")  # pragma: no cover - every bridge model has it


def unembed_positions(model, residual: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Logits [rows, end - begin, vocab] of positions begin..end-1 of a final residual [rows, pos, d_model]."""
    return model.unembed(model.ln_final(residual[:, begin:end]))


def final_position_logits(model, tokens: torch.Tensor, final: torch.Tensor,
                          fwd_hooks: Iterable = ()) -> torch.Tensor:
    """Logits [rows, vocab] at one position per row (`final` [rows]) of a forward with `fwd_hooks`.

    The forward stops after the last block and only the final positions are normed and unembedded, so
    memory does not grow with positions x vocabulary (a 262k-token vocabulary makes full logits of 16
    prompts x 20 positions 0.3 GB)."""
    residual = _final_residual(model, tokens, fwd_hooks)
    rows = torch.arange(residual.shape[0], device=residual.device)
    picked = residual[rows, final.to(residual.device)][:, None]  # [rows, 1, d]
    return model.unembed(model.ln_final(picked))[:, 0]
