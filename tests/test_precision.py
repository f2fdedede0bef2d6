"""Mixed-precision training (TrainingConfig.autocast), the fp16 loss scaler, batch transfer, and the sparse
decoder of TopK/BatchTopK against the dense one. CPU only: CPU autocast runs bf16 (and, in the torch used
here, fp16, which the tests switch on to exercise the GradScaler path that CUDA uses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sparse_data

import sae.training.loop
import sae.training.precision
from sae.batches import TensorBatchSource
from sae.batchtopk import batch_topk
from sae.config import DictionaryConfig
from sae.dictionary import TrainingState
from sae.io import load_dictionary, read_tensor_file
from sae.registry import build_dictionary
from sae.training import TrainingConfig, train_dictionaries
from sae.training.checkpoints import run_fingerprint
from sae.training.precision import check_autocast, to_training_device

HOOK = "blocks.0.hook_resid_post"
D_IN, D_SAE = 16, 64
CONFIGS = [DictionaryConfig("standard", D_IN, D_SAE, hook_name=HOOK, l1_coefficient=0.03),
           DictionaryConfig("topk", D_IN, D_SAE, hook_name=HOOK, k=3),
           DictionaryConfig("batchtopk", D_IN, D_SAE, hook_name=HOOK, k=3),
           DictionaryConfig("jumprelu", D_IN, D_SAE, hook_name=HOOK, l1_coefficient=0.01)]
# FVU of bf16 training may differ from fp32 on the same data and seed by at most this (absolute; FVUs ~0.05-0.2)
FVU_TOLERANCE = 0.02


def source() -> TensorBatchSource:
    x, _ = sparse_data(4096, D_IN, 32, active=3, seed=3)
    return TensorBatchSource({HOOK: x})


def training(autocast: str | None, **changes) -> TrainingConfig:
    settings = dict(total_tokens=60 * 128, batch_size=128, lr=3e-3, log_every=10, checkpoint_every=20,
                    dead_window_tokens=5 * 128, autocast=autocast)
    return TrainingConfig(**{**settings, **changes})


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Let fp16 autocast (and so the GradScaler) run on CPU, as it would on CUDA."""
    monkeypatch.setattr(sae.training.precision, "FP16_DEVICE_TYPES", ("cuda", "cpu"))


@pytest.fixture(scope="module")
def fp32_and_bf16(tmp_path_factory):
    runs = {}
    for autocast in (None, "bf16"):
        out_dir = tmp_path_factory.mktemp(f"run_{autocast}")
        runs[autocast] = out_dir, train_dictionaries(source(), CONFIGS, training(autocast), out_dir, progress=False)
    return runs


def test_bf16_training_reaches_the_fp32_fvu(fp32_and_bf16):
    for full, half in zip(fp32_and_bf16[None][1], fp32_and_bf16["bf16"][1]):
        assert full.name == half.name
        assert half.metrics["fvu"] < 0.5, half.name  # it learned
        assert abs(half.metrics["fvu"] - full.metrics["fvu"]) <= FVU_TOLERANCE, (half.name, full.metrics, half.metrics)


def test_bf16_keeps_fp32_master_weights_and_adam_state(fp32_and_bf16):
    out_dir, results = fp32_and_bf16["bf16"]
    for result in results:
        assert {parameter.dtype for parameter in result.dictionary.parameters()} == {torch.float32}
        tensors = read_tensor_file(sorted((out_dir / "checkpoints").glob("step_*"))[-1] / f"{result.name}.safetensors")
        floating = {key: value.dtype for key, value in tensors.items() if value.is_floating_point()
                    and not key.endswith(".step") and key != "buffer.threshold"}
        assert floating and set(floating.values()) == {torch.float32}, floating
        assert load_dictionary(result.folder).cfg.extra["training"]["autocast"] == "bf16"


def assert_same_folders(out_dir: Path, reference_dir: Path, names: list[str]) -> None:
    for name in names:
        ours, theirs = load_dictionary(out_dir / name), load_dictionary(reference_dir / name)
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), (name, key)
        log = f"{name}/training_log.csv"
        assert (out_dir / log).read_text() == (reference_dir / log).read_text()


def test_bf16_resume_is_exact(tmp_path, fp32_and_bf16):
    reference_dir, results = fp32_and_bf16["bf16"]
    train_dictionaries(source(), CONFIGS, training("bf16"), tmp_path, progress=False, stop_after_steps=30)
    train_dictionaries(source(), CONFIGS, training("bf16"), tmp_path, progress=False)
    assert_same_folders(tmp_path, reference_dir, [result.name for result in results])


