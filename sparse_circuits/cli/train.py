"""`sparse-circuits train`: harvest activations at hook points in one pass, then train SAEs from that harvest."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int
from sparse_circuits.cli.stream_options import add_stream_arguments, check_stream_arguments
from sparse_circuits.defaults import ARCHITECTURES
from sparse_circuits.validation import nonnegative_float, nonnegative_int, positive_float, seed

DESCRIPTION = """Harvest activations at one or more hook points in one pass (stopping after the deepest), then
train one SAE per hook and per L1 coefficient (or k) from that harvest. Writes
OUT/<hook>[__l1_A]/{sae_weights.safetensors,cfg.json,training_log.csv}, checkpoints under
OUT/checkpoints (rerun the same command to resume), and the activations under OUT/activations.

Data-parallel on N processes (gloo on CPU, nccl on CUDA; the same weights as one process with the same
--batch-size and --seed, up to the order of float sums; resume with the same N):
  torchrun --no-python --nproc_per_node=N sparse-circuits train ...
  (or python -m torch.distributed.run --nproc_per_node=N -m sparse_circuits train ...)
Several machines: torchrun --nnodes=M --node_rank=I --rdzv-endpoint=HOST:PORT --rdzv-backend=c10d ...
on each, with OUT on a file system all of them share.

