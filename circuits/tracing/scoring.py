"""Every feature's effect at one dictionary hook on the target and on the nodes kept one layer up.

effect(source -> node) = value(clean) - value(source ablated). Two scorers behind one interface,
`layer(hook, nodes_above) -> (scores on the target, {node above: scores on it})`:

- `AblationScorer`, the ground truth: one row per (context, active feature), batched per context,
  each batch with its own clean row so every difference is taken within one batch. The blocks
  before the edited hook run once per batch on the single context; the engine's FeatureAblation
  expands their output into one row per ablated feature. Runs stop after the target's block.
- `GradientScorer`, the fast path: activation x gradient. One forward through the engine with a
  gradient leaf at each dictionary hook (the clean run as well) and one backward per node; the
  scores come from `circuits.attribution.attribution_scores` with delta = the clean codes (removing
  a feature moves its codes to zero) and the error term x - reconstruction.
  With `ig_steps` N > 1 (integrated gradients along the ablation path, as Marks et al.'s
  feature-circuits do): the feature gradients at a hook are the mean over the N points t = 0, 1/N,
  ..., (N-1)/N of the gradient with every code at that hook already removed a fraction t of the way
  (activation = decode((1 - t) codes) + error at the editable positions): a left Riemann sum of the
  path integral, so N = 1 is plain attribution exactly and N -> infinity gives, for a lone feature,
  the ablation effect exactly. One extra forward per point and hook; the error node keeps the
  clean-point gradient (the path moves the features, not the error).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from sae.progress import progress_bar

from circuits.attribution import attribution_scores
from circuits.engine import FeatureAblation, run_with_edits
from circuits.hooks import layer_of_hook, stop_layer
from circuits.tracing.contexts import TraceContexts, length_buckets, protect_passthrough
from circuits.tracing.targets import (LogitTarget, Target, encode_features, feature_sums, target_hooks,
                                      target_layer, target_stop_layer, target_values)
from sae.dictionary import Dictionary


@dataclass
class LayerScores:
    """Every feature's effect at one dictionary hook on one node (the target, or a kept feature)."""

    hook: str
    method: str
    effects: torch.Tensor  # [n_features] effect on the node (0 where the feature is inactive)
    evaluated: torch.Tensor  # [n_features] bool: active features, whose effect was computed
    error_effect: float


class Node(NamedTuple):
    """A kept feature: `index` of the dictionary at `hook`."""

    hook: str
    index: int


class CleanRun(NamedTuple):
    contexts: TraceContexts  # the contexts, with the pass-through positions protected
    codes: dict[str, torch.Tensor]  # hook -> [n, pos, n_features] clean codes
    target: torch.Tensor  # [n] target value per context
    node_values: dict[str, torch.Tensor]  # hook -> [n_features]: clean value (mean over contexts)


@torch.no_grad()
def clean_run(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
              hooks: list[str]) -> CleanRun:
    """The unedited run: pass-through positions protected, codes at `hooks`, the target's value per
    context and every feature's value (its activation summed over positions, mean over contexts)."""
    record = list(dict.fromkeys(hooks + target_hooks(target)))
    stop = None if isinstance(target, LogitTarget) else stop_layer(record, model.cfg.n_layers)
    run = run_with_edits(model, contexts.tokens, record=record, stop_at_layer=stop)
    return clean_from_activations(dictionaries, target, contexts, hooks, output=run.output, recorded=run.recorded)


@torch.no_grad()
def clean_from_activations(dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                           hooks: list[str], *, output: torch.Tensor, recorded: dict[str, torch.Tensor]) -> CleanRun:
    """A CleanRun from the unedited run's output and activations ({hook: [n, pos, d]})."""
    recorded = {hook: activation.detach() for hook, activation in recorded.items()}
    contexts = protect_passthrough(contexts, recorded.values())
    valid = contexts.valid
    codes = {hook: dictionaries[hook].encode(recorded[hook]).cpu() for hook in hooks}
    values = {hook: (codes[hook] * valid[..., None]).sum(dim=1).mean(dim=0) for hook in hooks}
    target_value = target_values(target, dictionaries, output.detach(), recorded, contexts.measure).cpu()
    return CleanRun(contexts, codes, target_value, values)