def test_fp16_with_loss_scaler_resumes_exactly(tmp_path, monkeypatch, fp16_on_cpu):
    configs = CONFIGS[:2]
    real = sae.training.precision.new_grad_scaler

    def scaler(autocast, device):  # a small growth interval: the scale moves within the run, so resume needs it
        made = real(autocast, device)
        return made if made is None else torch.amp.GradScaler(device.type, init_scale=2.0**20, growth_interval=7)

    monkeypatch.setattr(sae.training.loop, "new_grad_scaler", scaler)
    reference = train_dictionaries(source(), configs, training("fp16"), tmp_path / "reference", progress=False)
    train_dictionaries(source(), configs, training("fp16"), tmp_path / "resumed", progress=False, stop_after_steps=30)
    state = json.loads((sorted((tmp_path / "resumed" / "checkpoints").glob("step_*"))[-1] / "state.json").read_text())
    assert set(state["grad_scalers"]) == {result.name for result in reference}
    assert all(saved["scale"] != 2.0**20 for saved in state["grad_scalers"].values())  # it moved
    train_dictionaries(source(), configs, training("fp16"), tmp_path / "resumed", progress=False)
    assert_same_folders(tmp_path / "resumed", tmp_path / "reference", [result.name for result in reference])
    # it trained: an untrained SAE has FVU ~1; with the default gradient clip (1/d_in) this short toy run ends at
    # 0.22 (ReLU) and 0.50 (TopK k=3; 0.46 in fp32)
    assert all(result.metrics["fvu"] < 0.6 for result in reference), [result.metrics["fvu"] for result in reference]


def test_gradients_are_unscaled_before_projection_and_clipping(tmp_path, monkeypatch):
    """A loss scaler on fp32 (an exact power of two, no overflow) must change nothing, clipping included: the
    decoder-gradient projection and the clip see the true gradients."""
    settings = dict(autocast=None, grad_clip_norm=0.05, checkpoint_every=None, total_tokens=20 * 128)
    reference = train_dictionaries(source(), CONFIGS[:2], training(**settings), tmp_path / "plain", progress=False)
    monkeypatch.setattr(sae.training.loop, "new_grad_scaler", lambda autocast, device: torch.amp.GradScaler("cpu"))
    train_dictionaries(source(), CONFIGS[:2], training(**settings), tmp_path / "scaled", progress=False)
    assert_same_folders(tmp_path / "scaled", tmp_path / "plain", [result.name for result in reference])


def test_fp16_on_cpu_is_refused_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="CPU autocast supports bf16 only"):
        train_dictionaries(source(), CONFIGS[:1], training("fp16"), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match="autocast must be one of"):
        training("fp32")
    with pytest.raises(ValueError, match="autocast must be one of"):
        check_autocast("int8", torch.device("cpu"))


def test_fp32_runs_keep_their_checkpoint_fingerprint():
    """autocast None leaves the fingerprint as it was before the setting existed (old checkpoints resume)."""
    assert "autocast" not in run_fingerprint(["a"], CONFIGS[:1], training(None))["training"]
    assert run_fingerprint(["a"], CONFIGS[:1], training("bf16"))["training"]["autocast"] == "bf16"


def test_batch_transfer_on_cpu_only_sets_the_dtype():
    x = torch.randn(8, 4, dtype=torch.float16)
    moved = to_training_device(x, torch.device("cpu"))
    assert moved.dtype == torch.float32 and torch.equal(moved, x.float())
    same = torch.randn(8, 4)
    assert to_training_device(same, torch.device("cpu")) is same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_transfer_to_cuda_is_pinned_and_exact():
    x = torch.randn(64, 8, dtype=torch.float16)
    moved = to_training_device(x, torch.device("cuda"))
    assert moved.device.type == "cuda" and moved.dtype == torch.float32
    assert torch.equal(moved.cpu(), x.float())


# --- sparse decoding -----------------------------------------------------------------------------


def trained_like(architecture: str, d_in: int = 32, d_sae: int = 256, k: int = 8):
    """An SAE with nonzero biases (and a BatchTopK threshold that leaves a few codes per token)."""
    dictionary = build_dictionary(DictionaryConfig(architecture, d_in, d_sae, hook_name=HOOK, k=k, tied=False))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        dictionary.b_dec.copy_(torch.randn(d_in, generator=generator))
        dictionary.b_enc.copy_(torch.randn(d_sae, generator=generator) * 0.1)
        if architecture == "batchtopk":
            dictionary.threshold.fill_(2.0)
    return dictionary


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_forward_equals_the_dense_decode(architecture):
    dictionary = trained_like(architecture)
    x = torch.randn(3, 40, 32)
    with torch.no_grad():
        reconstruction, codes = dictionary(x)
        dense = dictionary.decode(dictionary.encode(x))
    assert torch.equal(codes, dictionary.encode(x))
    assert 0 < (codes != 0).sum(dim=-1).float().mean() <= 32  # of 256: mostly zero
    assert reconstruction.shape == x.shape
    assert torch.allclose(reconstruction, dense, atol=1e-5, rtol=0)


