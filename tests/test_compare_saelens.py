"""The pure helpers of benchmarks/compare_saelens.py (the benchmark itself needs SAELens' environment and is
not run here): FVU interpolated at a matched L0 over an L1 sweep."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_saelens.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_saelens", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fvu_at_l0_is_linear_in_log_l0_between_the_points_around_it(bench):
    points = [(100.0, 0.2), (25.0, 0.4), (50.0, 0.3)]  # unsorted on purpose
    assert bench.fvu_at_l0(points, 50.0) == pytest.approx(0.3)
    assert bench.fvu_at_l0(points, math.sqrt(25 * 50)) == pytest.approx(0.35)  # geometric midpoint
    assert bench.fvu_at_l0(points, 70.0) == pytest.approx(0.3 - 0.1 * math.log(70 / 50) / math.log(2))


def test_fvu_at_l0_does_not_extrapolate(bench):
    points = [(25.0, 0.4), (100.0, 0.2)]
    assert bench.fvu_at_l0(points, 24.9) is None
    assert bench.fvu_at_l0(points, 101.0) is None
    assert bench.fvu_at_l0([], 50.0) is None


def test_matched_rows_give_the_ratio_at_our_l0(bench):
    ours = [{"l1_coefficient": 1e-3, "l0": 50.0, "fvu": 0.27}, {"l1_coefficient": 1e-4, "l0": 500.0, "fvu": 0.1}]
    theirs = [{"l0": 25.0, "fvu": 0.4}, {"l0": 100.0, "fvu": 0.2}]
    rows = bench.matched_rows(ours, theirs)
    assert rows[0]["saelens_fvu_at_l0"] == pytest.approx(0.3) and rows[0]["ratio"] == pytest.approx(0.9)
    assert rows[1]["saelens_fvu_at_l0"] is None and rows[1]["ratio"] is None


def test_overrides_are_json_values_or_strings(bench):
    assert bench.parse_overrides(["grad_clip_norm=1.0", "b_dec_init=zero", "adam_betas=[0.9, 0.99]",
                                  "decoder_init_norm=null"]) == {
        "grad_clip_norm": 1.0, "b_dec_init": "zero", "adam_betas": [0.9, 0.99], "decoder_init_norm": None}


def test_ce_candidates_are_every_dictionary(bench):
    rows = [{"spec": {"architecture": "topk"}, "ours": {"name": "ours topk"}, "saelens": {"name": "saelens topk"}},
            {"spec": {"architecture": "standard"}, "saelens": {"name": "saelens relu"}}]
    assert [record["name"] for record in bench.ce_candidates(rows)] == ["ours topk", "saelens topk", "saelens relu"]


def test_matched_rows_interpolate_the_ce_increase_too(bench):
    ours = [{"l1_coefficient": 1e-3, "l0": 50.0, "fvu": 0.27, "ce_increase": 0.3}]
    theirs = [{"l0": 25.0, "fvu": 0.4, "ce_increase": 0.5}, {"l0": 100.0, "fvu": 0.2, "ce_increase": 0.3}]
    [row] = bench.matched_rows(ours, theirs)
    assert row["saelens_ce_at_l0"] == pytest.approx(0.4) and row["ce_ratio"] == pytest.approx(0.75)
    [row] = bench.matched_rows(ours, [theirs[0], {"l0": 100.0, "fvu": 0.2}])
    assert "ce_ratio" not in row  # not every SAELens point has a CE: no interpolation
