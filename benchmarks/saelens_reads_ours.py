"""Does sae_lens read a dictionary we trained, on real activations, exactly as we do?

Run in the separate sae_lens environment (README, "Against SAELens"; our `sae` package imports there without
`circuits`), from the repository root:

    /work/venv_saelens/bin/python benchmarks/saelens_reads_ours.py --sae runs/topk40/blocks.12.hook_resid_post \
        --store runs/store12 --tokens 8192 --json results/saelens/reads_ours.json

It loads the folder twice, with our `sae.io.load_dictionary` and with sae_lens' `SAE.load_from_disk`
(recording every warning and log message: a pre-6.0 conversion announces itself), encodes the first
`--tokens` stored activations of the dictionary's hook (real activations of the model, from a store written
by `sparse-circuits train`) with both, and prints the largest code and reconstruction differences, the
fraction of codes whose zero pattern differs, and the messages. Exit status 1 if a code differs by more
than 1e-5 relative to its row's largest code (float32 rounding at the massive-activation rows, whose codes
reach 1e4, is about 1e-3 absolute) or a message mentions conversion.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `sae`

from sae.activation_store import ActivationStore  # noqa: E402
from sae.io import load_dictionary  # noqa: E402


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.INFO:
            self.messages.append(f"{record.levelname}: {record.getMessage()}")


def first_activations(store: ActivationStore, hook: str, tokens: int) -> torch.Tensor:
    rows, index = [], 0
    while sum(len(r) for r in rows) < tokens and index < len(store.shards):
        rows.append(store.read_shard(index, [hook])[hook].float())
        index += 1
    return torch.cat(rows)[:tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True, type=Path, help="a dictionary folder we wrote")
    parser.add_argument("--store", required=True, type=Path, help="an activation store holding its hook")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--json")
    args = parser.parse_args()

    import sae_lens
    from sae_lens import SAE

    ours = load_dictionary(args.sae).eval()
    x = first_activations(ActivationStore(args.store), ours.cfg.hook_name, args.tokens)
    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    logging.getLogger().setLevel(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = SAE.load_from_disk(str(args.sae), device="cpu")
    messages = recorder.messages + [f"warning: {w.message}" for w in caught]
    with torch.no_grad():
        our_codes = ours.encode(x)
        our_reconstruction = ours.decode(our_codes)
        their_codes = theirs.encode(x)
        their_reconstruction = theirs.decode(their_codes)
    scale = our_codes.abs().max().item()
    norms = x.norm(dim=-1)
    typical = norms <= 10 * norms.median()  # the engine's pass-through rule: massive rows have codes of 1e3-1e4
    relative = (our_codes - their_codes).abs() / our_codes.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    result = {
        "sae_lens_version": sae_lens.__version__, "folder": str(args.sae), "architecture": ours.cfg.architecture,
        "their_class": type(theirs).__name__, "tokens": int(x.shape[0]), "hook": ours.cfg.hook_name,
        "max_code_difference": (our_codes - their_codes).abs().max().item(), "max_code": scale,
        "max_code_difference_typical_rows": (our_codes - their_codes)[typical].abs().max().item(),
        "max_code_typical_rows": our_codes[typical].abs().max().item(), "typical_rows": int(typical.sum()),
        "max_relative_code_difference": relative.max().item(),
        "max_reconstruction_difference": (our_reconstruction - their_reconstruction).abs().max().item(),
        "zero_pattern_mismatch": ((our_codes != 0) != (their_codes != 0)).float().mean().item(),
        "l0_ours": (our_codes != 0).float().sum(-1).mean().item(),
        "l0_theirs": (their_codes != 0).float().sum(-1).mean().item(),
        "messages": messages,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    converted = any("conver" in message.lower() for message in messages)
    sys.exit(1 if result["max_relative_code_difference"] > 1e-5 or converted else 0)


if __name__ == "__main__":
    main()
