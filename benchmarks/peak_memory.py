"""Peak memory of `evaluate` and `ioi` on a model, beside the plain model's own forward (issue 16 item 3).

Each measurement runs in a fresh process and reports its peak resident set (ru_maxrss of the child), so
the numbers include the model's weights (Gemma-3-270M: 1.07 GB of fp32, 0.67 GB of it the tied
embedding) and everything a user pays for:

  load      load the model and touch every weight (one forward of one token, then one unembedding of
            every vocabulary row): the floor any command on this model starts from
  forward   the plain model: one full forward of `--batch` contexts of `--context-size` tokens, full logits
  evaluate  `sparse-circuits evaluate` on `--tokens` held-out tokens (default batch of 8 contexts)
  ioi       `sparse-circuits ioi` (attribution search) on `--prompts` prompts with PCA and neuron baselines

    python benchmarks/peak_memory.py --model gemma3-270m --sae DIR [--json out.json]

The target (issue 16): evaluate and ioi on Gemma-3-270M under 3 GB. Prints a table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROBE = r"""
import sys, torch
from circuits.models import load_model
model = load_model(sys.argv[1])
mode, batch, context = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokens = torch.randint(0, 1000, (batch, context))
with torch.inference_mode():
    if mode == "load":
        model(tokens[:1, :1])
        model.unembed(model.ln_final(torch.zeros(1, 1, model.cfg.d_model)))
    else:
        logits = model(tokens)
        print(tuple(logits.shape))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--sae", required=True, help="a dictionary folder at one hook of --model")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens for evaluate")
    parser.add_argument("--prompts", type=int, default=16, help="IOI prompts")
    parser.add_argument("--batch", type=int, default=8, help="contexts of the plain forward (evaluate's default)")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        steps = [
            ("load", [sys.executable, "-c", PROBE, args.model, "load", "1", "1"]),
            ("evaluate", ["sparse-circuits", "evaluate", "--model", args.model, "--sae", args.sae,
                          "--tokens", str(args.tokens), "--json", os.path.join(scratch, "eval.json")]),
            ("ioi", ["sparse-circuits", "ioi", "--model", args.model, "--sae", args.sae, "--prompts", str(args.prompts),
                     "--baselines", "pca,neurons", "--confirm-top", "0", "--out", os.path.join(scratch, "ioi")]),
            ("forward", [sys.executable, "-c", PROBE, args.model, "forward", str(args.batch), str(args.context_size)]),
        ]
        for name, command in steps:
            # a fresh interpreter per step so each peak is its own (RUSAGE_CHILDREN is cumulative max)
            wrapper = [sys.executable, "-c",
                       "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
                       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)", *command]
            start = time.perf_counter()
            done = subprocess.run(wrapper, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            peak_gb = int(done.stdout.strip().splitlines()[-1]) / 1e6 if done.returncode == 0 else float("nan")
            if done.returncode != 0:
                print(f"{name} failed ({done.returncode}): {done.stderr[-1500:]}", file=sys.stderr)
            rows.append({"step": name, "peak_gb": peak_gb, "wall_s": round(wall, 1), "command": " ".join(command)})
    floor = rows[0]["peak_gb"]
    print(f"peak resident memory, {args.model} (fresh process each; 'load' = weights fully resident)")
    print(f"{'step':<10} {'peak GB':>8} {'over load':>10} {'wall s':>8}")
    for row in rows:
        row["over_load_gb"] = row["peak_gb"] - floor
        print(f"{row['step']:<10} {row['peak_gb']:>8.2f} {row['over_load_gb']:>10.2f} {row['wall_s']:>8.1f}")
    if args.json:
        record = {"command": "python benchmarks/peak_memory.py " + " ".join(argv or sys.argv[1:]), "model": args.model,
                  "rows": rows}
        temporary = args.json + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(temporary, args.json)
    return 0 if all(row["peak_gb"] == row["peak_gb"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
