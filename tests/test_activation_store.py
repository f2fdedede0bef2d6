"""Harvesting into the on-disk store and reading it back (tiny random models, no download)."""

import json

import pytest
import torch

from circuits.harvest import harvest_activations
from circuits.hooks import stop_layer as stop_layer_for, validate_hooks
from sae.activation_store import ActivationStore, StoreError


def _contexts(n=12, ctx=8, vocab=40, seed=0):
    tokens = torch.randint(3, vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 1
    tokens[:, 1] = torch.arange(3, 3 + n)  # distinct prefixes: every stored activation row is distinct
    return tokens


def test_harvest_matches_a_plain_forward(tiny_model, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    contexts = _contexts()
    store = harvest_activations(tiny_model, contexts, hooks, tmp_path, dtype="float32", batch_size=5,
                                contexts_per_shard=4, progress=False)
    assert store.complete and len(store.shards) == 3
    _, cache = tiny_model.run_with_cache(contexts, names_filter=hooks)
    for hook in hooks:
        expected = cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1])  # BOS excluded
        stored = torch.cat([store.read_shard(i, [hook])[hook] for i in range(3)])
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
    assert store.n_tokens == 12 * 7


def test_stop_layer_skips_blocks_above_the_deepest_hook():
    assert stop_layer_for(["blocks.1.hook_resid_post", "blocks.3.hook_resid_pre"], 30) == 4
    assert stop_layer_for(["blocks.29.hook_resid_post"], 30) is None
    assert stop_layer_for(["ln_final.hook_normalized"], 30) is None


def test_unknown_hook_lists_close_names(tiny_llama):
    with pytest.raises(ValueError, match="blocks.1.hook_resid_post"):
        validate_hooks(tiny_llama, ["blocks.1.hook_resid_pots"])


def test_resume_after_interruption_gives_the_same_store(tiny_llama, tmp_path):
    hooks = ["blocks.1.hook_resid_post"]
    contexts = _contexts(n=10)
    full = harvest_activations(tiny_llama, contexts, hooks, tmp_path / "full", contexts_per_shard=3, progress=False)
    # First 2 shards only (as if killed), then resume with the full request.
    harvest_activations(tiny_llama, contexts[:6], hooks, tmp_path / "part", contexts_per_shard=3, progress=False)
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    manifest["complete"] = False
    manifest["n_contexts_requested"] = 10  # a harvest of all 10, killed after 6
    (tmp_path / "part" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "part" / ".shard_00002.safetensors.tmp").write_bytes(b"half-written")
    resumed = harvest_activations(tiny_llama, contexts, hooks, tmp_path / "part", contexts_per_shard=3, progress=False)
    assert [s["n_contexts"] for s in resumed.shards] == [3, 3, 3, 1]
    for i in range(4):
        assert torch.equal(full.read_shard(i, hooks)[hooks[0]], resumed.read_shard(i, hooks)[hooks[0]])
    assert not list((tmp_path / "part").glob(".shard_*"))


def test_store_with_other_settings_is_refused(tiny_llama, tmp_path):
    contexts = _contexts(n=4)
    harvest_activations(tiny_llama, contexts, ["blocks.1.hook_resid_post"], tmp_path, progress=False)
    with pytest.raises(StoreError, match="already holds an activation store made with other settings: hooks"):
        harvest_activations(tiny_llama, contexts, ["blocks.2.hook_resid_post"], tmp_path, progress=False)


