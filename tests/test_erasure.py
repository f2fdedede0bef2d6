"""Concept erasure: the edits (feature removal, LEACE, mean projection), the controls, the sweep and the CLI."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from sae.config import DictionaryConfig
from sae.io import save_dictionary
from sae.relu import ReluSAE
from tasks.erasure import (
    COLUMNS,
    K_METHODS,
    Concept,
    ConceptError,
    Erasure,
    build_edits,
    class_means,
    collect_train_statistics,
    evaluate_on_prompts,
    feature_removal,
    fit_leace,
    fit_mean_projection,
    gender_concept,
    load_concept_splits,
    probe_accuracies,
    run_erasure,
)

HOOK = "blocks.1.hook_resid_post"
KS = (1, 3)
# The sweep runs one method of each kind end to end, under every position setting: a ranked and a random-basis
# feature removal, LEACE and the projection at two strengths (test_build_edits_makes_every_method covers the rest
# without a forward per edit).
SWEEP_METHODS = ("mean_projection", "leace", "random_dictionary", "sae_attribution")
SWEEP_STRENGTHS = (0.5, 1.0)


def tiny_sae(hook: str = HOOK, d_in: int = 32, seed: int = 1) -> ReluSAE:
    return ReluSAE(DictionaryConfig("standard", d_in=d_in, d_sae=64, hook_name=hook, seed=seed)).eval()


def held_out_tokens(tokenizer, n: int = 4, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, len(tokenizer), (n, length), generator=generator)
    tokens[:, 0] = tokenizer.bos_token_id
    return tokens


def labelled_data(n: int = 40, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian activations whose two classes differ along a random direction, plus an offset."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    shift = torch.randn(d, generator=generator)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64) + 3.0
    return x + labels[:, None].double() * shift.double(), labels


@pytest.fixture(scope="module")
def sweep(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("erasure")
    splits = gender_concept(tiny_llama.tokenizer)
    # 1 + 3 x 8 edits, four prompts per side on test and transfer: one batch per split
    paths = run_erasure(tiny_llama, {HOOK: tiny_sae()}, splits, out, ks=KS, methods=SWEEP_METHODS,
                        strengths=SWEEP_STRENGTHS, prompts_per_side=4, ce_tokens=held_out_tokens(tiny_llama.tokenizer),
                        progress=False)
    return paths, pd.read_csv(paths["csv"])


# ----------------------------------------------------------------------------------------------
# The edits


def test_leace_puts_a_fresh_probe_at_chance_on_the_train_split(sweep):
    _, table = sweep
    clean = table[table["method"] == "clean"].iloc[0]
    leace = table[(table["method"] == "leace") & (table["strength"] == 1)].set_index("positions")
    assert clean["probe_train_accuracy"] == 1.0  # the concept is linearly readable before the edit
    # fitted on exactly the final positions: a fresh probe there is at chance (balanced split: chance is 0.5); fitted
    # over the whole name..final span ("all"), LEACE only guarantees that for the span as a whole
    assert leace.loc["final", "probe_train_accuracy"] == pytest.approx(0.5)
    assert leace.loc["name", "probe_train_accuracy"] == 1.0  # edited at the name only: the final position is clean
    assert (leace["edit_norm"] > 0).all()


def test_leace_eraser_leaves_no_linear_correlation(tiny_llama):
    x, labels = labelled_data()
    assert probe_accuracies(x, labels, x, labels)[0] == 1.0
    edited = fit_leace(HOOK, x, labels)(x)
    centred = edited - edited.mean(0)
    cross_covariance = centred.T @ (labels.double() - labels.double().mean())
    assert cross_covariance.abs().max() < 1e-8
    assert probe_accuracies(edited, labels, edited, labels)[0] == pytest.approx(0.5)


def test_mean_projection_removes_the_mean_difference_exactly():
    x, labels = labelled_data()
    edit = fit_mean_projection(HOOK, x, labels)
    edited = edit(x)
    positive, negative = class_means(edited, labels)
    assert torch.allclose(positive, negative, atol=1e-10)
    direction = edit.edit.fn.direction
    change = x - edited  # every change lies along the unit mean-difference direction
    assert torch.allclose(change, (change @ direction)[:, None] * direction, atol=1e-10)
    assert direction.norm().item() == pytest.approx(1.0)


def test_removing_features_subtracts_exactly_code_times_direction():
    sae = tiny_sae()
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # many features active
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    features = [4, 17, 40]
    codes = sae.encode(x)
    assert (codes[..., features] > 0).any()
    expected = sum(codes[..., i, None] * sae.W_dec[i] for i in features)
    edit = feature_removal(HOOK, "sae_activation", sae, features)
    assert torch.allclose(x - edit(x), expected, atol=1e-6)
    assert edit.k == 3 and edit.features == (4, 17, 40)
    passthrough = torch.zeros(3, 5, dtype=torch.bool)
    passthrough[1, 2] = True  # a row the engine passes through is left as it is
    kept = edit(x, passthrough)
    assert torch.equal(kept[1, 2], x[1, 2])
    assert torch.allclose(x - kept, expected * ~passthrough[..., None], atol=1e-6)


def test_an_edit_changes_every_position_but_bos_in_the_forward_pass(tiny_llama):
    from circuits.engine import run_with_edits

    tokens = held_out_tokens(tiny_llama.tokenizer, n=2, length=6)
    edit = feature_removal(HOOK, "sae_activation", tiny_sae(), [0, 1, 2, 3])
    _, clean = tiny_llama.run_with_cache(tokens, names_filter=[HOOK])
    seen = run_with_edits(tiny_llama, tokens, edits=edit.edits, record=[HOOK]).recorded[HOOK]
    assert torch.equal(seen[:, 0], clean[HOOK][:, 0])
    assert torch.allclose(seen[:, 1:], edit(clean[HOOK][:, 1:]), atol=1e-6)
    assert not torch.allclose(seen[:, 1:], clean[HOOK][:, 1:], atol=1e-4)


def test_every_method_leaves_bos_and_massive_activations_alone():
    """The engine's pass-through rule holds for feature removal, LEACE and the projection alike."""
    x, labels = labelled_data(d=32)
    sae = tiny_sae()
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # many features active everywhere
    activation = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    activation[:, 0] *= 50.0  # BOS
    activation[1, 3] *= 100.0  # a massive activation (norm far above 10x the row median)
    passed = torch.zeros(2, 6, dtype=torch.bool)
    passed[:, 0] = passed[1, 3] = True
    for method in (feature_removal(HOOK, "sae_activation", sae, range(64)), fit_leace(HOOK, x.float(), labels),
                   fit_mean_projection(HOOK, x.float(), labels)):
        edited = method.edit(activation)
        assert torch.equal(edited[passed], activation[passed]), method
        assert ((edited - activation).norm(dim=-1)[~passed] > 1e-3).all(), method