class AblationScorer:
    """Effects by ablation, one row per (context, active feature), batched per context."""

    method = "ablation"

    def __init__(self, model, dictionaries: dict[str, Dictionary], target: Target, clean: CleanRun, *,
                 batch_size: int = 32, max_candidates: int | None = None, progress: bool = True):
        self.model, self.dictionaries, self.target, self.contexts = model, dictionaries, target, clean.contexts
        self.clean, self.batch_size, self.max_candidates, self.progress = clean, batch_size, max_candidates, progress
        self.stop = target_stop_layer(model, target)

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
    def layer(self, hook: str, nodes_above: list[Node]) -> tuple[LayerScores, dict[Node, LayerScores]]:
        """Effects of every active feature (and the error) at `hook` on the target and on `nodes_above`."""
        n_features = self.dictionaries[hook].n_features
        self.target_effects = torch.zeros(n_features, dtype=torch.float64)
        self.node_effects = {node: torch.zeros(n_features, dtype=torch.float64) for node in nodes_above}
        self.error_target, self.error_nodes = 0.0, {node: 0.0 for node in nodes_above}
        evaluated = torch.zeros(n_features, dtype=torch.bool)
        per_context = self.candidates(hook)
        bar = progress_bar(total=sum(len(features) + 1 for features in per_context), desc=f"ablate {hook}", unit="row",
                           enabled=self.progress)
        for context, features in enumerate(per_context):
            evaluated[features] = True
            jobs = features.tolist() + [-1]  # -1: the error node
            for start in range(0, len(jobs), self.batch_size):
                self._batch(hook, context, jobs[start : start + self.batch_size], nodes_above)
                bar.update(len(jobs[start : start + self.batch_size]))
        bar.close()
        scores = LayerScores(hook, self.method, self.target_effects.float(), evaluated, self.error_target)
        return scores, {node: LayerScores(hook, self.method, self.node_effects[node].float(), evaluated,
                                          self.error_nodes[node]) for node in nodes_above}

    def _batch(self, hook: str, context: int, chunk: list[int], nodes_above: list[Node]) -> None:
        """One forward: row 0 clean, then one row per job of `chunk` (a feature, or -1 for the error)."""
        tokens, measure, valid = self.contexts.row(context)
        rows, n = len(chunk) + 1, len(self.contexts)
        edit = FeatureAblation.nothing(self.dictionaries[hook], valid.expand(rows, -1))
        for row, feature in enumerate(chunk, start=1):
            if feature < 0:
                edit.error[row] = True
            else:
                edit.features[row, feature] = 1.0
        above_hooks = sorted({node.hook for node in nodes_above})
        run = run_with_edits(self.model, tokens[None], {hook: edit}, record=above_hooks + target_hooks(self.target),
                             stop_at_layer=self.stop)
        values = target_values(self.target, self.dictionaries, run.output, run.recorded,
                               measure.expand(rows, -1)).double().cpu()
        drops = (values[0] - values[1:]) / n
        index = torch.tensor(chunk)
        is_feature = index >= 0
        self.target_effects[index[is_feature]] += drops[is_feature]
        self.error_target += float(drops[~is_feature].sum())
        for above in above_hooks:
            nodes = [node for node in nodes_above if node.hook == above]
            sums = feature_sums(self.dictionaries[above], run.recorded[above], [node.index for node in nodes],
                                valid.expand(rows, -1).to(run.recorded[above].device)).double().cpu()
            node_drops = (sums[0] - sums[1:]) / n  # [chunk, k]
            for column, node in enumerate(nodes):
                self.node_effects[node][index[is_feature]] += node_drops[is_feature, column]
                self.error_nodes[node] += float(node_drops[~is_feature, column].sum())


def ig_points(steps: int) -> list[float]:
    """The fractions of the removal at which integrated gradients take a gradient: 0, 1/N, ..., (N-1)/N
    (0: the clean run, so one step is plain attribution)."""
    if steps < 1:
        raise ValueError(f"ig_steps must be at least 1 (1: plain attribution), got {steps}")
    return [step / steps for step in range(steps)]


def direct_effect_hooks(model, first_layer: int, last_layer: int, include_final: bool) -> list[str]:
    """Hooks whose values are detached for direct effects: every attention pattern (`*hook_pattern`)
    and norm scale (`*hook_scale`: ln1, ln2, q/k norms, post-norms, ...) the model has in blocks
    first_layer..last_layer, and the final norm's scale with `include_final`; by block, then name."""
    chosen = []
    for name in model.hook_dict:
        if not name.endswith(("hook_pattern", "hook_scale")):
            continue
        layer = layer_of_hook(name)
        if (layer is None and include_final and name.endswith("hook_scale")) or (
                layer is not None and first_layer <= layer <= last_layer):
            chosen.append(name)
    return sorted(chosen, key=lambda name: (layer_of_hook(name) is None, layer_of_hook(name) or 0, name))


