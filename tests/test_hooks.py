"""The hook-name module: parsing, order, stop layers, replay starts, validation."""

import pytest

from circuits.hooks import (hook_order, hook_width, layer_of_hook, parse_hook, resume_block, sorted_hooks, stop_layer,
                            validate_hooks)


def test_parse_and_layer():
    assert parse_hook("blocks.12.hook_resid_post") == (12, "hook_resid_post")
    assert parse_hook("blocks.3.attn.hook_pattern") == (3, "attn.hook_pattern")
    assert parse_hook("ln_final.hook_scale") == (None, "ln_final.hook_scale")
    assert layer_of_hook("blocks.7.hook_mlp_out") == 7 and layer_of_hook("hook_embed") is None
    with pytest.raises(ValueError, match="non-empty"):
        parse_hook("")


def test_order_within_and_across_blocks():
    names = ["blocks.2.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid",
             "blocks.1.hook_attn_out", "blocks.1.hook_resid_pre"]
    assert sorted_hooks(names) == list(reversed(names))
    assert hook_order("blocks.1.hook_resid_post") < hook_order("blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match="not inside a block"):
        hook_order("hook_embed")


def test_stop_layer_and_resume_block():
    assert stop_layer(["blocks.1.hook_resid_post", "blocks.3.hook_resid_pre"], 30) == 4
    assert stop_layer(["blocks.29.hook_resid_post"], 30) is None
    assert stop_layer(["ln_final.hook_scale"], 30) is None
    assert resume_block("blocks.3.hook_resid_post") == 4 and resume_block("blocks.3.hook_resid_pre") == 3
    assert resume_block("blocks.3.hook_mlp_out") is None


def test_validation_and_width(tiny_llama):
    validate_hooks(tiny_llama, ["blocks.1.hook_resid_post"])
    with pytest.raises(ValueError, match="close valid names: blocks.1.hook_resid_post"):
        validate_hooks(tiny_llama, ["blocks.1.hook_resid_pots"])
    with pytest.raises(ValueError, match="empty hook name"):
        validate_hooks(tiny_llama, [""])
    assert hook_width(tiny_llama, "blocks.1.hook_resid_post") == tiny_llama.cfg.d_model
    assert hook_width(tiny_llama, "blocks.1.attn.hook_pattern") is None
