"""`sparse-circuits autointerp`: explain features with a language model and score the explanations (simulation
correlation as in the paper, detection as in delphi), for a dictionary and baseline bases."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int
from sparse_circuits.validation import MAX_BASELINE_TOKENS, bounded_int, nonnegative_int, positive_float, seed

DESCRIPTION = """Autointerp (Bills et al. 2023, the method of Cunningham et al.): for each feature a model reads its
top-activating and quantile excerpts (from the dashboard's one pass over held-out text) and writes a one-line
explanation; it then predicts the feature's activation on every token of held-out top excerpts and random
windows from the explanation alone, and the Pearson correlation of predicted with true activations is the score.
Detection (delphi): does the model tell activating from non-activating excerpts given the explanation (balanced
accuracy and AUC). A control simulates each feature from another feature's explanation (shuffled within the basis).

The model is a client: --client local (a transformers model from a folder; default the weak, always-available
smollm2-135m) or --client http (any OpenAI-compatible chat-completions endpoint: vLLM, llama.cpp's server,
ollama, hosted APIs; --base-url / OPENAI_BASE_URL, --api-key / OPENAI_API_KEY). Prompts and responses are cached
under --cache-dir, so a rerun costs nothing. A malformed response is recorded in the feature's row; an endpoint
that does not answer after the retries stops the run before anything is written.

Writes --out/explanations.jsonl, scores.csv (a row per feature), summary.csv (per basis: mean and a 95 percent bootstrap
interval over features) and autointerp.json, all at once at the end; an earlier output at --out is replaced."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "autointerp", help="explain features with a model and score the explanations",
                            description=DESCRIPTION)
    add_model_arguments(parser)
    parser.add_argument("--sae", type=Path, required=True,
                        help="a dictionary folder, or a folder of them (then --hook picks one)")
    parser.add_argument("--hook", help="hook point (default: the one dictionary in --sae)")
    parser.add_argument("--features", type=bounded_int(10_000, "features"), default=20,
                        help="features per basis, drawn at random (seeded) among those firing in enough contexts")
    parser.add_argument("--feature-indices", help="explicit dictionary features instead, e.g. 0-9,512 (--sae only; default: --features drawn at random)")
    parser.add_argument("--baseline", default="", help="comma-separated baseline bases to compare: neurons,pca,ica")
    parser.add_argument("--client", choices=["local", "http"], default="local", help="the model that explains")
    parser.add_argument("--client-model", help="local: a registry name or HF folder (default smollm2-135m); "
                                               "http: the model name the server knows (required)")
    parser.add_argument("--base-url", help="http: e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)")
    parser.add_argument("--api-key", help="http: bearer key (default: $OPENAI_API_KEY; none for local servers)")
    parser.add_argument("--timeout", type=positive_float, default=120.0, help="http: seconds per request")
    parser.add_argument("--retries", type=nonnegative_int, default=4,
                        help="http: retries of 429/5xx/timeouts/refused connections, exponential backoff")
    parser.add_argument("--simulation", choices=["auto", "likelihood", "generate"], default="auto",
                        help="likelihood: digit probabilities in one pass (local only); generate: ask for numbers "
                             "(any client); auto: likelihood when the client can")
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-explanation control")
    parser.add_argument("--tokens", type=positive_int, default=20_000, help="held-out tokens scanned per basis")
    parser.add_argument("--context-size", type=bounded_int(4096, "tokens per context"), default=64,
                        help="tokens per context")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="contexts per forward pass")
    parser.add_argument("--fit-tokens", type=bounded_int(MAX_BASELINE_TOKENS, "tokens"), default=5_000,
                        help="baselines: held-out tokens PCA/ICA are fitted on (ICA: minutes)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/sparse-circuits/autointerp"),
                        help="prompt/response cache")
    parser.add_argument("--seed", type=seed, default=0, help="seed for text order, feature draw and the control")
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced whole at the end)")
    return parser


def baselines(spec: str) -> list[str]:
    from sparse_circuits.validation import InputError

    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("neurons", "pca", "ica")]
    if unknown:
        raise InputError(f"--baseline {spec!r}: unknown {', '.join(unknown)}; choose among neurons, pca, ica")
    return list(dict.fromkeys(names))