class GradientScorer:
    """Effects by attribution: activation x gradient, from one forward (which is also the clean run)
    and one backward per node above a layer (batched); with `ig_steps` > 1, integrated gradients along
    the ablation path (see the module docstring)."""

    method = "attribution"

    def __init__(self, model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                 hooks: list[str], *, direct_effects: bool = False, ig_steps: int = 1):
        self.points = ig_points(ig_steps)
        self.model, self.dictionaries, self.target = model, dictionaries, target
        self.stop = target_stop_layer(model, target)
        self.detached: list[str] = []
        if direct_effects:
            lowest = min(layer_of_hook(hook) for hook in hooks)
            self.detached = direct_effect_hooks(model, lowest + 1, target_layer(model, target),
                                                isinstance(target, LogitTarget))
        with torch.enable_grad():
            run = run_with_edits(model, contexts.tokens, record=hooks + target_hooks(target), leaves=hooks,
                                 detach=self.detached, stop_at_layer=target_stop_layer(model, target))
            self.leaves = run.leaves
            self.spliced = {hook: run.recorded[hook] for hook in hooks}  # activation + leaf, in the autograd graph
            # The forward's values are the clean run's (the leaves are zero, detaching changes no value).
            self.clean = clean_from_activations(dictionaries, target, contexts, hooks, output=run.output,
                                                recorded=run.recorded)
            self.contexts = self.clean.contexts
            self.valid = self.contexts.valid.to(run.output.device)
            self.target_value = target_values(target, dictionaries, run.output, run.recorded,
                                              self.contexts.measure).mean()
        self._target_grads: dict[str, torch.Tensor] | None = None
        self._deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # hook -> (clean codes, error term)

    def _scores(self, hook: str, grads: list[torch.Tensor | None]) -> LayerScores:
        """Each feature's code x (decoder row . mean gradient over the points) and the error's
        (x - reconstruction) . clean gradient, summed over the valid positions (zero where the node does
        not depend on this hook). grads: one per point of `self.points`, the clean point first."""
        dictionary = self.dictionaries[hook]
        evaluated = (self.clean.codes[hook] * self.contexts.valid[..., None]).sum(dim=(0, 1)) > 0
        if all(grad is None for grad in grads):
            return LayerScores(hook, self.method, torch.zeros(dictionary.n_features), evaluated, 0.0)
        with torch.no_grad():
            if hook not in self._deltas:  # both zero outside the valid positions, so no mask is needed below
                x = self.spliced[hook].detach()
                valid = self.valid[..., None].to(x)
                codes = self.clean.codes[hook].to(x) * valid
                self._deltas[hook] = (codes, (x - dictionary.decode(codes)) * valid)
            codes, error = self._deltas[hook]
            grads = [torch.zeros_like(error) if grad is None else grad for grad in grads]
            scores = attribution_scores(grads, codes, dictionary.feature_directions, delta_error=error)
            if len(grads) > 1:  # the error's estimate stays at the clean point
                scores.error = attribution_scores(grads[0], codes, dictionary.feature_directions,
                                                  delta_error=error).error
        return LayerScores(hook, self.method, scores.features.float() * evaluated, evaluated, float(scores.error))

    def layer(self, hook: str, nodes_above: list[Node]) -> tuple[LayerScores, dict[Node, LayerScores]]:
        if self._target_grads is None:
            names = list(self.leaves)
            grads = torch.autograd.grad(self.target_value, [self.leaves[name] for name in names],
                                        retain_graph=True, allow_unused=True)
            self._target_grads = dict(zip(names, grads))
        target_grads = [self._target_grads[hook]]
        node_grads = dict(zip(nodes_above, self._node_grads(self.spliced, self.leaves[hook], nodes_above)))
        node_grads = {node: [grad] for node, grad in node_grads.items()}
        for point in self.points[1:]:
            target_grad, grads = self._gradients_at(hook, point, nodes_above)
            target_grads.append(target_grad)
            for node in nodes_above:
                node_grads[node].append(grads[node])
        return self._scores(hook, target_grads), {node: self._scores(hook, node_grads[node]) for node in nodes_above}

    def _node_grads(self, activations: dict[str, torch.Tensor], leaf: torch.Tensor,
                    nodes_above: list[Node]) -> list[torch.Tensor | None]:
        """d value(node) / d leaf for each node above (its code summed over the valid positions, mean over
        contexts, read off `activations`), one backward each (batching them with vmap is slower on CPU)."""
        grads = {}
        for above in sorted({node.hook for node in nodes_above}):
            nodes = [node for node in nodes_above if node.hook == above]
            codes = encode_features(self.dictionaries[above], activations[above], [node.index for node in nodes])
            values = (codes * self.valid[..., None]).sum(dim=(0, 1)) / len(self.contexts)  # [k]
            for node, value in zip(nodes, values):
                grads[node] = torch.autograd.grad(value, [leaf], retain_graph=True, allow_unused=True)[0]
        return [grads[node] for node in nodes_above]

    def _gradients_at(self, hook: str, point: float, nodes_above: list[Node]):
        """(d target / d activation at `hook`, {node: d node / d activation}) with every code at `hook`
        removed the fraction `point` of the way (one forward from the embedding)."""
        dictionary = self.dictionaries[hook]
        removal = FeatureAblation(dictionary, torch.full((dictionary.n_features,), float(point)),
                                  positions=self.valid)
        above_hooks = sorted({node.hook for node in nodes_above})
        with torch.enable_grad():
            run = run_with_edits(self.model, self.contexts.tokens, {hook: removal},
                                 record=above_hooks + target_hooks(self.target), leaves=[hook], detach=self.detached,
                                 stop_at_layer=self.stop)
            leaf = run.leaves[hook]
            value = target_values(self.target, self.dictionaries, run.output, run.recorded,
                                  self.contexts.measure).mean()
            (target_grad,) = torch.autograd.grad(value, [leaf], retain_graph=True, allow_unused=True)
            grads = self._node_grads(run.recorded, leaf, nodes_above)
        return target_grad, dict(zip(nodes_above, grads))


