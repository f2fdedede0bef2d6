"""The IOI feature-patching benchmark: search pieces, outputs, bad input, the CLI, and the real model."""

from __future__ import annotations

import argparse
import math
import time

import pandas as pd
import pytest
import torch

from circuits.harvest import collect_activations, harvest_activations
from sae.io import save_dictionary
from tasks.ioi import (
    CURVE_COLUMNS,
    BaselineSettings,
    IOIDataError,
    SearchSettings,
    area_under_curve,
    build_baselines,
    lower_envelope,
    prefix_sizes,
    run_ioi_benchmark,
)

HOOK = "blocks.2.hook_resid_post"
FAST = SearchSettings(confirm_top=8, prune_evals=4, bisect_evals=2)


def corpus_tokens(model, n: int = 24, length: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, len(model.tokenizer), (n, length), generator=generator)
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


@pytest.fixture(scope="module")
def llama_activations(tiny_llama):
    values = collect_activations(tiny_llama, corpus_tokens(tiny_llama), [HOOK])[HOOK]
    return values[:, 1:].reshape(-1, values.shape[-1])


def test_prefix_sizes():
    assert prefix_sizes(1) == [1]
    assert prefix_sizes(10) == [1, 2, 4, 8, 10]
    assert prefix_sizes(2048)[-2:] == [1024, 2048] and len(prefix_sizes(2304)) == 13


def test_area_under_curve_and_envelope():
    points = [{"n_features": 0, "kl": 2.0, "edit_norm": 0.0}, {"n_features": 3, "kl": 0.5, "edit_norm": 1.0},
              {"n_features": 7, "kl": 1.0, "edit_norm": 2.0}]
    assert lower_envelope(points) == [(0, 2.0), (3, 0.5)]
    # KL/KL0 = 1 on [0, log2 4) then 0.25 up to log2(16)
    assert area_under_curve(points, 2.0, 15) == pytest.approx((2 * 1 + 2 * 0.25) / 4)
    assert area_under_curve([{"n_features": 0, "kl": 2.0}], 2.0, 15) == pytest.approx(1.0)


def test_benchmark_writes_curves_summary_and_plot(random_sae, tiny_llama, llama_activations, tmp_path):
    baselines = build_baselines(tiny_llama, HOOK, ["pca", "neurons", "dense"], 0, None,
                                activations=llama_activations, settings=BaselineSettings(dense_epochs=1), progress=False)
    dictionaries = {"sae": random_sae(hook=HOOK), **baselines}
    result = run_ioi_benchmark(tiny_llama, dictionaries, HOOK, 8, tmp_path, settings=FAST, progress=False)
    curves = pd.read_csv(tmp_path / "curves.csv")
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(curves.columns) == CURVE_COLUMNS
    assert set(curves["dictionary"]) == set(dictionaries)
    assert {"dictionary", "features_to_reach_kl_target", "kl_target", "area_under_curve"} <= set(summary.columns)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.clean_performance["run_mode"] == "resume"
    for name in ("pca", "neurons"):  # complete bases: patching every candidate gives the counterfactual
        row = summary.set_index("dictionary").loc[name]
        assert abs(row["kl_all_features"]) < 1e-5
        assert row["features_to_reach_kl_target"] <= row["n_candidates"]
        assert 0 <= row["area_under_curve"] <= 1
    sae_row = summary.set_index("dictionary").loc["sae"]
    assert sae_row["n_confirmed"] == 8 and not math.isnan(sae_row["spearman_logit_diff"])
    assert summary.set_index("dictionary").loc["pca", "n_confirmed"] == 0  # baselines are not confirmed by default
    # every reported set was evaluated: the smallest one reaching the target has KL <= target
    reached = curves[curves["kl"] <= result.kl_target]
    assert (reached.groupby("dictionary")["n_features"].min().reindex(summary["dictionary"]).fillna(-1).values
            == summary["features_to_reach_kl_target"].fillna(-1).values).all()
    assert set(result.timings) >= {"prompts", "clean_counterfactual_runs", "attribution", "threshold_sweep"}


