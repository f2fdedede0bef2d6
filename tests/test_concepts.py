"""Binary concepts: validation, and the gender concept's splits, on the word-level tokenizer and the real one."""

from __future__ import annotations

import pytest

from conftest import WORDS, build_word_tokenizer
from tasks.concepts import (
    Concept,
    ConceptError,
    PRONOUN_TEMPLATES,
    concept_accuracy,
    gender_concept,
    target_token_ids,
    validate_concept,
)
from tasks.ioi.data import single_token_id


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


def concept(positive, negative, positive_token=" female", negative_token=" male") -> Concept:
    return Concept("gender", list(positive), list(negative), positive_token, negative_token)


def test_validation_explains_each_problem(tokenizer):
    assert validate_concept(concept(["a"], ["b"]), tokenizer) == target_token_ids(concept(["a"], ["b"]), tokenizer)
    with pytest.raises(ConceptError, match="no negative prompts"):
        validate_concept(concept(["a"], []), tokenizer)
    with pytest.raises(ConceptError, match="same token"):
        validate_concept(concept(["a"], ["b"], " male", " male"), tokenizer)
    with pytest.raises(ConceptError, match="unknown"):
        validate_concept(concept(["a"], ["b"], " zebra", " male"), tokenizer)
    with pytest.raises(ConceptError, match="12 positive vs 10 negative.*subsample both to 10"):
        validate_concept(concept(["a"] * 12, ["b"] * 10), tokenizer)
    validate_concept(concept(["a"] * 11, ["b"] * 10), tokenizer)  # within 10%


def test_gender_splits_are_disjoint_balanced_and_seeded(tokenizer):
    splits = gender_concept(tokenizer, seed=0)
    train, test, transfer = splits
    assert not train.subjects & test.subjects
    assert transfer.subjects == test.subjects
    assert set(train.positive_subjects) | set(test.positive_subjects) <= set(WORDS)
    for part, per_subject in zip(splits, (2, 2, len(PRONOUN_TEMPLATES))):
        assert len(part.positive_prompts) == per_subject * len(part.positive_subjects)
        assert len(part.positive_subjects) == len(part.negative_subjects)
        validate_concept(part, tokenizer)
    assert (train.positive_token, train.negative_token) == (" female", " male")
    assert (transfer.positive_token, transfer.negative_token) == (" she", " he")
    assert gender_concept(tokenizer, seed=0) == splits
    assert gender_concept(tokenizer, seed=1) != splits


def test_gender_prompts_hide_the_answer_position(tokenizer):
    train = gender_concept(tokenizer, seed=0).train
    for prompts, subjects in ((train.positive_prompts, train.positive_subjects),
                              (train.negative_prompts, train.negative_subjects)):
        last_answers = [prompt.rsplit(".", 2)[-2].split()[-1] for prompt in prompts]
        assert last_answers.count("female") == last_answers.count("male")  # the nearest example is either
        for prompt in prompts:
            assert prompt.endswith(" and I am a")
            assert prompt.count("female") == prompt.count(" male") == 2
            assert prompt.split("My name is ")[-1].split(" ")[0] in subjects


def test_too_few_names_is_explained(tokenizer):
    with pytest.raises(ConceptError, match="female and .* male single-token names.*Lower n_names_per_side"):
        gender_concept(tokenizer, n_names_per_side=50)
    small = gender_concept(tokenizer, n_names_per_side=2)
    assert len(small.train.positive_subjects) == len(small.test.positive_subjects) == 1


def test_accuracy_runs_on_a_tiny_model(tiny_llama):
    test = gender_concept(tiny_llama.tokenizer).test
    assert 0.0 <= concept_accuracy(tiny_llama, test, batch_size=3) <= 1.0


@pytest.mark.integration
def test_real_names_are_single_tokens_and_model_knows_gender(real_model):
    tokenizer = real_model.tokenizer
    splits = gender_concept(tokenizer, seed=0)
    for name in splits.train.subjects | splits.test.subjects:
        assert single_token_id(tokenizer, name) is not None
    assert len(splits.train.subjects) >= 40
    accuracies = {part.split: concept_accuracy(real_model, part) for part in splits}
    print(accuracies)
    assert accuracies["test"] > 0.75 and accuracies["transfer"] > 0.75
