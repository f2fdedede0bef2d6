"""Erase the gender concept at one layer: the top-k SAE features vs LEACE vs a mean projection.

Uses the demo's SAE at `blocks.10.hook_resid_post` (or --sae FOLDER). Prompts like "My name is <name>
and I am a" must complete " male" / " female"; every method is fitted on train names and scored on
unseen test names (removal, probe accuracy, edit size) and on held-out corpus text (KL, CE change).

    python examples/erase_gender.py [--sae FOLDER] [--out runs/example_erasure]
"""

import argparse
import sys
from pathlib import Path

from circuits.models import load_model
from sae.assets import cache_dir
from sae.io import load_dictionary
from tasks.erasure import gender_concept, run_erasure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", type=Path, default=cache_dir() / "demo" / "saes" / "blocks.10.hook_resid_post")
    parser.add_argument("--out", type=Path, default=Path("runs/example_erasure"))
    args = parser.parse_args()
    if not (args.sae / "cfg.json").exists():
        sys.exit(f"error: no SAE at {args.sae}; run `sparse-circuits demo` first or pass --sae FOLDER")
    model = load_model("smollm2-135m")
    sae = load_dictionary(args.sae)
    run_erasure(model, {sae.cfg.hook_name: sae}, gender_concept(model.tokenizer), args.out, ks=(1, 4, 16),
                methods=("sae_attribution", "sae_random", "leace", "mean_projection"))


if __name__ == "__main__":
    main()