def test_decode_sparse_and_decode_active_match_decode_on_any_leading_shape():
    dictionary = trained_like("topk")
    indices = torch.randint(0, 256, (2, 5, 8))
    values = torch.rand(2, 5, 8)
    codes = torch.zeros(2, 5, 256).scatter_add_(-1, indices, values)  # repeated indices add up, as in the gather
    with torch.no_grad():
        dense = dictionary.decode(codes)
        assert torch.allclose(dictionary.decode_sparse(indices, values), dense, atol=1e-5, rtol=0)
        assert torch.allclose(dictionary.decode_active(codes), dense, atol=1e-5, rtol=0)
        empty = torch.zeros(0, 256)
        assert dictionary.decode_active(empty).shape == (0, 32)
        assert torch.equal(dictionary.decode_active(torch.zeros(4, 256)), dictionary.b_dec.expand(4, 32))


def test_batchtopk_sparse_training_loss_equals_the_dense_one():
    dictionary = trained_like("batchtopk")
    x = torch.randn(64, 32)
    state = TrainingState(step=0, sparsity_ramp=1.0, dead=torch.zeros(256, dtype=torch.bool), aux_k_coefficient=0.0)
    out = dictionary.training_loss(x, state)
    out.loss.backward()
    sparse_gradients = {name: parameter.grad.clone() for name, parameter in dictionary.named_parameters()}
    dictionary.zero_grad()
    codes = batch_topk(dictionary.pre_activations(x), dictionary.cfg.k)
    residual, mse = dictionary.reconstruction_terms(x, codes)
    mse.backward()
    assert torch.allclose(out.mse, mse, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.codes, codes.detach()) and torch.allclose(out.residual, residual, atol=1e-5)
    for name, parameter in dictionary.named_parameters():
        if parameter.grad is not None:
            assert torch.allclose(sparse_gradients[name], parameter.grad, atol=1e-5, rtol=0), name


def test_sparse_decode_under_autocast_runs_in_its_dtype():
    dictionary = trained_like("topk")
    x = torch.randn(16, 32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reconstruction, codes = dictionary(x)
        dense = dictionary.decode(codes.float())  # the same codes decoded in fp32
    assert codes.dtype == torch.bfloat16 and reconstruction.dtype == torch.float32  # bf16 gather + fp32 bias
    assert torch.allclose(reconstruction, dense, atol=0.05, rtol=0.01)


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_refuses_fp16_on_cpu_before_loading_anything(tmp_path, capsys):
    from sparse_circuits.cli.main import main

    code = main(["train", "--model", "no-such-model", "--hook", HOOK, "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--autocast", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "--autocast bf16" in err and "Traceback" not in err


def test_cli_trains_with_bf16_autocast(tiny_llama_folder, text_corpus, tmp_path):
    from sparse_circuits.cli.main import main

    code = main(["train", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--hook",
                 "blocks.1.hook_resid_post", "--tokens", "1000", "--context-size", "16", "--batch-size", "128",
                 "--epochs", "2", "--arch", "topk", "--k", "4", "--out", str(tmp_path), "--device", "cpu",
                 "--autocast", "bf16"])
    assert code == 0
    dictionary = load_dictionary(tmp_path / "blocks.1.hook_resid_post")
    assert dictionary.cfg.extra["training"]["autocast"] == "bf16"
    assert {parameter.dtype for parameter in dictionary.parameters()} == {torch.float32}


def test_cli_refuses_fp16_harvest_on_cpu(tmp_path, capsys):
    from sparse_circuits.cli.main import main

    code = main(["train", "--model", "no-such-model", "--hook", HOOK, "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--harvest-autocast", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and "--harvest-autocast fp16 needs a CUDA device" in err and "Traceback" not in err


def test_cli_harvests_in_bf16_and_trains_in_float32(tiny_llama_folder, text_corpus, tmp_path):
    from sae.activation_store import ActivationStore
    from sparse_circuits.cli.main import main

    code = main(["train", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--hook",
                 "blocks.1.hook_resid_post", "--tokens", "1000", "--context-size", "16", "--batch-size", "128",
                 "--arch", "topk", "--k", "4", "--out", str(tmp_path), "--device", "cpu", "--harvest-autocast", "bf16"])
    assert code == 0
    assert ActivationStore(tmp_path / "activations").manifest["metadata"]["autocast"] == "bf16"
    dictionary = load_dictionary(tmp_path / "blocks.1.hook_resid_post")
    assert dictionary.cfg.extra["training"]["autocast"] is None
