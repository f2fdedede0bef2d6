"""One formatter for argument messages: the library names parameters, the CLI names its flags."""

from __future__ import annotations

import argparse
import sys

import pytest

from circuits import export
from circuits.graph import prune_by_cumulative_influence, save_graph_json
from sae.options import OptionError, render_error
from sparse_circuits.cli.main import main
from sparse_circuits.messages import cli_message, option_names
from test_export import circuit


def test_option_error_names_the_parameter_or_the_flag():
    error = OptionError("fmt", "pass {option} one of {formats}", formats="svg, png")
    assert str(error) == "pass fmt= one of svg, png" and isinstance(error, ValueError)
    assert error.render({"fmt": "--format"}) == "pass --format one of svg, png"
    assert render_error(ValueError("plain"), {"fmt": "--format"}) == "plain"


def test_library_errors_name_parameters():
    with pytest.raises(ValueError, match="pass fmt= one of") as caught:
        export.export_graph(circuit(), "graph.pdf")
    assert "--format" not in str(caught.value)
    with pytest.raises(OptionError, match=r"fraction= \(the share of influence to keep\)") as caught:
        prune_by_cumulative_influence(circuit(), 1.5)
    assert cli_message(caught.value, argparse.Namespace(influence=1.5)).startswith("--influence ")


def test_the_flag_depends_on_the_subcommand():
    assert option_names(argparse.Namespace(saes="x"))["folder_or_parent"] == "--saes"
    assert option_names(argparse.Namespace(sae="x"))["folder_or_parent"] == "--sae"
    assert option_names()["folder_or_parent"] == "--sae / --saes"


def test_two_dictionaries_at_one_hook(tmp_path):
    from conftest import make_random_sae
    from sae.io import load_dictionaries, save_dictionary

    for name in ("a", "b"):
        save_dictionary(make_random_sae(), tmp_path / name)
    with pytest.raises(OptionError) as caught:
        load_dictionaries(tmp_path)
    assert "folder_or_parent= must hold one dictionary per hook" in str(caught.value)
    shown = cli_message(caught.value, argparse.Namespace(saes=tmp_path))
    assert "--saes must hold one dictionary per hook" in shown and "load_dictionary" not in shown


def test_cli_export_names_the_flag_and_prints_the_graphviz_note_once(tmp_path, monkeypatch, capsys):
    graph = save_graph_json(circuit(), tmp_path / "graph.json")
    assert main(["export", str(graph), "-o", str(tmp_path / "graph.pdf")]) == 2
    err = capsys.readouterr().err
    assert "pass --format one of" in err and "fmt=" not in err
    monkeypatch.setattr(export.shutil, "which", lambda name, *args, **kwargs: None)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # a warning would be an exception here
        assert main(["export", str(graph), "-o", str(tmp_path / "picture.svg")]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("Graphviz 'dot' was not found") == 1
    assert "GraphvizMissingWarning" not in captured.err and "pipelines" not in captured.err