Recipes for strong dictionaries (10M tokens seen: the registry corpus's train split is 9.02M tokens, so
--tokens 10000000 harvests all of it and --epochs 1.109 sees 10M; untied rows train free, as SAELens;
--harvest-autocast bf16 halves the harvest on a CPU with AMX; on a GPU add --device cuda and torchrun,
where 50M+ tokens of a larger corpus are practical). Measured in results/strong_l12/ (before --grad-clip-norm
auto was the default: add --grad-clip-norm off to reproduce those numbers; the clip lowers L0 at a given --l1):
  TopK:       train --hook blocks.12.hook_resid_post --arch topk --k 40 --untied --tokens 10000000
              --epochs 1.109 --batch-size 4096 --lr 3e-3 --harvest-autocast bf16
              --activations runs/store12 --out runs/topk40
  BatchTopK:  the same with --arch batchtopk --k 40 (and --out runs/batchtopk40)
  ReLU + L1:  the same with --arch relu --l1 0.0025 (L0 36 at this layer in this recipe; elsewhere
              --target-l0 40 finds the coefficient, at the cost of about four more trainings: its last
              pilots are as long as the run; the paper's tied SAE: drop --untied, --lr 1e-3)
  then: sparse-circuits evaluate --sae runs/topk40 --tokens 16384
Several hooks in one --out share one harvest (repeat --hook); --activations DIR reuses a store."""


def clip_norm(text: str) -> float | str:
    """--grad-clip-norm: "auto", "off" or a positive number."""
    if text in ("auto", "off"):
        return text
    return positive_float(text)


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "train", help="harvest activations and train SAEs", description=DESCRIPTION)
    add_model_arguments(parser)
    parser.add_argument("--hook", action="append", required=True, metavar="HOOK",
                        help="TransformerLens hook name, e.g. blocks.12.hook_resid_post (repeat for several)")
    parser.add_argument("--tokens", type=positive_int, default=2_000_000, help="tokens to harvest")
    parser.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the harvested tokens")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="relu",
                        help="relu: the paper's ReLU + L1 SAE; topk: k active features per token; batchtopk: k per "
                             "token on average over the batch (saved as SAELens saves it, a JumpReLU with its "
                             "threshold); jumprelu: a learned threshold per feature, L0 penalty")
    parser.add_argument("--expansion", type=positive_int, default=4, help="d_sae / d_in (the paper's R)")
    parser.add_argument("--l1", type=nonnegative_float, nargs="+", default=None,
                        help="sparsity coefficient(s): the L1 alpha (relu) or the L0 weight (jumprelu); several "
                             "train a sweep from one harvest (default 1e-3; the L0 it gives depends on the model and "
                             "layer: use --target-l0 to ask for an L0)")
    parser.add_argument("--k", type=positive_int, nargs="+", default=None,
                        help="active features (topk, batchtopk); several train a sweep from one harvest (default 32)")
    parser.add_argument("--target-l0", type=positive_float, default=None, metavar="N",
                        help="calibrate the sparsity per hook to give L0 N instead of --l1/--k: k = N for topk and "
                             "batchtopk; for relu and jumprelu short pilot runs of several coefficients choose it "
                             "(reported, and kept in OUT/calibration.json and each cfg.json); default: off, --l1/--k set it")
    parser.add_argument("--pilot-tokens", type=positive_int, default=None,
                        help="tokens per calibration pilot (default: a quarter of the run, at least 262,144)")
    tied = parser.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tied", action="store_true", default=True,
                      help="encoder = decoder transpose, as in the paper (default)")
    tied.add_argument("--untied", dest="tied", action="store_false", help="separate encoder weights")
    parser.add_argument("--context-size", type=positive_int, default=128, help="tokens per harvested context")
    parser.add_argument("--batch-size", type=positive_int, default=4096, help="activations per training step")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (after warm-up)")
    parser.add_argument("--activations", type=Path, metavar="DIR",
                        help="activation store to harvest into or reuse (default: OUT/activations); a complete store "
                             "harvested with the same settings for these hooks and more is reused as it is")
    parser.add_argument("--store-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="dtype of the stored activations")
    parser.add_argument("--store-memory-mb", type=positive_int, default=None, metavar="MB",
                        help="stored activations held in memory for shuffling: a block of shards, shuffled token "
                             "by token (the whole store when it fits: a full shuffle); peak memory is about twice "
                             "this while a block loads. It sets the batch order: resume with the same value "
                             "(default: 8192)")
    parser.add_argument("--grad-clip-norm", type=clip_norm, default="auto", metavar="auto|off|C",
                        help="clip each SAE's gradient norm at C before each step; auto (default): 1/d_in for SAEs "
                             "with free decoder rows (--untied ReLU, TopK; SAELens' clip at 1.0 in our loss's units), "
                             "none for tied ones (the paper's recipe); off: never")
    parser.add_argument("--resample-dead", action="store_true", help="resample dead features during training")
    parser.add_argument("--checkpoint-every", type=positive_int, default=200, help="steps between checkpoints")
    parser.add_argument("--seed", type=seed, default=0, help="seed for context sampling, initialisation and batches")
    parser.add_argument("--autocast", choices=["bf16", "fp16", "off"], default="off",
                        help="mixed precision (torch.autocast) for the model's forward while harvesting and the SAEs' "
                             "forward and loss while training (float32 master weights and Adam; fp16 with a loss "
                             "scaler, CUDA only: CPU autocast supports bf16 only); off: float32, exact")
    parser.add_argument("--harvest-autocast", choices=["bf16", "fp16", "off"], default=None,
                        help="the harvest's precision alone, when it should differ from --autocast (default: as "
                             "--autocast); e.g. bf16 on a CPU with bfloat16 matrix units (AMX), which harvests about "
                             "2x faster, while training stays float32")
    parser.add_argument("--evaluate-tokens", type=nonnegative_int, default=0,
                        help="after training, evaluate on this many held-out tokens (0: skip)")
    add_stream_arguments(parser)
    return parser


MAX_EPOCHS = 1_000
MAX_TARGET_L0 = 100_000  # the width check itself runs once the model's d_model is known


def check_arguments(args) -> None:
    """Every argument and input file, before torch is imported or the model loads."""
    from sparse_circuits import validation

    if args.epochs > MAX_EPOCHS:
        raise validation.InputError(f"--epochs {args.epochs:g} is more than {MAX_EPOCHS:,} passes; give fewer epochs "
                                    "or harvest more --tokens")
    if args.target_l0 is not None and (args.l1 is not None or args.k is not None):
        given = "--l1" if args.l1 is not None else "--k"
        raise validation.InputError(f"give --target-l0 or {given}, not both: --target-l0 chooses the sparsity setting")
    if args.pilot_tokens is not None and args.target_l0 is None:
        raise validation.InputError("--pilot-tokens sets the calibration pilots of --target-l0; give --target-l0 too")
    if args.target_l0 is not None and args.target_l0 > MAX_TARGET_L0:
        raise validation.InputError(f"--target-l0 {args.target_l0:g} is not a plausible L0 (active features per token, "
                                    "below the dictionary width); give a number such as 40")
    world_size = validation.launcher_world_size()
    if args.stream and world_size > 1:
        raise validation.InputError("--stream runs in one process for now (the streaming source can serve a rank's "
                                    "share, but the pipeline does not split the stream yet); drop torchrun or --stream")
    if args.batch_size % world_size:
        raise validation.InputError(f"--batch-size {args.batch_size} does not divide among the {world_size} processes "
                                    f"torchrun started; give a multiple of {world_size}")
    for flag, value in (("--autocast", args.autocast), ("--harvest-autocast", args.harvest_autocast)):
        if value == "fp16" and str(args.device).split(":")[0] == "cpu":
            raise validation.InputError(f"{flag} fp16 needs a CUDA device, but --device is cpu (CPU autocast supports "
                                        f"bf16 only); give {flag} bf16 or off, or a --device cuda")
    validation.output_folder(args.out, "--out")
    validation.output_folder(args.activations, "--activations")
    validation.hook_names(args.hook)
    validation.corpus_spec(args.corpus)
    check_stream_arguments(args)


def run(args) -> None:
    from circuits.hooks import validate_hooks
    from circuits.models import load_model, resolve_device
    from sae.corpus import load_corpus
    from sae.distributed import Distributed
    from sparse_circuits.pipelines.evaluate import evaluate_folders, format_eval_table
    from sparse_circuits.pipelines.train import TrainRequest, train_on_model

    request = TrainRequest(
        hooks=args.hook, tokens=args.tokens, architecture=ARCHITECTURES[args.arch],
        expansion=args.expansion, l1_coefficients=args.l1 or [1e-3], k_values=args.k or [32], tied=args.tied,
        epochs=args.epochs, context_size=args.context_size, batch_size=args.batch_size, lr=args.lr,
        store_dtype=args.store_dtype, seed=args.seed, checkpoint_every=args.checkpoint_every,
        resample_dead=args.resample_dead, activations_dir=args.activations,
        store_memory_mb=args.store_memory_mb, target_l0=args.target_l0,
        pilot_tokens=args.pilot_tokens, harvest_autocast=args.harvest_autocast or args.autocast,
        autocast=None if args.autocast == "off" else args.autocast,
        grad_clip_norm=None if args.grad_clip_norm == "off" else args.grad_clip_norm)
    corpus = load_corpus(args.corpus)
    distributed = Distributed.from_environment(resolve_device(args.device))
    try:
        model = load_model(args.model, device=str(distributed.device(resolve_device(args.device))))
        validate_hooks(model, args.hook)
        if args.stream:
            from sparse_circuits.pipelines.stream import stream_train_on_model

            results = stream_train_on_model(model, corpus, request, args.out, buffer_tokens=args.buffer_tokens,
                                            buffer_mb=args.buffer_mb)
        else:
            results = train_on_model(model, corpus, request, args.out, distributed=distributed)
    finally:
        distributed.close()
    if not distributed.is_main:
        return
    for result in results:
        metrics = result.metrics
        target = f" (target {args.target_l0:g})" if args.target_l0 is not None else ""
        print(f"{result.folder}: L0 {metrics.get('l0', float('nan')):.1f}{target}, FVU "
              f"{metrics.get('fvu', float('nan')):.3f} (training batch)")
    if args.evaluate_tokens:
        evaluated = evaluate_folders(model, [result.folder for result in results], corpus, args.evaluate_tokens,
                                     context_size=args.context_size)
        print(format_eval_table(evaluated))
