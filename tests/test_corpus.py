"""Corpus cleaning, splitting and tokenization into contexts (local text, word-level tokenizer)."""

import json

import pytest
import torch

from sae.corpus import (CorpusError, JsonlCorpus, chunk_paragraphs, clean_brown, join_hard_wraps, load_corpus,
                        shuffled_documents, split_of, tokenize_contexts)
from tests.conftest import WORDS, build_word_tokenizer


def test_brown_tags_are_stripped_and_text_detokenized():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, Atlanta's/np$ mayor/nn did/dod n't/* ./.\n"
    assert clean_brown(raw) == ['The jury said "no evidence", Atlanta\'s mayor didn\'t.']


def test_hard_wraps_are_joined_within_paragraphs():
    text = "Emma Woodhouse, handsome,\nclever, and rich.\n\n  She was the\nyoungest.\n"
    assert join_hard_wraps(text) == ["Emma Woodhouse, handsome, clever, and rich.", "She was the youngest."]


def test_chunks_respect_the_limit_and_split_long_paragraphs_at_sentences():
    long = " ".join(f"Sentence number {i} is here." for i in range(100))
    chunks = chunk_paragraphs(["short one", long, "tail"], limit=300)
    assert all(len(chunk) <= 330 for chunk in chunks)
    assert "".join(chunks).replace("\n\n", " ").count("Sentence number") == 100


def test_split_is_stable_and_roughly_the_requested_fraction():
    ids = [f"doc-{i}" for i in range(4000)]
    held_out = [i for i in ids if split_of(i, 0.1) == "eval"]
    assert 300 < len(held_out) < 500
    assert held_out == [i for i in ids if split_of(i, 0.1) == "eval"]


def _write_corpus(path, n_docs=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocabulary = [w for w in WORDS if w.isalpha()]
    with open(path, "w") as handle:
        for d in range(n_docs):
            picks = torch.randint(len(vocabulary), (40,), generator=generator).tolist()
            handle.write(json.dumps({"id": f"d{d}", "text": " ".join(vocabulary[p] for p in picks)}) + "\n")
    return path


def test_contexts_start_with_bos_and_pack_documents_with_eos(tmp_path):
    tokenizer = build_word_tokenizer()
    corpus = JsonlCorpus([_write_corpus(tmp_path / "c.jsonl")])
    tokens = tokenize_contexts(corpus, tokenizer, context_size=16, n_contexts=20, seed=1)
    assert tokens.shape == (20, 16)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[:, 1:] == tokenizer.eos_token_id).sum() > 0  # document separators
    assert (tokens[:, 1:] == tokenizer.bos_token_id).sum() == 0
    again = tokenize_contexts(corpus, tokenizer, context_size=16, n_contexts=20, seed=1)
    other = tokenize_contexts(corpus, tokenizer, context_size=16, n_contexts=20, seed=2)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)


def test_train_and_eval_splits_share_no_document(tmp_path):
    corpus = JsonlCorpus([_write_corpus(tmp_path / "c.jsonl", n_docs=300)])
    train = {doc.id for doc in shuffled_documents(corpus, "train", seed=0, held_out_fraction=0.2)}
    held_out = {doc.id for doc in shuffled_documents(corpus, "eval", seed=0, held_out_fraction=0.2)}
    assert train and held_out and not train & held_out and len(train | held_out) == 300


def test_bad_corpus_inputs_are_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="neither"):
        load_corpus(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match="no string 'text' field"):
        list(load_corpus(str(bad)).documents())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt or .jsonl"):
        load_corpus(str(tmp_path / "empty"))


def test_text_file_corpus_reads_paragraph_chunks(tmp_path):
    (tmp_path / "a.txt").write_text("the park\nand the store\n\nMary went to the park\n")
    docs = list(load_corpus(str(tmp_path / "a.txt")).documents())
    assert [doc.text for doc in docs] == ["the park and the store\n\nMary went to the park"]
