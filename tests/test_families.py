"""Per model family (Llama, GPT-2, Gemma-3; tiny random models through the bridge): the direct logit
effect of a residual direction, and the set of hooks direct tracing detaches, against hand computations."""

from __future__ import annotations

import re

import pytest
import torch

from circuits.features import final_norm_linear
from circuits.tracing.scoring import direct_effect_hooks

FAMILIES = ["llama", "gpt2", "gemma3"]
EPSILON = 1e-3
# Editing a norm's hook_scale makes the bridge rebuild the norm's output from the hooked values (expected here).
EDITED_SCALE = pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")


@pytest.fixture(params=FAMILIES)
def family_model(request):
    fixture = {"llama": "tiny_llama", "gpt2": "tiny_gpt2", "gemma3": "tiny_gemma"}[request.param]
    return request.getfixturevalue(fixture)


def _final_scale_hook(model) -> str:
    scales = [h for h in model.hook_dict if h.startswith("ln_final") and h.endswith("hook_scale")]
    assert len(scales) == 1, scales
    return scales[0]


def _tokens(model):
    return model.tokenizer("Mary and John went to the store . John gave a ball to", return_tensors="pt").input_ids


@torch.no_grad()
def _hand_logit_change(model, direction: torch.Tensor) -> torch.Tensor:
    """The last position's logit change when EPSILON * direction is added to the residual just before
    the final norm, with the final norm's scale frozen at its clean value (divided by EPSILON)."""
    tokens = _tokens(model)
    scale_hook = _final_scale_hook(model)
    resid_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    clean_scale = {}

    def record(value, hook):
        clean_scale["value"] = value.detach().clone()
        return value

    def add(value, hook):
        value = value.clone()
        value[:, -1] += EPSILON * direction.to(value)
        return value

    def freeze(value, hook):
        return clean_scale["value"]

    clean = model.run_with_hooks(tokens, fwd_hooks=[(scale_hook, record)])
    edited = model.run_with_hooks(tokens, fwd_hooks=[(resid_hook, add), (scale_hook, freeze)])
    return (edited[0, -1] - clean[0, -1]).double() / EPSILON


def _predicted_logit_change(model, direction: torch.Tensor) -> torch.Tensor:
    return (final_norm_linear(model, direction.float()) @ model.W_U.detach().float()).double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@EDITED_SCALE
def test_frozen_final_scale_is_used_by_the_forward(family_model):
    """The hand computation freezes the final norm's scale through its hook; that only means something
    if the forward uses the hook's value (doubling it must change the logits)."""
    model = family_model
    tokens = _tokens(model)
    with torch.no_grad():
        clean = model(tokens)
        doubled = model.run_with_hooks(tokens, fwd_hooks=[(_final_scale_hook(model), lambda v, hook: 2 * v)])
    assert not torch.allclose(clean, doubled, atol=1e-4)


@EDITED_SCALE
def test_direct_logit_effect_matches_a_frozen_scale_forward(family_model):
    model = family_model
    generator = torch.Generator().manual_seed(1)
    weight = model.ln_final.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():  # a non-trivial final norm weight (random init is all ones or all zeros)
            weight.copy_(saved + torch.randn(saved.shape, generator=generator).to(saved))
        for _ in range(3):
            direction = torch.randn(model.cfg.d_model, generator=generator)
            hand = _hand_logit_change(model, direction)
            cosine = _cosine(_predicted_logit_change(model, direction), hand)
            assert cosine > 0.999, cosine
            if getattr(model.cfg, "rmsnorm_uses_offset", False):  # Gemma: x / rms * (1 + weight)
                plain = (direction * weight.detach().float()) @ model.W_U.detach().float()
                assert _cosine(plain.double(), hand) < 0.99, "the norm's 1 + weight offset made no difference"
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _layer(name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("first, last, include_final", [(0, 3, True), (1, 2, False), (2, 3, True), (3, 3, False)])
def test_direct_effect_hooks_are_every_pattern_and_norm_scale(family_model, first, last, include_final):
    model = family_model
    expected = set()
    for name in model.hook_dict:
        if not name.endswith(("hook_pattern", "hook_scale")):
            continue
        layer = _layer(name)
        if layer is not None and first <= layer <= last:
            expected.add(name)
        elif layer is None and include_final:
            expected.add(name)
    chosen = direct_effect_hooks(model, first, last, include_final)
    assert len(chosen) == len(set(chosen))
    assert set(chosen) == expected
    assert ("ln_final.hook_scale" in chosen) == include_final
    for layer in range(first, last + 1):  # every block contributes its pattern and its pre-norm scales
        assert f"blocks.{layer}.attn.hook_pattern" in chosen
        assert f"blocks.{layer}.ln1.hook_scale" in chosen
        assert f"blocks.{layer}.ln2.hook_scale" in chosen
    if any(".q_norm." in name for name in model.hook_dict):  # Gemma-3: q/k norms and the post-norms
        for layer in range(first, last + 1):
            for norm in ("attn.q_norm", "attn.k_norm", "ln1_post", "ln2_post"):
                assert f"blocks.{layer}.{norm}.hook_scale" in chosen


def test_final_position_logits_equal_the_full_forward(family_model):
    """The engine's bounded-memory logits (forward stopped after the last block, only the final positions
    normed and unembedded) equal the full forward's at those positions, with a hook edit applied too."""
    from circuits.engine import final_position_logits

    model = family_model
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(5))
    final = torch.tensor([8, 4, 1])
    rows = torch.arange(3)

    def halve(activation, hook=None):
        return activation * 0.5

    edit = [("blocks.1.hook_resid_post", halve)]
    with torch.no_grad():
        full = model.run_with_hooks(tokens, fwd_hooks=edit)[rows, final]
        bounded = final_position_logits(model, tokens, final, edit)
        unedited = final_position_logits(model, tokens, final)
    assert bounded.shape == (3, model.cfg.d_vocab)
    assert torch.allclose(bounded, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unedited, bounded, atol=1e-3)  # the edit mattered
