"""Running the erasure experiment: train-split statistics, evaluation of every edit, the whole sweep.

Every forward pass goes through the engine (`circuits.engine.run_with_edits`): the clean runs record
the activations at the hooks, the gradient pass adds leaves there, and each method's run applies its
edit. The edited positions of a prompt are its positions from `start` (1 when the tokenizer has a
BOS token) to its final one, minus those the engine passes through at that hook (massive
activations); statistics are fitted, and edit norms measured, over those positions only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from circuits.engine import passthrough_positions, run_with_edits
from circuits.hooks import check_width, sorted_hooks, validate_hooks
from circuits.metrics import cross_entropy, summed_kl
from circuits.models import provenance
from sae.dictionary import Dictionary
from sae.progress import progress_bar
from tasks.concept_files import read_concept_data
from tasks.erasure.concepts import (Concept, ConceptError, ConceptSplits, gender_concept, tokenize_prompts,
                                    validate_concept)
from tasks.erasure.edits import Erasure
from tasks.erasure.report import PromptResults, erasure_table, result_rows, write_results
from tasks.erasure.selection import (METHODS, HookStatistics, build_edits, check_ks, check_methods, feature_attribution,
                                     signed_logit_diffs)


def edited_positions(final_positions: torch.Tensor, length: int, start: int) -> torch.Tensor:
    """[n, pos] mask of the prompt positions start..final (BOS and padding excluded)."""
    positions = torch.arange(length)[None, :]
    return (positions >= start) & (positions <= final_positions[:, None])


def collect_train_statistics(model, dictionaries: dict[str, Dictionary], concept: Concept, start: int, *,
                             batch_size: int = 16, progress: bool = True) -> dict[str, HookStatistics]:
    """One forward and backward pass over the train prompts: activations and feature attributions."""
    token_ids = validate_concept(concept, model.tokenizer)
    prompts, labels = concept.prompts_and_labels()
    tokens, finals = tokenize_prompts(model.tokenizer, prompts)
    device = next(model.parameters()).device
    hooks = list(dictionaries)
    parts = {hook: {"final": [], "final_pass": [], "positions": [], "labels": []} for hook in hooks}
    attribution = {hook: torch.zeros(d.n_features, dtype=torch.float64) for hook, d in dictionaries.items()}
    active = {hook: torch.zeros(d.n_features, dtype=torch.bool) for hook, d in dictionaries.items()}
    for begin in progress_bar(range(0, len(prompts), batch_size), desc="fit (train split)", unit="batch", enabled=progress):
        batch_tokens, batch_finals = tokens[begin:begin + batch_size].to(device), finals[begin:begin + batch_size]
        batch_labels = labels[begin:begin + batch_size]
        rows, final_index = torch.arange(len(batch_finals), device=device), batch_finals.to(device)
        with torch.enable_grad():
            run = run_with_edits(model, batch_tokens, record=hooks, leaves=hooks)
            metric = signed_logit_diffs(run.output[rows, final_index], batch_labels, token_ids)
            grads = torch.autograd.grad(metric.sum(), [run.leaves[hook] for hook in hooks])
        prompt_positions = edited_positions(batch_finals, batch_tokens.shape[1], start).to(device)
        for (hook, dictionary), grad in zip(dictionaries.items(), grads):
            activation = run.recorded[hook].detach()
            passthrough = passthrough_positions(activation)
            mask = prompt_positions & ~passthrough
            part = parts[hook]
            part["final"].append(activation[rows, final_index].cpu())
            part["final_pass"].append(passthrough[rows, final_index].cpu())
            part["positions"].append(activation[mask].cpu())
            part["labels"].append(batch_labels[:, None].expand(mask.shape)[mask.cpu()])
            with torch.no_grad():
                drop, fired = feature_attribution(dictionary, activation, grad, mask)
            attribution[hook] += drop
            active[hook] |= fired
    return {hook: HookStatistics(torch.cat(parts[hook]["final"]), labels, attribution[hook] / len(prompts),
                                 torch.cat(parts[hook]["positions"]), torch.cat(parts[hook]["labels"]), active[hook],
                                 torch.cat(parts[hook]["final_pass"]))
            for hook in hooks}


@torch.no_grad()
def evaluate_on_prompts(model, edits: list[Erasure], concept: Concept, start: int, *, batch_size: int = 16,
                        progress: bool = True) -> list[PromptResults]:
    """Run the clean and every edited model on a split's prompts (one clean pass per batch)."""
    token_ids = validate_concept(concept, model.tokenizer)
    prompts, labels = concept.prompts_and_labels()
    tokens, finals = tokenize_prompts(model.tokenizer, prompts)
    device = next(model.parameters()).device
    hooks = sorted({edit.hook for edit in edits})
    diffs, activations = [[] for _ in edits], [[] for _ in edits]
    norms = torch.zeros(len(edits), 3, dtype=torch.float64)  # summed |x' - x|, |x| and count over edited positions
    starts = range(0, len(prompts), batch_size)
    bar = progress_bar(total=len(starts) * len(edits), desc=f"evaluate ({concept.split} split)", enabled=progress)
    for begin in starts:
        batch_tokens = tokens[begin:begin + batch_size].to(device)
        batch_finals = finals[begin:begin + batch_size].to(device)
        rows, batch_labels = torch.arange(len(batch_finals), device=device), labels[begin:begin + batch_size]
        clean = run_with_edits(model, batch_tokens, record=hooks)
        prompt_positions = edited_positions(batch_finals.cpu(), batch_tokens.shape[1], start).to(device)
        masks = {hook: prompt_positions & ~passthrough_positions(clean.recorded[hook]) for hook in hooks}
        for index, edit in enumerate(edits):
            x, mask = clean.recorded[edit.hook], masks[edit.hook]
            run = clean if edit.is_identity else run_with_edits(model, batch_tokens, edits=edit.edits,
                                                                  record=[edit.hook])
            edited = run.recorded[edit.hook]  # what the model continued with at the hook
            norms[index, 0] += ((edited - x).norm(dim=-1) * mask).sum().item()
            norms[index, 1] += (x.norm(dim=-1) * mask).sum().item()
            norms[index, 2] += int(mask.sum())
            activations[index].append(edited[rows, batch_finals].cpu())
            diffs[index].append(signed_logit_diffs(run.output[rows, batch_finals].float(), batch_labels,
                                                   token_ids).cpu())
            bar.update(1)
    bar.close()
    counts = norms[:, 2].clamp(min=1)
    return [PromptResults(torch.cat(diffs[i]), torch.cat(activations[i]), (norms[i, 0] / counts[i]).item(),
                          (norms[i, 1] / counts[i]).item()) for i in range(len(edits))]


