"""Compatibility with SAELens, proved against files written and outputs computed by the real sae_lens
package (6.54.12; tests/data/saelens/make_fixtures.py and check_our_folders.py, run in a separate
environment), and every SAELens option that changes the maths honoured or rejected by name."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.io import DictionaryFileError, load_dictionary, save_dictionary
from sae.registry import ARCHITECTURES

DATA = Path(__file__).parent / "data" / "saelens"
SAELENS_FOLDERS = ["standard", "topk", "topk_plain", "batchtopk", "jumprelu"]
OUR_FOLDERS = sorted(path.name for path in (DATA / "ours").iterdir())


def assert_outputs_match(dictionary, expected: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        codes = dictionary.encode(expected["inputs"])
        reconstruction = dictionary.decode(codes)
    assert torch.equal(codes != 0, expected["codes"] != 0)
    torch.testing.assert_close(codes, expected["codes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reconstruction, expected["reconstruction"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SAELENS_FOLDERS)
def test_folders_written_by_saelens_encode_as_saelens_does(name):
    dictionary = load_dictionary(DATA / name)
    assert_outputs_match(dictionary, load_file(DATA / name / "expected.safetensors"))
    assert dictionary.cfg.hook_name == "blocks.2.hook_resid_post" and dictionary.cfg.model_name == "tiny-test-model"


def test_rescale_acts_by_decoder_norm_is_folded_into_unit_decoder_rows():
    """SAELens' TopK default: codes are pre-activations x decoder norms (ignoring it differed by up to 19.5)."""
    assert json.loads((DATA / "topk" / "cfg.json").read_text())["rescale_acts_by_decoder_norm"] is True
    raw = load_file(DATA / "topk" / "sae_weights.safetensors")
    assert raw["W_dec"].norm(dim=1).std() > 0.1  # uneven norms: the option matters for these weights
    dictionary = load_dictionary(DATA / "topk")
    torch.testing.assert_close(dictionary.W_dec.norm(dim=1), torch.ones(48))


def test_batchtopk_saved_by_saelens_loads_as_jumprelu():
    dictionary = load_dictionary(DATA / "batchtopk")
    assert type(dictionary) is ARCHITECTURES["jumprelu"]
    threshold = load_file(DATA / "batchtopk" / "sae_weights.safetensors")["threshold"]
    assert torch.equal(threshold, torch.full_like(threshold, threshold[0].item()))  # one global threshold


def our_recipe():
    spec = importlib.util.spec_from_file_location("check_our_folders", DATA / "check_our_folders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("architecture", OUR_FOLDERS)
def test_saelens_reads_our_folders_as_we_do(tmp_path, architecture):
    """sae_lens' outputs on the folder we wrote equal ours; and our writer still writes those exact files."""
    folder = DATA / "ours" / architecture
    assert_outputs_match(load_dictionary(folder), load_file(folder / "saelens_outputs.safetensors"))
    rewritten = save_dictionary(our_recipe().build_our_sae(architecture), tmp_path / architecture)
    assert json.loads((rewritten / "cfg.json").read_text()) == json.loads((folder / "cfg.json").read_text()), (
        "cfg.json changed: rerun tests/data/saelens/check_our_folders.py with sae_lens")
    assert (rewritten / "sae_weights.safetensors").read_bytes() == (folder / "sae_weights.safetensors").read_bytes()


def test_every_registered_architecture_was_checked_with_saelens():
    assert sorted(ARCHITECTURES) == OUR_FOLDERS


REJECTED = [("hook_head_index", 3), ("normalize_activations", "constant_norm_rescale"),
            ("normalize_activations", "layer_norm"), ("reshape_activations", "hook_z"),
            ("finetuning_scaling_factor", True), ("activation_fn", "tanh-relu"), ("dtype", "int8")]


@pytest.mark.parametrize("key,value", REJECTED)
def test_options_that_change_the_maths_are_rejected_by_name(tmp_path, key, value):
    folder = shutil.copytree(DATA / "standard", tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryFileError, match=rf"{key}={value!r}".replace("(", r"\(")):
        load_dictionary(folder)


def test_head_index_in_metadata_is_rejected_too(tmp_path):
    folder = shutil.copytree(DATA / "standard", tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_head_index"] = 0
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryFileError, match="hook_head_index=0"):
        load_dictionary(folder)


def test_expected_average_only_in_is_applied_as_saelens_does(tmp_path):
    """sae_lens' load_from_disk applies no run-time normalisation for it: neither do we (with a warning)."""
    folder = shutil.copytree(DATA / "standard", tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        dictionary = load_dictionary(folder)
    assert_outputs_match(dictionary, load_file(DATA / "standard" / "expected.safetensors"))


def test_float64_dtype_is_honoured(tmp_path):
    folder = shutil.copytree(DATA / "jumprelu", tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["dtype"] = "torch.float64"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    dictionary = load_dictionary(folder)
    assert dictionary.W_enc.dtype == torch.float64 and dictionary.threshold.dtype == torch.float64