def test_per_prompt_feature_sets(random_sae, tiny_llama, tmp_path):
    settings = SearchSettings(confirm_top=0, feature_sets="per_prompt")
    result = run_ioi_benchmark(tiny_llama, {"sae": random_sae(hook=HOOK)}, HOOK, 6, tmp_path, settings=settings,
                               progress=False)
    curves = result.curves[result.curves["method"] == "threshold_sweep"]
    row = result.summary.iloc[0]
    assert curves["n_features"].max() == row["n_candidates"] <= 64  # k per prompt, at most each prompt's candidates
    assert "acdc_prune" not in set(result.curves["method"])  # no pruning per prompt
    with pytest.raises(ValueError, match="feature_sets"):
        run_ioi_benchmark(tiny_llama, {"sae": random_sae(hook=HOOK)}, HOOK, 6, tmp_path,
                          settings=SearchSettings(feature_sets="each"), progress=False)


def test_patching_the_error_too_reaches_the_counterfactual_with_every_feature(random_sae, tiny_llama, tmp_path):
    """With patch_error the error term comes from the counterfactual in every set, so an SAE patched
    in full reproduces the counterfactual (KL 0), and the error-only set is on the curve."""
    settings = SearchSettings(confirm_top=0, prune_evals=2, bisect_evals=1, patch_error=True)
    result = run_ioi_benchmark(tiny_llama, {"sae": random_sae(hook=HOOK)}, HOOK, 6, tmp_path, settings=settings,
                               progress=False)
    row = result.summary.iloc[0]
    assert abs(row["kl_all_features"]) < 1e-4 < row["kl_unpatched"]
    assert "error_only" in set(result.curves["method"])


def test_names_that_are_not_single_tokens_are_rejected(random_sae, tiny_llama, tmp_path):
    with pytest.raises(IOIDataError, match="Bartholomew"):
        run_ioi_benchmark(tiny_llama, {"sae": random_sae(hook=HOOK)}, HOOK, 4, tmp_path,
                          names=["Mary", "John", "Bartholomew", "Tom"], progress=False)
    assert not (tmp_path / "curves.csv").exists()


def test_a_dictionary_of_the_wrong_width_is_rejected_before_running(random_sae, tiny_llama, tmp_path):
    started = time.perf_counter()
    with pytest.raises(ValueError, match="'wide'.*d_in=48"):
        run_ioi_benchmark(tiny_llama, {"sae": random_sae(hook=HOOK), "wide": random_sae(d_in=48, d_sae=96)}, HOOK,
                          4, tmp_path, progress=False)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baselines(tiny_llama, HOOK, ["pca", "nmf"], 10, None, activations=torch.randn(10, 32))


def test_cli_runs_with_an_sae_folder_and_reuses_its_activations(random_sae, tiny_llama_folder, tiny_llama, tmp_path, capsys):
    from sparse_circuits.cli import ioi as cli_ioi

    saes = tmp_path / "saes"
    save_dictionary(random_sae(hook=HOOK), saes / HOOK)
    harvest_activations(tiny_llama, corpus_tokens(tiny_llama, n=40), [HOOK], saes / "activations", progress=False)
    parser = argparse.ArgumentParser()
    cli_ioi.add_parser(parser.add_subparsers(dest="command"))
    argv = ["ioi", "--model", str(tiny_llama_folder), "--sae", str(saes), "--prompts", "6", "--baselines",
            "pca,random", "--baseline-tokens", "300", "--confirm-top", "4", "--prune-evals", "2",
            "--corpus", str(tmp_path / "no-such-corpus.txt"), "--out", str(tmp_path / "out")]
    cli_ioi.run(parser.parse_args(argv))  # the corpus is never read: activations come from the store
    printed = capsys.readouterr().out
    assert "features_to_reach_kl_target" in printed and "summary" in printed
    assert set(pd.read_csv(tmp_path / "out" / "summary.csv")["dictionary"]) == {"sae", "pca", "random"}
    assert (tmp_path / "out" / "baselines" / "pca" / "cfg.json").exists()
    with pytest.raises(ValueError, match="no dictionary for hook"):
        cli_ioi.run(parser.parse_args(argv + ["--hook", "blocks.1.hook_resid_post"]))


