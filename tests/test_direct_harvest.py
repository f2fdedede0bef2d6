"""Harvesting without the bridge's overhead (circuits.direct_harvest, circuits.harvest.collect_activations): the
same activations as the bridge's run_with_cache for every family, stopping after the last hook (no later block,
no unembedding), falling back to the bridge where the plain view cannot stand in for it; autocast; the
benchmark's FLOP share."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from circuits.direct_harvest import collect_direct, plain_view
from circuits.harvest import collect_activations, harvest_activations, host_copies

FAMILIES = ["llama", "gpt2", "gemma3"]
RESIDUAL = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.3.hook_resid_post"]
OTHER = [["blocks.3.hook_mlp_out"], ["blocks.1.hook_attn_out", "blocks.3.hook_resid_post"],
         ["hook_embed", "blocks.2.attn.hook_pattern", "blocks.0.hook_resid_mid"]]


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return request.getfixturevalue({"llama": "tiny_llama", "gpt2": "tiny_gpt2", "gemma3": "tiny_gemma"}[request.param])


def _tokens(n: int = 3, ctx: int = 12, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(3, 60, (n, ctx), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 1  # BOS
    return tokens


def _bridge_cache(model, tokens, hooks):
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=list(hooks))
    return {hook: cache[hook] for hook in hooks}


def _max_difference(ours: dict, reference: dict) -> float:
    assert ours.keys() == reference.keys()
    return max(float((ours[hook] - reference[hook]).abs().max()) for hook in reference)


def _calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("hooks", [RESIDUAL, ["blocks.1.hook_resid_post"], ["blocks.3.hook_resid_post"],
                                   ["blocks.2.hook_resid_pre"]], ids=["all", "1-post", "last-post", "2-pre"])
def test_the_plain_view_gives_the_bridges_residual_stream(family_model, hooks):
    """Bit-identical for rotary-attention families (Llama, Gemma-3); GPT-2, whose fused-QKV attention the bridge
    computes ~1e-8 apart from HF, stays on the bridge (exact by construction)."""
    tokens = _tokens()
    with torch.inference_mode():
        direct = collect_direct(family_model, tokens, hooks)
        ours = collect_activations(family_model, tokens, hooks)
    reference = _bridge_cache(family_model, tokens, hooks)
    if family_model.cfg.gated_mlp:  # Llama and Gemma-3 (rotary attention); GPT-2 is not gated
        assert direct is not None, "the plain view should serve block-boundary residual hooks"
        assert _max_difference(direct, reference) == 0.0
    else:
        assert direct is None
    assert _max_difference(ours, reference) == 0.0
    for hook, value in ours.items():
        assert value.shape == (3, 12, family_model.cfg.d_model), hook


@pytest.mark.parametrize("hooks", OTHER, ids=["mlp_out", "attn_out+resid", "embed+pattern+mid"])
def test_other_hooks_fall_back_to_the_bridge_with_the_same_values(family_model, hooks):
    tokens = _tokens()
    assert collect_direct(family_model, tokens, hooks) is None
    with torch.inference_mode():
        ours = collect_activations(family_model, tokens, hooks)
    assert _max_difference(ours, _bridge_cache(family_model, tokens, hooks)) == 0.0


def test_the_plain_view_stops_after_the_deepest_hook(tiny_llama):
    view = plain_view(tiny_llama)
    later_block, unembedding, final_norm = _calls(view.layers[3]), _calls(view.root.lm_head), _calls(view.root.model.norm)
    with torch.inference_mode():
        collect_activations(tiny_llama, _tokens(), ["blocks.2.hook_resid_post"])
        assert not later_block
        collect_activations(tiny_llama, _tokens(), ["blocks.3.hook_resid_post"])  # the last block: still no unembedding
    assert len(later_block) == 1 and not unembedding and not final_norm


def test_the_bridge_fallback_stops_before_the_unembedding_for_a_last_block_hook(tiny_llama):
    """run_with_cache(stop_at_layer=None) ran the final norm and the unembedding for a hook in the last block."""
    unembedded = []
    with tiny_llama.hooks(fwd_hooks=[("unembed.hook_out", lambda value, hook: unembedded.append(1))]):
        with torch.inference_mode():
            values = collect_activations(tiny_llama, _tokens(), ["blocks.3.hook_mlp_out", "blocks.3.hook_resid_post"])
    assert not unembedded and set(values) == {"blocks.3.hook_mlp_out", "blocks.3.hook_resid_post"}


def test_hooks_attached_to_the_bridge_are_honoured(tiny_llama):
    """A hook the caller attached (e.g. a splice) changes the activations; the plain view would skip it, so the
    harvest runs through the bridge then."""
    hooks = ["blocks.2.hook_resid_post"]
    edit = [("blocks.0.hook_resid_post", lambda value, hook: value * 2)]
    tokens = _tokens()
    with tiny_llama.hooks(fwd_hooks=edit), torch.inference_mode():
        assert collect_direct(tiny_llama, tokens, hooks) is None
        edited = collect_activations(tiny_llama, tokens, hooks)
        _, cache = tiny_llama.run_with_cache(tokens, names_filter=hooks)
    assert torch.equal(edited[hooks[0]], cache[hooks[0]])
    clean = collect_activations(tiny_llama, tokens, hooks)
    assert not torch.allclose(clean[hooks[0]], edited[hooks[0]])


def test_the_plain_view_shares_the_bridges_parameters(tiny_llama_folder):
    from circuits.models import load_model

    model = load_model(str(tiny_llama_folder), device="cpu")  # its own copy: a weight is edited
    tokens, hooks = _tokens(), ["blocks.1.hook_resid_post"]
    before = collect_direct(model, tokens, hooks)[hooks[0]]
    with torch.no_grad():
        model.blocks[0].mlp.original_component.down_proj.weight.mul_(3.0)  # an in-place edit through the bridge
    reference = _bridge_cache(model, tokens, hooks)  # (transformers adds its own output-capturing hooks on a first run)
    hooks_on_the_bridge_tree = sum(len(module._forward_hooks) + len(module._forward_pre_hooks)
                                   for module in model.original_model.modules())
    after = collect_direct(model, tokens, hooks)
    assert not torch.allclose(before, after[hooks[0]])
    assert _max_difference(after, reference) <= 1e-5
    # the view's modules have their own hook tables: the recording hooks never reach the bridge's tree
    assert hooks_on_the_bridge_tree == sum(len(module._forward_hooks) + len(module._forward_pre_hooks)
                                           for module in model.original_model.modules())


def test_bf16_autocast_is_close_to_float32(tiny_llama):
    tokens, hooks = _tokens(n=4, ctx=16), ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    with torch.inference_mode():
        exact = collect_activations(tiny_llama, tokens, hooks)
        mixed = collect_activations(tiny_llama, tokens, hooks, autocast="bf16")
    for hook in hooks:
        error = (mixed[hook].float() - exact[hook]).norm() / exact[hook].norm()
        assert 0 < error < 2e-2, (hook, float(error))  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding


def test_unknown_autocast_is_refused_before_anything_is_written(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="autocast 'int8' is not one of off, bf16, fp16"):
        harvest_activations(tiny_llama, _tokens(), ["blocks.1.hook_resid_post"], tmp_path / "store", autocast="int8",
                            progress=False)
    assert not (tmp_path / "store").exists()


def test_harvest_with_autocast_records_it_and_stores_close_values(tiny_llama, tmp_path, text_corpus):
    from sae.activation_store import ActivationStore
    from sae.corpus import load_corpus
    from sparse_circuits.pipelines.train import TrainRequest, harvest_for_training

    hook = "blocks.1.hook_resid_post"
    corpus = load_corpus(str(text_corpus))
    exact = harvest_for_training(tiny_llama, corpus, TrainRequest(hooks=[hook], tokens=200, context_size=16,
                                                                  store_dtype="float32"), tmp_path / "f32", False)
    mixed = harvest_for_training(tiny_llama, corpus, TrainRequest(hooks=[hook], tokens=200, context_size=16,
                                                                  store_dtype="float32", harvest_autocast="bf16"),
                                 tmp_path / "bf16", False)
    assert "autocast" not in exact.manifest["metadata"] and mixed.manifest["metadata"]["autocast"] == "bf16"
    a = ActivationStore(tmp_path / "f32").read_shard(0, [hook])[hook]
    b = ActivationStore(tmp_path / "bf16").read_shard(0, [hook])[hook]
    assert a.shape == b.shape and 0 < float((a - b).norm() / a.norm()) < 2e-2


def test_host_copies_leave_cpu_tensors_alone():
    values = {"a": torch.ones(2, 3)}
    assert host_copies(values)["a"] is values["a"]


# --------------------------------------------------------------------------- the benchmark's ideal column


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "harvest_speed.py"
    spec = importlib.util.spec_from_file_location("harvest_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_share_of_smollm2(bench):
    """SmolLM2-135M: the unembedding is about a fifth of a forward; layers 20 and 29 need about 0.56 and 0.80."""
    cfg = SimpleNamespace(d_model=576, n_heads=9, d_head=64, n_key_value_heads=3, d_mlp=1536, d_vocab=49152,
                          n_layers=30, gated_mlp=True)
    block, unembed = bench.forward_flops_per_token(cfg, 128)
    assert block == 2 * 576 * 15 * 64 + 2 * 576 * 576 + 4 * 9 * 64 * 128 + 3 * 2 * 576 * 1536
    assert unembed / (30 * block + unembed) == pytest.approx(0.204, abs=1e-3)
    assert bench.flop_share(cfg, 20, 128) == pytest.approx(0.557, abs=1e-3)
    assert bench.flop_share(cfg, 29, 128) == pytest.approx(0.796, abs=1e-3)
    gpt2 = SimpleNamespace(d_model=768, n_heads=12, d_head=64, n_key_value_heads=None, d_mlp=3072, d_vocab=50257,
                           n_layers=12, gated_mlp=False)
    block, _ = bench.forward_flops_per_token(gpt2, 1024)
    assert block == 2 * 768 * 36 * 64 + 2 * 768 * 768 + 4 * 12 * 64 * 1024 + 2 * 2 * 768 * 3072


# --------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_real_model_plain_view_equals_the_bridge(real_model):
    from sae.corpus import load_corpus, tokenize_contexts

    tokens = tokenize_contexts(load_corpus("registry"), real_model.tokenizer, 64, 2, seed=1)
    hooks = ["blocks.5.hook_resid_post", "blocks.12.hook_resid_pre", "blocks.29.hook_resid_post"]
    with torch.inference_mode():
        direct = collect_direct(real_model, tokens, hooks)
        mixed = collect_activations(real_model, tokens, ["blocks.12.hook_resid_pre"], autocast="bf16")
    assert direct is not None
    assert _max_difference(direct, _bridge_cache(real_model, tokens, hooks)) <= 1e-5
    exact = direct["blocks.12.hook_resid_pre"][:, 1:]  # without BOS, whose massive activation dominates norms
    error = (mixed["blocks.12.hook_resid_pre"][:, 1:].float() - exact).norm() / exact.norm()
    assert error < 5e-2, float(error)
