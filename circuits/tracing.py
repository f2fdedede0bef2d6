"""Automatic circuit detection: which upstream features make a target fire, as a networkx graph.

A target is a feature `(hook, index)` or a logit (difference), measured on a set of contexts. Every
feature of the nearest dictionary before the target gets an effect on it; the strongest are kept,
and the search recurses layer by layer (to `depth` dictionary layers, or to the first one), with
edges between the kept features of neighbouring dictionary layers, so the result is a graph and not
only a tree (Cunningham et al., 2024, Section 5.3). With dictionaries on the residual stream,
everything a layer passes on goes through the next dictionary layer's residual (its features plus
its error), so edges between neighbouring dictionary layers are the whole story.

What is measured
----------------
- A node's value on a set of contexts is the mean over contexts of its activation summed over
  the positions where it is measured. The target is measured at its marked positions: for
  contexts found in the corpus, the one token where it fires (each context is cut just after it);
  for given texts, every token but BOS (a logit target: the last token). Every other node is
  measured over all of a context's tokens but BOS (the positions where features are ablated). A
  node's `activation` attribute is this value on the clean run, and every edge's `effect` is in
  its target's units.
- Positions whose residual norm is an outlier (above `outlier_factor`, default 2, times the
  context's median at any traced hook; see circuits.features.outlier_positions) are protected like
  BOS: never edited, never measured. SmolLM2 has such massive activations on about 2% of tokens in
  its early and middle layers; editing them breaks attention much as editing BOS would.
- Ablating a feature removes its contribution `code_i * decoder_row_i` from the residual at its
  hook, at every position but BOS and the protected ones (position 0 is left alone: in SmolLM2 its
  residual is a huge outlier no dictionary is trained on), and re-runs the model up to the target's block. Ablating an
  error node replaces the activation there by the dictionary's reconstruction.
- effect(source -> node) = value(clean) - value(source ablated): positive when the source helps.

Two methods behind one interface
--------------------------------
- "ablation", the ground truth: one run per (context, active feature) pair, batched per context,
  each batch with its own clean row so every difference is taken within one batch. The model runs
  from the feature's layer on: the blocks before it run once per batch on the single context, and
  the edit hook expands their output into one row per ablated feature (the bridge's
  `start_at_layer` would still execute the earlier blocks). Runs stop after the target's block
  (`stop_at_layer`).
- "attribution", the fast path: activation x gradient. A zero tensor requiring grad is added at each
  dictionary hook; the gradient of a node's value with respect to it, g, gives every feature's score
  `sum_positions code_i * (decoder_row_i . g)` and the error's `(x - reconstruction) . g`: one
  backward per node for all the features below it. This is the same as splicing x = reconstruction
  + error with the codes as leaves. `direct_effects=True` detaches the attention patterns and the norm
  scales between the layers (hooks `attn.hook_pattern`, `ln*.hook_scale`), keeping direct paths only.

Downstream tracing (`trace_downstream`) asks the converse: what a feature causes in later layers.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable, NamedTuple

import networkx as nx
import torch
from tqdm.auto import tqdm

from circuits import graph as circuit_graph
from circuits.features import (OUTLIER_FACTOR, FeatureScan, annotate_feature_nodes, context_entry,
                               max_activating_examples, outlier_positions)
from circuits.models import model_name_of
from sae.activation_store import validate_hooks
from sae.config import layer_of_hook
from sae.dictionary import Dictionary
from sae.relu import ReluSAE

METHODS = ("attribution", "ablation")
_HOOK_ORDER = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_resid_mid": 2, "hook_mlp_out": 3, "hook_resid_post": 4}


# --- targets ----------------------------------------------------------------------------------


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


def hook_order(hook: str) -> tuple[int, int]:
    """Where a hook sits in the forward pass: (block, place within the block)."""
    layer = layer_of_hook(hook)
    if layer is None:
        raise ValueError(f"hook {hook!r} is not inside a block (blocks.N.*); tracing needs block hook points")
    return layer, _HOOK_ORDER.get(hook.rsplit(".", 1)[-1], 2)


# --- contexts ---------------------------------------------------------------------------------


@dataclass
class TraceContexts:
    """Token rows to trace on, right-padded, with the positions where the target is measured."""

    tokens: torch.Tensor  # [n, pos] token ids, BOS first
    lengths: torch.Tensor  # [n] real tokens per row (the rest is padding)
    measure: torch.Tensor  # [n, pos] bool: where the target is measured
    entries: list[dict] = field(default_factory=list)  # graph-schema contexts shown on the target node
    protected: torch.Tensor | None = None  # [n, pos] bool: positions besides BOS left alone (outliers)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0:
            raise ValueError(f"contexts need tokens [n, pos] with n >= 1, got {tuple(self.tokens.shape)}")
        if self.measure.shape != self.tokens.shape:
            raise ValueError("contexts: measure must have the shape of tokens")
        if not bool(self.measure.any(dim=1).all()):
            raise ValueError("every context needs at least one position where the target is measured")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """[n, pos] bool: real tokens other than BOS and the protected ones (where features are
        ablated and nodes measured)."""
        positions = torch.arange(self.tokens.shape[1])
        valid = (positions[None, :] >= 1) & (positions[None, :] < self.lengths[:, None])
        return valid if self.protected is None else valid & ~self.protected

    def subset(self, indices: list[int]) -> "TraceContexts":
        """These contexts only, with the padding only they need."""
        index = torch.tensor(indices, dtype=torch.long)
        width = int(self.lengths[index].max())
        protected = None if self.protected is None else self.protected[index, :width]
        return TraceContexts(self.tokens[index, :width], self.lengths[index], self.measure[index, :width],
                             [self.entries[i] for i in indices] if self.entries else [], protected)

    def row(self, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, measure, valid) of one context without its padding."""
        length = int(self.lengths[context])
        return self.tokens[context, :length], self.measure[context, :length], self.valid[context, :length]


