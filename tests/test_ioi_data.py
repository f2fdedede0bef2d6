"""IOI prompt generation, tokenisation and the IOI metric, on the word-level tokenizer and tiny models."""

from __future__ import annotations

import pytest
import torch

from tasks.ioi.data import (
    IOIDataError,
    TEMPLATES,
    generate_ioi_prompts,
    ioi_performance,
    single_token_id,
    tokenize_ioi,
)
from conftest import WORDS, build_word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


def test_built_in_words_are_filtered_to_the_tokenizer(tokenizer):
    prompts = generate_ioi_prompts(tokenizer, 40)
    used = {name for prompt in prompts for name in (prompt.io_name, prompt.s_name, prompt.cf_name)}
    assert used <= set(WORDS)  # unknown words (<unk>) are not single tokens
    assert single_token_id(tokenizer, " Mary") == single_token_id(tokenizer, "Mary") is not None
    assert single_token_id(tokenizer, "Bartholomew") is None


def test_seeded_generation_is_reproducible(tokenizer):
    assert generate_ioi_prompts(tokenizer, 20, seed=3) == generate_ioi_prompts(tokenizer, 20, seed=3)
    assert generate_ioi_prompts(tokenizer, 20, seed=3) != generate_ioi_prompts(tokenizer, 20, seed=4)


def test_orders_balanced_and_names_distinct(tokenizer):
    prompts = generate_ioi_prompts(tokenizer, 30)
    orders = [prompt.order for prompt in prompts]
    assert orders.count("ABBA") == orders.count("BABA") == 15
    assert {prompt.template_id for prompt in prompts} == set(range(len(TEMPLATES)))
    for prompt in prompts:
        assert len({prompt.io_name, prompt.s_name, prompt.cf_name}) == 3
        io_at = prompt.text.index(" " + prompt.io_name + " ")
        s_at = prompt.text.index(" " + prompt.s_name + " ")
        assert (io_at < s_at) == (prompt.order == "ABBA")
        assert prompt.text.count(" " + prompt.s_name + " ") == 2


def test_counterfactual_differs_only_at_io_positions(tokenizer):
    prompts = generate_ioi_prompts(tokenizer, 24, seed=1)
    batch = tokenize_ioi(tokenizer, prompts)
    assert batch.clean_tokens.shape == batch.counterfactual_tokens.shape
    differs = batch.clean_tokens != batch.counterfactual_tokens
    for row in range(len(batch)):
        assert differs[row].sum() == 1  # the IO name is mentioned once
        assert (batch.clean_tokens[row][differs[row]] == batch.io_tokens[row]).all()
        assert (batch.counterfactual_tokens[row][differs[row]] == batch.cf_tokens[row]).all()
    assert (batch.io_tokens != batch.s_tokens).all() and (batch.io_tokens != batch.cf_tokens).all()


def test_padding_bos_and_final_positions(tokenizer):
    prompts = generate_ioi_prompts(tokenizer, 10)  # templates of different lengths
    batch = tokenize_ioi(tokenizer, prompts)
    assert (batch.clean_tokens[:, 0] == tokenizer.bos_token_id).all()
    assert len(set(batch.final_positions.tolist())) > 1
    for row, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt.text, add_special_tokens=False)
        final = batch.final_positions[row].item()
        assert final == len(ids)  # BOS shifts by one
        assert batch.clean_tokens[row, 1 : final + 1].tolist() == ids
        assert (batch.clean_tokens[row, final + 1 :] == tokenizer.pad_token_id).all()
    assert batch.attention_mask.sum(dim=1).tolist() == (batch.final_positions + 1).tolist()
    no_bos = tokenize_ioi(tokenizer, prompts, prepend_bos=False)
    assert (no_bos.final_positions == batch.final_positions - 1).all()


def test_multi_token_names_are_rejected_and_listed(tokenizer):
    with pytest.raises(IOIDataError, match="Bartholomew.*Zebedee"):
        generate_ioi_prompts(tokenizer, 4, names=["Mary", "Bartholomew", "John", "Zebedee", "Tom"])
    with pytest.raises(IOIDataError, match="at least 3"):
        generate_ioi_prompts(tokenizer, 4, names=["Mary", "John"])
    prompts = generate_ioi_prompts(tokenizer, 4, names=[" Mary", " John", " Tom"])  # leading spaces are fine
    assert {prompts[0].io_name, prompts[0].s_name, prompts[0].cf_name} == {"Mary", "John", "Tom"}


@pytest.mark.parametrize("template, problem", [
    ("When {A} and {B} went to the {PLACE}, {A} gave a {OBJECT} to", "exactly once"),
    ("When {A} and {B} went to the {PLACE}, gave a {OBJECT} to", "{S}"),
    ("{A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to", "follow a space"),
    ("When {A} and {B} went to the {SHOP}, {S} gave a {OBJECT} to", "SHOP"),
])
def test_bad_templates_are_explained(tokenizer, template, problem):
    with pytest.raises(IOIDataError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        generate_ioi_prompts(tokenizer, 2, templates=[template])


def test_performance_on_tiny_models(tiny_llama, tiny_gpt2):
    for model in (tiny_llama, tiny_gpt2):
        batch = tokenize_ioi(model, generate_ioi_prompts(model.tokenizer, 8))
        result = ioi_performance(model, batch, batch_size=3)
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["top1_accuracy"] <= result["accuracy"] + 1e-9
        # recompute one prompt alone, unpadded: right padding must not change the final logits
        with torch.no_grad():
            final = batch.final_positions[0].item()
            logits = model(batch.clean_tokens[:1, : final + 1])[0, -1]
        expected = (logits[batch.io_tokens[0]] - logits[batch.s_tokens[0]]).item()
        with torch.no_grad():
            all_logits = model(batch.clean_tokens)
        diff = all_logits[0, final, batch.io_tokens[0]] - all_logits[0, final, batch.s_tokens[0]]
        assert diff.item() == pytest.approx(expected, abs=1e-4)
        assert result["n_prompts"] == 8


@pytest.mark.integration
def test_real_model_does_ioi(real_model):
    batch = tokenize_ioi(real_model, generate_ioi_prompts(real_model.tokenizer, 40, seed=0))
    result = ioi_performance(real_model, batch)
    print(result)
    assert result["accuracy"] >= 0.9
    assert result["mean_logit_diff"] > 2.0