# ----------------------------------------------------------------------------------------------
# Controls and selection


def test_random_controls_are_reproducible_nested_and_active(tiny_llama):
    splits = gender_concept(tiny_llama.tokenizer)
    sae = tiny_sae()
    statistics = collect_train_statistics(tiny_llama, {HOOK: sae}, splits.train, start=1, progress=False)

    def features(seed):
        edits, _ = build_edits({HOOK: sae}, statistics, (2, 4), ("sae_random", "random_dictionary"), seed)
        return {(e.method, e.k): list(e.features) for e in edits if e.method in K_METHODS}

    first, again, other = features(0), features(0), features(1)
    assert first == again
    assert first[("sae_random", 2)] != other[("sae_random", 2)]
    assert first[("sae_random", 4)][:2] == first[("sae_random", 2)]  # nested across k
    active = (sae.encode(statistics[HOOK].position_activations) > 0).any(0)
    assert torch.equal(active, statistics[HOOK].active_features)
    assert active[first[("sae_random", 4)]].all()
    assert statistics[HOOK].attribution.shape == (sae.n_features,)


def test_random_features_survive_one_borderline_feature():
    """A feature that flips between active and inactive (a code near zero: threads, BLAS) only enters or
    leaves the random control's list; the other draws keep their order (issue 17)."""
    from tasks.erasure import random_features

    active = torch.rand(500, generator=torch.Generator().manual_seed(0)) > 0.5
    order = random_features(active, 0, HOOK)
    assert active[order].all() and len(order) == int(active.sum())
    for flipped in (int(order[3]), int(torch.nonzero(~active)[0])):
        other = active.clone()
        other[flipped] = ~other[flipped]
        kept = [index for index in random_features(other, 0, HOOK).tolist() if index != flipped]
        assert kept == [index for index in order.tolist() if index != flipped]


