"""Indirect object identification (IOI): prompts, and the feature-patching benchmark of Cunningham et al.

- data: IOI prompts and counterfactuals, tokenisation, the model's IOI performance
- search: the per-dictionary search (attribution order, threshold sweep, bisection, ACDC pruning, confirmation)
- greedy: the paper's search (ACDC-style greedy removal over a sweep of thresholds), `search="greedy"`
- report: KL at fixed feature counts, features to the targets, bootstrap intervals over prompts (report.csv)
- curves: curves.csv / summary.csv tables, the area under the curve, the plot
- benchmark: `run_ioi_benchmark`, which runs it all and writes the outputs
- baselines: the paper's comparison decompositions (PCA, ICA, neurons, random, dense autoencoder)
"""

from tasks.ioi.baselines import (BASELINE_NAMES, BaselineSettings, activations_for_baselines, activations_from_store,
                                 build_baselines, check_baseline_names, train_dense_autoencoder)
from tasks.ioi.benchmark import IOIBenchmarkResult, check_dictionaries, run_ioi_benchmark, write_outputs
from tasks.ioi.curves import (CURVE_COLUMNS, SUMMARY_COLUMNS, area_under_curve, format_summary, lower_envelope,
                              plot_curves, summarise)
from tasks.ioi.data import (NAMES, OBJECTS, ORDERS, PLACES, TEMPLATES, IOIBatch, IOIDataError, IOIPrompt,
                            final_position_logits, generate_ioi_prompts, io_logit_diff, ioi_performance,
                            single_token_id, tokenize_ioi)
from tasks.ioi.greedy import greedy_search, paper_thresholds
from tasks.ioi.report import FIXED_COUNTS, REPORT_COLUMNS, format_report, report_table
from tasks.ioi.search import (DEFAULT_KL_TARGET_FRACTION, GREEDY_ORDERS, SEARCHES, CandidateOrder, DictionaryCurve,
                              SearchSettings, confirm_attribution, order_scores, prefix_sizes, search_dictionary)

__all__ = [
    "BASELINE_NAMES", "BaselineSettings", "activations_for_baselines", "activations_from_store", "build_baselines",
    "check_baseline_names", "train_dense_autoencoder",
    "IOIBenchmarkResult", "check_dictionaries", "run_ioi_benchmark", "write_outputs",
    "CURVE_COLUMNS", "SUMMARY_COLUMNS", "area_under_curve", "format_summary", "lower_envelope", "plot_curves",
    "summarise",
    "NAMES", "OBJECTS", "ORDERS", "PLACES", "TEMPLATES", "IOIBatch", "IOIDataError", "IOIPrompt",
    "final_position_logits", "generate_ioi_prompts", "io_logit_diff", "ioi_performance", "single_token_id",
    "tokenize_ioi",
    "DEFAULT_KL_TARGET_FRACTION", "CandidateOrder", "DictionaryCurve", "SearchSettings", "confirm_attribution",
    "order_scores", "prefix_sizes", "search_dictionary", "GREEDY_ORDERS", "SEARCHES",
    "greedy_search", "paper_thresholds", "FIXED_COUNTS", "REPORT_COLUMNS", "format_report", "report_table",
]
