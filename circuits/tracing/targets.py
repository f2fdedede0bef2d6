"""What a trace is about: a feature or a logit (difference), and how its value is read off a run.

A node's value on a set of contexts is its activation summed over the positions where it is
measured (per context); `target_values` and `feature_sums` compute those sums from a run's output
and its recorded activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from circuits import graph as circuit_graph
from circuits.hooks import layer_of_hook, stop_layer
from sae.dictionary import Dictionary


@dataclass(frozen=True)
class FeatureTarget:
    """A dictionary feature: `index` of the dictionary at `hook`."""

    hook: str
    index: int

    @property
    def node_id(self) -> str:
        return circuit_graph.feature_node_id(self.hook, self.index)


@dataclass(frozen=True)
class LogitTarget:
    """The logit of `token` (minus that of `other`, for a logit difference), as token ids."""

    token: int
    other: int | None = None
    label: str = ""

    @property
    def node_id(self) -> str:
        return self.label or (f"logit: {self.token}" if self.other is None else f"logit: {self.token} - {self.other}")


Target = FeatureTarget | LogitTarget


def parse_feature(text: str) -> FeatureTarget:
    """`"blocks.7.hook_resid_post:123"` -> FeatureTarget."""
    hook, _, index = str(text).rpartition(":")
    if not hook or not index.strip().lstrip("-").isdigit():
        raise ValueError(f"feature {text!r} is not HOOK:INDEX, e.g. blocks.7.hook_resid_post:123")
    return FeatureTarget(hook, int(index))


def logit_target(model, token: str, other: str | None = None) -> LogitTarget:
    """A logit (difference) target from token texts; each must be exactly one token (e.g. " Mary")."""

    def single(text: str) -> int:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"logit token {text!r} is {len(ids)} tokens for this tokenizer; give a single token "
                             "(mind the leading space, e.g. ' Mary')")
        return int(ids[0])

    label = f"logit: {token.strip()}" if other is None else f"logit: {token.strip()} - {other.strip()}"
    return LogitTarget(single(token), None if other is None else single(other), label)


def target_from_graph(graph: nx.DiGraph) -> Target:
    """The target a traced graph was built for (graph attribute `target_spec`, else its target node)."""
    spec = graph.graph.get("target_spec")
    if isinstance(spec, dict) and spec.get("kind") == "logit":
        return LogitTarget(int(spec["token"]), None if spec.get("other") is None else int(spec["other"]),
                           str(spec.get("label", "")))
    data = graph.nodes[circuit_graph.target_node(graph)]
    if data["kind"] == "feature":
        return FeatureTarget(data["hook"], int(data["index"]))
    raise ValueError(f"cannot tell the target of this graph from its node {circuit_graph.target_node(graph)!r}; "
                     "it was not written by trace_upstream")


def target_hooks(target: Target) -> list[str]:
    """The hooks a run must record to read the target ([] for a logit: it is read off the output)."""
    return [target.hook] if isinstance(target, FeatureTarget) else []


def target_stop_layer(model, target: Target) -> int | None:
    """`stop_at_layer` that still computes the target (None: the whole model, for logits)."""
    if isinstance(target, LogitTarget):
        return None
    return stop_layer([target.hook], model.cfg.n_layers)


def target_layer(model, target: Target) -> int:
    """The block the target is read at (the last block for a logit)."""
    return model.cfg.n_layers - 1 if isinstance(target, LogitTarget) else layer_of_hook(target.hook)


def encode_features(dictionary: Dictionary, activation: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """[..., len(indices)]: the listed features' codes of activation [..., d] (the dictionary computes
    only those encoder columns where its architecture allows)."""
    return dictionary.encode_features(activation, indices)


def target_values(target: Target, dictionaries: dict[str, Dictionary], output: torch.Tensor,
                  recorded: dict[str, torch.Tensor], measure: torch.Tensor) -> torch.Tensor:
    """[rows]: the target summed over the measured positions `measure` [rows, pos] of each row."""
    measure = measure.to(output.device)
    if isinstance(target, LogitTarget):
        values = output[..., target.token]
        if target.other is not None:
            values = values - output[..., target.other]
    else:
        values = encode_features(dictionaries[target.hook], recorded[target.hook], [target.index])[..., 0]
    return (values * measure).sum(dim=1)


def feature_sums(dictionary: Dictionary, activation: torch.Tensor, indices: list[int],
                 valid: torch.Tensor) -> torch.Tensor:
    """[rows, len(indices)]: each listed feature summed over the `valid` [rows, pos] positions."""
    codes = encode_features(dictionary, activation, indices)  # [rows, pos, k]
    return (codes * valid[..., None].to(codes)).sum(dim=1)
