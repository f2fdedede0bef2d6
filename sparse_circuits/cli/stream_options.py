"""`train --stream` and its memory bound: the flags and their checks (standard library only: before torch)."""

from __future__ import annotations

import argparse

from sparse_circuits.cli.common import positive_int
from sparse_circuits.validation import InputError, positive_float

K_ARCHITECTURES = ("topk", "batchtopk")  # --arch values whose sparsity setting is k (--target-l0 needs no pilots)


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", action="store_true",
                        help="harvest into a bounded in-memory shuffling buffer and train from it as it fills, for "
                             "token counts that do not fit on disk: nothing is written to OUT/activations, memory "
                             "is bounded by --buffer-tokens/--buffer-mb, a rerun resumes exactly (one epoch only)")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--buffer-tokens", type=positive_int, default=None, metavar="N",
                       help="with --stream: activations held in memory at most (default 1,048,576 = 2^20: a batch of "
                            "4,096 then mixes tokens of about 8,000 contexts; 1.2 GB per hook at d_model 576 in float16)")
    bound.add_argument("--buffer-mb", type=positive_float, default=None, metavar="MB",
                       help="with --stream: the buffer as megabytes of activations (all hooks, in --store-dtype) "
                            "instead of tokens (default: off, --buffer-tokens bounds it)")


def check_stream_arguments(args) -> None:
    """Flags that cannot go with --stream (or need it), as `error:` lines."""
    bound = "--buffer-tokens" if args.buffer_tokens is not None else "--buffer-mb" if args.buffer_mb is not None else None
    if not args.stream:
        if bound:
            raise InputError(f"{bound} bounds the memory of --stream; give --stream too (or drop {bound})")
        return
    if args.epochs != 1:
        raise InputError(f"--stream trains on each token once, so --epochs must be 1 (got {args.epochs:g}); train "
                         "without --stream (harvest to disk) for several epochs")
    if args.activations is not None:
        raise InputError("--stream writes no activations, so --activations does not apply; drop one of them")
    if args.target_l0 is not None and args.arch not in K_ARCHITECTURES:
        raise InputError(f"--target-l0 with --stream is not supported for --arch {args.arch}: its calibration pilots "
                         "would run the model over the whole stream several more times. Calibrate on a stored harvest "
                         "first (train --target-l0 N without --stream, on fewer --tokens), then stream with the --l1 "
                         "it reports (with --arch topk or batchtopk, --target-l0 N is simply k = N)")
    if args.buffer_tokens is not None and args.buffer_tokens < args.batch_size:
        raise InputError(f"--buffer-tokens {args.buffer_tokens:,} holds fewer tokens than one batch (--batch-size "
                         f"{args.batch_size:,}); give a buffer of many batches, e.g. --buffer-tokens {64 * args.batch_size}")
