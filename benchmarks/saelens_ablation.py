"""Which recipe difference between our training and SAELens' makes the FVU gap (issue 14). Not run in CI.

Trains SAELens once (TopK and an L1 sweep: its L0-FVU curve) and our SAE once per recipe variant (TopK and ReLU+L1
at one coefficient), each variant toggling TrainingConfig / DictionaryConfig options from our recipe, all on the
same store, batches and steps (benchmarks/compare_saelens.py does the training and evaluation). Each of our ReLU
points is compared with SAELens' FVU interpolated at its L0. Writes JSON and a Markdown table:

    python benchmarks/saelens_ablation.py --store STORE --heldout HELDOUT --steps 146 --json ablation.json --md ablation.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("compare_saelens", HERE / "compare_saelens.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

# Our recipe before issue 14, spelled out so that the table does not move when the defaults do.
OLD_RECIPE = {"b_dec_init": "mean", "unit_norm_decoder": True, "decoder_init_norm": None, "grad_clip_norm": None,
              "lr_decay_fraction": 0.2, "l1_warmup_steps": None, "adam_betas": [0.9, 0.999]}  # + warm-up 5% (driver)
SAELENS_LIKE = {"b_dec_init": "zero", "unit_norm_decoder": False, "decoder_init_norm": 0.1, "grad_clip_norm": 1.0,
                "lr_decay_fraction": 0.0, "lr_warmup_steps": 0, "l1_warmup_steps": 0}
# name -> (what it changes, TrainingConfig overrides; "dictionary" holds DictionaryConfig overrides)
VARIANTS = {  # in the order they are run (the likeliest causes first)
    "baseline": ("our recipe before issue 14", {}),
    "saelens_recipe": ("all of SAELens' choices below at once", SAELENS_LIKE),
    "free_decoder_init_0.1": ("free decoder rows and init norm 0.1 (SAELens)",
                              {"unit_norm_decoder": False, "decoder_init_norm": 0.1}),
    "b_dec_zero": ("b_dec starts at 0 (SAELens), not the batch mean", {"b_dec_init": "zero"}),
    "b_dec_median": ("b_dec starts at the geometric median of batch 0", {"b_dec_init": "geometric_median"}),
    "init_0.1": ("rows start at norm 0.1 (encoder = decoder transpose); decoder still held at unit norm, so only "
                 "the encoder keeps the small init", {"decoder_init_norm": 0.1}),
    "free_decoder": ("decoder rows free, sparsity weighted by row norm (TopK: selection on pre x norm), init norm 1",
                     {"unit_norm_decoder": False}),
    "clip_1": ("gradient norm clipped at 1.0 (SAELens)", {"grad_clip_norm": 1.0}),
    "no_lr_decay": ("constant learning rate to the end (SAELens' default), not a linear decay over the last 20%",
                    {"lr_decay_fraction": 0.0}),
    "no_warmups": ("no learning-rate or L1 warm-up (SAELens' defaults)", {"lr_warmup_steps": 0, "l1_warmup_steps": 0}),
    "no_b_dec_input": ("encode x, not x - b_dec (apply_b_dec_to_input False)",
                       {"dictionary": {"apply_b_dec_to_input": False}}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--steps", type=int, default=146)
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--l1", type=float, default=2e-3, help="our L1 coefficient for every variant")
    parser.add_argument("--saelens-l1", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3],
                        help="SAELens' sweep, in our units (x d_in in SAELens)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--skip-saelens", help="reuse the SAELens rows of this earlier --json")
    parser.add_argument("--out", default="saelens_ablation_runs")
    parser.add_argument("--json", required=True)
    parser.add_argument("--md")
    args = parser.parse_args()

    base = {"store": args.store, "heldout": args.heldout, "eval_tokens": 16_384, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "seed": 0, "expansion": 4, "threads": args.threads}
    specs = [{"architecture": "topk", "k": args.k}, {"architecture": "standard", "l1_coefficient": args.l1}]
    started = time.perf_counter()
    if args.skip_saelens:
        saelens = json.loads(Path(args.skip_saelens).read_text())["saelens"]
    else:
        saelens = []
        for spec in [specs[0]] + [{"architecture": "standard", "l1_coefficient": a} for a in args.saelens_l1]:
            out = Path(args.out) / "saelens" / "_".join(f"{k}_{v}" for k, v in spec.items())
            out.mkdir(parents=True, exist_ok=True)
            record = compare.train_one("saelens", {**base, "spec": spec, "out": str(out)}, compare.DEFAULT_SAELENS_PYTHON,
                                       reuse=True)
            compare.print_row(args.steps, spec, "saelens", record)
            saelens.append({"spec": spec, **record})
    curve = [(row["l0"], row["fvu"]) for row in saelens if row["spec"]["architecture"] == "standard"]
    topk_reference = next(row["fvu"] for row in saelens if row["spec"]["architecture"] == "topk")

    variants = []
    for name in args.variants:
        what, overrides = VARIANTS[name]
        overrides = {**OLD_RECIPE, **overrides}
        dictionary = overrides.pop("dictionary", {})
        row = {"variant": name, "what": what, "training": overrides, "dictionary": dictionary}
        for spec in specs:
            out = Path(args.out) / name / spec["architecture"]
            out.mkdir(parents=True, exist_ok=True)
            record = compare.train_one("ours", {**base, "spec": {**spec, **dictionary}, "out": str(out),
                                                "ours_options": overrides}, sys.executable, reuse=True)
            compare.print_row(args.steps, spec, f"{name}", record)
            row[spec["architecture"]] = record
        row["topk_fvu_ratio"] = row["topk"]["fvu"] / topk_reference
        at_l0 = compare.fvu_at_l0(curve, row["standard"]["l0"])
        row["relu_saelens_fvu_at_l0"] = at_l0
        row["relu_fvu_ratio"] = None if at_l0 is None else row["standard"]["fvu"] / at_l0
        variants.append(row)
        write(args, saelens, variants, started)
    write(args, saelens, variants, started)


def write(args, saelens: list[dict], variants: list[dict], started: float) -> None:
    """The JSON (and Markdown) of what is done so far: rewritten after every variant."""
    report = {"command": " ".join(["python", "benchmarks/saelens_ablation.py", *sys.argv[1:]]), "steps": args.steps,
              "tokens": args.steps * args.batch_size, "threads": args.threads, "saelens": saelens,
              "variants": variants, "wall_s": time.perf_counter() - started}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report))
        print(markdown(report), flush=True)


def markdown(report: dict) -> str:
    saelens = report["saelens"]
    topk = next(row for row in saelens if row["spec"]["architecture"] == "topk")
    lines = [f"Same {report['tokens']:,} activations ({report['steps']} steps of 2048), held-out 16k tokens, "
             f"{report['threads']} torch thread(s). Command: `{report['command']}`", "",
             f"SAELens 6.54 reference: TopK k={topk['spec']['k']} FVU {topk['fvu']:.4f} (dead {topk['dead_fraction']:.3f});"
             " ReLU+L1 sweep (L0, FVU): " + ", ".join(f"({row['l0']:.1f}, {row['fvu']:.4f})" for row in saelens
                                                       if row["spec"]["architecture"] == "standard"), "",
             "| variant | TopK FVU | / SAELens | TopK dead | ReLU L0 | ReLU FVU | SAELens FVU at that L0 | ratio | what |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["variants"]:
        at = row["relu_saelens_fvu_at_l0"]
        lines.append(f"| {row['variant']} | {row['topk']['fvu']:.4f} | {row['topk_fvu_ratio']:.3f} | "
                     f"{row['topk']['dead_fraction']:.3f} | {row['standard']['l0']:.1f} | {row['standard']['fvu']:.4f} | "
                     f"{'out of range' if at is None else f'{at:.4f}'} | "
                     f"{'' if row['relu_fvu_ratio'] is None else format(row['relu_fvu_ratio'], '.3f')} | {row['what']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
