"""How much CE a residual error of a given size costs, per model: is the SAE's error special, or is the
model that sensitive to any error of that size?

At the dictionary's hook, over held-out contexts (BOS and massive positions passed through, as a spliced
dictionary does), the CE increase in nats of:
  sae          the reconstruction (the spliced dictionary)
  same-norm    x + a random direction with the SAE error's norm at each position (isotropic)
  fvu=F        x + isotropic noise scaled so that its squared norm is F x the activation's variance
               around the batch mean, for F in --fvus (what a dictionary of that FVU would cost if its
               error were random)
  mean-ablate  every (edited) position replaced by the batch mean

    python results/gemma/error_sensitivity.py --model gemma3-270m --sae DIR [--contexts 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from circuits.engine import ActivationMap, run_with_edits
from circuits.metrics import cross_entropy
from circuits.models import load_model
from sae.corpus import load_corpus, tokenize_contexts
from sae.io import load_dictionary
from sae.metrics import typical_token_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sae", required=True, type=Path)
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--fvus", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    dictionary = load_dictionary(args.sae)
    hook = dictionary.cfg.hook_name
    tokens = tokenize_contexts(load_corpus("registry"), model.tokenizer, args.context_size, args.contexts,
                               split="eval", seed=1)
    predicted = tokens.shape[0] * (tokens.shape[1] - 2)

    def ce(edit=None) -> float:
        edits = {hook: ActivationMap(edit, exclude_bos=True, pass_massive=True)} if edit else {}
        with torch.no_grad():
            return float(cross_entropy(run_with_edits(model, tokens, edits).output, tokens, 1)) / predicted

    with torch.no_grad():
        x = run_with_edits(model, tokens, record=[hook]).recorded[hook][:, 1:].reshape(-1, dictionary.d_in)
        typical = x[typical_token_mask(x)]
        variance = float((typical - typical.mean(0)).pow(2).sum(-1).mean())
        mean = typical.mean(0)
        reconstruction = dictionary(typical)[0]
        sae_fvu = float((typical - reconstruction).pow(2).sum(-1).mean()) / variance

    def random_like(activation: torch.Tensor) -> torch.Tensor:
        direction = torch.randn_like(activation)
        return direction / direction.norm(dim=-1, keepdim=True)

    clean = ce()
    rows = {"clean_ce": clean, "sae_fvu": sae_fvu}
    rows["sae"] = ce(lambda a: dictionary(a)[0]) - clean
    rows["same_norm"] = ce(lambda a: a + random_like(a) * (a - dictionary(a)[0]).norm(dim=-1, keepdim=True)) - clean
    for fvu in args.fvus:
        rows[f"fvu={fvu:g}"] = ce(lambda a, fvu=fvu: a + random_like(a) * (fvu * variance) ** 0.5) - clean
    rows["mean_ablate"] = ce(lambda a: mean.expand_as(a).clone()) - clean
    result = {"model": args.model, "sae": str(args.sae), "hook": hook, "contexts": int(tokens.shape[0]),
              "context_size": args.context_size, "ce_increase_nats": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        command = (f"python results/gemma/error_sensitivity.py --model {args.model} --sae {args.sae} "
                   f"--contexts {args.contexts}")
        args.json.write_text(json.dumps({"command": command, **result}, indent=1))


if __name__ == "__main__":
    main()
