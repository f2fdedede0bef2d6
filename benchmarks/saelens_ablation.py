"""Which recipe difference between our training and SAELens' makes the FVU gap (issue 14). Not run in CI.

Trains SAELens once (TopK and an L1 sweep: its L0-FVU curve) and our SAE once per recipe variant (TopK and ReLU+L1
at one coefficient), each variant toggling TrainingConfig / DictionaryConfig options from our recipe, all on the
same store, batches and steps (benchmarks/compare_saelens.py does the training and evaluation). Each of our ReLU
points is compared with SAELens' FVU interpolated at its L0. Writes JSON and a Markdown table:

    python benchmarks/saelens_ablation.py --store STORE --heldout HELDOUT --steps 146 --json ablation.json --md ablation.md

`--architectures topk` and `--architectures standard` run the two halves (side by side, as two processes);
`--merge A.json B.json --json ablation.json --md ablation.md` puts them in one table.
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
# SAELens clips at 1.0 on a loss summed over d_in; ours averages over d_in, so its clip is 1/d_in here ("auto"). The
# ablation.md run (before this was seen) clipped at 1.0 in OUR units, 576x weaker: it never bound.
SAELENS_LIKE = {"b_dec_init": "zero", "unit_norm_decoder": False, "decoder_init_norm": 0.1, "grad_clip_norm": "auto",
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
    "clip_1": ("gradient norm clipped at 1.0 in our loss's units (576x weaker than SAELens' clip; never binds)",
               {"grad_clip_norm": 1.0}),
    "clip_saelens": ("gradient norm clipped at 1/d_in: SAELens' clip at 1.0 in our loss's units (our default since)",
                     {"grad_clip_norm": "auto", "unit_norm_decoder": False, "decoder_init_norm": 0.1}),
    "no_lr_decay": ("constant learning rate to the end (SAELens' default), not a linear decay over the last 20%",
                    {"lr_decay_fraction": 0.0}),
    "no_warmups": ("no learning-rate or L1 warm-up (SAELens' defaults)", {"lr_warmup_steps": 0, "l1_warmup_steps": 0}),
    "no_b_dec_input": ("encode x, not x - b_dec (apply_b_dec_to_input False)",
                       {"dictionary": {"apply_b_dec_to_input": False}}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store")
    parser.add_argument("--heldout")
    parser.add_argument("--steps", type=int, default=146)
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--l1", type=float, default=2e-3, help="our L1 coefficient for every variant")
    parser.add_argument("--saelens-l1", type=float, nargs="+", default=[1e-3, 3e-3, 9e-3],
                        help="SAELens' sweep, in our units (x d_in in SAELens)")
    parser.add_argument("--architectures", nargs="+", default=["topk", "standard"], choices=["topk", "standard"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--saelens-threads", type=int, help="torch threads of the SAELens runs (default --threads)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--out", default="saelens_ablation_runs")
    parser.add_argument("--merge", nargs="+", help="only write --json/--md from these part JSONs (one per architecture)")
    parser.add_argument("--json", required=True)
    parser.add_argument("--md")
    args = parser.parse_args()
    if args.merge:
        write(merge([json.loads(Path(path).read_text()) for path in args.merge]), args)
        return
    if not args.store or not args.heldout:
        parser.error("--store and --heldout are required")

    base = {"store": args.store, "heldout": args.heldout, "eval_tokens": 16_384, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "seed": 0, "expansion": 4, "threads": args.threads}
    specs = {"topk": [{"architecture": "topk", "k": args.k}],
             "standard": [{"architecture": "standard", "l1_coefficient": a} for a in args.saelens_l1]}
    started = time.perf_counter()
    report = {"command": " ".join(["python", "benchmarks/saelens_ablation.py", *sys.argv[1:]]), "steps": args.steps,
              "tokens": args.steps * args.batch_size, "threads": args.threads,
              "saelens_threads": args.saelens_threads or args.threads, "saelens": [], "variants": []}
    for architecture in args.architectures:
        for spec in specs[architecture]:
            out = Path(args.out) / "saelens" / "_".join(f"{k}_{v}" for k, v in spec.items())
            out.mkdir(parents=True, exist_ok=True)
            job = {**base, "spec": spec, "out": str(out), "threads": report["saelens_threads"]}
            record = compare.train_one("saelens", job, compare.DEFAULT_SAELENS_PYTHON, reuse=True)
            compare.print_row(args.steps, spec, "saelens", record)
            report["saelens"].append({"spec": spec, **record})

    ours = {"topk": {"architecture": "topk", "k": args.k}, "standard": {"architecture": "standard", "l1_coefficient": args.l1}}
    for name in args.variants:
        what, overrides = VARIANTS[name]
        overrides = {**OLD_RECIPE, **overrides}
        dictionary = overrides.pop("dictionary", {})
        row = {"variant": name, "what": what, "training": overrides, "dictionary": dictionary}
        for architecture in args.architectures:
            spec = ours[architecture]
            out = Path(args.out) / name / architecture
            out.mkdir(parents=True, exist_ok=True)
            record = compare.train_one("ours", {**base, "spec": {**spec, **dictionary}, "out": str(out),
                                                "ours_options": overrides}, sys.executable, reuse=True)
            compare.print_row(args.steps, spec, name, record)
            row[architecture] = record
        report["variants"].append(row)
        report["wall_s"] = time.perf_counter() - started
        write(compare_rows(report), args)


def compare_rows(report: dict) -> dict:
    """Each variant's FVU against SAELens': TopK directly (L0 = k), ReLU at its L0 on SAELens' sweep."""
    curve = [(row["l0"], row["fvu"]) for row in report["saelens"] if row["spec"]["architecture"] == "standard"]
    topk = [row["fvu"] for row in report["saelens"] if row["spec"]["architecture"] == "topk"]
    for row in report["variants"]:
        if "topk" in row and topk:
            row["topk_fvu_ratio"] = row["topk"]["fvu"] / topk[0]
        if "standard" in row and curve:
            at_l0 = compare.fvu_at_l0(curve, row["standard"]["l0"])
            row["relu_saelens_fvu_at_l0"] = at_l0
            row["relu_fvu_ratio"] = None if at_l0 is None else row["standard"]["fvu"] / at_l0
    return report