@torch.no_grad()
def evaluate_on_text(model, edits: list[Erasure], contexts: torch.Tensor, start: int, *, batch_size: int = 8,
                     progress: bool = True) -> tuple[float, list[tuple[float, float]]]:
    """Clean CE per token, and (CE, KL(clean || edited)) per token for each edit, on contexts [n, ctx]."""
    device = next(model.parameters()).device
    sums = torch.zeros(len(edits), 2, dtype=torch.float64)
    clean_ce, predicted = 0.0, 0
    starts = range(0, contexts.shape[0], batch_size)
    bar = progress_bar(total=len(starts) * len(edits), desc="evaluate (held-out text)", enabled=progress)
    for begin in starts:
        tokens = contexts[begin:begin + batch_size].to(device)
        clean_logits = run_with_edits(model, tokens).output
        clean = cross_entropy(clean_logits, tokens, start).item()
        clean_ce += clean
        predicted += tokens.shape[0] * (tokens.shape[1] - 1 - start)
        for index, edit in enumerate(edits):
            if edit.is_identity:
                sums[index, 0] += clean
            else:
                logits = run_with_edits(model, tokens, edits=edit.edits).output
                sums[index, 0] += cross_entropy(logits, tokens, start).item()
                sums[index, 1] += summed_kl(clean_logits, logits, start).item()
            bar.update(1)
    bar.close()
    per_token = sums / max(predicted, 1)
    return clean_ce / max(predicted, 1), [(row[0].item(), row[1].item()) for row in per_token]


# ----------------------------------------------------------------------------------------------
# Inputs


def subsample_concept(concept: Concept, per_side: int | None, seed: int = 0) -> Concept:
    """At most `per_side` prompts per side, drawn at random (seeded); None keeps every prompt."""
    if per_side is None:
        return concept
    if per_side < 1:
        raise ValueError(f"prompts per side must be at least 1, got {per_side}")
    generator = torch.Generator().manual_seed(seed)

    def pick(prompts: list[str]) -> list[str]:
        order = torch.randperm(len(prompts), generator=generator)[:per_side].sort().values
        return [prompts[i] for i in order]

    return Concept(concept.name, pick(concept.positive_prompts), pick(concept.negative_prompts),
                   concept.positive_token, concept.negative_token, concept.split,
                   list(concept.positive_subjects), list(concept.negative_subjects))


def validate_inputs(model, dictionaries: dict[str, Dictionary], concept_splits: ConceptSplits) -> None:
    """Every check that needs no compute: the concept splits, the hooks and the dictionary widths."""
    if len(concept_splits) != 3 or concept_splits[0] is None or concept_splits[1] is None:
        raise ConceptError("concept_splits must be (train, test, transfer) with train and test given "
                           "(transfer may be None)")
    for concept in concept_splits:
        if concept is not None:
            validate_concept(concept, model.tokenizer)
    if not dictionaries:
        raise ValueError("no dictionaries given; pass at least one {hook: dictionary}")
    validate_hooks(model, list(dictionaries))
    for hook, dictionary in dictionaries.items():
        check_width(model, hook, dictionary.d_in)


