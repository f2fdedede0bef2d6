"""Concept erasure at feature granularity, compared with LEACE and a mean-difference projection.

A binary concept (gender: " female" / " male" after "My name is X and I am a") is erased at a hook
point by removing k dictionary features, or by LEACE or a projection, each an edit run through the
intervention engine (so BOS and massive activations are passed through, as when splicing);
statistics are fitted on a train split and every method is scored on unseen test subjects, on a
transfer task and on held-out text.

- concepts: binary concepts, the gender concept's splits, prompt tokenisation, concept accuracy
- positions: the fair protocol's position settings (name, final, all), where every method is fitted and applied
- edits: the methods as engine edits (`Erasure`: feature removal, LEACE, the mean projection, scaled)
- selection: feature rankings (attribution, activation difference, random controls), `build_edits`
- run: train-split statistics, evaluation on prompts and text, `run_erasure`
- report: the table (`COLUMNS`), the comparison at equal removal, its plot and the files written
"""

from tasks.erasure.concepts import (FEMALE_NAMES, FEW_SHOT_LINE, MALE_NAMES, MAX_IMBALANCE, PRONOUN_TEMPLATES, Concept,
                                    ConceptError, ConceptSplits, concept_accuracy, concept_logit_diffs, gender_concept,
                                    target_token_ids, tokenize_prompts, validate_concept)
from tasks.erasure.edits import (Erasure, Interpolated, LeaceMap, MeanDifferenceProjection, class_means,
                                 feature_removal, fit_leace, fit_mean_projection, scaled)
from tasks.erasure.positions import (SETTINGS, PositionMasks, check_settings, position_masks, subject_positions,
                                     subject_token_ids)
from tasks.erasure.report import (COLUMNS, DEFAULT_REMOVAL_LEVELS, equal_removal_table, PromptResults, erasure_table, format_erasure_table, plot_erasure,
                                  probe_accuracies, removal, result_rows, write_results)
from tasks.erasure.run import (collect_train_statistics, edited_positions, evaluate_on_prompts, evaluate_on_text,
                               held_out_contexts, load_concept_splits, read_concept_file, run_erasure,
                               subsample_concept, validate_inputs)
from tasks.erasure.selection import (DEFAULT_KS, DEFAULT_STRENGTHS, check_strengths, FIXED_METHODS, K_METHODS, METHODS, HookStatistics,
                                     activation_difference, build_edits, check_ks, check_methods, feature_attribution,
                                     feature_rankings, random_features, ranked, signed_logit_diffs)

__all__ = [
    "FEMALE_NAMES", "FEW_SHOT_LINE", "MALE_NAMES", "MAX_IMBALANCE", "PRONOUN_TEMPLATES", "Concept", "ConceptError",
    "ConceptSplits", "concept_accuracy", "concept_logit_diffs", "gender_concept", "target_token_ids",
    "tokenize_prompts", "validate_concept",
    "Erasure", "Interpolated", "LeaceMap", "MeanDifferenceProjection", "class_means", "feature_removal", "fit_leace",
    "fit_mean_projection", "scaled",
    "SETTINGS", "PositionMasks", "check_settings", "position_masks", "subject_positions", "subject_token_ids",
    "DEFAULT_REMOVAL_LEVELS", "equal_removal_table", "DEFAULT_STRENGTHS", "check_strengths",
    "COLUMNS", "PromptResults", "erasure_table", "format_erasure_table", "plot_erasure", "probe_accuracies", "removal",
    "result_rows", "write_results",
    "collect_train_statistics", "edited_positions", "evaluate_on_prompts", "evaluate_on_text", "held_out_contexts",
    "load_concept_splits", "read_concept_file", "run_erasure", "subsample_concept", "validate_inputs",
    "DEFAULT_KS", "FIXED_METHODS", "K_METHODS", "METHODS", "HookStatistics", "activation_difference", "build_edits",
    "check_ks", "check_methods", "feature_attribution", "feature_rankings", "random_features", "ranked",
    "signed_logit_diffs",
]