def test_a_store_of_another_token_budget_or_corpus_is_refused_not_reused(tiny_llama, tmp_path):
    """A complete store of 8 contexts never silently serves a request for 4 (training sizes itself from the
    store, so `train --tokens 20000` after 40000 would return the old dictionary), nor is extended with other text."""
    hooks = ["blocks.1.hook_resid_post"]
    harvest_activations(tiny_llama, _contexts(n=8), hooks, tmp_path, metadata={"corpus": "a", "seed": 0},
                        progress=False)
    with pytest.raises(StoreError, match=r"context count \(from --tokens\) 8, not 4\. Use another folder"):
        harvest_activations(tiny_llama, _contexts(n=4), hooks, tmp_path, metadata={"corpus": "a", "seed": 0},
                            progress=False)
    with pytest.raises(StoreError, match=r"corpus and seed \{'corpus': 'a', 'seed': 0\}, not \{'corpus': 'b'"):
        harvest_activations(tiny_llama, _contexts(n=8), hooks, tmp_path, metadata={"corpus": "b", "seed": 0},
                            progress=False)
    again = harvest_activations(tiny_llama, _contexts(n=8), hooks, tmp_path, metadata={"corpus": "a", "seed": 0},
                                progress=False)
    assert again.complete and sum(shard["n_contexts"] for shard in again.shards) == 8


@pytest.mark.parametrize("budget", [1 << 30, 1])  # whole store in memory / one shard at a time
def test_batches_are_deterministic_and_resume_exactly(tiny_llama, tmp_path, budget):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    harvest_activations(tiny_llama, _contexts(n=16), hooks, tmp_path, dtype="float32", contexts_per_shard=4,
                        progress=False)
    store = ActivationStore(tmp_path, memory_budget_bytes=budget)
    stream = store.batches(hooks, batch_size=10, seed=3)
    first = [next(stream) for _ in range(25)]  # crosses an epoch boundary
    resumed = store.batches(hooks, batch_size=10, seed=3, start_batch=17)
    for expected in first[17:]:
        got = next(resumed)
        assert all(torch.equal(got[h], expected[h]) for h in hooks)
    # One epoch visits every token exactly once (up to the dropped remainder per block).
    per_epoch = store.n_tokens // 10 if budget > 1 else sum(s["n_tokens"] // 10 for s in store.shards)
    seen = torch.cat([b[hooks[0]] for b in first[:per_epoch]])
    assert torch.unique(seen, dim=0).shape[0] == seen.shape[0]
    # Rows of different hooks stay aligned (the same token positions).
    all_tokens = torch.cat([store.read_shard(i, hooks)[hooks[0]] for i in range(len(store.shards))])
    assert all((all_tokens == row).all(-1).any() for row in first[0][hooks[0]])
    different_seed = next(store.batches(hooks, batch_size=10, seed=4))
    assert not torch.equal(different_seed[hooks[0]], first[0][hooks[0]])


def test_damaged_shard_is_a_clear_error(tiny_llama, tmp_path):
    store = harvest_activations(tiny_llama, _contexts(n=4), ["blocks.1.hook_resid_post"], tmp_path, progress=False)
    path = tmp_path / store.shards[0]["file"]
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(StoreError, match="unreadable"):
        store.read_shard(0, ["blocks.1.hook_resid_post"])


def test_a_complete_store_serves_a_subset_of_its_hooks(tiny_llama, tmp_path):
    """One harvest at several hooks is reused by a later request for fewer of them, without a forward;
    different contexts or settings are still refused."""
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    contexts = _contexts(n=6)
    harvest_activations(tiny_llama, contexts, hooks, tmp_path, dtype="float32", progress=False,
                        metadata={"seed": 0})
    before = sorted(path.stat().st_mtime_ns for path in tmp_path.glob("shard_*"))
    subset = harvest_activations(tiny_llama, contexts, hooks[1:], tmp_path, dtype="float32", progress=False,
                                 metadata={"seed": 0})
    assert sorted(path.stat().st_mtime_ns for path in tmp_path.glob("shard_*")) == before
    assert subset.hooks == hooks and subset.d_in(hooks[1]) == tiny_llama.cfg.d_model
    with pytest.raises(StoreError, match="already holds an activation store made with other settings"):
        harvest_activations(tiny_llama, contexts, hooks[1:], tmp_path, dtype="float16", progress=False,
                            metadata={"seed": 0})
    with pytest.raises(StoreError, match="already holds an activation store made with other settings"):
        harvest_activations(tiny_llama, contexts, hooks[1:], tmp_path, dtype="float32", progress=False,
                            metadata={"seed": 1})
