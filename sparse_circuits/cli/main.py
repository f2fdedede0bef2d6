"""`sparse-circuits`: one command, thin subcommands over the library.

  fetch     obtain the default model and the registry corpus into the cache
  train     harvest activations and train sparse autoencoders at hook points
  evaluate  measure saved dictionaries on held-out text (L0, FVU, CE loss recovered, KL)
  ioi       the IOI feature-patching benchmark: SAE features vs PCA, ICA, neurons, random, dense
  trace     trace a feature's upstream features into a graph (attribution or ablation)
  trace-agreement  attribution against ablation over many targets, depths and a skipped layer
  export    write a traced graph as SVG, PNG, DOT, GraphML, HTML or JSON
  erase     concept erasure with dictionary features, compared with LEACE and projections
  probe     sparse probing of part-of-speech labels: SAE features vs neurons, PCA, ICA, random
  dashboard an offline feature dashboard site (index + a page per feature) for a dictionary or baseline
  autointerp explain features with a model (local or OpenAI-compatible HTTP) and score the explanations
  demo      the main job end to end on defaults

A user mistake (bad hook, missing file, mismatched widths) prints one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from sparse_circuits.cli import (autointerp, dashboard, demo, erase, evaluate, export, fetch, ioi, probe, trace,
                                 trace_agreement, train)
from sparse_circuits.cli.common import HelpFormatter, positive_int
from sparse_circuits.messages import cli_message

SUBCOMMANDS = (fetch, train, evaluate, ioi, trace, trace_agreement, export, erase, probe, dashboard, autointerp,
               demo)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; building it imports nothing heavy."""
    parser = argparse.ArgumentParser(prog="sparse-circuits", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch (default: PyTorch's choice, usually one per core)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(commands).set_defaults(run=module.run, check=getattr(module, "check_arguments", None))
    return parser


# The exceptions that are a user's mistake or the machine's state (a bad file or argument, a full disk, a folder
# another run holds): one `error:` line, exit 2. OSError covers missing files, folders given as files and back,
# permissions and a full disk (CheckpointWriteError is one); RecursionError comes from JSON nested too deeply.
USER_ERRORS = (ValueError, OSError, RecursionError)
LIBRARY_USER_ERRORS = (("circuits.models", "ModelLoadError"), ("sae.activation_store", "StoreError"),
                       ("sae.assets", "AssetError"), ("sae.corpus", "CorpusError"),
                       ("sae.training.checkpoints", "CheckpointWriteError"), ("safetensors", "SafetensorError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS plus the library's own user-error classes among the modules already imported (an error of
    a class comes from an imported module, so nothing is imported here: a mistake found before torch loads
    is reported without loading it)."""
    found = [getattr(sys.modules[module], name, None) for module, name in LIBRARY_USER_ERRORS if module in sys.modules]
    return USER_ERRORS + tuple(error for error in found if isinstance(error, type))


def error_line(error: BaseException, args: argparse.Namespace | None = None) -> str:
    """The one line printed for a user error: the message (arguments named by their flags, see
    sparse_circuits.messages), or for a bare OSError/RecursionError what happened."""
    if isinstance(error, RecursionError):
        return "error: the input is nested too deeply to read (a JSON file with thousands of nested brackets?)"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
        return f"error: {where}: {error.strerror}"
    message = cli_message(error, args) or type(error).__name__
    return "error: " + " ".join(message.split("\n"))


def quiet_libraries() -> None:
    """Silence transformers' weight-loading bars and advisories; ours report progress instead."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # transformers absent or its logging API moved: nothing to silence
        pass
    import warnings

    warnings.filterwarnings("ignore", message=".*TransformerBridge.*")


def check_arguments(args: argparse.Namespace) -> None:
    """The subcommand's checks of every argument and input file (standard library only: before torch, except
    for an accelerator named by --device, whose presence only torch can tell)."""
    from sparse_circuits import validation

    validation.device(getattr(args, "device", None))
    if getattr(args, "check", None) is not None:
        args.check(args)


def run_command(args: argparse.Namespace):
    """Check, then run the parsed subcommand (exceptions propagate: main turns user errors into exit 2)."""
    check_arguments(args)
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and bad arguments exit here, before any heavy import
    try:
        check_arguments(args)  # every argument and input file, before torch is imported or the model loads
        quiet_libraries()
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        args.run(args)
    except KeyboardInterrupt:
        print("interrupted: completed shards and the last checkpoint are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        print(error_line(error, args), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
