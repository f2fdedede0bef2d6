"""Splice exactness on a real model and dictionary: how far spliced logits are from the clean model's.

Three runs over held-out contexts, compared with the clean logits (max |difference| over every logit):
  unedited   the dictionary spliced, nothing edited (the engine returns x itself: 0 by construction)
  recomputed the codes replaced by an equal copy, so out = decode(codes) + (x - decode(codes)) is
             computed in floating point (what every feature edit goes through)
  no error   the reconstruction alone (error term zeroed): the dictionary's own damage, for scale

    python results/gemma/splice_exactness.py --model gemma3-270m --sae DIR [--contexts 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from circuits.engine import splice_dictionaries
from circuits.models import load_model
from sae.corpus import load_corpus, tokenize_contexts
from sae.io import load_dictionary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sae", required=True, type=Path)
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = load_model(args.model, device="cpu")
    dictionary = load_dictionary(args.sae)
    hook = dictionary.cfg.hook_name
    tokens = tokenize_contexts(load_corpus("registry"), model.tokenizer, args.context_size, args.contexts,
                               split="eval", seed=1)
    result = {"model": args.model, "sae": str(args.sae), "hook": hook, "contexts": int(tokens.shape[0]),
              "context_size": args.context_size}
    with torch.no_grad():
        clean = model(tokens)
        with splice_dictionaries(model, {hook: dictionary}) as splice:
            result["unedited"] = float((model(tokens) - clean).abs().max())
            copy = (splice.hook_name(hook), lambda codes, hook=None: codes.clone())
            result["recomputed"] = float((model.run_with_hooks(tokens, fwd_hooks=[copy]) - clean).abs().max())
            zero = (splice.hook_name(hook, "hook_sae_error"), lambda error, hook=None: torch.zeros_like(error))
            result["no_error"] = float((model.run_with_hooks(tokens, fwd_hooks=[zero]) - clean).abs().max())
        result["logit_scale"] = float(clean.abs().max())
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"command": f"python results/gemma/splice_exactness.py --model {args.model} "
                                         f"--sae {args.sae} --contexts {args.contexts}", **result}, indent=1))


if __name__ == "__main__":
    main()
