"""Sparse probing: how well the best k directions of a basis predict part-of-speech labels of real text.

The paper's interpretability question answered with labelled data (as SAEBench's sparse probing and
Gurnee et al.'s "Finding neurons in a haystack"): Brown corpus tags mapped onto model tokens
(sae.tagged_corpus), activations at labelled tokens, and for each basis (SAE features; neurons, PCA,
ICA and random directions fitted on the same train tokens) the top-k directions by class separation
and a logistic probe on them, scored by F1 and AUC on held-out Brown samples with bootstrap intervals.

- labels: tags and concepts (`CONCEPTS`), the default label set, checks
- codes: activations at labelled tokens, a basis's coordinates
- fit: direction selection and the logistic probe
- scores: F1, AUC and the sentence bootstrap
- run: `run_probing`; report: tables, plot, files
"""

from tasks.probing.codes import basis_codes, is_signed_basis, labelled_activations, n_directions
from tasks.probing.fit import SELECTIONS, Probe, best_f1_threshold, fit_probe, separation_scores, top_directions
from tasks.probing.labels import (CONCEPTS, DEFAULT_FREQUENT_TAGS, LabelError, ProbeLabel, check_label_counts,
                                  frequent_tags, parse_label_names, resolve_labels)
from tasks.probing.report import (COLUMNS, SUMMARY_COLUMNS, format_per_label, format_summary, plot_probing,
                                  probing_table, summary_table, write_probing)
from tasks.probing.run import (DEFAULT_KS, PROBE_BASELINES, ProbeInputError, ProbeResults, ProbeSettings,
                               probe_basis, run_probing, validate_dictionaries)
from tasks.probing.scores import f1_scores, interval, plain_weights, precision_recall, resample_weights, roc_auc

__all__ = [
    "basis_codes", "is_signed_basis", "labelled_activations", "n_directions",
    "SELECTIONS", "Probe", "best_f1_threshold", "fit_probe", "separation_scores", "top_directions",
    "CONCEPTS", "DEFAULT_FREQUENT_TAGS", "LabelError", "ProbeLabel", "check_label_counts", "frequent_tags",
    "parse_label_names", "resolve_labels",
    "COLUMNS", "SUMMARY_COLUMNS", "format_per_label", "format_summary", "plot_probing", "probing_table",
    "summary_table", "write_probing",
    "DEFAULT_KS", "PROBE_BASELINES", "ProbeInputError", "ProbeResults", "ProbeSettings", "probe_basis",
    "run_probing", "validate_dictionaries",
    "f1_scores", "interval", "plain_weights", "precision_recall", "resample_weights", "roc_auc",
]
