"""SAE training throughput (tokens/s) against the device's measured matmul rate, on CPU or CUDA, fp32 or autocast.

Times `train_dictionaries` on in-memory activations (d_in 576, 2304 features, batch 4096 by default) and,
in the same run, a plain matmul of the training's shape [B, d] x [d, F] in the dtype the training's
matmuls run in (float32, or bf16/fp16 under --autocast). FLOPs counted per step are the matmuls the
step actually does (no gradient to the input activations):
  dense decode (standard: the tied ReLU on Gaussian data keeps dense codes, so training takes the dense
  path): encode forward, decode forward, gradient to the codes, to the decoder, to the encoder = 10*B*d*F;
  sparse decode (topk, batchtopk): the dense encode forward 2*B*d*F; then on CPU, where the backward passes
  are sparse too (sae/sparse_backward.py), the gathered decode, its gradient to the codes and to the decoder
  rows, and the encoder's gradient at the k selected entries, 8*B*k*d; on CUDA the encoder's gradient is the
  dense 2*B*d*F and the decode side 6*B*k*d.
fraction_of_matmul_rate = achieved FLOP/s / reference FLOP/s, the reference being the best of several
warmed-up rounds measured before and after the training (a round slowed by another process cannot
lower it), so the fraction stays below 1. On CUDA every timing is bracketed by synchronisation and the
batches travel from pinned host memory (sae.training.precision.to_training_device). Example (the
committed results; one row per architecture and precision, all in one run):

    nice -n 5 python benchmarks/train_throughput.py --steps 10 --threads 1 --arch standard topk \\
        --autocast off bf16 --json results/train_throughput.json
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
from sae.sparse_backward import sparse_backward_on
from sae.training.precision import AUTOCAST_DTYPES

K = 32  # active features per token for topk and batchtopk


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(batch: int, d_in: int, d_sae: int, repeats: int = 10, rounds: int = 5,
                            dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                            clock=time.perf_counter) -> float:
    """The device's matmul rate on the training's shape and dtype, on the current torch thread count: warmed up,
    then the BEST of `rounds` timings of `repeats` products into a preallocated output (a one-off slow round, from
    another process taking the cores, would otherwise lower the reference and push the fraction above 1).
    `clock`: wall time by default; time.process_time gives the rate per CPU-second of this process (CPU only)."""
    device = torch.device(device)
    a = torch.randn(batch, d_in, device=device).to(dtype)
    b = torch.randn(d_in, d_sae, device=device).to(dtype)
    out = torch.empty(batch, d_sae, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = clock()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, clock() - start)
    return 2 * batch * d_in * d_sae * repeats / best


def step_flops(arch: str, batch: int, d_in: int, d_sae: int, device: torch.device = torch.device("cpu")) -> int:
    """The matmul FLOPs of one training step (see the module docstring)."""
    if arch in ("topk", "batchtopk"):
        if sparse_backward_on(device):
            return 2 * batch * d_in * d_sae + 8 * batch * K * d_in
        return 4 * batch * d_in * d_sae + 6 * batch * K * d_in
    return 10 * batch * d_in * d_sae


def time_training(arch: str, autocast: str | None, args, device: torch.device) -> float:
    """Seconds for args.steps training steps (after a 2-step warm-up run of the same settings)."""
    data = torch.randn(args.batch_size * 4, args.d_in)
    source = TensorBatchSource({"hook": data})
    cfg = DictionaryConfig(arch, d_in=args.d_in, d_sae=args.d_sae, hook_name="hook", tied=True, l1_coefficient=1e-3,
                           k=K if arch in ("topk", "batchtopk") else None)

    def settings(steps: int) -> TrainingConfig:
        return TrainingConfig(total_tokens=args.batch_size * steps, batch_size=args.batch_size, checkpoint_every=None,
                              log_every=10**9, autocast=autocast)

    with tempfile.TemporaryDirectory() as out:
        train_dictionaries(source, [cfg], settings(2), out + "/warm", progress=False, device=device)
        synchronize(device)
        start = time.perf_counter()
        train_dictionaries(source, [cfg], settings(args.steps), out + "/run", progress=False, device=device)
        synchronize(device)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--arch", nargs="+", choices=["standard", "topk", "batchtopk"], default=["standard"])
    parser.add_argument("--autocast", nargs="+", choices=["off", "bf16", "fp16"], default=["off"],
                        help="precision(s) of the SAE forward and loss (fp16: CUDA only)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the training and the reference")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (torch {torch.__version__}); "
                     "use --device cpu")

    def reference(autocast: str) -> float:
        dtype = AUTOCAST_DTYPES.get(autocast, torch.float32)
        return matmul_flops_per_second(args.batch_size, args.d_in, args.d_sae, dtype=dtype, device=device)

    precisions = list(dict.fromkeys(args.autocast))
    references = {autocast: reference(autocast) for autocast in precisions}  # before the runs ...
    seconds = {(arch, autocast): time_training(arch, None if autocast == "off" else autocast, args, device)
               for arch in args.arch for autocast in precisions}
    for autocast in precisions:  # ... and after them: the best of both
        references[autocast] = max(references[autocast], reference(autocast))

    rows = []
    print(f"{'arch':<10} {'autocast':<8} {'tokens/s':>10} {'GFLOP/s':>9} {'matmul GFLOP/s':>15} {'fraction':>9}")
    for (arch, autocast), elapsed in seconds.items():
        achieved = step_flops(arch, args.batch_size, args.d_in, args.d_sae, device) * args.steps / elapsed
        row = {"arch": arch, "autocast": autocast, "device": str(device), "threads": torch.get_num_threads(),
               "d_in": args.d_in, "d_sae": args.d_sae, "batch_size": args.batch_size, "steps": args.steps,
               "tokens_per_s": args.steps * args.batch_size / elapsed, "steps_per_s": args.steps / elapsed,
               "achieved_gflops": achieved / 1e9, "matmul_gflops": references[autocast] / 1e9,
               "fraction_of_matmul_rate": achieved / references[autocast]}
        rows.append(row)
        print(f"{arch:<10} {autocast:<8} {row['tokens_per_s']:>10.0f} {row['achieved_gflops']:>9.1f} "
              f"{row['matmul_gflops']:>15.1f} {row['fraction_of_matmul_rate']:>9.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