@pytest.mark.integration
def test_real_model_splicing_is_exact_and_the_benchmark_runs(random_sae, real_model, tmp_path):
    from circuits.engine import splice_dictionaries
    from sae.baselines import fit_pca
    from tasks.ioi import generate_ioi_prompts, tokenize_ioi

    hook = "blocks.18.hook_resid_post"
    batch = tokenize_ioi(real_model, generate_ioi_prompts(real_model.tokenizer, 6, seed=1))
    with torch.no_grad():
        clean, cache = real_model.run_with_cache(batch.clean_tokens, names_filter=[hook])
        pca = fit_pca(cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1]), hook_name=hook)
        sae = random_sae(d_in=576, d_sae=2304, hook=hook)
        for dictionary in (sae, pca):
            with splice_dictionaries(real_model, {hook: dictionary}):
                assert (real_model(batch.clean_tokens) - clean).abs().max().item() <= 1e-4
    result = run_ioi_benchmark(real_model, {"pca": pca}, hook, 6, tmp_path, progress=False, confirm=["pca"],
                               settings=SearchSettings(confirm_top=4, prune_evals=2, bisect_evals=1))
    assert result.clean_performance["accuracy"] >= 0.8
    assert result.clean_performance["run_mode"] == "resume"
    row = result.summary.set_index("dictionary").loc["pca"]
    assert row["kl_unpatched"] > 0.5 and abs(row["kl_all_features"]) < 1e-3
    assert row["features_to_reach_kl_target"] < row["n_candidates"]


TEMPLATE_FILE = """# custom IOI templates for the tiny word-level vocabulary
when {A} and {B} went to the {PLACE} {S} gave the {OBJECT} to

then {A} and {B} met at the {PLACE} and {S} gave it to
"""


def test_cli_templates_file_and_provenance(random_sae, tiny_llama_folder, tmp_path):
    """`ioi --templates FILE` runs with exactly those templates, and details.json records the provenance:
    templates, names, seed, the model's and the dictionary's sha256 (of their safetensors files)."""
    import hashlib
    import json

    from sparse_circuits.cli.main import main

    saes = tmp_path / "saes"
    save_dictionary(random_sae(hook=HOOK), saes / HOOK)
    (tmp_path / "templates.txt").write_text(TEMPLATE_FILE)
    argv = ["ioi", "--model", str(tiny_llama_folder), "--sae", str(saes / HOOK), "--prompts", "4", "--baselines",
            "none", "--confirm-top", "0", "--prune-evals", "1", "--names", "Mary,John,Tom,Anna", "--seed", "3",
            "--templates", str(tmp_path / "templates.txt"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2  # the random model gets all 4 prompts wrong: an error, not a run on failed prompts
    assert not (tmp_path / "out" / "details.json").exists()
    assert main(argv + ["--keep-failed-prompts"]) == 0
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    provenance = details["provenance"]
    assert provenance["templates"] == ["when {A} and {B} went to the {PLACE} {S} gave the {OBJECT} to",
                                       "then {A} and {B} met at the {PLACE} and {S} gave it to"]
    assert provenance["names"] == ["Mary", "John", "Tom", "Anna"] and provenance["seed"] == 3
    assert provenance["places"] and provenance["objects"]

    def sha256(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert provenance["dictionaries"] == {"sae": sha256(saes / HOOK / "sae_weights.safetensors")}
    assert provenance["model"] == {"name": str(tiny_llama_folder),
                                   "sha256": sha256(tiny_llama_folder / "model.safetensors")}


def test_dictionary_sha256_of_a_folder_a_loaded_and_an_unsaved_dictionary(random_sae, tmp_path):
    import hashlib

    from sae.io import dictionary_sha256, load_dictionary

    sae = random_sae(hook=HOOK)
    folder = save_dictionary(sae, tmp_path / "sae")
    on_disk = hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert dictionary_sha256(folder) == dictionary_sha256(load_dictionary(folder)) == on_disk
    in_memory = dictionary_sha256(sae)
    assert len(in_memory) == 64 and in_memory == dictionary_sha256(sae)
    with torch.no_grad():
        sae.W_dec.add_(1.0)
    assert dictionary_sha256(sae) != in_memory