def test_build_edits_makes_every_method(tiny_llama):
    """Every method and k (and strength), in the documented order, each fitted on the setting's fitted positions."""
    from tasks.erasure import FIXED_METHODS, METHODS

    sae = tiny_sae()
    train = gender_concept(tiny_llama.tokenizer).train
    for setting in ("final", "all"):
        statistics = collect_train_statistics(tiny_llama, {HOOK: sae}, train, 1, setting, progress=False)
        stats = statistics[HOOK]
        edits, chosen = build_edits({HOOK: sae}, statistics, KS, METHODS, seed=0, strengths=(0.5, 1.0))
        assert [(e.method, e.k, e.strength) for e in edits] == [(method, k, 1.0) for method in K_METHODS for k in KS] \
            + [(method, None, strength) for method in FIXED_METHODS for strength in (0.5, 1.0)]
        assert {e.setting for e in edits} == {setting}
        assert set(chosen[HOOK]) == set(K_METHODS) and all(len(f) == max(KS) for f in chosen[HOOK].values())
        by_method = {(e.method, e.k, e.strength): e for e in edits}
        assert by_method[("sae_activation", 3, 1.0)].features[:1] == by_method[("sae_activation", 1, 1.0)].features
        x, labels = stats.position_activations, stats.position_labels
        if setting == "final":
            assert len(x) == len(stats.final_activations)
        else:  # the name..final span of every prompt, not the few-shot examples before it
            assert len(stats.final_activations) < len(x) < 10 * len(stats.final_activations)
        edited = by_method[("mean_projection", None, 1.0)](x)
        assert torch.allclose(*class_means(edited, labels), atol=1e-6), setting  # fitted on exactly these rows
        half = by_method[("mean_projection", None, 0.5)](x)
        assert torch.allclose(half, (x + edited) / 2, atol=1e-5)  # half strength: half the edit
        edited = by_method[("leace", None, 1.0)](x).double()
        covariance = (edited - edited.mean(0)).T @ (labels.double() - labels.double().mean())
        assert covariance.abs().max() < 1e-3 * x.abs().max(), setting


def test_one_pass_for_all_settings_equals_one_pass_per_setting(tiny_llama):
    """run_erasure fits every setting from one pass over the train split: the same statistics as a pass each."""
    from tasks.erasure.run import collect_train_statistics_for

    sae = tiny_sae()
    train = gender_concept(tiny_llama.tokenizer).train
    together = collect_train_statistics_for(tiny_llama, {HOOK: sae}, train, 1, ["name", "final", "all"],
                                            progress=False)
    for setting in ("name", "final", "all"):
        alone = collect_train_statistics(tiny_llama, {HOOK: sae}, train, 1, setting, progress=False)[HOOK]
        joint = together[setting][HOOK]
        assert joint.setting == setting
        assert torch.equal(joint.position_activations, alone.position_activations)
        assert torch.equal(joint.position_labels, alone.position_labels)
        assert torch.allclose(joint.attribution, alone.attribution)
        assert torch.equal(joint.active_features, alone.active_features)
    assert len(together["final"][HOOK].position_activations) < len(together["all"][HOOK].position_activations)


def test_position_settings_find_the_subject_and_not_the_examples(tiny_llama):
    """The name setting marks the subject in the final sentence (not a few-shot example's name), the final
    setting the last token, and all the span from after BOS, fitted from the name on."""
    from tasks.erasure import position_masks, subject_token_ids, tokenize_prompts

    train = gender_concept(tiny_llama.tokenizer).train
    prompts, _ = train.prompts_and_labels()
    tokens, finals = tokenize_prompts(tiny_llama.tokenizer, prompts)
    subjects = subject_token_ids(train, tiny_llama.tokenizer)
    masks = {setting: position_masks(setting, tokens, finals, 1, subjects) for setting in ("name", "final", "all")}
    names = masks["name"].names
    for row, prompt in enumerate(prompts):
        subject = tiny_llama.tokenizer.decode([int(tokens[row, names[row]])]).strip()
        assert prompt.rsplit("My name is ", 1)[1].startswith(subject + " ")  # the final sentence's subject
    assert torch.equal(masks["name"].apply.float().argmax(1), names) and (masks["name"].apply.sum(1) == 1).all()
    assert torch.equal(masks["final"].apply.float().argmax(1), finals)
    assert (masks["all"].apply.sum(1) == finals).all()  # positions 1..final
    assert (masks["all"].fit.sum(1) == finals - names + 1).all()
    assert not (masks["all"].fit & ~masks["all"].apply).any()


