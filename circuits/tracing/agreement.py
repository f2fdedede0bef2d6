"""Attribution against ablation over many targets: the distribution of rank agreement, and where
attribution fails.

For each target feature (`pick_targets`: active, seeded, spread over firing rates) the same contexts
are scored by ablation (the ground truth) and by attribution (plain, and integrated gradients with
`ig_steps` > 1), layer by layer down the dictionaries below the target. The nodes above each layer
are ablation's `top_k_edges` strongest features of the layer above, for every method, so that the
edges between dictionary layers compare as well as the effects on the target. Per (target, layer,
method, receiver): Spearman of attribution against ablation on ablation's top n (among the features
ablation evaluated), the overlap of the two top-n sets, and the failures.

A failure is a feature whose ablation effect is large (at least `LARGE` of the receiver's strongest)
but whose attribution is near zero (under `NEAR_ZERO` of it) or of the opposite sign. Each failure
is re-run once to split its ablation effect by position: the part at positions where the receiver
was off on the clean run (`switched_on`) is invisible to a gradient there (a ReLU or TopK code at
zero has zero gradient), so attribution cannot see an effect made of features the ablation turns on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from circuits.engine import FeatureAblation, run_with_edits
from circuits.features import FeatureScan
from circuits.hooks import layer_of_hook, stop_layer
from circuits.tracing.checks import method_agreement
from circuits.tracing.contexts import TraceContexts, find_target_contexts
from circuits.tracing.scoring import AblationScorer, BucketedScorer, LayerScores, Node, clean_run
from circuits.tracing.targets import FeatureTarget, encode_features
from circuits.tracing.upstream import top_features, upstream_hooks
from sae.dictionary import Dictionary
from sae.progress import status

LARGE = 0.1  # a failure's ablation effect is at least this share of the receiver's largest |effect|
NEAR_ZERO = 0.1  # attribution under this share of the ablation effect counts as near zero


def method_name(ig_steps: int) -> str:
    """"attribution" for plain activation x gradient, "ig<N>" for integrated gradients over N points."""
    return "attribution" if ig_steps == 1 else f"ig{ig_steps}"


def pick_targets(scan: FeatureScan, hook: str, n: int, *, seed: int = 0, min_contexts: int = 8,
                 max_firing_fraction: float = 0.2) -> list[int]:
    """n target features at `hook`, spread over firing rates: the features that fire in at least
    `min_contexts` scanned contexts on at most `max_firing_fraction` of tokens, sorted by firing rate and
    cut into n equal strata, one seeded pick per stratum (sorted by index)."""
    if hook not in scan.max_activation:
        raise ValueError(f"hook {hook!r} was not scanned; scanned hooks: {', '.join(scan.hooks)}")
    fired = (scan.max_activation[hook] > 0).sum(dim=0)
    density = scan.firing_fraction[hook]
    eligible = torch.nonzero((fired >= min_contexts) & (density > 0) & (density <= max_firing_fraction)).flatten()
    if len(eligible) < n:
        raise ValueError(f"only {len(eligible)} features at {hook} fire in at least {min_contexts} of the "
                         f"{scan.tokens.shape[0]} scanned contexts on at most {max_firing_fraction:.0%} of tokens, "
                         f"fewer than the {n} targets asked for; scan more contexts or ask for fewer targets")
    eligible = eligible[torch.argsort(density[eligible], stable=True)]
    generator = torch.Generator().manual_seed(seed)
    picks = [int(stratum[torch.randint(len(stratum), (1,), generator=generator)])
             for stratum in torch.tensor_split(eligible, n)]
    return sorted(picks)


class Failure(NamedTuple):
    feature: int
    ablation: float  # the ablation effect on the receiver
    attribution: float  # the method's estimate of it
    kind: str  # "near zero" or "opposite sign"


def find_failures(exact: LayerScores, estimate: LayerScores, top_n: int = 30, large: float = LARGE,
                  near_zero: float = NEAR_ZERO) -> list[Failure]:
    """Ablation's top-n features whose |effect| is at least `large` x the largest, with an estimate under
    `near_zero` x the effect in size ("near zero") or of the other sign ("opposite sign")."""
    top = top_features(exact, top_n)
    if not top:
        return []
    biggest = float(exact.effects[top[0]].abs())
    failures = []
    for index in top:
        effect, guess = float(exact.effects[index]), float(estimate.effects[index])
        if abs(effect) < large * biggest:
            continue
        if abs(guess) < near_zero * abs(effect):
            failures.append(Failure(index, effect, guess, "near zero"))
        elif guess * effect < 0:
            failures.append(Failure(index, effect, guess, "opposite sign"))
    return failures


def restricted(estimate: LayerScores, exact: LayerScores) -> LayerScores:
    """The estimate on the features the exact method evaluated only (ablation may cap its candidates)."""
    evaluated = estimate.evaluated & exact.evaluated
    return LayerScores(estimate.hook, estimate.method, estimate.effects * evaluated, evaluated, estimate.error_effect)


class SplitEffect(NamedTuple):
    effect: float  # clean - ablated, mean over contexts of the sum over measured positions
    switched_on: float  # the part at positions where the receiver was off (code 0) on the clean run


@torch.no_grad()
def split_effect(model, dictionaries: dict[str, Dictionary], contexts: TraceContexts, source: Node,
                 receiver: Node, measure: torch.Tensor) -> SplitEffect:
    """Ablate `source` (as AblationScorer does: its contribution at the contexts' editable positions) and
    split the receiver's drop (summed over `measure` [n, pos], mean over contexts) into the part at
    positions where the receiver was off on the clean run and the rest."""
    rows = len(contexts)
    edit = FeatureAblation.nothing(dictionaries[source.hook], torch.cat([contexts.valid, contexts.valid]))
    edit.features[rows:, source.index] = 1.0
    run = run_with_edits(model, torch.cat([contexts.tokens, contexts.tokens]), {source.hook: edit},
                         record=[receiver.hook], stop_at_layer=stop_layer([receiver.hook], model.cfg.n_layers))
    codes = encode_features(dictionaries[receiver.hook], run.recorded[receiver.hook], [receiver.index])[..., 0]
    codes = codes.double().cpu() * torch.cat([measure, measure]).double()
    clean, ablated = codes[:rows], codes[rows:]
    drop = clean - ablated
    return SplitEffect(float(drop.sum() / rows), float(drop[clean <= 0].sum() / rows))


@dataclass
class TargetComparison:
    """One target traced both ways down one set of dictionaries: a row per (layer, method, receiver) and
    a row per failure (plain dicts, ready for a CSV)."""

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


def compare_target(model, dictionaries: dict[str, Dictionary], target: FeatureTarget, contexts: TraceContexts,
                   hooks: list[str], *, ig_steps: tuple[int, ...] = (1,), top_n: int = 30, top_k_edges: int = 5,
                   max_candidates: int | None = None, batch_size: int = 32, progress: bool = False,
                   labels: dict | None = None) -> TargetComparison:
    """Score `target` on `contexts` at `hooks` (nearest first) by ablation and by attribution with each of
    `ig_steps`; see the module docstring. `labels` are copied into every row (e.g. the arm's name)."""
    labels = dict(labels or {})
    clean = clean_run(model, dictionaries, target, contexts, hooks)
    contexts = clean.contexts
    ablation = AblationScorer(model, dictionaries, target, clean, batch_size=batch_size,
                              max_candidates=max_candidates, progress=progress)
    scorers = {method_name(steps): BucketedScorer(model, dictionaries, target, contexts, hooks, ig_steps=steps)
               for steps in ig_steps}
    target_node = Node(target.hook, target.index)
    result, splits, above = TargetComparison(), {}, []
    for depth, hook in enumerate(hooks, start=1):
        exact_target, exact_nodes = ablation.layer(hook, above)
        exact = {target_node: exact_target, **exact_nodes}
        where = {"depth": depth, "hook": hook, "blocks_apart": layer_of_hook(target.hook) - layer_of_hook(hook)}
        for method, scorer in scorers.items():
            estimate_target, estimate_nodes = scorer.layer(hook, above)
            estimates = {target_node: estimate_target, **estimate_nodes}
            for receiver, truth in exact.items():
                estimate = restricted(estimates[receiver], truth)
                [agreement] = method_agreement({hook: estimate}, {hook: truth}, top_n)
                failures = find_failures(truth, estimate, top_n)
                measure = contexts.measure if receiver == target_node else contexts.valid
                for failure in failures:
                    key = (hook, failure.feature, receiver)
                    if key not in splits:
                        splits[key] = split_effect(model, dictionaries, contexts, Node(hook, failure.feature),
                                                   receiver, measure)
                    split = splits[key]
                    result.failures.append({**labels, **where, "method": method, "receiver": _name(receiver),
                                            "receiver_kind": "target" if receiver == target_node else "edge",
                                            "feature": failure.feature, "ablation": failure.ablation,
                                            "attribution": failure.attribution, "kind": failure.kind,
                                            "switched_on": split.switched_on,
                                            "switched_on_share": _share(split.switched_on, split.effect),
                                            "cause": "switched on" if _share(split.switched_on, split.effect) >= 0.5
                                            else "other"})
                on = sum(1 for row in result.failures[len(result.failures) - len(failures):]
                         if row["cause"] == "switched on")
                result.rows.append({**labels, **where, "method": method, "receiver": _name(receiver),
                                    "receiver_kind": "target" if receiver == target_node else "edge",
                                    "receiver_activation": float(clean.target.mean()) if receiver == target_node
                                    else float(clean.node_values[receiver.hook][receiver.index]),
                                    "compared": agreement.n, "spearman": agreement.spearman,
                                    "top_overlap": agreement.top_overlap,
                                    "candidates": int(truth.evaluated.sum()),
                                    "failures": len(failures), "switched_on_failures": on})
        above = [Node(hook, index) for index in top_features(exact_target, top_k_edges)]
    return result


def _name(node: Node) -> str:
    return f"{node.hook}:{node.index}"


def _share(part: float, whole: float) -> float:
    return abs(part) / abs(whole) if whole else (1.0 if part else 0.0)


@dataclass
class AgreementStudy:
    rows: list[dict]
    failures: list[dict]
    targets: list[dict]  # per target: index, contexts, clean activation
    arms: dict[str, list[str]]  # arm -> the hooks it traced (nearest first)


def study_arms(dictionaries: dict[str, Dictionary], target_hook: str, depth: int,
               skip_layer: bool) -> dict[str, list[str]]:
    """"consecutive": the `depth` dictionaries nearest below the target; with `skip_layer`, "skip": the
    second nearest alone (the nearest left out: traced through two layers at once)."""
    below = upstream_hooks(dictionaries, FeatureTarget(target_hook, 0), max(depth, 2 if skip_layer else 1))
    arms = {"consecutive": below[:depth]}
    if skip_layer:
        if len(below) < 2:
            raise ValueError(f"skipping a layer needs two dictionaries below {target_hook}; have {', '.join(below)}")
        arms["skip"] = [below[1]]
    return arms


def agreement_study(model, dictionaries: dict[str, Dictionary], scan: FeatureScan, target_hook: str, *,
                    n_targets: int = 20, depth: int = 3, skip_layer: bool = False, ig_steps: tuple[int, ...] = (1,),
                    n_contexts: int = 8, top_n: int = 30, top_k_edges: int = 5, max_candidates: int | None = None,
                    max_firing_fraction: float = 0.2, batch_size: int = 32, seed: int = 0, pad_id: int = 0,
                    progress: bool = True) -> AgreementStudy:
    """Pick `n_targets` features at `target_hook` (`pick_targets`), find `n_contexts` scanned contexts for
    each (`find_target_contexts`: between half and all of its maximum, cut after the activating token) and
    compare the methods on every arm of `study_arms` (each arm splices only its own dictionaries)."""
    if target_hook not in dictionaries:
        raise ValueError(f"no dictionary at the target hook {target_hook!r}; have: {', '.join(dictionaries)}")
    arms = study_arms(dictionaries, target_hook, depth, skip_layer)
    study = AgreementStudy([], [], [], arms)
    indices = pick_targets(scan, target_hook, n_targets, seed=seed, min_contexts=n_contexts,
                           max_firing_fraction=max_firing_fraction)
    for number, index in enumerate(indices, start=1):
        target = FeatureTarget(target_hook, index)
        contexts = find_target_contexts(scan, target, model.tokenizer, n_contexts=n_contexts, seed=seed,
                                        pad_id=pad_id)
        study.targets.append({"target": _name(Node(target_hook, index)), "index": index, "contexts": len(contexts),
                              "context_tokens": int(contexts.lengths.sum())})
        for arm, hooks in arms.items():
            used = {hook: dictionaries[hook] for hook in [target_hook, *hooks]}
            compared = compare_target(model, used, target, contexts, hooks, ig_steps=tuple(ig_steps), top_n=top_n,
                                      top_k_edges=top_k_edges, max_candidates=max_candidates, batch_size=batch_size,
                                      labels={"target": _name(Node(target_hook, index)), "arm": arm})
            study.rows += compared.rows
            study.failures += compared.failures
        status(f"trace-agreement: target {number}/{len(indices)} ({target_hook}:{index}) done", progress)
    return study


def agreement_table(rows: list[dict], receiver_kind: str = "target") -> list[dict]:
    """Per (arm, depth, method): how many targets (receivers), the quartiles of Spearman (nan dropped), the
    median top-n overlap, and the failures (all, and those made by switched-on features)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["receiver_kind"] == receiver_kind:
            groups.setdefault((row["arm"], row["depth"], row["blocks_apart"], row["method"]), []).append(row)
    table = []
    for (arm, depth, blocks, method), members in sorted(groups.items(), key=lambda item: (
            item[0][0] != "consecutive", item[0][1], item[0][0], item[0][3] != "attribution", item[0][3])):
        rhos = torch.tensor([row["spearman"] for row in members if not math.isnan(row["spearman"])],
                            dtype=torch.float64)
        quartiles = torch.quantile(rhos, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist() \
            if len(rhos) else [math.nan] * 3
        overlaps = torch.tensor([row["top_overlap"] for row in members], dtype=torch.float64)
        table.append({"arm": arm, "depth": depth, "blocks_apart": blocks, "method": method, "receivers": len(members),
                      "spearman_q1": quartiles[0], "spearman_median": quartiles[1], "spearman_q3": quartiles[2],
                      "spearman_min": float(rhos.min()) if len(rhos) else math.nan,
                      "overlap_median": float(overlaps.nanmedian()) if len(overlaps) else math.nan,
                      "failures": sum(row["failures"] for row in members),
                      "switched_on_failures": sum(row["switched_on_failures"] for row in members)})
    return table
