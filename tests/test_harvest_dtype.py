"""A store dtype that cannot hold the activations fails naming the value and the dtype that can (Gemma-3's
residual stream passes float16's 65,504), instead of a generic NaN/inf error."""

import pytest
import torch

from circuits.harvest import harvest_activations
from circuits.models import load_model
from sae.activation_store import ActivationStore, StoreError

HOOK = "blocks.1.hook_resid_post"


def test_float16_overflow_names_the_fix_and_bfloat16_holds_it(tiny_llama_folder, tmp_path):
    model = load_model(str(tiny_llama_folder), device="cpu")  # its own copy: the embeddings are scaled up
    with torch.no_grad():
        embedding = model.embed.W_E if hasattr(model.embed, "W_E") else model.embed.weight
        embedding.mul_(1e6 / embedding.abs().max())  # residuals of ~1e6, as in no float16 store
    contexts = torch.randint(3, 60, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(StoreError, match=r"beyond float16's largest value 65,504.*--store-dtype bfloat16"):
        harvest_activations(model, contexts, [HOOK], tmp_path / "f16", dtype="float16", progress=False)
    assert not list((tmp_path / "f16").glob("shard_*"))  # nothing half-written
    store = harvest_activations(model, contexts, [HOOK], tmp_path / "bf16", dtype="bfloat16", progress=False)
    stored = ActivationStore(tmp_path / "bf16").read_shard(0, [HOOK])[HOOK]
    assert torch.isfinite(stored).all() and stored.abs().max() > 65_504
    assert store.n_tokens == 4 * 7
