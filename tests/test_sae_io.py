"""Saving and loading dictionary folders: round trips, SAELens folders, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.config import DictionaryConfig
from sae.io import (CONFIG_FILE, WEIGHTS_FILE, DictionaryFileError, load_dictionaries, load_dictionary,
                    save_dictionary)
from sae.registry import build_dictionary
from sae.relu import ReluSAE
from sae.topk import TopKSAE

D_IN, D_SAE = 12, 40
HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def trained_looking(architecture="standard", tied=False, hook=HOOK, seed=0) -> ReluSAE:
    cfg = DictionaryConfig(architecture, D_IN, D_SAE, hook_name=hook, model_name="tiny", tied=tied, k=5,
                           l1_coefficient=0.01, activation_scale=1.7, seed=seed)
    sae = build_dictionary(cfg)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return sae


@pytest.mark.parametrize("architecture,tied", [("standard", False), ("standard", True), ("topk", False)])
def test_round_trip_is_bit_exact(tmp_path, architecture, tied):
    sae = trained_looking(architecture, tied)
    save_dictionary(sae, tmp_path / "sae")
    stored = load_file(tmp_path / "sae" / WEIGHTS_FILE)
    assert sorted(stored) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert all(tensor.dtype == torch.float32 for tensor in stored.values())
    assert torch.equal(stored["W_enc"], sae.W_enc.detach())
    loaded = load_dictionary(tmp_path / "sae", expected_d_in=D_IN)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for name, parameter in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], parameter)
    if tied:
        assert loaded.W_enc.data_ptr() == loaded.W_dec.data_ptr()
    x = torch.randn(9, D_IN)
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)
        assert torch.equal(loaded(x).codes, sae(x).codes)
    assert sorted(path.name for path in (tmp_path / "sae").iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dictionary(tmp_path / "nowhere")
    folder = save_dictionary(trained_looking(), tmp_path / "sae")
    (folder / CONFIG_FILE).rename(tmp_path / "cfg.json.bak")
    with pytest.raises(DictionaryFileError, match=f"no {CONFIG_FILE}"):
        load_dictionary(folder)
    (tmp_path / "cfg.json.bak").rename(folder / CONFIG_FILE)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS_FILE}"):
        load_dictionary(folder)


def test_bad_config_is_reported(tmp_path):
    folder = save_dictionary(trained_looking(), tmp_path / "sae")
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dictionary(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"architecture": "standard", "d_in": D_IN}))
    with pytest.raises(ValueError, match="d_sae"):
        load_dictionary(folder)


def test_shape_mismatch_names_the_tensor_and_shapes(tmp_path):
    folder = save_dictionary(trained_looking(), tmp_path / "sae")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["d_sae"] = D_SAE + 1
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(DictionaryFileError, match=rf"W_enc has shape \[{D_IN}, {D_SAE}\].*needs \[{D_IN}, {D_SAE + 1}\]"):
        load_dictionary(folder)


def test_width_mismatch_names_hook_widths_and_remedy(tmp_path):
    folder = save_dictionary(trained_looking(), tmp_path / "sae")
    with pytest.raises(ValueError) as caught:
        load_dictionary(folder, expected_d_in=D_IN * 2)
    message = str(caught.value)
    assert HOOK in message and f"d_in={D_IN}" in message and f"width {D_IN * 2}" in message
    assert "train" in message


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage", "empty"])
def test_broken_weight_files_raise_a_clear_error(tmp_path, damage):
    folder = save_dictionary(trained_looking(), tmp_path / "sae")
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    damaged = {"truncate_data": data[: len(data) - 100], "truncate_header": data[:40],
               "garbage": b"\x13\x00\x00\x00\x00\x00\x00\x00this is not json at all....",
               "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(DictionaryFileError, match="is truncated or not a safetensors file.*re-save or re-download"):
        load_dictionary(folder)


# --- SAELens folders, written by hand -----------------------------------------------------------


def write_saelens_folder(folder: Path, cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D_IN, D_SAE, generator=generator) * 0.4,
               "b_enc": torch.randn(D_SAE, generator=generator) * 0.2,
               "W_dec": torch.randn(D_SAE, D_IN, generator=generator) * 0.4,
               "b_dec": torch.randn(D_IN, generator=generator) * 0.2}
    folder.mkdir(parents=True)
    save_file(weights, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    return weights


SAELENS_V5 = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "hook_name": HOOK, "hook_layer": 2,
              "hook_head_index": None, "model_name": "gpt2", "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": True, "activation_fn_str": "relu", "activation_fn_kwargs": {},
              "finetuning_scaling_factor": False, "context_size": 128, "dataset_path": "x",
              "prepend_bos": True, "normalize_activations": "none", "sae_lens_training_version": "5.1.0"}
SAELENS_V6 = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
              "metadata": {"hook_name": HOOK, "model_name": "gpt2", "sae_lens_version": "6.0.0",
                           "prepend_bos": True, "context_size": 128}}
SAELENS_V5_TOPK = {**SAELENS_V5, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}}
SAELENS_V6_TOPK = {**SAELENS_V6, "architecture": "topk", "k": 4, "apply_b_dec_to_input": True}


@pytest.mark.parametrize("cfg", [SAELENS_V5, SAELENS_V6, SAELENS_V5_TOPK, SAELENS_V6_TOPK],
                         ids=["v5", "v6", "v5-topk", "v6-topk"])
def test_saelens_folders_load_and_match_the_formula(tmp_path, cfg):
    weights = write_saelens_folder(tmp_path / "saelens", cfg)
    sae = load_dictionary(tmp_path / "saelens", expected_d_in=D_IN)
    assert sae.cfg.hook_name == HOOK and sae.cfg.model_name == "gpt2"
    assert sae.cfg.hook_layer == cfg.get("hook_layer")  # read, never parsed from the hook name (v6 has none)
    x = torch.randn(7, D_IN) * 3
    shifted = x - weights["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = shifted @ weights["W_enc"] + weights["b_enc"]
    expected = torch.relu(pre)
    topk = cfg.get("architecture") == "topk" or cfg.get("activation_fn_str") == "topk"
    if topk:
        assert isinstance(sae, TopKSAE) and sae.cfg.k == 4
        threshold = pre.topk(4, dim=1).values[:, -1:]
        expected = torch.where(pre >= threshold, expected, torch.zeros_like(expected))
    with torch.no_grad():
        codes = sae.encode(x)
        torch.testing.assert_close(codes, expected)
        torch.testing.assert_close(sae.decode(codes), expected @ weights["W_dec"] + weights["b_dec"])
    if topk:
        assert ((codes != 0).sum(dim=1) <= 4).all()


def test_load_dictionaries_keys_by_hook(tmp_path):
    for layer in (0, 3):
        save_dictionary(trained_looking(hook=f"blocks.{layer}.hook_resid_post", seed=layer), tmp_path / f"layer{layer}")
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not a dictionary")
    loaded = load_dictionaries(tmp_path)
    assert sorted(loaded) == ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"]
    assert list(load_dictionaries(tmp_path / "layer3")) == ["blocks.3.hook_resid_post"]
    save_dictionary(trained_looking(hook="blocks.3.hook_resid_post", seed=9), tmp_path / "other")
    with pytest.raises(ValueError, match="two dictionaries for hook 'blocks.3.hook_resid_post'"):
        load_dictionaries(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dictionary folders"):
        load_dictionaries(tmp_path / "empty")


def test_symlinked_dictionary_folders_are_found_and_link_cycles_end(tmp_path):
    from sae.folders import find_dictionary_folders

    save_dictionary(trained_looking(hook="blocks.3.hook_resid_post", seed=3), tmp_path / "runs" / "a" / "sae")
    (tmp_path / "runs" / "a" / "checkpoints" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "checkpoints" / "x" / CONFIG_FILE).write_text("{}")  # never a dictionary
    picked = tmp_path / "picked"
    picked.mkdir()
    (picked / "topk").symlink_to(tmp_path / "runs" / "a" / "sae", target_is_directory=True)
    (picked / "loop").symlink_to(picked, target_is_directory=True)  # a cycle must not hang the search
    assert find_dictionary_folders(picked) == [picked / "topk"]
    assert list(load_dictionaries(picked)) == ["blocks.3.hook_resid_post"]
