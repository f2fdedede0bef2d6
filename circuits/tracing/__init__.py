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
- Positions the engine passes through (`circuits.engine.passthrough_positions`: BOS, and massive
  activations above 10x the row's median norm) at ANY traced hook on the clean run are protected:
  never edited, never measured, at every hook. Editing them breaks attention much as editing BOS
  would, and no dictionary is trained on them.
- Ablating a feature removes its contribution `code_i * decoder_row_i` at its hook, at every
  editable position (the engine's FeatureAblation), and re-runs the model up to the target's block.
  Ablating an error node replaces the activation there by the dictionary's reconstruction.
- effect(source -> node) = value(clean) - value(source ablated): positive when the source helps.

Two methods behind one interface (circuits.tracing.scoring)
-----------------------------------------------------------
- "ablation", the ground truth: one run per (context, active feature) pair, batched per context.
- "attribution", the fast path: activation x gradient (`circuits.attribution.attribution_scores`)
  with gradient leaves at each dictionary hook, one backward per node. `direct_effects=True`
  detaches every attention pattern and norm scale between the layers, keeping direct paths only.

- `ig_steps` N > 1 turns attribution into integrated gradients along the ablation path: the mean of
  the gradients with every code at the scored hook removed 0, 1/N, ..., (N-1)/N of the way (N = 1 is
  plain attribution; see circuits.tracing.scoring).

Modules: targets, contexts, scoring, upstream, downstream (what a feature causes in later layers),
checks (ablating found features, top versus random, method agreement), agreement (attribution against
ablation over many targets and depths, and where attribution fails), summary.
"""

from circuits.tracing.agreement import (AgreementStudy, agreement_study, agreement_table, compare_target,
                                        find_failures, method_name, pick_targets, split_effect, study_arms)
from circuits.tracing.checks import (AblationEffect, LayerAgreement, TopVersusRandom, ablate_features_effect,
                                     ablation_agreement, method_agreement, top_versus_random)
from circuits.tracing.contexts import (TraceContexts, contexts_from_texts, find_target_contexts, length_buckets,
                                       pad_rows, pad_token_id, protect_passthrough)
from circuits.tracing.downstream import downstream_effects, downstream_hooks, run_downstream_trace, trace_downstream
from circuits.tracing.scoring import (AblationScorer, BucketedScorer, CleanRun, GradientScorer, LayerScores, Node,
                                      clean_from_activations, clean_run, direct_effect_hooks, ig_points)
from circuits.tracing.summary import relative_graph, summarize
from circuits.tracing.targets import (FeatureTarget, LogitTarget, Target, encode_features, feature_sums, logit_target,
                                      parse_feature, target_from_graph, target_values)
from circuits.tracing.upstream import (METHODS, TraceResult, check_inputs, run_upstream_trace, top_features,
                                       trace_upstream, upstream_hooks)

__all__ = [
    "AgreementStudy", "agreement_study", "agreement_table", "compare_target", "find_failures", "method_name",
    "pick_targets", "split_effect", "study_arms",
    "AblationEffect", "LayerAgreement", "TopVersusRandom", "ablate_features_effect", "ablation_agreement",
    "method_agreement", "top_versus_random",
    "TraceContexts", "contexts_from_texts", "find_target_contexts", "length_buckets", "pad_rows", "pad_token_id",
    "protect_passthrough",
    "downstream_effects", "downstream_hooks", "run_downstream_trace", "trace_downstream",
    "AblationScorer", "BucketedScorer", "CleanRun", "GradientScorer", "LayerScores", "Node", "clean_from_activations",
    "clean_run", "direct_effect_hooks", "ig_points",
    "relative_graph", "summarize",
    "FeatureTarget", "LogitTarget", "Target", "encode_features", "feature_sums", "logit_target", "parse_feature",
    "target_from_graph", "target_values",
    "METHODS", "TraceResult", "check_inputs", "run_upstream_trace", "top_features", "trace_upstream", "upstream_hooks",
]
