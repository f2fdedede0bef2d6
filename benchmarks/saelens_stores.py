"""The activation stores benchmarks/compare_saelens.py and saelens_ablation.py read (issue 14): the default model's
blocks.12.hook_resid_post on the registry corpus, a training store (train split) and a held-out store (eval split),
contexts of 128 tokens (BOS left out, as `sparse-circuits train` stores them), float16 as `train` stores them.

    python benchmarks/saelens_stores.py --out STORES --train-tokens 1010000 --heldout-tokens 16384

writes STORES/train and STORES/heldout (rerunning resumes a partial harvest; a complete one is kept).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from circuits.harvest import harvest_activations
from circuits.models import DEFAULT_MODEL, load_model
from sae.corpus import load_corpus, tokenize_contexts

HOOK = "blocks.12.hook_resid_post"
CONTEXT = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-tokens", type=int, default=1_010_000)
    parser.add_argument("--heldout-tokens", type=int, default=16_384)
    parser.add_argument("--autocast", default="off", choices=["off", "bf16"], help="the harvest's forward precision")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(DEFAULT_MODEL, device="cpu")
    corpus = load_corpus("registry")
    for split, tokens in (("eval", args.heldout_tokens), ("train", args.train_tokens)):
        contexts = tokenize_contexts(corpus, model.tokenizer, CONTEXT, math.ceil(tokens / (CONTEXT - 1)), split=split,
                                     seed=0)
        folder = Path(args.out) / ("heldout" if split == "eval" else "train")
        harvest_activations(model, contexts, [HOOK], folder, model_name=DEFAULT_MODEL, autocast=args.autocast)
        print(f"{split}: {contexts.shape[0]} contexts x {CONTEXT - 1} tokens -> {folder}", flush=True)


if __name__ == "__main__":
    main()
