"""Sparse against dense decoding for TopK and BatchTopK SAEs, inference and training, in one run.

The sparse path gathers each token's k active decoder rows (embedding_bag: B * k * d multiply-adds) instead
of multiplying the mostly-zero [B, F] code matrix by the [F, d] decoder (B * F * d). Rows of the table:

    decode            decode(codes) (dense matmul)       vs decode_sparse(indices, values)
    topk forward      decode(encode(x))                  vs TopKSAE.forward (decode_sparse)
    batchtopk forward decode(encode(x))                  vs BatchTopKSAE.forward (decode_active: nonzero + gather)
    topk train        codes -> reconstruction_terms, backward   vs TopKSAE.training_loss (sparse), backward
    batchtopk train   batch_topk codes -> reconstruction_terms  vs BatchTopKSAE.training_loss (sparse), backward

Each time is the best of `--rounds` after one warm-up; `speedup` = dense seconds / sparse seconds. Example
(the committed results):

    nice -n 5 python benchmarks/sparse_decode.py --threads 1 --json results/sparse_decode.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sae.batchtopk import batch_topk
from sae.config import DictionaryConfig
from sae.dictionary import TrainingState
from sae.registry import build_dictionary


def best_seconds(work, rounds: int) -> float:
    work()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def state(d_sae: int) -> TrainingState:
    return TrainingState(step=0, sparsity_ramp=1.0, dead=torch.zeros(d_sae, dtype=torch.bool), aux_k_coefficient=0.0)


def cases(x: torch.Tensor, d_sae: int, k: int):
    """(name, dense work, sparse work) for one width and k."""
    d_in = x.shape[1]
    topk = build_dictionary(DictionaryConfig("topk", d_in, d_sae, hook_name="hook", k=k))
    batchtopk = build_dictionary(DictionaryConfig("batchtopk", d_in, d_sae, hook_name="hook", k=k))
    with torch.no_grad():
        top = topk.pre_activations(x).topk(k, dim=-1, sorted=False)
        values = torch.relu(top.values)
        codes = torch.zeros(x.shape[0], d_sae).scatter_(-1, top.indices, values)
        # an inference threshold that keeps about k codes per token, as training would have set it
        kept = batch_topk(batchtopk.pre_activations(x), k)
        batchtopk.threshold.fill_(float(kept[kept > 0].min()))

    def no_grad(work):
        def run():
            with torch.no_grad():
                work()
        return run

    def dense_topk_train():
        topk.zero_grad(set_to_none=True)
        topk.reconstruction_terms(x, topk.activation(topk.pre_activations(x)))[1].backward()

    def sparse_topk_train():
        topk.zero_grad(set_to_none=True)
        topk.training_loss(x, state(d_sae)).mse.backward()

    def dense_batchtopk_train():
        batchtopk.zero_grad(set_to_none=True)
        batchtopk.reconstruction_terms(x, batch_topk(batchtopk.pre_activations(x), k))[1].backward()

    def sparse_batchtopk_train():
        batchtopk.zero_grad(set_to_none=True)
        batchtopk.training_loss(x, state(d_sae)).mse.backward()

    return [
        ("decode", no_grad(lambda: topk.decode(codes)), no_grad(lambda: topk.decode_sparse(top.indices, values))),
        ("topk forward", no_grad(lambda: topk.decode(topk.encode(x))), no_grad(lambda: topk(x))),
        ("batchtopk forward", no_grad(lambda: batchtopk.decode(batchtopk.encode(x))), no_grad(lambda: batchtopk(x))),
        ("topk train", dense_topk_train, sparse_topk_train),
        ("batchtopk train", dense_batchtopk_train, sparse_batchtopk_train),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, nargs="+", default=[2304, 9216])
    parser.add_argument("--k", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.d_in)

    rows = []
    print(f"{'case':<18} {'d_sae':>6} {'k':>4} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}")
    for d_sae in args.d_sae:
        for k in args.k:
            for name, dense, sparse in cases(x, d_sae, k):
                dense_s, sparse_s = best_seconds(dense, args.rounds), best_seconds(sparse, args.rounds)
                row = {"case": name, "d_in": args.d_in, "d_sae": d_sae, "k": k, "batch": args.batch_size,
                       "dense_ms": 1e3 * dense_s, "sparse_ms": 1e3 * sparse_s, "speedup": dense_s / sparse_s}
                rows.append(row)
                print(f"{name:<18} {d_sae:>6} {k:>4} {row['dense_ms']:>10.1f} {row['sparse_ms']:>10.1f} "
                      f"{row['speedup']:>7.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
