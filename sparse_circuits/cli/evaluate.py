"""`sparse-circuits evaluate`: measure saved dictionaries on held-out text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int

DESCRIPTION = """Prints L0, FVU, dead/dense fractions, CE loss clean / spliced / zero-ablated, CE loss recovered
and KL, and writes them to eval.json in each dictionary folder."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "evaluate", help="evaluate saved dictionaries on held-out text",
                            description=DESCRIPTION)
    add_model_arguments(parser)
    parser.add_argument("--sae", required=True, type=Path,
                        help="a dictionary folder (sae_weights.safetensors + cfg.json) or a folder of them")
    parser.add_argument("--tokens", type=positive_int, default=20_000, help="held-out tokens")
    parser.add_argument("--context-size", type=positive_int, default=128, help="tokens per context")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="contexts per forward pass")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file (default: only eval.json in each folder)")
    return parser


def check_arguments(args) -> None:
    """Dictionary files, the --json path and the corpus, before torch is imported or the model loads."""
    from sparse_circuits import validation

    validation.dictionary_folders(args.sae)
    validation.output_file(args.json, "--json")
    validation.corpus_spec(args.corpus)


def run(args) -> None:
    from circuits.models import load_model
    from sae.corpus import load_corpus
    from sae.assets import atomic_write_text
    from sparse_circuits.pipelines.evaluate import (check_dictionary_widths, dictionary_folders, evaluate_folders,
                                                    format_eval_table)

    corpus = load_corpus(args.corpus)
    folders = dictionary_folders(args.sae)
    model = load_model(args.model, device=args.device)
    check_dictionary_widths(model, folders)  # before reading any text or running the model
    results = evaluate_folders(model, folders, corpus, args.tokens,
                               context_size=args.context_size, batch_size=args.batch_size)
    print(format_eval_table(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