def merge(parts: list[dict]) -> dict:
    """One report from part reports run side by side (say one per architecture): their SAELens rows, and each
    variant's records from every part that ran it."""
    merged = {"command": " && ".join(part["command"] for part in parts), "steps": parts[0]["steps"],
              "tokens": parts[0]["tokens"], "threads": parts[0]["threads"],
              "saelens_threads": parts[0]["saelens_threads"], "parts": [part["command"] for part in parts],
              "saelens": [row for part in parts for row in part["saelens"]], "variants": []}
    by_name: dict[str, dict] = {}
    for part in parts:
        for row in part["variants"]:
            if row["variant"] not in by_name:
                by_name[row["variant"]] = {key: row[key] for key in ("variant", "what", "training", "dictionary")}
                merged["variants"].append(by_name[row["variant"]])
            by_name[row["variant"]].update({key: row[key] for key in ("topk", "standard") if key in row})
    return compare_rows(merged)


def write(report: dict, args) -> None:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report))
        print(markdown(report), flush=True)


def markdown(report: dict) -> str:
    saelens = report["saelens"]
    topk = [row for row in saelens if row["spec"]["architecture"] == "topk"]
    relu = [row for row in saelens if row["spec"]["architecture"] == "standard"]
    lines = [f"Same {report['tokens']:,} activations ({report['steps']} steps of 2048), held-out 16k tokens; "
             f"torch threads: ours {report['threads']}, SAELens {report['saelens_threads']}.", "",
             f"Command: `{report['command']}`", ""]
    if topk:
        lines.append(f"SAELens 6.54 TopK k={topk[0]['spec']['k']}: FVU {topk[0]['fvu']:.4f}, dead "
                     f"{topk[0]['dead_fraction']:.3f}.")
    if relu:
        lines.append("SAELens 6.54 ReLU+L1 sweep (L1 in our units, L0, FVU): " + ", ".join(
            f"({row['spec']['l1_coefficient']:g}, {row['l0']:.1f}, {row['fvu']:.4f})" for row in relu) + ".")
    lines += ["", "| variant | TopK FVU | / SAELens | TopK dead | ReLU L0 | ReLU FVU | SAELens FVU at that L0 | ratio | "
              "what |", "|---|---|---|---|---|---|---|---|---|"]

    def number(value, digits: int = 4) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    for row in report["variants"]:
        top, standard = row.get("topk", {}), row.get("standard", {})
        at = row.get("relu_saelens_fvu_at_l0")
        lines.append(f"| {row['variant']} | {number(top.get('fvu'))} | {number(row.get('topk_fvu_ratio'), 3)} | "
                     f"{number(top.get('dead_fraction'), 3)} | {number(standard.get('l0'), 1)} | "
                     f"{number(standard.get('fvu'))} | "
                     f"{'out of range' if standard and at is None else number(at)} | "
                     f"{number(row.get('relu_fvu_ratio'), 3)} | {row['what']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
