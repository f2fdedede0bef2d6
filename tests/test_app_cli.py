"""The app layer's command line: --help without torch, help for every flag, defaults in step with the library."""

import argparse
import subprocess
import sys

import pytest

from sparse_circuits.cli.main import build_parser

HELP_WITHOUT_TORCH = """
import sys
from sparse_circuits.cli.main import main
for argv in (["--help"], ["train", "--help"], ["ioi", "--help"], ["erase", "--help"], ["probe", "--help"],
             ["train", "--tokens", "x"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(name for name in ("torch", "transformers", "transformer_lens") if name in sys.modules)
assert not heavy, heavy
"""


def test_help_and_argument_errors_do_not_import_torch():
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: sparse-circuits" in done.stdout and "expected a positive integer" in done.stderr


def _subcommands(parser):
    [commands] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices


def test_every_flag_has_help_and_shows_its_default():
    parser = build_parser()
    for name, subparser in {"": parser, **_subcommands(parser)}.items():
        assert subparser.description, f"`{name}` has no description"
        text = subparser.format_help()
        in_required_group = {id(action) for group in subparser._mutually_exclusive_groups if group.required
                             for action in group._group_actions}
        for action in subparser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[-1]
            assert action.help, f"{name} {flag} has no help"
            needs_default = not action.required and action.nargs != 0 and id(action) not in in_required_group
            assert not needs_default or "default" in action.help.lower() or action.default is not None, \
                f"{name} {flag}: default None and the help does not say what happens without it"
        assert "%" not in text.replace("%%", "")


def test_defaults_match_the_library():
    """sparse_circuits.defaults copies library constants so that --help needs no torch; they must agree."""
    from circuits.model_sources import REGISTRY_MODELS
    from circuits.models import DEFAULT_MODEL
    from sparse_circuits import defaults
    from tasks import erasure, ioi, probing

    assert defaults.DEFAULT_MODEL == DEFAULT_MODEL
    assert defaults.REGISTRY_MODEL_NAMES == tuple(REGISTRY_MODELS)
    from sae.registry import ARCHITECTURES

    assert sorted(defaults.ARCHITECTURES.values()) == sorted(ARCHITECTURES)
    assert defaults.IOI_BASELINES == tuple(ioi.BASELINE_NAMES)
    assert defaults.IOI_KL_TARGET_FRACTION == ioi.SearchSettings().kl_target_fraction
    assert defaults.ERASE_METHODS == tuple(erasure.METHODS)
    assert defaults.ERASE_KS == tuple(erasure.DEFAULT_KS)
    assert defaults.ERASE_POSITIONS == tuple(erasure.SETTINGS)
    assert defaults.ERASE_STRENGTHS == tuple(erasure.DEFAULT_STRENGTHS)
    assert defaults.ERASE_REMOVAL_LEVELS == tuple(erasure.DEFAULT_REMOVAL_LEVELS)
    assert defaults.PROBE_BASELINES == tuple(probing.PROBE_BASELINES)
    assert defaults.PROBE_KS == tuple(probing.DEFAULT_KS)


@pytest.mark.parametrize("argv, message", [
    (["export", "g.json", "-o", "g.svg", "--influence", "1.5"], "argument --influence"),
    (["trace", "--saes", "s", "--feature", "auto", "--out", "g.json", "--depth", "0"], "argument --depth"),
])
def test_bad_values_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
