"""Check that sae_lens reads the folders *we* write: no pre-6.0 conversion, no warning, the same codes.

Run in the separate sae_lens environment (see make_fixtures.py), from the repository root:

    /work/saelens_env/bin/python tests/data/saelens/check_our_folders.py

For every registered architecture it builds a small seeded SAE with our code, saves it with
`sae.io.save_dictionary` into tests/data/saelens/ours/<architecture>/, loads it with sae_lens'
`SAE.load_from_disk` (recording warnings and log messages), and writes sae_lens' outputs on seeded
inputs to ours/<architecture>/saelens_outputs.safetensors; tests/test_sae_saelens.py checks our
encode/decode against them and that our writer still writes these exact files.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, for `sae`

from sae.config import DictionaryConfig  # noqa: E402
from sae.registry import ARCHITECTURES, build_dictionary  # noqa: E402

D_IN, D_SAE, N_TOKENS = 16, 48, 64


@torch.no_grad()
def build_our_sae(architecture: str, seed: int = 7):
    """A seeded SAE of our code with random weights, nonzero biases and positive thresholds."""
    cfg = DictionaryConfig(architecture, D_IN, D_SAE, hook_name="blocks.2.hook_resid_post", model_name="tiny",
                           k=6, seed=seed, hook_layer=2)
    sae = build_dictionary(cfg)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sae.named_parameters():
        values = torch.randn(parameter.shape, generator=generator) * 0.5
        parameter.copy_(values.abs() + 0.2 if "threshold" in name else values)
    for name, buffer in sae.named_buffers():
        if "threshold" in name:
            buffer.fill_(0.6)
    return sae.eval()


def inputs(seed: int = 70) -> torch.Tensor:
    return torch.randn(N_TOKENS, D_IN, generator=torch.Generator().manual_seed(seed)) * 2.0 + 0.5


def main() -> None:
    import sae_lens
    from safetensors.torch import save_file
    from sae_lens import SAE

    from sae.io import save_dictionary

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(f"log {record.levelname}: {record.getMessage()}")
    logging.getLogger().addHandler(handler)
    x = inputs()
    print(f"sae_lens {sae_lens.__version__}")
    for architecture in sorted(ARCHITECTURES):
        ours = build_our_sae(architecture)
        folder = save_dictionary(ours, HERE / "ours" / architecture)
        messages.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = SAE.load_from_disk(folder)
        messages.extend(f"warning: {w.message}" for w in caught)
        with torch.no_grad():
            codes = theirs.encode(x)
            reconstruction = theirs.decode(codes)
            our_codes = ours.encode(x)
            our_reconstruction = ours.decode(our_codes)
        save_file({"inputs": x, "codes": codes.contiguous(), "reconstruction": reconstruction.contiguous()},
                  folder / "saelens_outputs.safetensors")
        print(f"{architecture}: sae_lens loads it as {type(theirs).__name__}; "
              f"max |codes diff| {(codes - our_codes).abs().max().item():.3g}, "
              f"max |reconstruction diff| {(reconstruction - our_reconstruction).abs().max().item():.3g}, "
              f"active-set mismatches {int(((codes != 0) != (our_codes != 0)).sum())}, mean L0 "
              f"{(codes != 0).float().sum(-1).mean().item():.2f}; warnings/log messages: {messages or 'none'}")


if __name__ == "__main__":
    main()