def test_an_edit_acts_only_at_its_settings_positions(tiny_llama):
    """Evaluated under the name setting, an edit changes the hook's activation at the name position only."""
    from circuits.engine import run_with_edits
    from tasks.erasure import position_masks, subject_token_ids, tokenize_prompts

    train = gender_concept(tiny_llama.tokenizer).train
    tokens, finals = tokenize_prompts(tiny_llama.tokenizer, train.prompts_and_labels()[0][:4])
    masks = position_masks("name", tokens, finals, 1, subject_token_ids(train, tiny_llama.tokenizer))
    edit = replace(feature_removal(HOOK, "x", tiny_sae(), range(64)), setting="name")
    clean = run_with_edits(tiny_llama, tokens, record=[HOOK]).recorded[HOOK]
    seen = run_with_edits(tiny_llama, tokens, edits=edit.at(masks.apply), record=[HOOK]).recorded[HOOK]
    changed = (seen - clean).norm(dim=-1) > 1e-6
    assert torch.equal(changed, masks.apply)


def test_equal_removal_interpolates_each_curve_from_the_clean_model():
    from tasks.erasure import equal_removal_table

    rows = [{"positions": "none", "hook": HOOK, "method": "clean", "k": None, "strength": 1.0, "removal": 0.0,
             "kl": 0.0, "ce_delta": 0.0, "transfer_removal": 0.0, "probe_accuracy": 1.0,
             "probe_accuracy_name": 1.0, "relative_edit_norm": 0.0}]
    for k, r, kl in ((1, 0.2, 0.01), (4, 0.6, 0.05), (16, 0.8, 0.3)):
        rows.append({**rows[0], "positions": "final", "method": "sae_attribution", "k": k, "removal": r, "kl": kl})
    rows.append({**rows[0], "positions": "final", "method": "leace", "strength": 1.0, "removal": 1.0, "kl": 0.02})
    frame = pd.DataFrame(rows)
    table = equal_removal_table(frame, levels=(0.5, 0.9)).set_index(["method", "removal"])
    assert table.loc[("sae_attribution", 0.5), "kl"] == pytest.approx(0.01 + 0.75 * 0.04)  # between k=1 and 4
    assert table.loc[("sae_attribution", 0.5), "between"] == "1-4"
    assert ("sae_attribution", 0.9) not in table.index  # never reached: no row
    assert table.loc[("leace", 0.9), "kl"] == pytest.approx(0.018)  # from the clean model (0, 0) to strength 1


def test_attribution_predicts_the_effect_of_removing_a_small_feature(tiny_llama):
    """The first-order attribution of one feature tracks its exact removal effect on the train prompts."""
    train = gender_concept(tiny_llama.tokenizer).train
    sae = tiny_sae()
    with torch.no_grad():
        sae.W_dec.mul_(0.01)  # small edits: the linear approximation holds
    statistics = collect_train_statistics(tiny_llama, {HOOK: sae}, train, 1, "all", progress=False)
    feature = int(statistics[HOOK].attribution.abs().argmax())
    removal_edit = replace(feature_removal(HOOK, "x", sae, [feature]), setting="all")
    clean, removed = evaluate_on_prompts(tiny_llama, [Erasure(HOOK), removal_edit], train, start=1, progress=False)
    exact_drop = (clean.signed_diffs - removed.signed_diffs).mean().item()
    assert exact_drop == pytest.approx(statistics[HOOK].attribution[feature].item(), rel=0.05)


# ----------------------------------------------------------------------------------------------
# The sweep's outputs