class BucketedScorer:
    """Attribution over contexts of very different lengths: one gradient scorer per bucket of similar
    lengths (so little of the work is padding), their effects averaged with the buckets' weights."""

    method = "attribution"

    def __init__(self, model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                 hooks: list[str], *, direct_effects: bool = False, ig_steps: int = 1, max_buckets: int = 3):
        self.buckets = length_buckets(contexts.lengths, max_buckets)
        self.weights = [len(bucket) / len(contexts) for bucket in self.buckets]
        self.scorers = [GradientScorer(model, dictionaries, target, contexts.subset(bucket), hooks,
                                       direct_effects=direct_effects, ig_steps=ig_steps) for bucket in self.buckets]
        self.detached = self.scorers[0].detached
        self.clean = self._merged_clean(contexts)

    def _merged_clean(self, contexts: TraceContexts) -> CleanRun:
        """The buckets' clean runs as one over all contexts (in their order; codes stay per bucket)."""
        target = torch.zeros(len(contexts))
        measure = torch.zeros_like(contexts.measure)
        protected = torch.zeros_like(contexts.measure)
        for bucket, scorer in zip(self.buckets, self.scorers):
            index = torch.tensor(bucket)
            width = scorer.contexts.tokens.shape[1]
            target[index] = scorer.clean.target
            measure[index, :width] = scorer.contexts.measure
            protected[index, :width] = scorer.contexts.protected
        values = {hook: sum(weight * scorer.clean.node_values[hook] for weight, scorer in zip(self.weights, self.scorers))
                  for hook in self.scorers[0].clean.node_values}
        return CleanRun(replace(contexts, measure=measure, protected=protected), {}, target, values)

    def layer(self, hook: str, nodes_above: list[Node]) -> tuple[LayerScores, dict[Node, LayerScores]]:
        parts = [scorer.layer(hook, nodes_above) for scorer in self.scorers]
        target = weighted_scores([part[0] for part in parts], self.weights)
        return target, {node: weighted_scores([part[1][node] for part in parts], self.weights) for node in nodes_above}


def weighted_scores(scores: list[LayerScores], weights: list[float]) -> LayerScores:
    """Scores over all contexts from scores over buckets of them (weights: each bucket's share)."""
    effects = sum(weight * score.effects for weight, score in zip(weights, scores))
    evaluated = torch.stack([score.evaluated for score in scores]).any(dim=0)
    error = sum(weight * score.error_effect for weight, score in zip(weights, scores))
    return LayerScores(scores[0].hook, scores[0].method, effects, evaluated, float(error))
