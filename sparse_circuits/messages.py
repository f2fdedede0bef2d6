"""CLI wording of library errors: a library message names a parameter (`fmt=`), the CLI user reads the
flag (`--format`). The one formatter is sae.options (OptionError.render); this is the app's table."""

from __future__ import annotations

import argparse

# parameter -> (argparse dest, flag) of the options that set it; the first the subcommand has is named
OPTION_FLAGS = {
    "fmt": (("fmt", "--format"),),
    "fraction": (("influence", "--influence"),),
    "folder_or_parent": (("sae", "--sae"), ("saes", "--saes")),
}


def option_names(args: argparse.Namespace | None = None) -> dict[str, str]:
    """{parameter: flag} for the subcommand parsed into `args` (without `args`: every flag that may set it)."""
    names = {}
    for parameter, choices in OPTION_FLAGS.items():
        present = [flag for dest, flag in choices if args is None or hasattr(args, dest)]
        if present:
            names[parameter] = present[0] if args is not None else " / ".join(present)
    return names


def cli_message(error: BaseException, args: argparse.Namespace | None = None) -> str:
    """The message of `error` as a CLI user should read it: arguments named by their flags."""
    from sae.options import render_error  # imports nothing heavy, but only when an error is printed

    return render_error(error, option_names(args))
