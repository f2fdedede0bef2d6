"""Harvesting cost vs depth: our one-pass, early-stopping harvest against a plain transformers full forward.

For each layer L it times `collect_activations` at `blocks.L.hook_resid_post` and a plain transformers full
forward of the whole model on the same tokens (a separate `AutoModelForCausalLM` loaded from the same folder,
not wrapped by the bridge, its default attention, no KV cache), interleaved in one run, and prints the cost
ratio (fastest of interleaved rounds over fastest) next to the ideal: the FLOP share of what the harvest must compute (the embedding and L+1 blocks) in a
full forward (the embedding, every block, the unembedding), counted from the config:

    block    = 2*d*(n_heads + 2*n_kv_heads)*d_head + 2*n_heads*d_head*d   (q, k, v, o projections)
             + 4*n_heads*d_head*context                                   (scores and values, full context)
             + (3 if gated else 2) * 2*d*d_mlp                            (MLP)
    unembed  = 2*d*vocab,  embedding lookup ~ 0;   share(L) = (L+1)*block / (n_layers*block + unembed)

per token. `cost/share` is the ratio over that ideal (the target is <= 1.1). The "bridge" column is the harvest
as it was (TransformerBridge `run_with_cache(stop_at_layer=...)`), for the record of where the time went. The
last column is the harvest's useful FLOP rate, (L+1)*block*tokens/s, as a fraction of the machine's fp32 matmul
rate measured in the same run (a square matmul, best of several; train_throughput.matmul_flops_per_second).
`--breakdown` also times full-forward variants (eager attention, KV cache, the bridge). Times are this process's
CPU seconds by default (`--clock cpu`: with one thread, other processes on a shared machine do not count).
Example:

    python benchmarks/harvest_speed.py --layers 5 12 20 29 --threads 1 --json results/harvest_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_flops_per_second  # noqa: E402  (a sibling benchmark script)

from circuits.harvest import collect_activations  # noqa: E402
from circuits.hooks import stop_layer  # noqa: E402
from circuits.models import load_model  # noqa: E402
from sae.corpus import load_corpus, tokenize_contexts  # noqa: E402


def forward_flops_per_token(cfg, context_size: int) -> tuple[float, float]:
    """(FLOPs of one block, FLOPs of the unembedding) per token, counted from a bridge config (see docstring)."""
    d, heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head
    kv_heads = getattr(cfg, "n_key_value_heads", None) or heads
    projections = 2 * d * (heads + 2 * kv_heads) * d_head + 2 * heads * d_head * d
    attention = 4 * heads * d_head * context_size
    mlp = (3 if getattr(cfg, "gated_mlp", False) else 2) * 2 * d * cfg.d_mlp
    return float(projections + attention + mlp), float(2 * d * cfg.d_vocab)


def flop_share(cfg, layer: int, context_size: int) -> float:
    """The FLOPs of the embedding and blocks 0..layer over those of a full forward with the unembedding."""
    block, unembed = forward_flops_per_token(cfg, context_size)
    return (layer + 1) * block / (cfg.n_layers * block + unembed)


def plain_transformers_model(model, spec: str):
    """The same weights as a plain transformers model (its default attention), not wrapped by the bridge."""
    from transformers import AutoModelForCausalLM

    source = getattr(model, "model_folder", None) or spec
    return AutoModelForCausalLM.from_pretrained(source, dtype=next(model.parameters()).dtype).eval()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = CLOCKS["cpu"]


def _seconds(function) -> float:
    start = CLOCK()
    function()
    return CLOCK() - start


def interleaved(functions: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` rounds, the functions one after another in each round (a
    slow spell from another process then hits every function of a round alike; ratios are taken per round)."""
    for function in functions.values():
        function()  # warm-up
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(_seconds(function))
    return times


