"""The CLI end to end on a tiny model and local text: train, evaluate, and clear errors (exit 2)."""

import json

import pytest
import torch

from sparse_circuits.cli.main import main


@pytest.fixture(scope="module")
def trained(tiny_llama_folder, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    code = main(["train", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--hook",
                 "blocks.1.hook_resid_post", "--hook", "blocks.2.hook_resid_post", "--tokens", "3000",
                 "--context-size", "16", "--batch-size", "128", "--epochs", "10", "--lr", "3e-3", "--l1", "1e-3", "3e-3",
                 "--out", str(out), "--checkpoint-every", "50"])
    assert code == 0
    return out


def test_train_writes_one_folder_per_hook_and_coefficient(trained):
    names = sorted(p.name for p in trained.iterdir() if (p / "cfg.json").exists())
    assert names == ["blocks.1.hook_resid_post__l1_0.001", "blocks.1.hook_resid_post__l1_0.003",
                     "blocks.2.hook_resid_post__l1_0.001", "blocks.2.hook_resid_post__l1_0.003"]
    cfg = json.loads((trained / names[0] / "cfg.json").read_text())
    assert cfg["d_sae"] == 4 * cfg["d_in"] and cfg["tied"] and cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert (trained / names[0] / "training_log.csv").read_text().count("\n") >= 2
    manifest = json.loads((trained / "activations" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["hooks"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def test_evaluate_prints_and_writes_every_metric(trained, tiny_llama_folder, text_corpus, tmp_path, capsys):
    import shutil

    folder = tmp_path / "sae"  # evaluate writes eval.json into the folder: work on a copy of the shared one
    shutil.copytree(trained / "blocks.2.hook_resid_post__l1_0.001", folder)
    out_json = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--sae", str(folder),
                 "--tokens", "300", "--context-size", "16", "--json", str(out_json)])
    assert code == 0
    [result] = json.loads(out_json.read_text())
    for key in ["l0", "fvu", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "ce_loss_recovered",
                "kl", "dead_fraction", "dense_fraction"]:
        assert key in result and result[key] == result[key]  # present and not NaN
    assert 0 <= result["fvu"] < 1 and result["l0"] > 0
    assert "ce_loss_recovered" in capsys.readouterr().out


def test_unknown_hook_exits_2_listing_close_names(tiny_llama_folder, text_corpus, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--hook",
                 "blocks.1.hook_resid_pots", "--tokens", "100", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "blocks.1.hook_resid_post" in err and "Traceback" not in err


def _copy_dictionary(source, target):
    target.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_width_mismatch_fails_before_any_compute(trained, tiny_llama_folder, text_corpus, tmp_path, capsys):
    folder = _copy_dictionary(trained / "blocks.1.hook_resid_post__l1_0.001", tmp_path / "wrong")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_in"] = 48
    (folder / "cfg.json").write_text(json.dumps(cfg))
    code = main(["evaluate", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--sae", str(folder)])
    assert code == 2
    assert "48" in capsys.readouterr().err  # failed on the width, before running the model (files: test_bad_input)


def test_truncated_weights_are_a_clear_error(trained, tiny_llama_folder, text_corpus, tmp_path, capsys):
    folder = _copy_dictionary(trained / "blocks.1.hook_resid_post__l1_0.001", tmp_path / "cut")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = main(["evaluate", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--sae", str(folder)])
    assert code == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err


def test_missing_sae_folder_exits_2(tiny_llama_folder, tmp_path, capsys):
    assert main(["evaluate", "--model", str(tiny_llama_folder), "--sae", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--hook", "--tokens", "--out", "--arch", "--expansion", "--l1", "--k", "--tied", "--untied"]:
        assert flag in text


@pytest.mark.parametrize("arch, sparsity, saved_as", [("batchtopk", ["--k", "6"], "jumprelu"),
                                                       ("jumprelu", ["--l1", "1e-2"], "jumprelu")])
def test_train_every_registered_architecture_from_the_cli(arch, sparsity, saved_as, tiny_llama_folder, text_corpus,
                                                          tmp_path):
    from sae.io import load_dictionary

    out = tmp_path / arch
    code = main(["train", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--hook",
                 "blocks.1.hook_resid_post", "--tokens", "1500", "--context-size", "16", "--batch-size", "128",
                 "--epochs", "4", "--lr", "3e-3", "--arch", arch, *sparsity, "--out", str(out)])
    assert code == 0
    cfg = json.loads((out / "blocks.1.hook_resid_post" / "cfg.json").read_text())
    assert cfg["architecture"] == saved_as and cfg["hook_layer"] == 1
    dictionary = load_dictionary(out / "blocks.1.hook_resid_post")
    codes = dictionary.encode(torch.randn(64, dictionary.d_in))
    assert codes.shape == (64, 4 * dictionary.d_in) and torch.isfinite(codes).all()
