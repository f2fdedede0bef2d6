"""Write small SAE folders with the real sae_lens package, plus its own encode/decode outputs.

sae_lens cannot be installed beside transformer-lens 4, so this runs once in a separate environment:

    python -m venv /work/saelens_env
    /work/saelens_env/bin/pip install torch==2.13.0 sae-lens      # sae-lens 6.54.12 was used
    /work/saelens_env/bin/python tests/data/saelens/make_fixtures.py

For each architecture sae_lens has, it writes tests/data/saelens/<name>/ (sae_weights.safetensors and
cfg.json, written by sae_lens' own save method) and <name>/expected.safetensors holding `inputs` [64, 16],
and sae_lens' `codes` = sae.encode(inputs) and `reconstruction` = sae.decode(codes).
Weights are random (seeded) with nonzero biases and thresholds and decoder rows of uneven norms, so every
option that changes the maths shows up in the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import sae_lens
from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

D_IN, D_SAE, N_TOKENS = 16, 48, 64
HERE = Path(__file__).parent


def metadata() -> SAEMetadata:
    return SAEMetadata(model_name="tiny-test-model", hook_name="blocks.2.hook_resid_post", hook_head_index=None,
                       prepend_bos=True)


@torch.no_grad()
def randomise(sae: torch.nn.Module, seed: int) -> None:
    """Random weights, biases and decoder row norms between 0.3 and 3 (not unit)."""
    generator = torch.Generator().manual_seed(seed)
    sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=generator) * 0.5)
    sae.b_enc.copy_(torch.randn(D_SAE, generator=generator) * 0.3)
    rows = torch.randn(D_SAE, D_IN, generator=generator)
    norms = 0.3 + 2.7 * torch.rand(D_SAE, 1, generator=generator)
    sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True) * norms)
    sae.b_dec.copy_(torch.randn(D_IN, generator=generator) * 0.5)


def inputs(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N_TOKENS, D_IN, generator=generator) * 2.0 + 0.5


def record(name: str, folder_writer, x: torch.Tensor) -> None:
    """Save with sae_lens, load the folder back with sae_lens, and store its outputs on x."""
    folder = HERE / name
    folder.mkdir(parents=True, exist_ok=True)
    folder_writer(folder)
    loaded = SAE.load_from_disk(folder)
    codes = loaded.encode(x)
    reconstruction = loaded.decode(codes)
    save_file({"inputs": x.contiguous(), "codes": codes.detach().contiguous(),
               "reconstruction": reconstruction.detach().contiguous()}, folder / "expected.safetensors")
    active = (codes != 0).float().sum(dim=-1).mean().item()
    print(f"{name}: loaded back as {type(loaded).__name__}, mean L0 {active:.2f}, "
          f"cfg architecture {json.loads((folder / 'cfg.json').read_text())['architecture']}")


def main() -> None:
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    standard = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=metadata()))
    randomise(standard, seed=1)
    record("standard", standard.save_model, inputs(11))

    # TopK as sae_lens trains it: rescale_acts_by_decoder_norm (the training default), uneven decoder norms.
    topk = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, rescale_acts_by_decoder_norm=True, metadata=metadata()))
    randomise(topk, seed=2)
    record("topk", topk.save_model, inputs(12))

    topk_plain = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, rescale_acts_by_decoder_norm=False,
                                       apply_b_dec_to_input=False, metadata=metadata()))
    randomise(topk_plain, seed=3)
    record("topk_plain", topk_plain.save_model, inputs(13))

    # BatchTopK: trained as batchtopk, saved for inference as jumprelu with the learned global threshold.
    batchtopk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4,
                                                                rescale_acts_by_decoder_norm=True, metadata=metadata()))
    randomise(batchtopk, seed=4)
    batchtopk.topk_threshold = torch.tensor(0.8, dtype=torch.double)
    record("batchtopk", batchtopk.save_inference_model, inputs(14))

    jumprelu = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=metadata()))
    randomise(jumprelu, seed=5)
    with torch.no_grad():
        jumprelu.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(50)) * 1.5)
    record("jumprelu", jumprelu.save_model, inputs(15))


if __name__ == "__main__":
    main()
