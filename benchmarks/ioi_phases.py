"""Time per phase of the IOI feature-patching benchmark, and what running from the patched layer saves.

Phases: loading the model and the SAE, the baselines (activations, then each fit), prompts, the clean
and counterfactual runs, then summed over dictionaries: encoding, attribution (one forward + backward),
the threshold sweep, bisection + ACDC pruning, confirmation by exact patching; and writing the outputs.
Then one batch of exact evaluations is timed three ways on `--speed-prompts` prompts: our replay of the
blocks after the hook (circuits/engine/replay.py), a full forward with a replacing hook, and the bridge's
`start_at_layer` (also checked against the full forward's logits).

    python benchmarks/ioi_phases.py --sae /tmp/saes/blocks.18.hook_resid_post --threads 2 --json ioi_phases.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _timed(phases: dict, name: str, function):
    start = time.perf_counter()
    value = function()
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return value


def replay_speed(model, hook: str, n_prompts: int, n_sets: int, seed: int) -> dict:
    """Seconds for one exact evaluation of `n_sets` edited runs: replay, full forward + hook, start_at_layer."""
    from circuits.engine import CachedRun
    from circuits.hooks import resume_block
    from tasks.ioi import generate_ioi_prompts, tokenize_ioi

    batch = tokenize_ioi(model, generate_ioi_prompts(model.tokenizer, n_prompts, seed=seed))
    run = CachedRun(model, hook, batch.clean_tokens, batch.final_positions, batch.counterfactual_tokens)
    timings, start_block = {}, resume_block(hook)
    exact = {}
    with torch.no_grad():
        for mode in ("resume", "hooks"):
            run.mode = mode
            start = time.perf_counter()
            for bucket in run.buckets:
                run.run(bucket, bucket.clean.repeat(n_sets, 1, 1))
            timings[f"{mode}_seconds"] = time.perf_counter() - start
        if start_block is not None and start_block < model.cfg.n_layers:
            start, worst = time.perf_counter(), 0.0
            for bucket in run.buckets:
                logits = model(bucket.clean.repeat(n_sets, 1, 1), start_at_layer=start_block)
                final = logits[torch.arange(logits.shape[0]), bucket.final.repeat(n_sets)]
                worst = max(worst, (final - run.clean_logits[bucket.rows].repeat(n_sets, 1)).abs().max().item())
            timings["start_at_layer_seconds"] = time.perf_counter() - start
            exact["start_at_layer_max_abs_logit_error"] = worst
    tokens = sum(bucket.tokens.numel() for bucket in run.buckets) * n_sets
    return {"prompts": n_prompts, "sets": n_sets, "tokens": tokens, **timings, **exact,
            "speedup_vs_full_forward": timings["hooks_seconds"] / timings["resume_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sae", type=Path, help="SAE folder (default: the one `sparse-circuits ioi` caches)")
    parser.add_argument("--hook", help="default: the SAE's hook")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--baselines", default="pca,ica,neurons,random,dense")
    parser.add_argument("--baseline-tokens", type=int, default=20_000)
    parser.add_argument("--activations", type=Path,
                        help="activation store to fit baselines on (default: the one beside the SAE, else harvest)")
    parser.add_argument("--confirm-top", type=int, default=50)
    parser.add_argument("--speed-prompts", type=int, default=16)
    parser.add_argument("--speed-sets", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="benchmark outputs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the timings to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from circuits.models import load_model
    from sae.corpus import load_corpus
    from sae.io import load_dictionary
    from sparse_circuits.pipelines.ioi import cached_sae_folder, default_hook
    from tasks.ioi import (BaselineSettings, SearchSettings, activations_for_baselines, activations_from_store,
                           build_baselines, run_ioi_benchmark)

    phases: dict[str, float] = {}
    started = time.perf_counter()
    model = _timed(phases, "load model", lambda: load_model(args.model, device="cpu"))
    folder = args.sae or cached_sae_folder(args.hook or default_hook(model))
    if folder is None:
        raise SystemExit("no SAE: pass --sae or run `sparse-circuits ioi` once to train and cache one")
    sae = _timed(phases, "load SAE", lambda: load_dictionary(folder, expected_d_in=model.cfg.d_model))
    hook = args.hook or sae.cfg.hook_name
    names = [name for name in args.baselines.split(",") if name]
    activations = None
    if names:
        store = args.activations or folder.parent / "activations"
        activations = _timed(phases, "baselines: activations",
                             lambda: activations_from_store(store, hook, args.baseline_tokens)
                             if store.exists() else None)
        if activations is None:
            activations = _timed(phases, "baselines: activations", lambda: activations_for_baselines(
                model, hook, args.baseline_tokens, load_corpus("registry"), seed=args.seed, progress=False))
    dictionaries = {"sae": sae}
    for name in names:
        fitted = _timed(phases, f"baselines: fit {name}", lambda: build_baselines(
            model, hook, [name], args.baseline_tokens, None, seed=args.seed, activations=activations,
            settings=BaselineSettings(ratio=sae.n_features // sae.d_in, tied=sae.cfg.tied), progress=False))
        dictionaries.update(fitted)
    out = args.out or Path(tempfile.mkdtemp(prefix="ioi_phases_"))
    benchmark_start = time.perf_counter()
    result = run_ioi_benchmark(model, dictionaries, hook, args.prompts, out, seed=args.seed, progress=False,
                               settings=SearchSettings(confirm_top=args.confirm_top))
    benchmark_seconds = time.perf_counter() - benchmark_start
    for name, seconds in result.timings.items():
        phases[f"benchmark: {name}"] = seconds
    speed = replay_speed(model, hook, args.speed_prompts, args.speed_sets, args.seed)
    total = time.perf_counter() - started

    print(f"IOI benchmark, {args.prompts} prompts, {hook}, {len(dictionaries)} dictionaries, "
          f"{torch.get_num_threads()} thread(s)\n")
    print(f"{'phase':<36} {'seconds':>9}")
    for name, seconds in phases.items():
        print(f"{name:<36} {seconds:>9.1f}")
    print(f"{'benchmark total (SAE existing)':<36} {benchmark_seconds:>9.1f}")
    print(f"{'everything':<36} {total:>9.1f}\n")
    print(f"{'dictionary':<12} {'exact evals':>11} {'attrib s':>9} {'sweep s':>8} {'prune s':>8} {'confirm s':>9}")
    for name, info in result.per_dictionary.items():
        timing = info["timings_seconds"]
        print(f"{name:<12} {info['exact_evaluations']:>11} {timing.get('attribution', 0):>9.1f} "
              f"{timing.get('threshold_sweep', 0):>8.1f} {timing.get('prune', 0):>8.1f} {timing.get('confirm', 0):>9.1f}")
    print(f"\none evaluation of {speed['sets']} sets x {speed['prompts']} prompts ({speed['tokens']} tokens): "
          f"replay {speed['resume_seconds']:.2f} s, full forward {speed['hooks_seconds']:.2f} s "
          f"(x{speed['speedup_vs_full_forward']:.2f})"
          + (f", start_at_layer {speed['start_at_layer_seconds']:.2f} s "
             f"(max logit error {speed['start_at_layer_max_abs_logit_error']:.1e})"
             if "start_at_layer_seconds" in speed else ""))
    print(f"\nsummary ({out}):")
    from tasks.ioi import format_summary

    print(format_summary(result.summary))
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "hook": hook, "prompts": args.prompts,
                                         "phases_seconds": phases, "benchmark_seconds": benchmark_seconds,
                                         "total_seconds": total, "per_dictionary": result.per_dictionary,
                                         "replay_speed": speed, "summary": result.summary.to_dict("records")},
                                        indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
