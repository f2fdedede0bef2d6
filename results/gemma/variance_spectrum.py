"""Where a residual stream's variance sits: the share of the top principal components and of the top single
coordinates, over typical tokens (massive positions left out) of a harvested activation store.

    python results/gemma/variance_spectrum.py --store DIR --hook HOOK [--sae DIR] [--rows 8192] [--json out.json]

With --sae, also the dictionary's FVU on the top coordinate and on all the others.

Used for results/gemma/README.md: at Gemma-3-270M blocks.9 one coordinate holds 73% of the variance,
so FVU (a share of total variance) says little about the other 639 dimensions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sae.activation_store import ActivationStore
from sae.metrics import typical_token_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--hook", required=True)
    parser.add_argument("--sae", type=Path, help="a dictionary at --hook: its FVU on the top coordinate and the rest")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    store = ActivationStore(args.store)
    x = next(store.batches([args.hook], args.rows, 3))[args.hook].float()
    x = x[typical_token_mask(x)]
    centred = x - x.mean(0)
    eigen = torch.linalg.svdvals(centred).pow(2)
    share = (eigen / eigen.sum()).cumsum(0)
    per_dim = centred.pow(2).mean(0)
    order = per_dim.argsort(descending=True)
    result = {"store": str(args.store), "hook": args.hook, "rows": int(x.shape[0]), "d_model": int(x.shape[1]),
              "top1_pc_share": float(share[0]), "top4_pc_share": float(share[3]), "top16_pc_share": float(share[15]),
              "pcs_for_90pct": int((share < 0.9).sum()) + 1,
              "top1_coordinate": int(order[0]), "top1_coordinate_share": float(per_dim[order[0]] / per_dim.sum()),
              "top4_coordinates_share": float(per_dim[order[:4]].sum() / per_dim.sum())}
    if args.sae is not None:
        from sae.io import load_dictionary

        with torch.no_grad():
            error = x - load_dictionary(args.sae)(x)[0]
        rest = torch.ones(x.shape[1], dtype=torch.bool)
        rest[order[0]] = False
        result["sae"] = str(args.sae)
        result["sae_fvu"] = float(error.pow(2).sum() / centred.pow(2).sum())
        result["sae_fvu_top1_coordinate"] = float(error[:, order[0]].pow(2).sum() / centred[:, order[0]].pow(2).sum())
        result["sae_fvu_other_coordinates"] = float(error[:, rest].pow(2).sum() / centred[:, rest].pow(2).sum())
    print(json.dumps(result, indent=1))
    if args.json:
        command = (f"python results/gemma/variance_spectrum.py --store {args.store} --hook {args.hook} --rows {args.rows}"
                   + (f" --sae {args.sae}" if args.sae else ""))
        args.json.write_text(json.dumps({"command": command, **result}, indent=1))


if __name__ == "__main__":
    main()