def best_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The ratio of the fastest rounds: on a shared machine the least disturbed timing of each is the closest to
    its cost (the per-round median ratio is kept in the JSON beside it)."""
    return min(numerator) / min(denominator)


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def measure(model, plain, batches: list[torch.Tensor], layers: list[int], repeats: int, old_path: bool) -> list[dict]:
    n_tokens = sum(batch.numel() for batch in batches)
    context = batches[0].shape[1]
    block, _ = forward_flops_per_token(model.cfg, context)
    rows = []
    for layer in layers:
        hook = f"blocks.{layer}.hook_resid_post"
        stop = stop_layer([hook], model.cfg.n_layers)
        functions = {
            "plain": lambda: [plain(input_ids=batch, use_cache=False) for batch in batches],
            "ours": lambda: [collect_activations(model, batch, [hook]) for batch in batches],
        }
        if old_path:
            functions["bridge"] = lambda: [model.run_with_cache(batch, names_filter=[hook], stop_at_layer=stop)
                                           for batch in batches]
        times = interleaved(functions, repeats)
        share = flop_share(model.cfg, layer, context)
        cost = best_ratio(times["ours"], times["plain"])
        row = {"layer": layer, "flop_share": share, "cost_ratio": cost, "cost_over_share": cost / share,
               "cost_ratio_median_of_rounds": median_ratio(times["ours"], times["plain"]),
               "ours_tokens_per_s": n_tokens / min(times["ours"]),
               "plain_full_forward_tokens_per_s": n_tokens / min(times["plain"]),
               "useful_flops_per_token": (layer + 1) * block, "seconds": times}
        if old_path:
            row["bridge_cost_ratio"] = best_ratio(times["bridge"], times["plain"])
        rows.append(row)
    return rows


def breakdown(model, plain, batches: list[torch.Tensor], repeats: int, spec: str) -> dict[str, float]:
    """Full-forward variants as a fraction of the plain forward (default attention, no KV cache)."""
    from transformers import AutoModelForCausalLM

    source = getattr(model, "model_folder", None) or spec
    eager = AutoModelForCausalLM.from_pretrained(source, dtype=next(model.parameters()).dtype,
                                                 attn_implementation="eager").eval()
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    functions = {
        "plain": lambda: [plain(input_ids=batch, use_cache=False) for batch in batches],
        "plain_with_kv_cache": lambda: [plain(input_ids=batch) for batch in batches],
        "plain_eager_attention": lambda: [eager(input_ids=batch, use_cache=False) for batch in batches],
        "plain_blocks_only": lambda: [plain.model(input_ids=batch, use_cache=False) for batch in batches],
        "bridge_forward": lambda: [model(batch) for batch in batches],
        "bridge_run_with_cache_last_block": lambda: [model.run_with_cache(batch, names_filter=[last])
                                                     for batch in batches],
    }
    times = interleaved(functions, repeats)
    return {name: best_ratio(times[name], times["plain"]) for name in functions}


def print_table(rows: list[dict], matmul_rate: float) -> None:
    bridge = "bridge" in "".join(rows[0])
    print(f"{'layer':>5} {'FLOP share':>10} {'cost/full':>9} {'cost/share':>10} "
          + (f"{'bridge (was)':>12} " if bridge else "")
          + f"{'ours tok/s':>10} {'full tok/s':>10} {'of matmul':>9}")
    for row in rows:
        fraction = row["ours_tokens_per_s"] * row["useful_flops_per_token"] / matmul_rate
        row["fraction_of_matmul_rate"] = fraction
        print(f"{row['layer']:>5} {row['flop_share']:>10.3f} {row['cost_ratio']:>9.3f} {row['cost_over_share']:>10.3f} "
              + (f"{row['bridge_cost_ratio']:>12.3f} " if bridge else "")
              + f"{row['ours_tokens_per_s']:>10.0f} {row['plain_full_forward_tokens_per_s']:>10.0f} {fraction:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 12, 20, 29])
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; ratios of the fastest rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the model and the matmul reference")
    parser.add_argument("--no-bridge", action="store_true", help="skip timing the old bridge path")
    parser.add_argument("--breakdown", action="store_true", help="also time full-forward variants")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="cpu: this process's CPU seconds (with 1 thread, immune to other processes taking the "
                             "cores of a shared machine; tokens/s are then per CPU-second); wall: elapsed time")
    parser.add_argument("--json", help="write the table to this file")
    args = parser.parse_args()

    global CLOCK
    CLOCK = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    plain = plain_transformers_model(model, args.model)
    tokens = tokenize_contexts(load_corpus("registry"), model.tokenizer, args.context_size, args.contexts, seed=1)
    batches = list(tokens.split(args.batch_size))
    matmul_rate = matmul_flops_per_second(1024, 1024, 1024, clock=CLOCK)
    with torch.inference_mode():
        rows = measure(model, plain, batches, args.layers, args.repeats, old_path=not args.no_bridge)
        variants = breakdown(model, plain, batches, args.repeats, args.model) if args.breakdown else None
    print(f"{args.model}, {tokens.numel()} tokens ({args.contexts} x {args.context_size}, batch {args.batch_size}), "
          f"{torch.get_num_threads()} thread(s), {args.clock} clock, fp32 matmul {matmul_rate / 1e9:.1f} GFLOP/s")
    print_table(rows, matmul_rate)
    if variants:
        print("full forward variants, cost relative to the plain forward:")
        for name, ratio in variants.items():
            print(f"  {name:<34} {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "clock": args.clock,
                       "tokens": tokens.numel(),
                       "context_size": args.context_size, "batch_size": args.batch_size, "repeats": args.repeats,
                       "matmul_flops_per_s": matmul_rate, "rows": rows, "full_forward_variants": variants},
                      handle, indent=2)


if __name__ == "__main__":
    main()
