"""Model loading: local folders, clear failures for bad specs."""

import pytest
import torch

from circuits.models import ModelLoadError, load_model, model_name_of


def test_local_folder_loads_as_a_bridge_matching_hf(tiny_llama_folder):
    from transformers import AutoModelForCausalLM

    bridge = load_model(str(tiny_llama_folder))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    tokens = torch.tensor([[1, 5, 9, 12, 7]])
    torch.testing.assert_close(bridge(tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)
    assert "blocks.3.hook_resid_post" in bridge.hook_dict
    assert model_name_of(bridge) == str(tiny_llama_folder)
    assert not any(p.requires_grad for p in bridge.parameters())


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_name_names_the_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model("no-such-org/no-such-model-xyz")


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="never loaded"):
        load_model(str(tmp_path))


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))