def check_arguments(args) -> None:
    """Everything that can be checked before torch is imported or the model loads."""
    from sparse_circuits import validation

    baselines(args.baseline)
    validation.hook_names([args.hook] if args.hook else [])
    config = validation.dictionary_config_at_hook(args.sae, args.hook)
    if args.feature_indices is not None:
        n_features = config["d_sae"]
        if validation.feature_selection(args.feature_indices, n_features, "--feature-indices") in (None, "auto"):
            raise validation.InputError("--feature-indices takes indices and ranges such as 0-9,512")
    if args.context_size < BEFORE_AND_AFTER + 2:
        raise validation.InputError(f"--context-size must be at least {BEFORE_AND_AFTER + 2} (an excerpt's window)")
    if args.client == "http":
        if not args.client_model:
            raise validation.InputError("--client http needs --client-model (the model name the server knows)")
        base = args.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base:
            raise validation.InputError("--client http needs --base-url (e.g. http://localhost:8000/v1) or "
                                        "OPENAI_BASE_URL")
        if not base.startswith(("http://", "https://")):
            raise validation.InputError(f"--base-url {base!r} is not an http:// or https:// URL")
        if args.simulation == "likelihood":
            raise validation.InputError("--simulation likelihood needs the local client; use generate with http")
    validation.output_folder(args.out)
    from sparse_circuits.pipelines.autointerp import check_output_folder  # standard library at import

    try:
        check_output_folder(args.out)
    except ValueError as error:
        raise validation.InputError(str(error)) from None
    validation.corpus_spec(args.corpus)


BEFORE_AND_AFTER = 15


def make_client(args):
    from tasks.autointerp import CachedClient, EndpointError, HttpClient, LocalClient, MalformedResponse

    if args.client == "http":
        inner = HttpClient(args.client_model, args.base_url, args.api_key, timeout=args.timeout,
                           max_retries=args.retries)
        try:  # a down or non-OpenAI endpoint is one clear error now, not after minutes of collection
            inner.complete([{"role": "user", "content": "Reply with OK."}], max_tokens=2)
        except MalformedResponse as error:
            raise EndpointError(f"{inner.url} answered, but not as an OpenAI-compatible chat-completions endpoint "
                                f"({error}); check --base-url") from None
    else:
        inner = LocalClient(args.client_model or "smollm2-135m", device=resolve(args.device))
    return CachedClient(inner, args.cache_dir)


def resolve(device: str) -> str:
    from circuits.models import resolve_device

    return resolve_device(device)


def run(args) -> None:
    from circuits.models import load_model, provenance
    from sae.corpus import load_corpus
    from sparse_circuits.pipelines.autointerp import AutointerpSettings, format_summary, run_autointerp
    from sparse_circuits.pipelines.dashboard import fit_baseline_dictionary, select_dictionary
    from sparse_circuits.validation import feature_selection

    corpus = load_corpus(args.corpus)
    folder, dictionary = select_dictionary(args.sae, args.hook)
    model = load_model(args.model, device=resolve(args.device))
    from circuits.hooks import check_width

    check_width(model, dictionary.cfg.hook_name, dictionary.cfg.d_in)  # another model's dictionary: refused now
    client = make_client(args)
    hook = dictionary.cfg.hook_name
    bases = {f"sae:{Path(folder).name}": dictionary.to(next(model.parameters()).device)}
    for name in baselines(args.baseline):
        bases[name] = (lambda contexts, name=name: fit_baseline_dictionary(
            model, name, hook, contexts, fit_tokens=args.fit_tokens, batch_size=args.batch_size, seed=args.seed))
    indices = None if args.feature_indices is None else feature_selection(args.feature_indices, dictionary.n_features,
                                                                           "--feature-indices")
    settings = AutointerpSettings(n_features=args.features, indices=indices, tokens=args.tokens,
                                  context_size=args.context_size, batch_size=args.batch_size, seed=args.seed,
                                  method=args.simulation, control=not args.no_control)
    record = {"command": "autointerp", "sae": str(folder), "hook": hook, "baselines": baselines(args.baseline),
              "provenance": provenance(model, {"sae": dictionary}, args.seed)}
    result = run_autointerp(model, corpus, bases, client, args.out, settings, record=record)
    print(format_summary(result.summary))
    print(f"wrote {result.out} ({len(result.rows)} features; cache: {client.hits} hits, {client.misses} new "
          f"requests; {result.timings['total']:.0f} s)")
