"""SAE training throughput against the machine's measured fp32 matmul rate.

Times `train_dictionaries` on in-memory activations (d_in 576, 2304 features, batch 4096 by default)
and a plain fp32 matmul of the same size, in one run. One step is five matmuls of B x d x F: encode
and decode forward; backward, the gradient to the codes, to the decoder and to the encoder (none to
the input activations), so about 10 * B * d * F FLOPs; the fraction of the FLOP limit reached is
(10 * B * d * F * steps/s) / matmul FLOP/s, the reference being the best of several warmed-up timings
on the same thread count (so one slow round cannot push the fraction above 1). The default SAE (tied
ReLU on Gaussian data) keeps dense codes, so training takes the dense path; the sparse decode of TopK
and of sparse ReLU codes (sae.dictionary.sparse_reconstruction_terms) does less than 10 * B * d * F.
Example:

    python benchmarks/train_throughput.py --steps 20 --threads 1 --json results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from sae.batches import TensorBatchSource
from sae.config import DictionaryConfig
from sae.training import TrainingConfig, train_dictionaries


def matmul_flops_per_second(batch: int, d_in: int, d_sae: int, repeats: int = 10, rounds: int = 5,
                            clock=time.perf_counter) -> float:
    """The machine's fp32 matmul rate on the training's shape, on the current torch thread count: warmed up, then
    the BEST of `rounds` timings of `repeats` products into a preallocated output (a one-off slow round, from
    another process taking the cores, would otherwise lower the reference and push the fraction above 1).
    `clock`: wall time by default; time.process_time gives the rate per CPU-second of this process."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    out = torch.empty(batch, d_sae)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        best = min(best, clock() - start)
    return 2 * batch * d_in * d_sae * repeats / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--arch", choices=["standard", "topk"], default="standard")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the training and the reference")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = torch.randn(args.batch_size * 4, args.d_in)
    source = TensorBatchSource({"hook": data})
    cfg = DictionaryConfig(args.arch, d_in=args.d_in, d_sae=args.d_sae, hook_name="hook", tied=True,
                           l1_coefficient=1e-3, k=32 if args.arch == "topk" else None)
    training = TrainingConfig(total_tokens=args.batch_size * (args.steps + 2), batch_size=args.batch_size,
                              checkpoint_every=None, log_every=10**9)
    with tempfile.TemporaryDirectory() as out:
        train_dictionaries(source, [cfg], TrainingConfig(total_tokens=args.batch_size * 2, batch_size=args.batch_size,
                           checkpoint_every=None), out + "/warm", progress=False)
        start = time.perf_counter()
        train_dictionaries(source, [cfg], training, out + "/run", progress=False)
        seconds = time.perf_counter() - start
    flops = matmul_flops_per_second(args.batch_size, args.d_in, args.d_sae)  # after the run: as warm as it
    steps = training.total_steps
    step_flops = 10 * args.batch_size * args.d_in * args.d_sae
    row = {"threads": torch.get_num_threads(), "tokens_per_s": steps * args.batch_size / seconds,
           "steps_per_s": steps / seconds, "achieved_gflops": step_flops * steps / seconds / 1e9,
           "matmul_gflops": flops / 1e9, "fraction_of_matmul_rate": step_flops * steps / seconds / flops}
    for key, value in row.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(row, handle, indent=2)


if __name__ == "__main__":
    main()