def held_out_contexts(model, ce_tokens: int | torch.Tensor, corpus: str, context_size: int, seed: int) -> torch.Tensor:
    """Held-out corpus text (split "eval") as contexts [n, context_size], or the given token tensor."""
    if isinstance(ce_tokens, torch.Tensor):
        return ce_tokens
    from sae.corpus import CorpusError, load_corpus, tokenize_contexts

    n_contexts = max(1, -(-int(ce_tokens) // context_size))
    text = load_corpus(corpus)
    try:
        return tokenize_contexts(text, model.tokenizer, context_size, n_contexts, split="eval", seed=seed)
    except CorpusError:  # a small local corpus may have no held-out documents: the dictionaries never saw it
        warnings.warn(f"corpus {corpus!r} has no held-out ('eval') documents; measuring damage on all of it",
                      stacklevel=2)
        return tokenize_contexts(text, model.tokenizer, context_size, n_contexts, split="all", seed=seed)


def load_concept_splits(spec: str, tokenizer, seed: int = 0, n_shots_per_side: int = 2) -> ConceptSplits:
    """`gender` (built in) or a JSON file (see `read_concept_file`)."""
    if spec == "gender":
        return gender_concept(tokenizer, seed=seed, n_shots_per_side=n_shots_per_side)
    return read_concept_file(spec)


def read_concept_file(spec: str | Path) -> ConceptSplits:
    """A concept JSON file (the format is in tasks/concept_files.py), every field's type checked; needs no
    tokenizer."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConceptError(f"unknown concept {str(spec)!r}: use 'gender' or a JSON file of prompts (see "
                           "tasks.erasure.read_concept_file)")
    name, splits = read_concept_data(path, ConceptError)
    concepts = {split: Concept(name, *part, split) for split, part in splits.items()}
    return ConceptSplits(concepts["train"], concepts["test"], concepts.get("transfer"))


# ----------------------------------------------------------------------------------------------
# The sweep


def run_erasure(model, dictionaries: dict[str, Dictionary], concept_splits: ConceptSplits, out_dir: str | Path, *,
                ks: Sequence[int] = (1, 4, 16), ce_tokens: int | torch.Tensor = 512, seed: int = 0,
                progress: bool = True, methods: Sequence[str] = METHODS, prompts_per_side: int | None = 16,
                corpus: str = "registry", context_size: int = 64, batch_size: int = 16,
                transfer: bool = True) -> dict[str, str]:
    """Fit every method on the train split, measure on test (and transfer) and held-out text; write the table.

    Writes OUT/erasure.csv, OUT/erasure.png and OUT/erasure.json (settings, clean numbers, chosen
    features); returns {"csv", "plot", "json"} paths. `prompts_per_side` subsamples the test and
    transfer splits (the train split is fitted whole, in one forward and backward pass). Cost: one
    forward per edit over the test (and transfer) prompts and the `ce_tokens` of held-out text, with
    hooks x (4 x len(ks) + 4) edits.
    """
    validate_inputs(model, dictionaries, concept_splits)  # before any compute
    ks, methods = check_ks(ks, dictionaries), check_methods(methods)
    train, test, transfer_split = concept_splits
    test = subsample_concept(test, prompts_per_side, seed)
    transfer_split = subsample_concept(transfer_split, prompts_per_side, seed) if transfer and transfer_split else None
    device = next(model.parameters()).device
    dictionaries = {hook: dictionaries[hook].to(device).eval() for hook in sorted_hooks(dictionaries)}
    start = 1 if model.tokenizer.bos_token_id is not None else 0
    contexts = held_out_contexts(model, ce_tokens, corpus, context_size, seed)

    statistics = collect_train_statistics(model, dictionaries, train, start, batch_size=batch_size, progress=progress)
    edits, chosen = build_edits(dictionaries, statistics, ks, methods, seed)
    test_results = evaluate_on_prompts(model, edits, test, start, batch_size=batch_size, progress=progress)
    transfer_results = (evaluate_on_prompts(model, edits, transfer_split, start, batch_size=batch_size,
                                            progress=progress) if transfer_split is not None else None)
    text = evaluate_on_text(model, edits, contexts, start, batch_size=max(1, batch_size // 2), progress=progress)
    frame = erasure_table(result_rows(edits, statistics, test_results, transfer_results, text,
                                      test_labels=test.prompts_and_labels()[1], seed=seed, device=device))
    settings = {"concept": train.name, "seed": seed, "ks": ks, "methods": methods, "hooks": list(dictionaries),
                "prompts": {split.split: len(split.prompts_and_labels()[1])
                            for split in (train, test, transfer_split) if split is not None},
                "held_out_tokens": int(contexts.numel()), "clean_ce_loss": text[0],
                "edited_positions": "every position but BOS and massive activations (the engine's pass-through rule)",
                "fitted_at": "train split, final prompt position (every edited position for *_all_positions)",
                "chosen_features": chosen, "provenance": provenance(model, dictionaries, seed)}
    return write_results(frame, Path(out_dir), settings, progress)
