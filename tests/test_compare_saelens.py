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


def test_ce_candidates_are_the_topk_pair_and_the_closest_relu_pair(bench):
    def row(architecture, ours_l0, theirs_l0):
        return {"spec": {"architecture": architecture}, "ours": {"l0": ours_l0, "name": f"ours {ours_l0}"},
                "saelens": {"l0": theirs_l0, "name": f"saelens {theirs_l0}"}}

    rows = [row("topk", 60, 60), row("standard", 200, 150), row("standard", 80, 40), row("standard", 25, 10)]
    names = [record["name"] for record in bench.ce_candidates(rows)]
    assert names == ["ours 60", "saelens 60", "ours 200", "saelens 150"]  # log(200/150) is the smallest gap
