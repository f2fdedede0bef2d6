"""Splicing dictionaries into tiny models: exactness, feature edits, hook points, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from circuits.engine import SPLICE_HOOKS, splice_dictionaries, spliced

HOOK = "blocks.1.hook_resid_post"


def tokens_for(model, n: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, len(model.tokenizer), (n, length), generator=generator)
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


@torch.no_grad()
def test_splice_is_exact_and_exposes_hook_points(random_sae, tiny_model):
    tokens = tokens_for(tiny_model)
    clean = tiny_model(tokens)
    names = [f"{HOOK}.{name}" for name in SPLICE_HOOKS]
    with splice_dictionaries(tiny_model, {HOOK: random_sae()}) as splice:
        assert splice.hook_name(HOOK) == f"{HOOK}.hook_sae_acts_post"
        logits, cache = tiny_model.run_with_cache(tokens, names_filter=names)
        assert (logits - clean).abs().max().item() <= 1e-5
        assert set(names) <= set(cache.keys())
        assert cache[names[1]].shape == (3, 12, 64)
        assert (cache[names[1]][:, 0] == 0).all()  # BOS is never encoded
        assert (cache[names[1]][:, 1:] > 0).any()
        rebuilt = cache[f"{HOOK}.hook_sae_recons"] + cache[f"{HOOK}.hook_sae_error"]
        torch.testing.assert_close(rebuilt, cache[f"{HOOK}.hook_sae_input"], atol=1e-5, rtol=1e-5)
    assert f"{HOOK}.hook_sae_acts_post" not in tiny_model.hook_dict
    assert torch.equal(tiny_model(tokens), clean)


@torch.no_grad()
def test_editing_one_feature_moves_the_activation_along_its_decoder_direction(random_sae, tiny_llama):
    sae = random_sae()
    tokens = tokens_for(tiny_llama)
    _, base = tiny_llama.run_with_cache(tokens, names_filter=[HOOK])
    feature, position, delta = 5, 4, 2.5

    def bump(codes, hook):
        edited = codes.clone()
        edited[:, position, feature] += delta
        return edited

    with spliced(tiny_llama, [sae]):
        with tiny_llama.hooks(fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", bump)]):
            _, cache = tiny_llama.run_with_cache(tokens, names_filter=[f"{HOOK}.hook_sae_output"])
    change = cache[f"{HOOK}.hook_sae_output"] - base[HOOK]
    expected = torch.zeros_like(change)
    expected[:, position] = delta * sae.W_dec[feature]
    torch.testing.assert_close(change, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_error_term_carries_gradients_only_when_asked(random_sae, tiny_llama):
    tokens = tokens_for(tiny_llama, n=2)

    def gradients(error_gradients: bool | None):
        seen = {}

        def keep_error_grad(grad, hook):
            seen["error"] = grad.detach().clone()

        def keep_embed_grad(grad, hook):
            seen["embed"] = grad.detach().clone()

        def track(activation, hook):
            return activation.detach().requires_grad_(True)

        fwd = [("hook_embed", track)]
        bwd = [("hook_embed", keep_embed_grad)]
        splice = None
        if error_gradients is not None:
            splice = splice_dictionaries(tiny_llama, {HOOK: random_sae()}, error_gradients=error_gradients)
            bwd.append((f"{HOOK}.hook_sae_error", keep_error_grad))
        try:
            with tiny_llama.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                tiny_llama(tokens)[:, -1, 7].sum().backward()
        finally:
            if splice is not None:
                splice.remove()
        return seen

    plain = gradients(None)
    with_error = gradients(True)
    detached = gradients(False)
    assert "error" in with_error and with_error["error"].abs().sum() > 0
    torch.testing.assert_close(with_error["embed"], plain["embed"], atol=1e-5, rtol=1e-4)  # the true gradient
    assert "error" not in detached  # SAELens-style: no gradient reaches the error node
    assert not torch.allclose(detached["embed"], plain["embed"], atol=1e-5)


def test_persistent_splice_survives_reset_hooks_until_removed(random_sae, tiny_llama):
    tokens = tokens_for(tiny_llama, n=1)
    splice = splice_dictionaries(tiny_llama, {HOOK: random_sae()})
    try:
        tiny_llama.reset_hooks()  # removes temporary hooks only
        _, cache = tiny_llama.run_with_cache(tokens, names_filter=[f"{HOOK}.hook_sae_acts_post"])
        assert f"{HOOK}.hook_sae_acts_post" in cache
        with pytest.raises(ValueError, match="already"):
            splice_dictionaries(tiny_llama, {HOOK: random_sae(seed=1)})
    finally:
        splice.remove()
    splice.remove()  # idempotent
    assert not tiny_llama.hook_dict[HOOK].has_hooks()


def test_bad_width_or_hook_is_rejected_before_attaching(random_sae, tiny_llama):
    before = set(tiny_llama.hook_dict)
    with pytest.raises(ValueError, match="d_in=16"):
        splice_dictionaries(tiny_llama, {HOOK: random_sae(d_in=16, d_sae=32)})
    with pytest.raises(ValueError, match="unknown hook point"):
        splice_dictionaries(tiny_llama, {"blocks.9.hook_resid_post": random_sae()})
    with pytest.raises(ValueError, match="two dictionaries"):
        splice_dictionaries(tiny_llama, [random_sae(), random_sae(seed=1)])
    assert set(tiny_llama.hook_dict) == before
    assert not tiny_llama.hook_dict[HOOK].has_hooks()


@torch.no_grad()
def test_massive_activation_positions_are_passed_through_unedited(random_sae):
    """A position whose norm is far above its context's median gets no codes (like BOS): the error
    term carries it, so no feature edit can touch it; exclude_outliers=False encodes it."""
    from circuits.engine import SplicedDictionary

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=generator)
    x[1, 4] *= 40.0
    for exclude, expected in ((True, True), (False, False)):
        part = SplicedDictionary(random_sae(), HOOK, exclude_outliers=exclude)
        codes = part.codes_of(x)
        assert bool((codes[1, 4] == 0).all()) is expected
        assert (codes[1, 3] > 0).any() and (codes[0, 4] > 0).any()
        torch.testing.assert_close(part(x), x)
