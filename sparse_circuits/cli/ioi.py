"""`sparse-circuits ioi`: the IOI feature-patching benchmark, SAE features against the paper's baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int
from sparse_circuits.defaults import IOI_BASELINES, IOI_KL_TARGET_FRACTION, IOI_TRAIN_TOKENS
from sparse_circuits.validation import (MAX_BASELINE_TOKENS, MAX_IOI_PROMPTS, bounded_int, fraction, nonnegative_int,
                                        positive_float, seed)

DESCRIPTION = """Patch features from counterfactual IOI prompts (IO name replaced) into clean ones at one hook
point and find the smallest feature sets that reach a KL target, for an SAE and the baselines (PCA,
ICA, neurons, random directions, a non-sparse autoencoder). Writes OUT/curves.csv, OUT/summary.csv,
OUT/curves.png and OUT/details.json (with the provenance: templates, names, seed, model and dictionary
sha256s), and prints the summary. --templates FILE replaces the built-in templates: one per line, with
{A} {B} (the two names), {S} (the subject, repeated), {PLACE} and {OBJECT}.

With no --sae it runs at blocks.{0.6 n_layers}.hook_resid_post (blocks.18 of SmolLM2's 30), with an SAE
found in the cache (<cache>/ioi/saes/<hook> or the demo's) or trained there first (100k tokens, 16
epochs: 10-20 minutes on a 2-core CPU, once). Baselines are fitted once per output folder and reused
(OUT/baselines/).

--search greedy runs the paper's search instead (Cunningham et al. 2024, after ACDC): every candidate feature
patched, then each one removed whose removal raises KL by less than a threshold, for a sweep of thresholds
(default the paper's 50, 1e-5 .. 1); OUT/report.csv gives, for either search and every basis, the KL at 8,
32, 128 and 512 features, the features to reach the KL target and three quarters of the basis's own reduction, with 95 percent
bootstrap intervals over prompts. Prompts the model gets wrong (clean logit difference <= 0) are dropped and
counted (details.json "dropped_prompts") unless --keep-failed-prompts."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(
        commands, "ioi", help="IOI feature-patching benchmark: how few features move the output to the counterfactual",
        description=DESCRIPTION)
    add_model_arguments(parser, corpus_help="text for fitting baselines / training an SAE when no activation store "
                                            "sits beside the SAE")
    parser.add_argument("--sae", type=Path, help="SAE folder, or a parent of several (default: cached or trained)")
    parser.add_argument("--hook", help="hook point (default: the SAE's, else blocks.{0.6 n_layers}.hook_resid_post)")
    parser.add_argument("--prompts", type=bounded_int(MAX_IOI_PROMPTS, "prompts"), default=50,
                        help=f"IOI prompts (at most {MAX_IOI_PROMPTS:,})")
    parser.add_argument("--baselines", default=",".join(IOI_BASELINES), help="comma-separated baselines, or 'none'")
    parser.add_argument("--baseline-tokens", type=bounded_int(MAX_BASELINE_TOKENS, "tokens"), default=20_000,
                        help=f"activations the baselines are fitted on (at most {MAX_BASELINE_TOKENS:,}: they are held "
                             "in memory)")
    parser.add_argument("--kl-target", type=positive_float,
                        help="absolute KL target (default: --kl-target-fraction of the unpatched KL)")
    parser.add_argument("--kl-target-fraction", type=fraction, default=IOI_KL_TARGET_FRACTION,
                        help="KL target as a fraction of KL(clean || counterfactual)")
    parser.add_argument("--confirm-top", type=nonnegative_int, default=50,
                        help="features whose attribution is checked by exact patching (0: skip)")
    parser.add_argument("--prune-evals", type=nonnegative_int, default=16, help="exact evaluations for ACDC pruning")
    parser.add_argument("--per-prompt", action="store_true",
                        help="give each prompt its own feature set (default: one set shared by all prompts)")
    parser.add_argument("--patch-error", action="store_true",
                        help="also patch the SAE error term from the counterfactual in every set (only features are "
                             "counted); default: the error stays at its clean value")
    parser.add_argument("--search", default="attribution",
                        help="attribution (default: ranked prefixes, bisection, pruning) or greedy (the paper's: "
                             "ACDC-style removal over a threshold sweep)")
    parser.add_argument("--thresholds", metavar="T1,T2,...",
                        help="greedy: thresholds on the KL rise one removal may cause (default: the paper's 50, "
                             "log-spaced 1e-5 .. 1)")
    parser.add_argument("--greedy-order", default="attribution",
                        help="greedy visiting order: attribution (least helpful first; default) or random (the "
                             "paper's, seeded)")
    parser.add_argument("--greedy-start", type=positive_int,
                        help="greedy: start from the top K candidates by attribution (cheaper; default: every candidate)")
    parser.add_argument("--speculation", type=positive_int, default=8,
                        help="greedy: removals evaluated together in one batch (same result as one at a time)")
    parser.add_argument("--max-evals", type=positive_int,
                        help="budget of exact evaluations per dictionary (greedy: removal trials); a search that "
                             "runs out stops with what it found and says so (default: no budget)")
    parser.add_argument("--error-node", action="store_true",
                        help="patch the SAE error term too, counted as one node (greedy may remove it)")
    parser.add_argument("--bootstrap", type=nonnegative_int, default=1000,
                        help="prompt resamples for the report's 95%% intervals (0: none)")
    parser.add_argument("--keep-failed-prompts", action="store_true",
                        help="keep prompts the model gets wrong (default: dropped and counted)")
    parser.add_argument("--names", help="comma-separated IO/S names to use, each one token (default: the built-in list)")
    parser.add_argument("--templates", type=Path, metavar="FILE",
                        help="IOI templates, one per line ('#' lines and blank lines skipped), with the placeholders "
                             "{A} and {B} (the two names, once each), {S} (the subject, repeated), {PLACE} and "
                             "{OBJECT}, e.g. 'When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to' "
                             "(default: the built-in ten)")
    parser.add_argument("--train-tokens", type=positive_int, default=IOI_TRAIN_TOKENS,
                        help="tokens to train an SAE on when none is found")
    parser.add_argument("--seed", type=seed, default=0, help="seed for prompts, baselines and training")
    parser.add_argument("--out", type=Path, help="output folder (default: <cache>/ioi/<hook>)")
    return parser


def check_arguments(args) -> None:
    """Paths, SAE files, hook, names and corpus, before torch is imported or the model loads."""
    from sparse_circuits import validation

    validation.output_folder(args.out, "--out")
    if args.sae is not None:
        validation.dictionary_folders(args.sae)
    if args.hook is not None:
        validation.hook_names([args.hook])
    if args.names is not None and len([name for name in args.names.split(",") if name.strip()]) < 2:
        raise validation.InputError(f"--names {args.names!r}: give at least two comma-separated names")
    if args.templates is not None:
        validation.ioi_template_file(args.templates)
    validation.ioi_search_options(args)
    validation.corpus_spec(args.corpus)


def run(args) -> None:
    from circuits.models import load_model
    from sparse_circuits import validation
    from sparse_circuits.pipelines.ioi import IOIRequest, check_baseline_names, run_ioi
    from tasks.ioi import SearchSettings
    from tasks.ioi_templates import read_template_file

    baselines = [] if args.baselines.strip().lower() in ("", "none") else [
        name.strip() for name in args.baselines.split(",") if name.strip()]
    check_baseline_names(baselines)  # before loading the model
    settings = SearchSettings(kl_target=args.kl_target, kl_target_fraction=args.kl_target_fraction,
                              confirm_top=args.confirm_top, prune_evals=args.prune_evals,
                              feature_sets="per_prompt" if args.per_prompt else "shared", patch_error=args.patch_error,
                              search=args.search, max_evals=args.max_evals, error_node=args.error_node,
                              thresholds=validation.ioi_thresholds(args.thresholds), greedy_order=args.greedy_order,
                              greedy_start=args.greedy_start, speculation=args.speculation, bootstrap=args.bootstrap,
                              seed=args.seed)
    request = IOIRequest(sae=args.sae, hook=args.hook, prompts=args.prompts, baselines=baselines,
                         baseline_tokens=args.baseline_tokens, corpus=args.corpus,
                         names=[name.strip() for name in args.names.split(",")] if args.names else None,
                         templates=read_template_file(args.templates) if args.templates is not None else None,
                         train_tokens=args.train_tokens, seed=args.seed, out=args.out, settings=settings,
                         drop_failed=not args.keep_failed_prompts)
    model = load_model(args.model, device=args.device)
    result = run_ioi(model, request)
    print(f"\nKL target {result.kl_target:.4g} (unpatched KL {result.summary['kl_unpatched'].iloc[0]:.4g}); "
          f"clean IOI accuracy {result.clean_performance['accuracy']:.2f}")
    for name, path in result.paths().items():
        print(f"  {name:<8} {path}")
