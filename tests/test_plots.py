"""Plots explain themselves: erasure k labels never overlap and the title names the concept; the IOI
summary explains NaN Spearman values and clips float-rounding negative KL to 0."""

from __future__ import annotations

import math

import pandas as pd

from tasks.erasure.report import label_k_values, plot_erasure
from tasks.ioi.curves import CLIPPED_KL_NOTE, SPEARMAN_NOTE, clip_kl, format_summary


def test_erasure_k_labels_do_not_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    ks = [1, 2, 4, 8, 16, 32]
    axis.plot([1e-3 * (1 + 0.01 * k) for k in ks], [0.5] * len(ks))  # six points almost on top of each other
    axis.set_xscale("log")
    axis.set_xlim(1e-5, 1)
    written = label_k_values(figure, [(axis, 1e-3 * (1 + 0.01 * k), 0.5, float(k)) for k in ks])
    plt.close(figure)
    assert 1 <= len(written) < len(ks) and written[0][1] == "1"  # whole numbers, the smallest k first
    boxes = [box for _, _, box in written]
    for index, box in enumerate(boxes):
        for other in boxes[index + 1:]:
            assert not (box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3])


def test_erasure_plot_is_written(tmp_path):
    rows = [{"positions": setting, "hook": "blocks.1.hook_resid_post", "method": method, "k": k, "strength": 1.0,
             "removal": 0.1 * k, "kl": 1e-3 * k, "probe_accuracy": 0.9, "probe_accuracy_name": 0.8}
            for setting in ("name", "final") for method in ("sae_attribution", "sae_random") for k in (1, 2, 4)]
    rows += [{"positions": "final", "hook": "blocks.1.hook_resid_post", "method": "leace", "k": math.nan,
              "strength": strength, "removal": 0.5 * strength, "kl": 0.01 * strength, "probe_accuracy": 0.5,
              "probe_accuracy_name": 1.0} for strength in (0.5, 1.0)]
    path = plot_erasure(pd.DataFrame(rows), tmp_path / "erasure.png", "gender")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ioi_summary_notes_nan_spearman_and_clips_rounding_kl():
    assert clip_kl(-1.4e-8) == 0.0 and clip_kl(-0.1) == -0.1 and clip_kl(0.2) == 0.2
    summary = pd.DataFrame([
        {"dictionary": "sae", "features_to_reach_kl_target": 3, "kl_target": 0.1, "area_under_curve": 0.2,
         "edit_norm_at_target": 1.0, "best_kl": 0.01, "kl_all_features": 0.02, "spearman_kl": 0.8,
         "spearman_logit_diff": 0.7},
        {"dictionary": "pca", "features_to_reach_kl_target": 5, "kl_target": 0.1, "area_under_curve": 0.3,
         "edit_norm_at_target": 2.0, "best_kl": clip_kl(-1.4e-08), "kl_all_features": 0.0, "spearman_kl": math.nan,
         "spearman_logit_diff": math.nan}])
    text = format_summary(summary)
    assert SPEARMAN_NOTE in text and CLIPPED_KL_NOTE in text and "-1.4e-08" not in text
    assert SPEARMAN_NOTE not in format_summary(summary.iloc[:1])
