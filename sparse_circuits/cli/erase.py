"""`sparse-circuits erase`: concept erasure by dictionary features, LEACE and a mean projection, compared.

A thin shell over `tasks.erasure.run_erasure`: loads the model and the dictionaries, builds the concept
splits (checked before any compute), runs the sweep and prints the tables; writes OUT/erasure.csv,
OUT/erasure_equal_removal.csv, OUT/erasure.png and OUT/erasure.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int
from sparse_circuits.defaults import (ERASE_KS, ERASE_METHODS, ERASE_POSITIONS, ERASE_REMOVAL_LEVELS,
                                      ERASE_STRENGTHS)
from sparse_circuits.validation import nonnegative_int, seed

DESCRIPTION = """Erase a binary concept at a hook under a fair protocol: every method (SAE feature removal ranked by
attribution or by activation difference, random controls, LEACE, the mean-difference projection) is fitted on
the train split and applied on the test split at the same positions, one position setting at a time: the
subject's name token, the final prompt position, or all positions (fitted on the name..final span, whose
positions the prompt's label describes). BOS and massive activations are left alone by every method. On the
test split it measures the behaviour (removal of the concept-token logit difference, 1 = gone; the same on the
pronoun transfer task) and the concept (a fresh linear probe at the final and at the name position, 0.5 =
gone); on held-out text, with every method editing every position, the damage (KL to the clean model, CE
change). LEACE and the projection run at several strengths and the feature methods over k, so that methods
are compared at equal removal (each curve interpolated). Writes OUT/erasure.csv,
OUT/erasure_equal_removal.csv, OUT/erasure.png and OUT/erasure.json and prints both tables."""


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the `erase` subcommand to the CLI's subparsers."""
    parser = add_subcommand(
        commands, "erase", help="erase a concept by removing SAE features; compare with LEACE and a mean projection",
        description=DESCRIPTION)
    add_model_arguments(parser, corpus_help="held-out text for the CE/KL damage: 'registry', a .txt/.jsonl file or "
                                            "folder, or hf:NAME[:SPLIT[:FIELD]]")
    parser.add_argument("--sae", required=True, type=Path,
                        help="a dictionary folder, or a folder holding several (one per hook)")
    parser.add_argument("--concept", default="gender",
                        help="'gender' (built in) or a JSON file of prompts (see tasks.erasure.load_concept_splits)")
    parser.add_argument("--layers", type=nonnegative_int, nargs="+",
                        help="use the dictionaries at blocks.L.hook_resid_post for these L (default: every one found)")
    parser.add_argument("--k", type=positive_int, nargs="+", default=list(ERASE_KS),
                        help="numbers of features to remove")
    parser.add_argument("--methods", nargs="+", choices=ERASE_METHODS, default=list(ERASE_METHODS), metavar="METHOD",
                        help=f"methods to run, among {', '.join(ERASE_METHODS)} (default: all)")
    parser.add_argument("--positions", nargs="+", choices=ERASE_POSITIONS, metavar="SETTING",
                        help=f"position settings, among {', '.join(ERASE_POSITIONS)} (default: all three for gender; "
                             "final and all for a concept file, which names no subjects)")
    parser.add_argument("--strengths", type=float, nargs="+", default=list(ERASE_STRENGTHS),
                        help="fractions of the LEACE and projection edits to apply, in (0, 1]: their curves")
    parser.add_argument("--removal-levels", type=float, nargs="+", default=list(ERASE_REMOVAL_LEVELS),
                        help="removal levels at which the methods are compared (interpolated)")
    parser.add_argument("--ce-tokens", type=positive_int, default=20_480,
                        help="held-out tokens for the KL / CE damage (each edit costs one forward over them)")
    parser.add_argument("--context-size", type=positive_int, default=64, help="held-out context length")
    parser.add_argument("--prompts-per-side", type=positive_int,
                        help="subsample the test and transfer splits to at most this many prompts per side "
                             "(default: all; the train split is always used whole)")
    parser.add_argument("--shots", type=positive_int, default=2, help="gender: few-shot examples per side")
    parser.add_argument("--no-transfer", action="store_true", help="skip the transfer split (pronouns for gender)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    parser.add_argument("--seed", type=seed, default=0, help="seed for splits, random controls and probes")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    return parser


def select_dictionaries(dictionaries: dict, layers: list[int] | None, where: Path) -> dict:
    """The dictionaries at blocks.L.hook_resid_post for each L, or all of them when `layers` is None."""
    if layers is None:
        return dictionaries
    wanted = {f"blocks.{layer}.hook_resid_post" for layer in layers}
    missing = sorted(wanted - set(dictionaries))
    if missing:
        raise ValueError(f"{where} has no dictionary for {', '.join(missing)}; it holds "
                         f"{', '.join(sorted(dictionaries)) or 'none'}. Pick --layers among those or train them")
    return {hook: dictionary for hook, dictionary in dictionaries.items() if hook in wanted}


def default_positions(concept: str) -> list[str]:
    """Every position setting for the built-in gender concept; final and all for a concept file (no subjects)."""
    return list(ERASE_POSITIONS) if concept == "gender" else ["final", "all"]


def check_arguments(args) -> None:
    """Paths, dictionary files, the concept file and the corpus, before torch is imported or the model loads."""
    from sparse_circuits import validation

    validation.output_folder(args.out, "--out")
    validation.dictionary_folders(args.sae)
    if args.concept != "gender":
        validation.concept_file(args.concept)
        if args.positions and "name" in args.positions:
            raise validation.InputError("--positions name needs the concept's subjects (the names its prompts are "
                                        "about); a concept file has none: use --positions final all")
    for flag, values in (("--strengths", args.strengths), ("--removal-levels", args.removal_levels)):
        bad = [value for value in values if not 0 < value <= (1 if flag == "--strengths" else 2)]
        if bad:
            raise validation.InputError(f"{flag} {' '.join(f'{value:g}' for value in bad)}: each must be in "
                                        f"(0, {1 if flag == '--strengths' else 2}]")
    validation.corpus_spec(args.corpus)


def run(args) -> dict[str, str]:
    from circuits.models import load_model
    from sae.io import load_dictionaries
    from tasks.erasure import load_concept_splits, run_erasure, validate_inputs

    dictionaries = select_dictionaries(load_dictionaries(args.sae), args.layers, args.sae)
    model = load_model(args.model, device=args.device)
    splits = load_concept_splits(args.concept, model.tokenizer, seed=args.seed, n_shots_per_side=args.shots)
    validate_inputs(model, dictionaries, splits)  # before reading text or running the model
    return run_erasure(model, dictionaries, splits, args.out, ks=args.k, ce_tokens=args.ce_tokens, seed=args.seed,
                       methods=args.methods, prompts_per_side=args.prompts_per_side, corpus=args.corpus,
                       context_size=args.context_size, batch_size=args.batch_size, transfer=not args.no_transfer,
                       positions=args.positions or default_positions(args.concept), strengths=args.strengths, removal_levels=args.removal_levels)