def pad_rows(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token rows into [n, max_len]; padding after a row never changes it (causal)."""
    lengths = torch.tensor([len(row) for row in rows])
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for number, row in enumerate(rows):
        tokens[number, : len(row)] = row
    return tokens, lengths


def pad_token_id(model) -> int:
    """The id used to right-pad token rows: pad, else EOS, else 0."""
    tokenizer = model.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def contexts_from_texts(model, texts: list[str], target: Target) -> TraceContexts:
    """Given texts (BOS prepended): a feature target is measured at every token but BOS, a logit target
    at the last token."""
    if not texts:
        raise ValueError("no context texts given; pass at least one text, or find contexts in the corpus")
    rows = [model.to_tokens(text)[0].cpu() for text in texts]
    short = [text for text, row in zip(texts, rows) if len(row) < 2]
    if short:
        raise ValueError(f"context text {short[0]!r} has no tokens besides BOS; give non-empty texts")
    tokens, lengths = pad_rows(rows, pad_token_id(model))
    positions = torch.arange(tokens.shape[1])
    if isinstance(target, LogitTarget):
        measure = positions[None, :] == (lengths[:, None] - 1)
    else:
        measure = (positions[None, :] >= 1) & (positions[None, :] < lengths[:, None])
    tokenizer = model.tokenizer
    entries = [context_entry(tokenizer, row, len(row) - 1, 0.0, before=len(row)) for row in rows]
    return TraceContexts(tokens, lengths, measure, entries)


def find_target_contexts(scan: FeatureScan, target: FeatureTarget, tokenizer, n_contexts: int = 20,
                         band: tuple[float, float] | None = (0.5, 1.0), seed: int = 0, truncate: bool = True,
                         pad_id: int = 0) -> TraceContexts:
    """Scanned contexts where the target fires strongly (a seeded sample of those between half and all
    of its maximum, as in the paper), each measured at its activating token and, with `truncate`,
    cut just after it (later tokens cannot matter)."""
    examples = max_activating_examples(scan, target.hook, target.index, n=n_contexts, band=band, seed=seed)
    if not examples:
        raise ValueError(f"feature {target.index} at {target.hook} never fires on the {scan.tokens.shape[0]} scanned "
                         "contexts; scan more text, or pick a feature that is active")
    rows = [scan.tokens[e.context, : e.position + 1] if truncate else scan.tokens[e.context] for e in examples]
    tokens, lengths = pad_rows(rows, pad_id)
    measure = torch.zeros_like(tokens, dtype=torch.bool)
    for number, example in enumerate(examples):
        measure[number, example.position] = True
    entries = [context_entry(tokenizer, scan.tokens[e.context], e.position, e.activation) for e in examples]
    return TraceContexts(tokens, lengths, measure, entries)


# --- running the model ------------------------------------------------------------------------


class Edit(NamedTuple):
    """What to remove at one hook, per row: features ([rows, n_features], 1 = remove) and the error,
    at the positions marked in `positions` (never BOS)."""

    features: torch.Tensor  # [rows, n_features] float
    error: torch.Tensor  # [rows] bool
    positions: torch.Tensor  # [rows, pos] bool


def _edit_hook(dictionary: Dictionary, edit: Edit, record: dict, name: str, keep: bool):
    """A forward hook removing the listed features (and errors) at the edit's positions, then recording."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        rows = edit.features.shape[0]
        if activation.shape[0] == 1 < rows:  # one shared prefix, run once, then one row per edit
            activation = activation.expand(rows, -1, -1)
        body = activation[:, 1:]  # [rows, pos - 1, d]
        codes = dictionary.encode(body)
        removed = (codes * edit.features[:, None, :].to(codes)) @ dictionary.feature_directions
        if bool(edit.error.any()):
            removed = removed + edit.error[:, None, None].to(body) * (body - dictionary.decode(codes))
        removed = removed * edit.positions[:, 1:, None].to(removed)
        edited = torch.cat([activation[:, :1], body - removed], dim=1)
        if keep:
            record[name] = edited
        return edited

    return hook


def _record_hook(record: dict, name: str):
    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        record[name] = activation
        return activation

    return hook


def stop_layer(model, target: Target) -> int | None:
    """`stop_at_layer` that still computes the target (None: the whole model, for logits)."""
    if isinstance(target, LogitTarget):
        return None
    layer = hook_order(target.hook)[0]
    return layer + 1 if layer + 1 < model.cfg.n_layers else None


def run_edited(model, tokens: torch.Tensor, dictionaries: dict[str, Dictionary], edits: dict[str, Edit],
               record: Iterable[str], stop: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `tokens` [rows, pos] with `edits` applied; returns (model output, {hook: activation} for
    `record`, taken after that hook's edit)."""
    recorded: dict[str, torch.Tensor] = {}
    record = list(record)
    hooks = [(name, _edit_hook(dictionaries[name], edit, recorded, name, name in record))
             for name, edit in edits.items()]
    hooks += [(name, _record_hook(recorded, name)) for name in record if name not in edits]
    device = next(model.parameters()).device
    output = model.run_with_hooks(tokens.to(device), fwd_hooks=hooks, stop_at_layer=stop)
    return output, recorded


def no_edit(positions: torch.Tensor, n_features: int) -> Edit:
    """An edit removing nothing yet, for rows whose editable positions are `positions` [rows, pos]."""
    rows = positions.shape[0]
    return Edit(torch.zeros(rows, n_features), torch.zeros(rows, dtype=torch.bool), positions)


def encode_features(dictionary: Dictionary, activation: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """[..., len(indices)]: the listed features' codes. For a plain ReLU SAE only their encoder
    columns are computed (each code depends on its own column alone); otherwise the full encode."""
    if type(dictionary).activation is ReluSAE.activation and isinstance(dictionary, ReluSAE):
        columns = torch.as_tensor(indices, dtype=torch.long, device=activation.device)
        return torch.relu(_encoder_columns(dictionary, activation, columns))
    return dictionary.encode(activation)[..., indices]


def _encoder_columns(dictionary: ReluSAE, activation: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The pre-activations of the encoder columns `columns` only, as ReluSAE.pre_activations computes them."""
    weight, bias = dictionary.W_enc[:, columns], dictionary.b_enc[columns]
    if dictionary.cfg.apply_b_dec_to_input:
        activation = activation - dictionary.b_dec
    return activation @ weight + bias


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


# --- scores -----------------------------------------------------------------------------------


@dataclass
class LayerScores:
    """Every feature's effect at one dictionary hook on one node (the target, or a kept feature)."""

    hook: str
    method: str
    effects: torch.Tensor  # [n_features] effect on the node (0 where the feature is inactive)
    evaluated: torch.Tensor  # [n_features] bool: active features, whose effect was computed
    error_effect: float


class _Node(NamedTuple):
    hook: str
    index: int


def _upstream_hooks(dictionaries: dict[str, Dictionary], target: Target, depth: int | None) -> list[str]:
    """Dictionary hooks before the target, nearest first, at most `depth` of them."""
    if isinstance(target, LogitTarget):
        below = list(dictionaries)
    else:
        below = [hook for hook in dictionaries if hook_order(hook) < hook_order(target.hook)]
    below.sort(key=hook_order, reverse=True)
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        below = below[:depth]
    if not below:
        raise ValueError(f"no dictionary sits before the target {getattr(target, 'hook', target)}; give dictionaries "
                         f"at earlier layers (have: {', '.join(sorted(dictionaries, key=hook_order))})")
    return below


class CleanRun(NamedTuple):
    contexts: TraceContexts  # the contexts, with outlier positions protected
    codes: dict[str, torch.Tensor]  # hook -> [n, pos, n_features] clean codes
    target: torch.Tensor  # [n] target value per context
    node_values: dict[str, torch.Tensor]  # hook -> [n_features]: clean value (mean over contexts)


def protect_outliers(contexts: TraceContexts, activations: Iterable[torch.Tensor],
                     factor: float | None) -> TraceContexts:
    """The contexts with every position whose residual is an outlier at any of `activations`
    ([n, pos, d] each; see circuits.features.outlier_positions) protected like BOS. Where that would
    leave a context no measured position, its measured positions stay as they were."""
    if factor is None:
        return contexts
    protected = torch.zeros_like(contexts.tokens, dtype=torch.bool)
    for activation in activations:
        protected |= outlier_positions(activation, factor, contexts.lengths).cpu()
    measure = contexts.measure & ~protected
    emptied = ~measure.any(dim=1)
    measure[emptied] = contexts.measure[emptied]
    return replace(contexts, measure=measure, protected=protected)


@torch.no_grad()
def clean_run(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
              hooks: list[str], outlier_factor: float | None = OUTLIER_FACTOR) -> CleanRun:
    """The unedited run: outlier positions protected, codes at `hooks`, the target's value per
    context and every feature's value (its activation summed over positions, mean over contexts)."""
    record = list(dict.fromkeys(hooks + ([target.hook] if isinstance(target, FeatureTarget) else [])))
    stop = None if isinstance(target, LogitTarget) else stop_layer(model, FeatureTarget(max(record, key=hook_order), 0))
    output, recorded = run_edited(model, contexts.tokens, dictionaries, {}, record, stop)
    return clean_from_activations(dictionaries, target, contexts, hooks, output, recorded, outlier_factor)


@torch.no_grad()
def clean_from_activations(dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                           hooks: list[str], output: torch.Tensor, recorded: dict[str, torch.Tensor],
                           outlier_factor: float | None) -> CleanRun:
    """A CleanRun from the unedited run's output and activations ({hook: [n, pos, d]})."""
    recorded = {hook: activation.detach() for hook, activation in recorded.items()}
    contexts = protect_outliers(contexts, recorded.values(), outlier_factor)
    valid = contexts.valid
    codes = {hook: dictionaries[hook].encode(recorded[hook]).cpu() for hook in hooks}
    values = {hook: (codes[hook] * valid[..., None]).sum(dim=1).mean(dim=0) for hook in hooks}
    target_value = target_values(target, dictionaries, output.detach(), recorded, contexts.measure).cpu()
    return CleanRun(contexts, codes, target_value, values)


class _AblationScorer:
    """Effects by ablation, one row per (context, active feature), batched per context."""

    method = "ablation"

    def __init__(self, model, dictionaries, target, contexts, clean: CleanRun, batch_size: int = 32,
                 max_candidates: int | None = None, progress: bool = True):
        self.model, self.dictionaries, self.target, self.contexts = model, dictionaries, target, clean.contexts
        self.clean, self.batch_size, self.max_candidates, self.progress = clean, batch_size, max_candidates, progress
        self.stop = stop_layer(model, target)

    def candidates(self, hook: str) -> list[torch.Tensor]:
        """Per context, the features active there (capped at the `max_candidates` with most activation)."""
        codes = self.clean.codes[hook]
        active = list(((codes > 0) & self.contexts.valid[..., None]).any(dim=1))
        if self.max_candidates is not None:
            mass = (codes * self.contexts.valid[..., None]).sum(dim=(0, 1))
            allowed = torch.zeros_like(mass, dtype=torch.bool)
            allowed[torch.argsort(mass, descending=True, stable=True)[: self.max_candidates]] = True
            allowed &= mass > 0
            active = [mask & allowed for mask in active]
        return [torch.nonzero(mask).flatten() for mask in active]

    @torch.no_grad()
    def layer(self, hook: str, nodes_above: list[_Node]) -> tuple[LayerScores, dict[_Node, LayerScores]]:
        """Effects of every active feature (and the error) at `hook` on the target and on `nodes_above`."""
        n_features = self.dictionaries[hook].n_features
        n = len(self.contexts)
        target_effects = torch.zeros(n_features, dtype=torch.float64)
        node_effects = {node: torch.zeros(n_features, dtype=torch.float64) for node in nodes_above}
        error_target, error_nodes = 0.0, {node: 0.0 for node in nodes_above}
        evaluated = torch.zeros(n_features, dtype=torch.bool)
        per_context = self.candidates(hook)
        above_hooks = sorted({node.hook for node in nodes_above})
        total_rows = sum(len(features) + 1 for features in per_context)
        bar = tqdm(total=total_rows, desc=f"ablate {hook}", unit="row", disable=not self.progress)
        for context, features in enumerate(per_context):
            evaluated[features] = True
            tokens, measure, valid = self.contexts.row(context)
            jobs = features.tolist() + [-1]  # -1: the error node
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                rows = len(chunk) + 1  # row 0 is the clean baseline of this batch
                edit = no_edit(valid.expand(rows, -1), n_features)
                for row, feature in enumerate(chunk, start=1):
                    if feature < 0:
                        edit.error[row] = True
                    else:
                        edit.features[row, feature] = 1.0
                # The blocks before `hook` run once for the batch: the edit expands their output to one row per job.
                output, recorded = run_edited(self.model, tokens[None], self.dictionaries, {hook: edit},
                                              above_hooks + self._target_hooks(), self.stop)
                values = target_values(self.target, self.dictionaries, output, recorded,
                                       measure.expand(rows, -1)).double().cpu()
                drops = (values[0] - values[1:]) / n
                index = torch.tensor(chunk)
                is_feature = index >= 0
                target_effects[index[is_feature]] += drops[is_feature]
                error_target += float(drops[~is_feature].sum())
                for above in above_hooks:
                    nodes = [node for node in nodes_above if node.hook == above]
                    sums = feature_sums(self.dictionaries[above], recorded[above], [node.index for node in nodes],
                                        valid.expand(rows, -1).to(recorded[above].device)).double().cpu()
                    node_drops = (sums[0] - sums[1:]) / n  # [chunk, k]
                    for column, node in enumerate(nodes):
                        node_effects[node][index[is_feature]] += node_drops[is_feature, column]
                        error_nodes[node] += float(node_drops[~is_feature, column].sum())
                bar.update(len(chunk))
        bar.close()
        scores = LayerScores(hook, self.method, target_effects.float(), evaluated, error_target)
        return scores, {node: LayerScores(hook, self.method, node_effects[node].float(), evaluated, error_nodes[node])
                        for node in nodes_above}

    def _target_hooks(self) -> list[str]:
        return [self.target.hook] if isinstance(self.target, FeatureTarget) else []


_DETACHED_HOOKS = ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale")


def direct_effect_hooks(model, first_layer: int, last_layer: int, include_final: bool) -> list[str]:
    """Hooks whose values are detached for direct effects: attention patterns and norm scales of
    blocks first_layer..last_layer (and the final norm's scale), those the model has."""
    names = [f"blocks.{layer}.{suffix}" for layer in range(first_layer, last_layer + 1) for suffix in _DETACHED_HOOKS]
    if include_final:
        names.append("ln_final.hook_scale")
    return [name for name in names if name in model.hook_dict]


def _detach(activation: torch.Tensor, hook=None) -> torch.Tensor:
    return activation.detach()


class _GradientScorer:
    """Effects by attribution: activation x gradient, from one forward (which is also the clean run)
    and one backward per node above a layer (batched)."""

    method = "attribution"

    def __init__(self, model, dictionaries, target, contexts, hooks: list[str], direct_effects: bool = False,
                 outlier_factor: float | None = OUTLIER_FACTOR):
        self.dictionaries, self.target = dictionaries, target
        self.leaves: dict[str, torch.Tensor] = {}
        self.spliced: dict[str, torch.Tensor] = {}  # hook -> activation + leaf, in the autograd graph
        self.detached: list[str] = []
        device = next(model.parameters()).device
        fwd_hooks = [(hook, self._leaf_hook(hook)) for hook in hooks]
        recorded: dict[str, torch.Tensor] = {}
        if isinstance(target, FeatureTarget):
            fwd_hooks.append((target.hook, _record_hook(recorded, target.hook)))
        if direct_effects:
            lowest = min(hook_order(hook)[0] for hook in hooks)
            last = model.cfg.n_layers - 1 if isinstance(target, LogitTarget) else hook_order(target.hook)[0]
            self.detached = direct_effect_hooks(model, lowest + 1, last, isinstance(target, LogitTarget))
            fwd_hooks += [(name, _detach) for name in self.detached]
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*hook_scale.*")  # the bridge notes edited norm hooks
            output = model.run_with_hooks(contexts.tokens.to(device), fwd_hooks=fwd_hooks,
                                          stop_at_layer=stop_layer(model, target))
            # The forward's values are the clean run's (the leaves are zero, detaching changes no value).
            self.clean = clean_from_activations(dictionaries, target, contexts, hooks, output,
                                                {**recorded, **self.spliced}, outlier_factor)
            self.contexts = self.clean.contexts
            self.valid = self.contexts.valid.to(device)
            self.target_value = target_values(target, dictionaries, output, recorded, self.contexts.measure).mean()
        self._target_grads: dict[str, torch.Tensor] | None = None
        self._clean_codes: dict[str, torch.Tensor] = {}  # hook -> [n, pos, n_features], zero where not valid
        self._errors: dict[str, torch.Tensor] = {}
        self._nonzero: dict[str, torch.Tensor] = {}

    def _leaf_hook(self, name: str):
        def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
            leaf = torch.zeros_like(activation, requires_grad=True)
            self.leaves[name] = leaf
            self.spliced[name] = activation + leaf
            return self.spliced[name]

        return hook

    def _scores(self, hook: str, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Each feature's code x (decoder row . grad) and the error's (x - reconstruction) . grad,
        summed over the valid positions."""
        dictionary = self.dictionaries[hook]
        with torch.no_grad():
            if hook not in self._clean_codes:
                x = self.spliced[hook].detach()
                codes = self.clean.codes[hook].to(x) * self.valid[..., None].to(x)
                self._clean_codes[hook], self._errors[hook] = codes, x - dictionary.decode(codes)
                self._nonzero[hook] = torch.nonzero(codes)  # [active, 3]: context, position, feature
            grad = grad * self.valid[..., None].to(grad)
            codes, nonzero, directions = self._clean_codes[hook], self._nonzero[hook], dictionary.feature_directions
            if 8 * len(nonzero) < codes.numel():  # sparse codes: a dot product per active (position, feature)
                effects = torch.zeros(codes.shape[-1], dtype=codes.dtype, device=codes.device)
                for chunk in nonzero.split(16384):
                    context, position, feature = chunk.unbind(dim=1)
                    dots = (grad[context, position] * directions[feature]).sum(dim=-1)
                    effects.index_add_(0, feature, codes[context, position, feature] * dots)
            else:
                effects = (codes * (grad @ directions.T)).sum(dim=(0, 1))  # [n_features]
            error = (self._errors[hook] * grad).sum()
        return effects.float().cpu(), float(error)

    def _layer_scores(self, hook: str, grad: torch.Tensor | None) -> LayerScores:
        n_features = self.dictionaries[hook].n_features
        if grad is None:  # the node does not depend on this hook at all
            effects, error = torch.zeros(n_features), 0.0
        else:
            effects, error = self._scores(hook, grad)
        evaluated = (self.clean.codes[hook] * self.contexts.valid[..., None]).sum(dim=(0, 1)) > 0
        return LayerScores(hook, self.method, effects * evaluated, evaluated, error)

    def layer(self, hook: str, nodes_above: list[_Node]) -> tuple[LayerScores, dict[_Node, LayerScores]]:
        if self._target_grads is None:
            names = list(self.leaves)
            grads = torch.autograd.grad(self.target_value, [self.leaves[name] for name in names],
                                        retain_graph=True, allow_unused=True)
            self._target_grads = dict(zip(names, grads))
        target_scores = self._layer_scores(hook, self._target_grads[hook])
        node_scores = {}
        for above in sorted({node.hook for node in nodes_above}):
            nodes = [node for node in nodes_above if node.hook == above]
            codes = encode_features(self.dictionaries[above], self.spliced[above], [node.index for node in nodes])
            values = (codes * self.valid[..., None]).sum(dim=(0, 1)) / len(self.contexts)  # [k]
            for node, grad in zip(nodes, self._node_grads(values, hook)):
                node_scores[node] = self._layer_scores(hook, grad)
        return target_scores, node_scores

    def _node_grads(self, values: torch.Tensor, hook: str) -> list[torch.Tensor | None]:
        """d values[k] / d leaf at `hook`, one backward each (batching them with vmap is slower on CPU)."""
        leaf = self.leaves[hook]
        return [torch.autograd.grad(value, [leaf], retain_graph=True, allow_unused=True)[0] for value in values]


class _BucketedScorer:
    """Attribution over contexts of very different lengths: one gradient scorer per bucket of similar
    lengths (so little of the work is padding), their effects averaged with the buckets' weights."""

    method = "attribution"

    def __init__(self, model, dictionaries, target, contexts: TraceContexts, hooks: list[str],
                 direct_effects: bool = False, outlier_factor: float | None = OUTLIER_FACTOR, max_buckets: int = 3):
        self.buckets = length_buckets(contexts.lengths, max_buckets)
        self.weights = [len(bucket) / len(contexts) for bucket in self.buckets]
        self.scorers = [_GradientScorer(model, dictionaries, target, contexts.subset(bucket), hooks, direct_effects,
                                        outlier_factor) for bucket in self.buckets]
        self.detached = self.scorers[0].detached
        self.clean = self._merged_clean(contexts)

    def _merged_clean(self, contexts: TraceContexts) -> CleanRun:
        """The buckets' clean runs as one over all contexts (in their order; codes stay per bucket)."""
        n = len(contexts)
        target = torch.zeros(n)
        measure = torch.zeros_like(contexts.measure)
        protected = torch.zeros_like(contexts.measure)
        for bucket, scorer in zip(self.buckets, self.scorers):
            index = torch.tensor(bucket)
            width = scorer.contexts.tokens.shape[1]
            target[index] = scorer.clean.target
            measure[index, :width] = scorer.contexts.measure
            if scorer.contexts.protected is not None:
                protected[index, :width] = scorer.contexts.protected
        values = {hook: sum(weight * scorer.clean.node_values[hook] for weight, scorer in zip(self.weights, self.scorers))
                  for hook in self.scorers[0].clean.node_values}
        merged = replace(contexts, measure=measure, protected=protected)
        return CleanRun(merged, {}, target, values)

    def layer(self, hook: str, nodes_above: list[_Node]) -> tuple[LayerScores, dict[_Node, LayerScores]]:
        parts = [scorer.layer(hook, nodes_above) for scorer in self.scorers]
        target = _weighted([part[0] for part in parts], self.weights)
        return target, {node: _weighted([part[1][node] for part in parts], self.weights) for node in nodes_above}


def _weighted(scores: list[LayerScores], weights: list[float]) -> LayerScores:
    """Scores over all contexts from scores over buckets of them (weights: each bucket's share)."""
    effects = sum(weight * score.effects for weight, score in zip(weights, scores))
    evaluated = torch.stack([score.evaluated for score in scores]).any(dim=0)
    error = sum(weight * score.error_effect for weight, score in zip(weights, scores))
    return LayerScores(scores[0].hook, scores[0].method, effects, evaluated, float(error))


def length_buckets(lengths: torch.Tensor, max_buckets: int = 3) -> list[list[int]]:
    """Context indices split into at most `max_buckets` groups of similar length: the split of the
    sorted lengths that pads least (each group is padded to its longest), using fewer groups when
    that costs at most 10% more tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    sizes = [int(lengths[i]) for i in order]
    n = len(sizes)
    # best[k][j]: least padded tokens for the first j sorted contexts in k groups; cut[k][j]: where the last begins
    best = [[math.inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for groups in range(1, max_buckets + 1):
        for end in range(1, n + 1):
            for start in range(groups - 1, end):
                cost = best[groups - 1][start] + (end - start) * sizes[end - 1]
                if cost < best[groups][end]:
                    best[groups][end], cut[groups][end] = cost, start
    fewest = min(best[k][n] for k in range(1, max_buckets + 1))
    groups = min(k for k in range(1, max_buckets + 1) if best[k][n] <= 1.1 * fewest)  # a group costs a forward
    buckets, end = [], n
    for k in range(groups, 0, -1):
        start = cut[k][end]
        buckets.append(sorted(order[start:end]))
        end = start
    return [bucket for bucket in reversed(buckets) if bucket]


# --- upstream tracing -------------------------------------------------------------------------


@dataclass
class TraceResult:
    """A trace: the graph, every feature's effect on the target per layer, and phase timings."""

    graph: nx.DiGraph
    scores: dict[str, LayerScores]  # hook -> effects of all its features on the target
    contexts: TraceContexts
    timings: dict[str, float]


def top_features(scores: LayerScores, k: int) -> list[int]:
    """The k evaluated features with the largest |effect| (ties: lower index), skipping zero effects."""
    magnitude = scores.effects.abs() * scores.evaluated
    order = torch.argsort(-magnitude, stable=True)[:k]
    return [int(index) for index in order if magnitude[index] > 0]


def _check_inputs(model, dictionaries: dict[str, Dictionary], target: Target, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if not dictionaries:
        raise ValueError("no dictionaries given; load them with sae.io.load_dictionaries(folder)")
    validate_hooks(model, list(dictionaries))
    for hook, dictionary in dictionaries.items():
        dictionary.check_input_width(model.cfg.d_model, hook)
    if isinstance(target, FeatureTarget):
        if target.hook not in dictionaries:
            raise ValueError(f"target hook {target.hook!r} has no dictionary; have: {', '.join(dictionaries)}")
        n_features = dictionaries[target.hook].n_features
        if not 0 <= target.index < n_features:
            raise ValueError(f"target feature {target.index} is out of range for {target.hook} (0..{n_features - 1})")


def run_upstream_trace(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                       method: str = "attribution", depth: int | None = 2, top_k_per_layer: int = 10,
                       include_error: bool = True, direct_effects: bool = False, max_candidates: int | None = None,
                       batch_size: int = 32, scan: FeatureScan | None = None,
                       outlier_factor: float | None = OUTLIER_FACTOR, progress: bool = True) -> TraceResult:
    """Trace the target's upstream features (see the module docstring); the full result.

    depth: dictionary layers to go back (None: all); top_k_per_layer: features kept per layer (by
    |effect on the target|); include_error: add each layer's error node; direct_effects: attribution
    only, detach attention patterns and norm scales; max_candidates: ablation only, try at most this
    many features per layer (those with the most activation); batch_size: ablation rows per forward;
    scan: a FeatureScan to describe the nodes with (top tokens, contexts); outlier_factor: protect
    positions whose residual norm exceeds this many times the context's median, like BOS (None: off).
    """
    _check_inputs(model, dictionaries, target, method)
    if top_k_per_layer < 1:
        raise ValueError(f"top_k_per_layer must be at least 1, got {top_k_per_layer}")
    if direct_effects and method == "ablation":
        raise ValueError("direct_effects applies to the attribution method only; drop it or use method='attribution'")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    hooks = _upstream_hooks(dictionaries, target, depth)
    if method == "ablation":
        clean = clean_run(model, dictionaries, target, contexts, hooks, outlier_factor)
        timings["clean run"] = time.perf_counter() - started
        scorer = _AblationScorer(model, dictionaries, target, contexts, clean, batch_size, max_candidates, progress)
    else:
        scorer = _BucketedScorer(model, dictionaries, target, contexts, hooks, direct_effects, outlier_factor)
        clean = scorer.clean
        timings["forward with leaves"] = time.perf_counter() - started
    contexts = clean.contexts
    graph = _new_graph(model, target, contexts, clean, method, hooks, top_k_per_layer, direct_effects)
    graph.graph["outlier_factor"] = outlier_factor if outlier_factor is not None else 0.0
    graph.graph["protected_positions"] = int(contexts.protected.sum()) if contexts.protected is not None else 0
    above: list[_Node] = []
    scores: dict[str, LayerScores] = {}
    for hook in hooks:
        phase = time.perf_counter()
        target_scores, node_scores = scorer.layer(hook, above)
        timings[f"scores at {hook}"] = time.perf_counter() - phase
        scores[hook] = target_scores
        kept = [_Node(hook, index) for index in top_features(target_scores, top_k_per_layer)]
        _add_layer(graph, target, hook, kept, above, target_scores, node_scores, clean, method, include_error)
        above = kept
    if getattr(scorer, "detached", None):
        graph.graph["detached_hooks"] = list(scorer.detached)
    phase = time.perf_counter()
    annotate_feature_nodes(graph, model, dictionaries, scan)
    graph.nodes[graph.graph["target"]]["contexts"] = list(contexts.entries)
    timings["node annotation"] = time.perf_counter() - phase
    timings["total"] = time.perf_counter() - started
    graph.graph["timings_s"] = {name: round(seconds, 4) for name, seconds in timings.items()}
    return TraceResult(graph, scores, contexts, timings)


def trace_upstream(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                   method: str = "attribution", depth: int | None = 2, top_k_per_layer: int = 10,
                   **options) -> nx.DiGraph:
    """The target's upstream circuit as a graph in the circuits.graph schema (options: see
    `run_upstream_trace`)."""
    return run_upstream_trace(model, dictionaries, target, contexts, method, depth, top_k_per_layer, **options).graph


def _new_graph(model, target: Target, contexts: TraceContexts, clean: CleanRun, method: str, hooks: list[str],
               top_k: int, direct_effects: bool) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.graph.update({"method": method, "model": model_name_of(model), "direction": "upstream",
                        "hooks": list(hooks), "top_k_per_layer": top_k, "n_contexts": len(contexts),
                        "direct_effects": direct_effects,
                        "measure": "mean over contexts of the activation summed over measured positions"})
    value = float(clean.target.mean())
    if isinstance(target, LogitTarget):
        graph.graph["target_spec"] = {"kind": "logit", "token": target.token, "other": target.other,
                                      "label": target.node_id}
    if isinstance(target, FeatureTarget):
        circuit_graph.add_feature_node(graph, target.hook, hook_order(target.hook)[0], target.index,
                                       activation=value, is_target=True)
    else:
        circuit_graph.add_output_node(graph, model.cfg.n_layers, node_id=target.node_id, label=target.node_id,
                                      activation=value)
    return graph


def _add_layer(graph: nx.DiGraph, target: Target, hook: str, kept: list[_Node], above: list[_Node],
               target_scores: LayerScores, node_scores: dict[_Node, LayerScores], clean: CleanRun, method: str,
               include_error: bool) -> None:
    """Add the kept features (and error) of one layer, with edges to the nodes kept one layer up
    (the target itself for the first layer)."""
    layer = hook_order(hook)[0]
    values = clean.node_values[hook]
    sources = {}
    for node in kept:
        sources[node.index] = circuit_graph.add_feature_node(
            graph, hook, layer, node.index, activation=float(values[node.index]),
            effect_on_target=float(target_scores.effects[node.index]))
    if include_error:
        sources[-1] = circuit_graph.add_error_node(graph, hook, layer, effect_on_target=target_scores.error_effect)
    if not above:
        receivers = {graph.graph["target"]: target_scores}
    else:
        receivers = {circuit_graph.feature_node_id(node.hook, node.index): node_scores[node] for node in above}
    for receiver, scores in receivers.items():
        for index, source in sources.items():
            effect = scores.error_effect if index < 0 else float(scores.effects[index])
            if effect != 0 and math.isfinite(effect):
                circuit_graph.add_edge(graph, source, receiver, effect, method)


# --- downstream tracing -----------------------------------------------------------------------


def _downstream_hooks(dictionaries: dict[str, Dictionary], source: FeatureTarget, depth: int | None) -> list[str]:
    above = sorted((hook for hook in dictionaries if hook_order(hook) > hook_order(source.hook)), key=hook_order)
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        above = above[:depth]
    if not above:
        raise ValueError(f"no dictionary sits after {source.hook}; give dictionaries at later layers to trace downstream")
    return above


def _downstream_effects(model, dictionaries: dict[str, Dictionary], node: _Node, contexts: TraceContexts,
                        hooks: list[str], method: str) -> dict[str, torch.Tensor]:
    """{hook: [n_features]} the effect of removing `node` on every feature at `hooks` (value summed
    over positions 1.., mean over contexts): exact by ablation, or linearised (one forward-mode pass)."""
    deepest = max(hooks, key=hook_order)
    stop = stop_layer(model, FeatureTarget(deepest, 0))
    valid = contexts.valid
    n_features = dictionaries[node.hook].n_features
    if method == "ablation":
        with torch.no_grad():
            rows = len(contexts)
            tokens = torch.cat([contexts.tokens, contexts.tokens])
            edit = no_edit(torch.cat([valid, valid]), n_features)
            edit.features[rows:, node.index] = 1.0
            _, recorded = run_edited(model, tokens, dictionaries, {node.hook: edit}, hooks, stop)
            result = {}
            for hook in hooks:
                codes = dictionaries[hook].encode(recorded[hook]).cpu() * torch.cat([valid, valid])[..., None]
                sums = codes.sum(dim=1)
                result[hook] = (sums[:rows] - sums[rows:]).mean(dim=0)
            return result
    import torch.autograd.forward_ad as forward_ad

    dictionary = dictionaries[node.hook]
    recorded: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device

    def tangent_hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        codes = dictionary.encode(activation)[..., node.index]  # [n, pos]
        direction = dictionary.feature_directions[node.index]
        tangent = (codes * valid.to(codes))[..., None] * direction  # removing it lowers x by this much
        return forward_ad.make_dual(activation, tangent.detach())

    with torch.no_grad(), forward_ad.dual_level():
        fwd_hooks = [(node.hook, tangent_hook)] + [(hook, _record_hook(recorded, hook)) for hook in hooks]
        model.run_with_hooks(contexts.tokens.to(device), fwd_hooks=fwd_hooks, stop_at_layer=stop)
        result = {}
        for hook in hooks:
            codes = dictionaries[hook].encode(recorded[hook])
            change = forward_ad.unpack_dual(codes).tangent
            if change is None:
                change = torch.zeros_like(forward_ad.unpack_dual(codes).primal)
            result[hook] = (change.cpu() * valid[..., None]).sum(dim=1).mean(dim=0)
    return result


def run_downstream_trace(model, dictionaries: dict[str, Dictionary], source: FeatureTarget, contexts: TraceContexts,
                         method: str = "ablation", depth: int | None = 2, top_k_per_layer: int = 10,
                         scan: FeatureScan | None = None, outlier_factor: float | None = OUTLIER_FACTOR,
                         progress: bool = True) -> TraceResult:
    """What `source` causes: its effect on every feature of the later dictionary layers; the strongest
    per layer are kept, with edges between neighbouring layers (each kept node removed in turn).

    The graph's `target` attribute names the source (the schema needs one) and `direction` is
    "downstream"; edges still point cause -> effect. Nodes carry `effect_of_source`.
    """
    _check_inputs(model, dictionaries, source, method)
    started = time.perf_counter()
    hooks = _downstream_hooks(dictionaries, source, depth)
    clean = clean_run(model, dictionaries, source, contexts, hooks, outlier_factor)
    contexts = clean.contexts
    graph = nx.DiGraph()
    graph.graph.update({"method": method, "model": model_name_of(model), "direction": "downstream",
                        "hooks": list(hooks), "top_k_per_layer": top_k_per_layer, "n_contexts": len(contexts),
                        "measure": "mean over contexts of the activation summed over positions 1.."})
    circuit_graph.add_feature_node(graph, source.hook, hook_order(source.hook)[0], source.index,
                                   activation=float(clean.target.mean()), is_target=True)
    total = _downstream_effects(model, dictionaries, _Node(source.hook, source.index), contexts, hooks, method)
    scores = {hook: LayerScores(hook, method, total[hook].float(), total[hook] != 0, 0.0) for hook in hooks}
    previous = [_Node(source.hook, source.index)]
    for number, hook in enumerate(tqdm(hooks, desc="trace downstream", disable=not progress)):
        kept = [_Node(hook, index) for index in top_features(scores[hook], top_k_per_layer)]
        for node in kept:
            circuit_graph.add_feature_node(graph, hook, hook_order(hook)[0], node.index,
                                           activation=float(clean.node_values[hook][node.index]),
                                           effect_of_source=float(total[hook][node.index]))
        for upstream in previous:
            effects = total if number == 0 else _downstream_effects(model, dictionaries, upstream, contexts, [hook],
                                                                     method)
            for node in kept:
                effect = float(effects[hook][node.index])
                if effect != 0:
                    circuit_graph.add_edge(graph, circuit_graph.feature_node_id(upstream.hook, upstream.index),
                                           circuit_graph.feature_node_id(hook, node.index), effect, method)
        previous = kept
    annotate_feature_nodes(graph, model, dictionaries, scan)
    graph.nodes[graph.graph["target"]]["contexts"] = list(contexts.entries)
    timings = {"total": time.perf_counter() - started}
    graph.graph["timings_s"] = {name: round(seconds, 4) for name, seconds in timings.items()}
    return TraceResult(graph, scores, contexts, timings)


def trace_downstream(model, dictionaries: dict[str, Dictionary], source: FeatureTarget, contexts: TraceContexts,
                     method: str = "ablation", depth: int | None = 2, top_k_per_layer: int = 10,
                     **options) -> nx.DiGraph:
    """The features `source` drives in later layers, as a graph (see `run_downstream_trace`)."""
    return run_downstream_trace(model, dictionaries, source, contexts, method, depth, top_k_per_layer,
                                **options).graph


# --- checking a trace -------------------------------------------------------------------------


class AblationEffect(NamedTuple):
    """The target's value clean and with a set of features removed together."""

    clean: float
    ablated: float

    @property
    def drop(self) -> float:
        return self.clean - self.ablated

    @property
    def fraction(self) -> float:
        """The share of the target's value removed (0 when the clean value is 0)."""
        return self.drop / self.clean if self.clean else 0.0


@torch.no_grad()
def ablate_features_effect(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                           features: list[tuple[str, int]], errors: Iterable[str] = (),
                           outlier_factor: float | None = OUTLIER_FACTOR) -> AblationEffect:
    """Remove all `features` [(hook, index)] (and the errors at the hooks in `errors`) together at the
    contexts' editable positions and measure the target (mean over contexts of its value at the
    measured positions). Contexts from a TraceResult already have their outliers protected; others
    get them protected here (`outlier_factor`)."""
    _check_inputs(model, dictionaries, target, "ablation")
    if contexts.protected is None and outlier_factor is not None:
        contexts = clean_run(model, dictionaries, target, contexts, [hook for hook, _ in features] + list(errors),
                             outlier_factor).contexts
    rows = len(contexts)
    edits: dict[str, Edit] = {}
    for hook, index in list(features) + [(hook, -1) for hook in errors]:
        if hook not in dictionaries:
            raise ValueError(f"no dictionary at {hook!r} to ablate a feature in; have: {', '.join(dictionaries)}")
        if hook not in edits:
            edits[hook] = no_edit(torch.cat([contexts.valid, contexts.valid]), dictionaries[hook].n_features)
        if index < 0:
            edits[hook].error[rows:] = True
        else:
            edits[hook].features[rows:, index] = 1.0
    tokens = torch.cat([contexts.tokens, contexts.tokens])  # clean rows, then ablated rows: one batch
    record = [target.hook] if isinstance(target, FeatureTarget) else []
    output, recorded = run_edited(model, tokens, dictionaries, edits, record, stop_layer(model, target))
    values = target_values(target, dictionaries, output, recorded, torch.cat([contexts.measure, contexts.measure]))
    return AblationEffect(float(values[:rows].mean()), float(values[rows:].mean()))


class TopVersusRandom(NamedTuple):
    hook: str
    k: int
    top: AblationEffect  # the k features with the largest positive effect, removed together
    random: list[AblationEffect]  # k random active features, removed together, per draw

    @property
    def random_fraction(self) -> float:
        return sum(effect.fraction for effect in self.random) / len(self.random) if self.random else 0.0


def top_versus_random(model, dictionaries: dict[str, Dictionary], result: TraceResult, k: int = 10,
                      n_random: int = 5, seed: int = 0) -> list[TopVersusRandom]:
    """Per traced layer: the target's drop when its k most helpful features are removed together,
    against k features drawn at random from those active on the traced contexts."""
    target = target_from_graph(result.graph)
    generator = torch.Generator().manual_seed(seed)
    report = []
    for hook, scores in result.scores.items():
        helpful = torch.argsort(-scores.effects * scores.evaluated, stable=True)[:k].tolist()
        helpful = [index for index in helpful if scores.effects[index] > 0]
        top = ablate_features_effect(model, dictionaries, target, result.contexts, [(hook, i) for i in helpful])
        active = torch.nonzero(scores.evaluated).flatten()
        draws = []
        for _ in range(n_random):
            chosen = active[torch.randperm(len(active), generator=generator)[: len(helpful)]].tolist()
            draws.append(ablate_features_effect(model, dictionaries, target, result.contexts,
                                                [(hook, i) for i in chosen]))
        report.append(TopVersusRandom(hook, len(helpful), top, draws))
    return report


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


class LayerAgreement(NamedTuple):
    hook: str
    n: int  # features compared
    spearman: float
    top_overlap: float  # share of ablation's top n found in attribution's top n


def method_agreement(attribution: dict[str, LayerScores], ablation: dict[str, LayerScores],
                     top_n: int = 30) -> list[LayerAgreement]:
    """Per layer: Spearman correlation of attribution with ablation on ablation's top_n features
    (by |effect|), and the overlap of the two top_n sets."""
    from scipy.stats import spearmanr

    report = []
    for hook, exact in ablation.items():
        if hook not in attribution:
            continue
        estimate = attribution[hook]
        top = top_features(exact, top_n)
        if len(top) >= 3:
            rho = float(spearmanr(exact.effects[top].numpy(), estimate.effects[top].numpy()).statistic)
        else:
            rho = float("nan")
        estimated_top = set(top_features(estimate, top_n))
        overlap = len(estimated_top & set(top)) / len(top) if top else float("nan")
        report.append(LayerAgreement(hook, len(top), rho, overlap))
    return report


def ablation_agreement(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                       depth: int | None = 2, top_n: int = 30, top_k_per_layer: int = 10,
                       **options) -> tuple[list[LayerAgreement], dict[str, float]]:
    """Trace the same target on the same contexts both ways; returns the per-layer agreement (see
    `method_agreement`) and each trace's seconds. Options go to `run_upstream_trace`."""
    settings = {"depth": depth, "top_k_per_layer": top_k_per_layer, **options}
    attribution = run_upstream_trace(model, dictionaries, target, contexts, "attribution", **settings)
    ablation = run_upstream_trace(model, dictionaries, target, contexts, "ablation", **settings)
    seconds = {"attribution": attribution.timings["total"], "ablation": ablation.timings["total"]}
    return method_agreement(attribution.scores, ablation.scores, top_n), seconds


# --- the summary ------------------------------------------------------------------------------


def relative_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy whose edges hold the share of the receiver's activation the source supplies (effect /
    the receiver's activation; 0 where that activation is not positive). Shares are comparable across
    the graph, and a path's strength (the product of |shares|) estimates the share of the target that
    flows along it. Graph attribute `edge_units` says so."""
    relative = graph.copy()
    for source, receiver, data in relative.edges(data=True):
        activation = float(graph.nodes[receiver].get("activation", 0.0))
        effect = data["effect"] / activation if activation > 0 else 0.0
        data.update(effect=effect, weight=abs(effect), sign=-1 if effect < 0 else 1)
    relative.graph["edge_units"] = "share of the receiving node's activation"
    return relative


def summarize(graph: nx.DiGraph, n_paths: int = 5) -> str:
    """A readable summary: the target, each layer's strongest features, and the strongest paths."""
    target = circuit_graph.target_node(graph)
    data = graph.nodes[target]
    lines = [f"target {circuit_graph.describe_node(graph, target)}: activation {data['activation']:.4g} "
             f"({graph.graph.get('method', '')}, {graph.graph.get('n_contexts', '?')} contexts)"]
    upstream = graph.graph.get("direction", "upstream") == "upstream"
    key = "effect_on_target" if upstream else "effect_of_source"
    layers = sorted({d["layer"] for n, d in graph.nodes(data=True) if n != target}, reverse=upstream)
    lines.append(f"strongest nodes per layer ({'effect on the target' if upstream else 'effect of the source'}):")
    for layer in layers:
        members = [n for n, d in graph.nodes(data=True) if d["layer"] == layer and n != target and key in d]
        members.sort(key=lambda n: -abs(graph.nodes[n][key]))
        shown = ", ".join(f"{circuit_graph.describe_node(graph, n)} {graph.nodes[n][key]:+.3g}" for n in members[:5])
        lines.append(f"  layer {layer}: {shown}")
    if upstream:
        lines.append("strongest paths (each hop: the share of the receiver's activation the source supplies; "
                     "strength: the share of the target along the path):")
        relative = relative_graph(graph)
        lines.append(circuit_graph.format_paths(relative, circuit_graph.strongest_paths(relative, n_paths)))
    return "\n".join(lines)
