"""Sparse probing: Brown tags onto tokens, direction selection, the probe, F1/AUC and the bootstrap, the run
on a tiny model, the command's errors, and (integration) a small run on the real model."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pandas as pd
import pytest
import torch

from sae.config import DictionaryConfig
from sae.io import save_dictionary
from sae.tagged_corpus import (TaggedSentence, labelled_token_indices, normalise_tag, parse_brown_sample,
                               sentence_text, tag_tokens, token_words)
from sae.topk import TopKSAE
from tasks.probing import (CONCEPTS, LabelError, ProbeInputError, ProbeSettings, basis_codes, best_f1_threshold,
                           check_label_counts, f1_scores, fit_probe, interval, parse_label_names, plain_weights,
                           probe_basis, resample_weights, resolve_labels, roc_auc, run_probing, separation_scores,
                           summary_table, top_directions, write_probing)

HOOK = "blocks.1.hook_resid_post"

# --------------------------------------------------------------------------- Brown tags onto tokens


def test_normalise_tag_drops_title_suffixes_and_keeps_contractions():
    assert normalise_tag("NN-TL") == "nn"
    assert normalise_tag("np$-hl") == "np$"
    assert normalise_tag("fw-nn") == "fw"
    assert normalise_tag("pps+bez") == "pps+bez"
    assert normalise_tag("md*") == "md*"
    assert normalise_tag("--") == "--"


def test_parse_brown_sample_splits_a_paragraph_into_sentences_keeping_closing_quotes():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ./. ''/'' It/pps ran/vbd ./.\n\n\n"
           "\tHe/pps-tl won/vbd !/.\n")
    sentences = parse_brown_sample("ca01", raw)
    assert [s.words for s in sentences] == [("The", "jury", "said", "``", "no", ".", "''"), ("It", "ran", "."),
                                            ("He", "won", "!")]
    assert sentences[2].tags == ("pps", "vbd", ".")
    assert [s.index for s in sentences] == [0, 1, 2] and {s.document for s in sentences} == {"ca01"}


def test_sentence_text_detokenizes_as_the_registry_corpus_and_gives_word_spans():
    words = ("``", "Only", "a", "handful", "''", ",", "the", "jury", "did", "n't", "say", ".")
    text, spans = sentence_text(words)
    assert text == '"Only a handful", the jury didn\'t say.'
    assert [text[start:end] for start, end in spans] == ['"', "Only", "a", "handful", '"', ",", "the", "jury",
                                                         "did", "n't", "say", "."]


def test_tokens_map_to_words_and_the_chosen_token_of_each_word_is_labelled():
    text, spans = sentence_text(("The", "investigation", "ended", "."))
    # "The", " invest", "igation", " ended", "." as a BPE tokenizer would cut them (offsets keep the space)
    offsets = [(0, 3), (3, 10), (10, 17), (17, 23), (23, 24)]
    owners = token_words(text, spans, offsets)
    assert owners == [0, 1, 1, 2, 3]
    assert labelled_token_indices(owners, "last") == [(0, 0), (2, 1), (3, 2), (4, 3)]
    assert labelled_token_indices(owners, "first") == [(0, 0), (1, 1), (3, 2), (4, 3)]
    assert labelled_token_indices(owners, "all") == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 3)]
    assert token_words(" a", [(1, 2)], [(0, 1), (1, 2)]) == [None, 0]  # a lone space belongs to no word
    with pytest.raises(ValueError, match="label position"):
        labelled_token_indices(owners, "middle")


def synthetic_sentences(n_documents: int = 40, per_document: int = 6) -> list[TaggedSentence]:
    """Sentences of the tiny test vocabulary with Brown-like tags; names vary so the split has both sides."""
    patterns = [
        (("the", "boy", "gave", "the", "girl", "a", "book"), ("at", "nn", "vbd", "at", "nn", "at", "nn")),
        (("Mary", "took", "the", "ball", "to", "the", "park"), ("np", "vbd", "at", "nn", "in", "at", "nn")),
        (("John", "saw", "a", "ring", "at", "the", "store"), ("np", "vbd", "at", "nn", "in", "at", "nn")),
        (("she", "had", "a", "letter", "for", "Tom"), ("pps", "hvd", "at", "nn", "in", "np")),
    ]
    sentences = []
    for document in range(n_documents):
        for index in range(per_document):
            words, tags = patterns[(document + index) % len(patterns)]
            sentences.append(TaggedSentence(f"c{'abcdefghj'[document % 9]}{document:02d}", index, words, tags))
    return sentences


def test_tag_tokens_labels_each_word_token_and_splits_by_document():
    from tests.conftest import build_word_tokenizer

    tokenizer = build_word_tokenizer()
    tagged = tag_tokens(synthetic_sentences(), tokenizer, 600, context_size=24, held_out_fraction=0.5, seed=0)
    assert (tagged.tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tagged.positions >= 1).all() and (tagged.positions < tagged.lengths[tagged.rows]).all()
    decoded = [tokenizer.convert_ids_to_tokens(int(tagged.tokens[r, p])) for r, p in zip(tagged.rows, tagged.positions)]
    assert decoded == tagged.words  # one token per word in this vocabulary: the labelled token is the word
    assert tagged.held_out.any() and (~tagged.held_out).any()
    assert 550 <= len(tagged.tags) <= 650
    # a sentence's tokens are all on one side of the split
    for number in set(tagged.sentences.tolist()):
        assert len(set(tagged.held_out[tagged.sentences == number].tolist())) == 1


# --------------------------------------------------------------------------- labels


def test_labels_resolve_tags_and_concepts_and_refuse_unknown_or_empty_sets():
    counts = Counter({"nn": 50, "vbd": 30, "at": 40, ".": 99, "np": 20, "hvd": 3})
    labels = resolve_labels(None, counts, n_frequent=2)
    assert [label.name for label in labels] == ["nn", "at", *CONCEPTS]  # punctuation is never a default label
    [past] = resolve_labels(["past_tense_verb"], counts)
    assert past.of(["vbd", "hvd", "vbn", "nn"]).tolist() == [True, True, False, False]
    with pytest.raises(LabelError, match="unknown tag.*xyz.*most frequent nn, at"):
        resolve_labels(["nn", "xyz"], counts)
    with pytest.raises(LabelError, match="label set is empty"):
        parse_label_names(" , ")
    assert parse_label_names("nn, vbd,nn") == ["nn", "vbd"] and parse_label_names("auto") is None
    with pytest.raises(LabelError, match="too few examples.*np"):
        check_label_counts(resolve_labels(["np"], counts), ["np"] * 3 + ["nn"] * 50, ["np", "nn"])


# --------------------------------------------------------------------------- selection, probe, scores


def test_selection_finds_the_separating_direction_and_normalising_ignores_scale():
    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(400) % 4 == 0)[:, None]
    codes = torch.randn(400, 6, generator=generator)
    codes[:, 3] += 2.0 * labels[:, 0]  # the label's direction
    codes[:, 5] *= 100.0  # a large-scale direction carrying nothing
    normalised = separation_scores(codes, labels)
    assert top_directions(normalised, 2)[0, 0].item() == 3
    rescaled = codes.clone()
    rescaled[:, 3] *= 1000.0
    torch.testing.assert_close(separation_scores(rescaled, labels), normalised, rtol=1e-4, atol=1e-5)
    assert top_directions(separation_scores(codes, labels, "mean_difference"), 1)[0, 0].item() == 5
    with pytest.raises(ValueError, match="k must be between 1 and the 6"):
        top_directions(normalised, 7)


def test_f1_and_auc_match_a_hand_computed_case():
    predicted = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    actual = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    # TP 2, FP 1, FN 1: F1 = 4 / 6
    assert f1_scores(plain_weights(5), predicted, actual).item() == pytest.approx(4 / 6)
    # weights: token 1 (the false positive) counted twice, token 2 (a false negative) not at all: 4 / (4 + 2 + 0)
    weights = torch.tensor([[1.0], [2.0], [0.0], [1.0], [1.0]])
    assert f1_scores(weights, predicted, actual).item() == pytest.approx(4 / 6)
    assert f1_scores(plain_weights(2), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)).item() == 0
    scores = torch.tensor([0.9, 0.4, 0.4, 0.1, 0.8])
    # positives 0.9, 0.4, 0.8 against negatives 0.4 (a tie with one positive) and 0.1: (2 + 1.5 + 2) / 6
    assert roc_auc(plain_weights(5), scores, actual).item() == pytest.approx(5.5 / 6)


def test_auc_under_resample_weights_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (300,), generator=generator).double()
    actual = torch.rand(300, generator=generator) < 0.3
    weights = resample_weights(torch.arange(300) // 5, 8, seed=2)
    ours = roc_auc(weights, scores, actual)
    for column in range(8):
        expected = roc_auc_score(actual.numpy(), scores.numpy(), sample_weight=weights[:, column].numpy())
        assert ours[column].item() == pytest.approx(expected)


def test_resample_weights_draw_whole_sentences():
    sentences = torch.tensor([0, 0, 0, 1, 1, 2])
    weights = resample_weights(sentences, 50, seed=0)
    assert weights.shape == (6, 50)
    assert (weights[0] == weights[1]).all() and (weights[3] == weights[4]).all()  # a sentence's tokens together
    assert (weights[[0, 3, 5]].sum(dim=0) == 3).all()  # three sentences drawn per resample
    with pytest.raises(ValueError, match="resamples"):
        resample_weights(sentences, 0)


def test_best_threshold_maximises_train_f1():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    actual = torch.tensor([0, 0, 1, 0, 1, 1], dtype=torch.bool)
    threshold = best_f1_threshold(scores, actual)
    assert 0.2 < threshold < 0.3  # the top 4 give F1 6/7, above the top 2 (4/5), top 3 (4/6) or top 5 (6/8)
    tied = best_f1_threshold(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, False, False]))
    assert 0.0 < tied < 1.0  # never a cut inside a run of equal scores


def probe_data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    y = (torch.rand(1200, 2, generator=generator) < 0.2)
    codes = torch.randn(1200, 10, generator=generator)
    codes[:, 2] += 2.5 * y[:, 0]
    codes[:, 7] += 1.0 * y[:, 1]
    sentences = torch.arange(1200) // 10
    return codes[:800], y[:800], codes[800:], y[800:], sentences[800:]


def test_probe_finds_the_signal_and_the_bootstrap_interval_contains_the_estimate():
    train_x, train_y, test_x, test_y, sentences = probe_data()
    probe = fit_probe(train_x, train_y[:, 0], torch.tensor([2]))
    assert f1_scores(plain_weights(400), probe.predict(test_x), test_y[:, 0]).item() > 0.7
    weights = resample_weights(sentences, 200, seed=0)
    rows, f1s, aucs = probe_basis(train_x, train_y, test_x, test_y, weights, ProbeSettings(ks=(1, 4)))
    assert [(row["label_index"], row["k"]) for row in rows] == [(0, 1), (0, 4), (1, 1), (1, 4)]
    assert rows[0]["directions"] == "2" and rows[2]["directions"] == "7"
    for row, k_index in zip(rows, (0, 1, 0, 1)):
        low, high = interval(f1s[k_index, row["label_index"]])
        assert low <= row["f1"] <= high and low < high
        low, high = interval(aucs[k_index, row["label_index"]])
        assert low <= row["auc"] <= high
    assert rows[0]["auc"] > rows[2]["auc"] > 0.6  # the stronger signal is the better probe


# --------------------------------------------------------------------------- bases


def test_signed_baseline_codes_are_coordinates():
    from sae.baselines import fit_pca

    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9)
    pca = fit_pca(x)
    codes = basis_codes(pca, x)
    assert codes.shape == (200, 8)  # one coordinate per direction, not the 16 signed features
    torch.testing.assert_close(codes, ((x - pca.b_dec) @ pca.W_dec[:8].T).float(), rtol=1e-4, atol=1e-4)
    assert (codes < 0).any()


def tiny_topk(hook: str = HOOK, model_name: str = "", d_in: int = 32, seed: int = 1) -> TopKSAE:
    cfg = DictionaryConfig("topk", d_in=d_in, d_sae=64, hook_name=hook, model_name=model_name, k=8, seed=seed)
    return TopKSAE(cfg).eval()


@pytest.fixture(scope="module")
def tiny_tagged():
    from tests.conftest import build_word_tokenizer

    return tag_tokens(synthetic_sentences(), build_word_tokenizer(), 800, context_size=32, held_out_fraction=0.5)


def test_run_probing_on_a_tiny_model_writes_every_file(tiny_llama, tiny_tagged, tmp_path):
    labels = resolve_labels(["at", "nn", "proper_noun"], Counter(tiny_tagged.tags))
    settings = ProbeSettings(ks=(1, 2), resamples=30)
    results = run_probing(tiny_llama, {"sae-topk": {HOOK: tiny_topk()}}, tiny_tagged, labels,
                          baselines=["neurons", "pca", "random"], settings=settings, progress=False)
    assert results.kinds == {"sae-topk": "sae", "neurons": "baseline", "pca": "baseline", "random": "baseline"}
    assert len(results.rows) == 4 * 3 * 2
    summary = summary_table(results)
    sae = summary[summary["basis"] == "sae-topk"]
    assert sae["best_baseline"].isin(["neurons", "pca", "random"]).all()
    assert (summary["mean_f1_lo"] <= summary["mean_f1"] + 1e-9).all()
    paths = write_probing(results, tmp_path / "out", {"resamples": 30}, progress=False)
    table = pd.read_csv(paths["csv"])
    assert set(table["label"]) == {"at", "nn", "proper_noun"} and set(table["k"]) == {1, 2}
    assert table["f1"].between(0, 1).all()
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(open(paths["json"]).read())["counts"]["train_tokens"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["probing.csv", "probing.json", "probing.png",
                                                                   "summary.csv"]


def test_run_probing_refuses_a_dictionary_from_another_model_and_a_large_k(tiny_llama, tiny_tagged):
    labels = resolve_labels(["nn"], Counter(tiny_tagged.tags))
    with pytest.raises(ProbeInputError, match="trained on model 'gpt2'.*--model gpt2"):
        run_probing(tiny_llama, {"sae": {HOOK: tiny_topk(model_name="gpt2")}}, tiny_tagged, labels, progress=False)
    with pytest.raises(ProbeInputError, match="k=100 is more than the 64 features"):
        run_probing(tiny_llama, {"sae": {HOOK: tiny_topk()}}, tiny_tagged, labels,
                    settings=ProbeSettings(ks=(1, 100)), progress=False)
    with pytest.raises(ValueError, match="width"):
        run_probing(tiny_llama, {"sae": {HOOK: tiny_topk(d_in=16)}}, tiny_tagged, labels, progress=False)
    with pytest.raises(ProbeInputError, match="label set is empty"):
        run_probing(tiny_llama, {"sae": {HOOK: tiny_topk()}}, tiny_tagged, [], progress=False)


# --------------------------------------------------------------------------- the command


def _main(*argv: str) -> int:
    from sparse_circuits.cli.main import main

    return main(["probe", *argv])


def test_cli_errors_are_one_line_and_leave_no_output(tmp_path, capsys):
    folder = tmp_path / "saes" / "L1"
    save_dictionary(tiny_topk(model_name="gpt2"), folder)
    out = tmp_path / "out"
    assert _main("--sae", str(folder), "--out", str(out)) == 2  # the default model is smollm2-135m
    assert "trained on model 'gpt2', not 'smollm2-135m'" in capsys.readouterr().err
    assert _main("--sae", str(folder), "--model", "gpt2", "--tags", " , ", "--out", str(out)) == 2
    assert "--tags is empty" in capsys.readouterr().err
    assert _main("--sae", str(folder), "--model", "gpt2", "--ks", "1,x", "--out", str(out)) == 2
    assert "--ks" in capsys.readouterr().err
    assert _main("--sae", str(folder), "--model", "gpt2", "--baselines", "pca,dense", "--out", str(out)) == 2
    assert "unknown dense" in capsys.readouterr().err
    assert _main("--sae", str(tmp_path / "nowhere"), "--out", str(out)) == 2
    assert not out.exists()


def test_cli_refuses_unknown_tags_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import circuits.models

    folder = tmp_path / "L1"
    save_dictionary(tiny_topk(), folder)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tags were checked")

    monkeypatch.setattr(circuits.models, "load_model", no_model)
    assert _main("--sae", str(folder), "--tags", "nn,zz9", "--out", str(tmp_path / "out")) == 2
    assert "unknown tag(s) zz9" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_names_sae_sets_by_architecture(tmp_path):
    from sparse_circuits.cli.probe import split_sae_argument
    from sparse_circuits.pipelines.probe import ProbeRequest, load_sae_sets

    save_dictionary(tiny_topk(), tmp_path / "a" / "L1")
    save_dictionary(tiny_topk(seed=2), tmp_path / "b" / "L1")
    request = ProbeRequest(saes=[tmp_path / "a", tmp_path / "b"], out=tmp_path / "out")
    assert list(load_sae_sets(request)) == ["sae-topk", "sae-topk-b"]
    assert split_sae_argument(f"mine={tmp_path / 'a'}") == ("mine", tmp_path / "a")
    assert split_sae_argument(str(tmp_path / "a")) == (None, tmp_path / "a")


# --------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_probing_on_the_real_model(real_model, tmp_path):
    """A small budget at one hook: the pipeline end to end on real Brown text; a random TopK SAE stands in for a
    trained one (no training here). Determiners (`at`) are linearly obvious in the residual stream: PCA's best
    16 directions find them."""
    from sparse_circuits.pipelines.probe import ProbeRequest, run_probe

    hook = "blocks.6.hook_resid_post"
    save_dictionary(tiny_topk(hook, model_name="smollm2-135m", d_in=576), tmp_path / "sae" / hook)
    request = ProbeRequest(saes=[tmp_path / "sae"], out=tmp_path / "out", baselines=["pca", "random"],
                           tags="at,nn,proper_noun", ks=(1, 16), tokens=1500, resamples=50)
    paths = run_probe(real_model, request, progress=False)
    table = pd.read_csv(paths["csv"])
    assert set(table["basis"]) == {"sae-topk", "pca", "random"}
    pca_at = table[(table["basis"] == "pca") & (table["label"] == "at") & (table["k"] == 16)].iloc[0]
    assert pca_at["f1"] > 0.8 and pca_at["auc"] > 0.9
    assert pca_at["f1_lo"] <= pca_at["f1"] <= pca_at["f1_hi"]
    record = json.loads(open(paths["json"]).read())
    assert record["counts"]["held_out_sentences"] > 10
