"""Binary concepts: validation, and the gender concept's splits, on the word-level tokenizer and the real one."""

from __future__ import annotations

import pytest
import torch

from conftest import WORDS, build_word_tokenizer
from tasks.erasure import (
    PRONOUN_TEMPLATES,
    Concept,
    ConceptError,
    concept_accuracy,
    concept_logit_diffs,
    gender_concept,
    target_token_ids,
    tokenize_prompts,
    validate_concept,
)
from tasks.ioi import single_token_id


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


def test_accuracy_counts_the_prompts_whose_own_token_wins(tiny_llama):
    """Batched, right-padded accuracy equals a prompt-by-prompt count of logit[own token] > logit[other token]."""
    tokenizer = tiny_llama.tokenizer
    # prompts of different lengths and endings, so the two target logits do not order every prompt alike
    prompts = [" ".join(WORDS[(7 * index) % 40 : (7 * index) % 40 + 1 + index % 5]) for index in range(16)]
    final_logits = torch.stack([tiny_llama(tokenize_prompts(tokenizer, [prompt])[0])[0, -1] for prompt in prompts])
    checked = 0  # one prompt at a time above: no padding, the last position is the prompt's end
    for positive_token, negative_token in [(" girl", " boy"), (" she", " he"), (" woman", " man"), (" her", " his")]:
        concept = Concept("gender", prompts[:8], prompts[8:], positive_token, negative_token)
        positive_id, negative_id = target_token_ids(concept, tokenizer)
        labels = concept.prompts_and_labels()[1]
        expected = final_logits[:, positive_id] - final_logits[:, negative_id]
        wins = (expected > 0).long() == labels
        if wins.float().mean() == 0.5:  # swapped labels or signs would give the same accuracy: not a check
            continue
        diffs, got_labels = concept_logit_diffs(tiny_llama, concept, batch_size=3)
        assert torch.equal(got_labels, labels)
        assert torch.allclose(diffs, expected, atol=1e-4)
        assert concept_accuracy(tiny_llama, concept, batch_size=3) == pytest.approx(wins.float().mean().item())
        checked += 1
    assert checked > 0, "every target pair splits the prompts evenly on this tiny model; the test checks nothing"


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
