"""Data-parallel scaling on this machine: harvest and training tokens/s at 1, 2, ... processes (torchrun, gloo).

For each process count N it starts `torchrun --standalone --nproc_per_node=N` on this file in worker mode,
with the machine's cores split evenly among the ranks (OMP_NUM_THREADS = cores / N). Each worker harvests
the same contexts of the real model at one hook into a fresh store (every rank its shards), then trains
one TopK SAE on it for a fixed number of steps (every rank its share of each batch). Rank 0 times both
phases between barriers. The table shows tokens/s and the speed-up over one process on the same work.

    python benchmarks/distributed_scaling.py --processes 1 2 --json results/distributed_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from circuits.harvest import collect_activations, harvest_activations
    from circuits.models import load_model, model_name_of
    from sae.config import DictionaryConfig
    from sae.corpus import load_corpus, tokenize_contexts
    from sae.distributed import Distributed
    from sae.training import TrainingConfig, train_dictionaries

    distributed = Distributed.from_environment("cpu")
    model = load_model(args.model, device="cpu")
    hook = f"blocks.{args.layer}.hook_resid_post"
    contexts = tokenize_contexts(load_corpus("registry"), model.tokenizer, args.context_size, args.contexts, seed=5)
    out = Path(args.worker)
    with torch.inference_mode():  # warm-up: the first forward pays one-time costs
        collect_activations(model, contexts[:2], [hook])
    distributed.barrier()
    start = time.perf_counter()
    store = harvest_activations(model, contexts, [hook], out / "store", contexts_per_shard=args.contexts_per_shard,
                                model_name=model_name_of(model), progress=False, distributed=distributed)
    harvest_seconds = time.perf_counter() - start
    d_in = store.d_in(hook)
    config = DictionaryConfig("topk", d_in, args.expansion * d_in, hook_name=hook, k=40)
    training = TrainingConfig(total_tokens=args.train_steps * args.batch_size, batch_size=args.batch_size, lr=1e-3,
                              checkpoint_every=None, log_every=args.train_steps)
    distributed.barrier()
    start = time.perf_counter()
    train_dictionaries(store, [config], training, out / "sae", progress=False, distributed=distributed)
    train_seconds = time.perf_counter() - start
    if distributed.is_main:
        (out / "timing.json").write_text(json.dumps({
            "processes": distributed.world_size, "threads_per_process": torch.get_num_threads(),
            "harvest_tokens": store.n_tokens, "harvest_seconds": harvest_seconds,
            "harvest_tokens_per_s": store.n_tokens / harvest_seconds,
            "train_tokens": training.total_steps * training.batch_size, "train_seconds": train_seconds,
            "train_tokens_per_s": training.total_steps * training.batch_size / train_seconds}))
    distributed.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--contexts", type=int, default=96)
    parser.add_argument("--contexts-per-shard", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--json", help="write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 1
    rows = []
    for processes in args.processes:
        with tempfile.TemporaryDirectory() as folder:
            forwarded = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                         if key not in ("processes", "json", "worker")]
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                       __file__, *forwarded, f"--worker={folder}"]
            environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes)),
                           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            subprocess.run(command, check=True, env=environment, cwd=ROOT)
            rows.append(json.loads((Path(folder) / "timing.json").read_text()))
    base = rows[0]
    for row in rows:
        row["harvest_speedup"] = row["harvest_tokens_per_s"] / base["harvest_tokens_per_s"]
        row["train_speedup"] = row["train_tokens_per_s"] / base["train_tokens_per_s"]
    print(f"{'procs':>5} {'threads':>7} {'harvest tok/s':>14} {'speed-up':>9} {'train tok/s':>12} {'speed-up':>9}")
    for row in rows:
        print(f"{row['processes']:>5} {row['threads_per_process']:>7} {row['harvest_tokens_per_s']:>14.0f} "
              f"{row['harvest_speedup']:>9.2f} {row['train_tokens_per_s']:>12.0f} {row['train_speedup']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
