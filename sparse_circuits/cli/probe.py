"""`sparse-circuits probe`: sparse probing of part-of-speech labels with SAE features and baseline bases.

A thin shell over `sparse_circuits.pipelines.probe.run_probe`; writes OUT/probing.csv, OUT/summary.csv,
OUT/probing.png and OUT/probing.json and prints the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.cli.common import add_subcommand, positive_int
from sparse_circuits.defaults import DEFAULT_MODEL, DEVICE_HELP, PROBE_BASELINES, PROBE_KS, REGISTRY_MODEL_NAMES
from sparse_circuits.validation import InputError, fraction, seed

DESCRIPTION = """Measured interpretability without a language model. The Brown corpus's part-of-speech tags are
mapped onto model tokens (the last token of each word); for each label (the most frequent word tags and
the concepts proper_noun, past_tense_verb, plural_noun, adjective, or --tags) and each basis (each SAE
given, and neurons, PCA, ICA and random directions fitted on the same train tokens), the k directions that
best separate the label on train text are chosen and a logistic probe on them is scored on held-out
Brown samples: F1 and AUC with 95 percent bootstrap intervals over held-out sentences. Writes OUT/probing.csv
(per label), OUT/summary.csv (means over labels, SAE minus best baseline), OUT/probing.png, OUT/probing.json."""


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the `probe` subcommand to the CLI's subparsers."""
    parser = add_subcommand(commands, "probe", help="sparse probing of part-of-speech labels: SAE features vs "
                                                    "neurons, PCA, ICA, random", description=DESCRIPTION)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="the model the dictionaries were trained on: a known name, a local HF folder or a hub name")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--sae", action="append", required=True, metavar="[NAME=]DIR",
                        help="a dictionary folder or a folder of them (one per hook); repeat for several SAE sets "
                             "(named sae-<architecture> unless NAME= is given)")
    parser.add_argument("--baselines", default=",".join(PROBE_BASELINES),
                        help=f"comma-separated among {', '.join(PROBE_BASELINES)}, or 'none'")
    parser.add_argument("--tags", default=None,
                        help="comma-separated Brown tags (nn, vbd, np ...) and concepts (proper_noun, "
                             "past_tense_verb, plural_noun, adjective) (default: the 8 most frequent word tags and "
                             "every concept)")
    parser.add_argument("--ks", default=",".join(str(k) for k in PROBE_KS), help="numbers of directions, comma-separated")
    parser.add_argument("--tokens", type=positive_int, default=30_000,
                        help="labelled tokens (one per word), train and held out together")
    parser.add_argument("--held-out", type=fraction, default=0.25, help="fraction of labelled tokens from held-out "
                                                                        "Brown samples")
    parser.add_argument("--position", choices=["last", "first", "all"], default="last",
                        help="which tokens of a word carry its tag")
    parser.add_argument("--selection", choices=["normalised", "mean_difference"], default="normalised",
                        help="how directions are ranked: class-mean difference over pooled std, or raw")
    parser.add_argument("--resamples", type=positive_int, default=500, help="bootstrap resamples of held-out sentences")
    parser.add_argument("--context-size", type=positive_int, default=128, help="tokens per context")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="contexts per forward pass")
    parser.add_argument("--seed", type=seed, default=0, help="seed for sample order, baselines, probes, bootstrap")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    return parser


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise InputError(f"--ks {text!r}: expected comma-separated positive integers such as 1,2,4,8,16") from None
    if not ks or ks[0] < 1:
        raise InputError(f"--ks {text!r}: expected comma-separated positive integers such as 1,2,4,8,16")
    return ks


def parse_baselines(text: str) -> list[str]:
    names = [] if text.strip() == "none" else list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [name for name in names if name not in PROBE_BASELINES]
    if unknown:
        raise InputError(f"--baselines: unknown {', '.join(unknown)}; choose among {', '.join(PROBE_BASELINES)} "
                         "or 'none'")
    return names


def split_sae_argument(text: str) -> tuple[str | None, Path]:
    """`NAME=DIR` or `DIR`."""
    name, equals, folder = text.partition("=")
    if equals and name and "/" not in name and not Path(text).exists():
        return name, Path(folder)
    return None, Path(text)


def check_arguments(args) -> None:
    """Arguments, dictionary folders and the model they name, before torch is imported or the model loads."""
    from sparse_circuits import validation

    validation.output_folder(args.out, "--out")
    parse_ks(args.ks)
    parse_baselines(args.baselines)
    if args.held_out >= 1:
        raise InputError(f"--held-out {args.held_out:g}: the probes need train text too; give a fraction below 1 "
                         "such as 0.25")
    if args.tags is not None and not any(part.strip() for part in args.tags.split(",")):
        raise InputError("--tags is empty: name at least one Brown tag (nn, vbd, np ...) or concept (proper_noun, "
                         "past_tense_verb, plural_noun, adjective), or leave --tags out for the default set")
    for text in args.sae:
        configs = validation.dictionary_folders(split_sae_argument(text)[1])
        model = args.model.lower()
        for folder, config in configs.items():
            trained_on = config.get("model_name") or (config.get("metadata") or {}).get("model_name")
            if model in REGISTRY_MODEL_NAMES and trained_on and trained_on != model:
                raise InputError(f"--sae {folder} was trained on model {trained_on!r}, not {args.model!r}: its "
                                 f"features mean nothing here; give --model {trained_on} or dictionaries trained "
                                 f"on {args.model}")


def run(args) -> dict[str, str]:
    from circuits.models import load_model
    from sparse_circuits.pipelines.probe import ProbeRequest, prepare_probe, run_probe

    parsed = [split_sae_argument(text) for text in args.sae]
    request = ProbeRequest(saes=[folder for _, folder in parsed], names=[name for name, _ in parsed], out=args.out,
                           baselines=parse_baselines(args.baselines), tags=args.tags, ks=parse_ks(args.ks),
                           tokens=args.tokens, held_out_fraction=args.held_out, position=args.position,
                           selection=args.selection, resamples=args.resamples, context_size=args.context_size,
                           batch_size=args.batch_size, seed=args.seed)
    inputs = prepare_probe(request)  # tags and dictionary files checked before the model loads
    model = load_model(args.model, device=args.device)
    return run_probe(model, request, inputs)