def test_sweep_writes_the_table_plot_and_settings(sweep):
    paths, table = sweep
    assert list(table.columns) == COLUMNS
    per_setting = [(method, k, 1.0) for method in ("sae_attribution", "random_dictionary") for k in KS]
    per_setting += [(method, None, strength) for method in ("leace", "mean_projection") for strength in SWEEP_STRENGTHS]
    expected = [("none", "clean", None, 1.0)] + [(setting, *row) for setting in ("name", "final", "all")
                                                 for row in per_setting]  # the documented orders, not the given one
    assert [(p, m, None if pd.isna(k) else k, s) for p, m, k, s in
            zip(table["positions"], table["method"], table["k"], table["strength"])] == expected
    assert set(table["hook"]) == {HOOK}
    clean = table[table["method"] == "clean"].iloc[0]
    assert clean["removal"] == 0 and clean["kl"] == 0 and clean["edit_norm"] == 0
    edited = table[table["method"] != "clean"]
    assert (edited["edit_norm"] > 0).all() and (edited["kl"] >= 0).all()
    assert edited["transfer_removal"].notna().all()
    maps = edited[edited["method"].isin(["leace", "mean_projection"])]  # they move every position they act on
    assert (maps["transfer_removal"] != 0).all()
    assert edited["probe_accuracy_name"].notna().all()
    equal = pd.read_csv(paths["equal_removal"])
    assert set(equal["positions"]) <= {"name", "final", "all"} and set(equal["method"]) <= set(SWEEP_METHODS)
    with open(paths["plot"], "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
    settings = json.loads(open(paths["json"]).read())
    assert settings["positions"] == ["name", "final", "all"]
    assert len(settings["chosen_features"]["final"][HOOK]["sae_attribution"]) == max(KS)
    provenance = settings["provenance"]  # the same block as the IOI details.json
    assert set(provenance) >= {"model", "dictionaries", "seed"} and list(provenance["dictionaries"]) == [HOOK]
    assert len(provenance["dictionaries"][HOOK]) == 64


# ----------------------------------------------------------------------------------------------
# Bad input


class NoCompute:
    """The model's tokenizer, config and hook names, but no forward pass: for checks that must fail before
    any compute (without touching the shared model fixture)."""

    def __init__(self, model):
        self.tokenizer, self.cfg, self.hook_dict = model.tokenizer, model.cfg, model.hook_dict

    def __getattr__(self, name):
        raise AssertionError(f"model.{name} used before the inputs were checked")


@pytest.mark.parametrize("positive, negative, tokens, message", [
    (["my name is Mary"], ["my name is John"], (" male", " male"), "same token"),
    ([], ["my name is John"], (" female", " male"), "no positive prompts"),
    (["my name is Mary"] * 5, ["my name is John"] * 2, (" female", " male"), "unbalanced"),
])
def test_bad_concepts_fail_before_any_compute(tiny_llama, tmp_path, positive, negative, tokens, message):
    good = gender_concept(tiny_llama.tokenizer)
    bad = Concept("bad", positive, negative, *tokens, split="test")
    with pytest.raises(ConceptError, match=message):
        run_erasure(NoCompute(tiny_llama), {HOOK: tiny_sae()}, (good.train, bad, good.transfer), tmp_path / "out",
                    ks=KS, ce_tokens=held_out_tokens(tiny_llama.tokenizer), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_named(tiny_llama, tmp_path):
    splits = gender_concept(tiny_llama.tokenizer)
    tokens = held_out_tokens(tiny_llama.tokenizer)
    with pytest.raises(ValueError, match="k=100 exceeds the 64 features"):
        run_erasure(tiny_llama, {HOOK: tiny_sae()}, splits, tmp_path, ks=(1, 100), ce_tokens=tokens, progress=False)
    with pytest.raises(ValueError, match="d_in=16"):
        run_erasure(tiny_llama, {HOOK: tiny_sae(d_in=16)}, splits, tmp_path, ce_tokens=tokens, progress=False)
    with pytest.raises(ValueError, match="unknown erasure method"):
        run_erasure(tiny_llama, {HOOK: tiny_sae()}, splits, tmp_path, methods=["lace"], ce_tokens=tokens,
                    progress=False)
    with pytest.raises(ValueError, match="unknown position setting"):
        run_erasure(tiny_llama, {HOOK: tiny_sae()}, splits, tmp_path, positions=["subject"], ce_tokens=tokens,
                    progress=False)
    with pytest.raises(ValueError, match=r"strengths must be in \(0, 1\]"):
        run_erasure(tiny_llama, {HOOK: tiny_sae()}, splits, tmp_path, strengths=[2.0], ce_tokens=tokens,
                    progress=False)
    anonymous = splits.train.__class__(**{**vars(splits.train), "positive_subjects": [], "negative_subjects": []})
    with pytest.raises(ConceptError, match="'name' position setting needs the concept's subjects"):
        run_erasure(tiny_llama, {HOOK: tiny_sae()}, (anonymous, splits.test, None), tmp_path, ce_tokens=tokens,
                    progress=False)
    assert not any(tmp_path.iterdir())


def test_concept_files(tmp_path, tiny_llama):
    tokenizer = tiny_llama.tokenizer
    good = {"name": "size", "positive_token": " girl", "negative_token": " boy",
            "train": {"positive": ["a", "the"], "negative": ["an", "it"]},
            "test": {"positive": ["he"], "negative": ["she"]}}
    path = tmp_path / "concept.json"
    path.write_text(json.dumps(good))
    splits = load_concept_splits(str(path), tokenizer)
    assert splits.transfer is None and splits.train.positive_prompts == ["a", "the"]
    path.write_text(json.dumps({"name": "size", "train": {}}))
    with pytest.raises(ConceptError, match="not a concept file"):
        load_concept_splits(str(path), tokenizer)
    with pytest.raises(ConceptError, match="unknown concept"):
        load_concept_splits("colour", tokenizer)


# ----------------------------------------------------------------------------------------------
# CLI


def _cli_args(*argv):
    from sparse_circuits.cli.erase import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["erase", *argv])


def test_cli_runs_on_saved_dictionaries(tiny_llama_folder, tmp_path):
    from sparse_circuits.cli.erase import run

    for layer in (1, 2):
        save_dictionary(tiny_sae(f"blocks.{layer}.hook_resid_post", seed=layer), tmp_path / "saes" / f"L{layer}")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the girl gave the boy a book and she went to the park ."] * 20))
    args = _cli_args("--model", str(tiny_llama_folder), "--device", "cpu", "--sae", str(tmp_path / "saes"),
                     "--layers", "2", "--k", "1", "2", "--ce-tokens", "32", "--context-size", "16",
                     "--corpus", str(text), "--methods", "sae_attribution", "leace", "--no-transfer",
                     "--out", str(tmp_path / "out"))
    paths = run(args)
    table = pd.read_csv(paths["csv"])
    assert set(table["hook"]) == {"blocks.2.hook_resid_post"}
    per_setting = ["sae_attribution"] * 2 + ["leace"] * 3  # k = 1, 2; strengths 0.25, 0.5, 1
    assert list(table["method"]) == ["clean"] + per_setting * 3
    assert list(table["positions"]) == ["none"] + [s for s in ("name", "final", "all") for _ in per_setting]
    assert table["transfer_removal"].isna().all()

    with pytest.raises(ValueError, match="no dictionary for blocks.7.hook_resid_post.*--layers"):
        run(_cli_args("--model", str(tiny_llama_folder), "--sae", str(tmp_path / "saes"), "--layers", "7",
                      "--out", str(tmp_path / "x")))


# ----------------------------------------------------------------------------------------------
# The real model


@pytest.mark.integration
def test_erasure_on_the_real_model(real_model, tmp_path):
    """One layer, one k, three methods, a signed PCA basis of the train prompts' activations as the dictionary."""
    from sae.baselines import fit_pca
    from tasks.erasure import subsample_concept, tokenize_prompts

    hook = "blocks.9.hook_resid_post"
    splits = [subsample_concept(split, 8, seed=0) for split in gender_concept(real_model.tokenizer)]
    tokens, _ = tokenize_prompts(real_model.tokenizer, splits[0].prompts_and_labels()[0])
    _, cache = real_model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=10)
    dictionary = fit_pca(cache[hook][:, 1:], n_components=64, hook_name=hook)
    paths = run_erasure(real_model, {hook: dictionary}, splits, tmp_path, ks=(4,), ce_tokens=64, context_size=32,
                        methods=("sae_attribution", "sae_random", "leace"), transfer=False, progress=False,
                        positions=("final", "all"), strengths=(1.0,))
    frame = pd.read_csv(paths["csv"])
    table = {setting: part.set_index("method") for setting, part in frame.groupby("positions")}
    assert table["none"].loc["clean", "concept_accuracy"] > 0.7  # the model does the task
    assert table["final"].loc["leace", "probe_train_accuracy"] == pytest.approx(0.5)  # fitted exactly there
    # removing features everywhere moves the output; at the final position alone nothing does (the name's
    # gender is not read from there at this layer: results/erasure_fair_small/)
    assert table["all"].loc["sae_attribution", "removal"] > table["all"].loc["sae_random", "removal"] + 0.2
    assert abs(table["final"].loc["sae_attribution", "removal"]) < table["all"].loc["sae_attribution", "removal"]
    assert (frame["kl"] >= 0).all() and (frame[frame["method"] != "clean"]["edit_norm"] > 0).all()
