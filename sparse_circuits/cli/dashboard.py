"""`sparse-circuits dashboard`: an offline feature dashboard site for a dictionary or a baseline basis."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int
from sparse_circuits.validation import MAX_BASELINE_TOKENS, bounded_int, seed

DESCRIPTION = """Run the model once over held-out text and write a static site (works from file://, no network):
an index of features (sortable by density and max activation, searchable by top tokens, paged), and a page per
feature with its top-activating contexts, examples from several activation quantiles, its activation density
histogram, its logit effects and its nearest features by decoder cosine.

Give a dictionary (--sae; --hook picks one when the folder holds several) or a baseline basis (--baseline
neurons|pca|ica --hook HOOK), fitted on the same held-out text. An earlier site at --out is replaced whole."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "dashboard", help="write an offline feature dashboard site",
                            description=DESCRIPTION)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sae", type=Path, help="a dictionary folder, or a folder of them (then --hook picks one)")
    source.add_argument("--baseline", choices=["neurons", "pca", "ica"],
                        help="a baseline basis instead of a dictionary (needs --hook); signed, so 2 x d_model features")
    parser.add_argument("--hook", help="hook point, e.g. blocks.9.hook_resid_post (default: the one dictionary in --sae)")
    parser.add_argument("--features", default="all",
                        help="'all', 'auto' (pages for the features that fire) or indices/ranges such as 0-199,512")
    parser.add_argument("--tokens", type=positive_int, default=100_000, help="held-out tokens to scan")
    parser.add_argument("--context-size", type=bounded_int(4096, "tokens per context"), default=64,
                        help="tokens per context")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="contexts per forward pass")
    parser.add_argument("--top-k", type=bounded_int(1000, "contexts"), default=20, help="top contexts kept per feature")
    parser.add_argument("--fit-tokens", type=bounded_int(MAX_BASELINE_TOKENS, "tokens"), default=5_000,
                        help="baselines: tokens of the same held-out text to fit PCA/ICA (and the neurons' mean) on; "
                             "ICA is slow: FastICA on 5,000 tokens at d_model 576 took ~19 min on a loaded 2-core CPU")
    parser.add_argument("--seed", type=seed, default=0, help="seed for the text order and the quantile samples")
    parser.add_argument("--out", required=True, type=Path, help="site folder to write (index.html inside)")
    return parser


def check_arguments(args) -> None:
    """Source, feature selection, output folder and corpus, before torch is imported or the model loads."""
    from sparse_circuits import validation

    if args.baseline and not args.hook:
        raise validation.InputError(f"--baseline {args.baseline} needs --hook (e.g. blocks.9.hook_resid_post)")
    validation.hook_names([args.hook] if args.hook else [])
    if args.context_size < 2:
        raise validation.InputError("--context-size must be at least 2 (BOS + one token)")
    n_features = None
    if args.sae is not None:
        n_features = validation.dictionary_config_at_hook(args.sae, args.hook)["d_sae"]
    validation.feature_selection(args.features, n_features)  # baselines: width checked once the model is loaded
    validation.dashboard_site_folder(args.out)
    validation.corpus_spec(args.corpus)


def run(args) -> None:
    from circuits.models import load_model, resolve_device
    from sae.corpus import load_corpus
    from sparse_circuits.pipelines.dashboard import (build_dashboard, fit_baseline_dictionary, held_out_tokens,
                                                     select_dictionary)

    corpus = load_corpus(args.corpus)
    device = resolve_device(args.device)
    folder, dictionary = select_dictionary(args.sae, args.hook) if args.sae else (None, None)
    model = load_model(args.model, device=device)
    contexts = None
    if dictionary is None:
        from circuits.hooks import validate_hooks
        from sparse_circuits.validation import feature_selection

        validate_hooks(model, [args.hook])
        feature_selection(args.features, 2 * model.cfg.d_model)  # the signed basis's width: before any compute
        contexts = held_out_tokens(model, corpus, args.tokens, args.context_size, args.seed)
        dictionary = fit_baseline_dictionary(model, args.baseline, args.hook, contexts, fit_tokens=args.fit_tokens,
                                             batch_size=args.batch_size, seed=args.seed)
    dictionary = dictionary.to(device)
    source = f"baseline {args.baseline}" if args.baseline else f"dictionary {folder}"
    title = f"baseline {args.baseline}" if args.baseline else f"dictionary {Path(folder).name}"
    result = build_dashboard(model, dictionary, corpus, args.out, source=source, features=args.features,
                             tokens=args.tokens, context_size=args.context_size, batch_size=args.batch_size,
                             top_k=args.top_k, seed=args.seed, title=title, contexts=contexts)
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.timings.items())
    print(f"wrote {result.out / 'index.html'} ({result.n_features:,} feature pages over {result.n_tokens:,} tokens "
          f"in {result.n_contexts:,} contexts; {phases})")
