"""Running the erasure experiment: train-split statistics, evaluation of every edit, the whole sweep.

Every forward pass goes through the engine (`circuits.engine.run_with_edits`): the clean runs record
the activations at the hooks, the gradient pass adds leaves there, and each method's run applies its
edit. Each position setting (tasks.erasure.positions: the name, the final position, all positions) fits
every method on the train split at its fitted positions and applies it on the test and transfer prompts
at its applied positions, minus those the engine passes through at that hook (BOS, massive activations);
edit norms are measured over the applied positions. On held-out text every edit acts at every position.
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
from tasks.erasure.positions import SETTINGS, check_settings, position_masks, subject_positions, subject_token_ids
from tasks.erasure.report import (DEFAULT_REMOVAL_LEVELS, PromptResults, erasure_table, result_rows,
                                  write_results)
from tasks.erasure.selection import (DEFAULT_STRENGTHS, METHODS, HookStatistics, build_edits, check_ks, check_methods,
                                     check_strengths, feature_attribution, signed_logit_diffs)


def edited_positions(final_positions: torch.Tensor, length: int, start: int) -> torch.Tensor:
    """[n, pos] mask of the prompt positions start..final (BOS and padding excluded)."""
    positions = torch.arange(length)[None, :]
    return (positions >= start) & (positions <= final_positions[:, None])


def _rows_at(activation: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
    """activation [n, pos, ...] at one position per row (index [n]); None when index is None."""
    if index is None:
        return None
    return activation[torch.arange(len(index), device=activation.device), index.to(activation.device)]


def collect_train_statistics(model, dictionaries: dict[str, Dictionary], concept: Concept, start: int,
                             setting: str = "final", *, batch_size: int = 16,
                             progress: bool = True) -> dict[str, HookStatistics]:
    """One forward and backward pass over the train prompts: activations at the setting's fitted positions (and
    at the final and name positions, for the probes) and feature attributions summed over its applied positions."""
    return collect_train_statistics_for(model, dictionaries, concept, start, [setting], batch_size=batch_size,
                                        progress=progress)[setting]


def collect_train_statistics_for(model, dictionaries: dict[str, Dictionary], concept: Concept, start: int,
                                 settings: Sequence[str], *, batch_size: int = 16,
                                 progress: bool = True) -> dict[str, dict[str, HookStatistics]]:
    """`collect_train_statistics` for several position settings from the same passes ({setting: {hook: ...}}):
    the forward and backward pass do not depend on the setting, only the positions read from them do."""
    token_ids = validate_concept(concept, model.tokenizer)
    prompts, labels = concept.prompts_and_labels()
    tokens, finals = tokenize_prompts(model.tokenizer, prompts)
    subjects = subject_token_ids(concept, model.tokenizer)
    device = next(model.parameters()).device
    hooks = list(dictionaries)
    keys = ("final", "final_pass", "name", "name_pass", "positions", "labels")
    parts = {(setting, hook): {key: [] for key in keys} for setting in settings for hook in hooks}
    attribution = {(setting, hook): torch.zeros(dictionaries[hook].n_features, dtype=torch.float64)
                   for setting in settings for hook in hooks}
    active = {(setting, hook): torch.zeros(dictionaries[hook].n_features, dtype=torch.bool)
              for setting in settings for hook in hooks}
    for begin in progress_bar(range(0, len(prompts), batch_size), desc=f"fit ({', '.join(settings)} positions)",
                              unit="batch", enabled=progress):
        batch_tokens, batch_finals = tokens[begin:begin + batch_size].to(device), finals[begin:begin + batch_size]
        batch_labels = labels[begin:begin + batch_size]
        rows, final_index = torch.arange(len(batch_finals), device=device), batch_finals.to(device)
        with torch.enable_grad():
            run = run_with_edits(model, batch_tokens, record=hooks, leaves=hooks)
            metric = signed_logit_diffs(run.output[rows, final_index], batch_labels, token_ids)
            grads = torch.autograd.grad(metric.sum(), [run.leaves[hook] for hook in hooks])
        masks_of = {setting: position_masks(setting, batch_tokens.cpu(), batch_finals, start, subjects)
                    for setting in settings}
        for (hook, dictionary), grad in zip(dictionaries.items(), grads):
            activation = run.recorded[hook].detach()  # read once per hook; only the positions depend on the setting
            passthrough = passthrough_positions(activation)
            for setting in settings:
                masks = masks_of[setting]
                applied = masks.apply.to(device) & ~passthrough
                fitted = masks.fit.to(device) & ~passthrough
                part = parts[setting, hook]
                part["final"].append(_rows_at(activation, batch_finals).cpu())
                part["final_pass"].append(_rows_at(passthrough, batch_finals).cpu())
                if masks.names is not None:
                    part["name"].append(_rows_at(activation, masks.names).cpu())
                    part["name_pass"].append(_rows_at(passthrough, masks.names).cpu())
                part["positions"].append(activation[fitted].cpu())
                part["labels"].append(batch_labels[:, None].expand(fitted.shape)[fitted.cpu()])
                with torch.no_grad():
                    drop, fired = feature_attribution(dictionary, activation, grad, applied)
                attribution[setting, hook] += drop
                active[setting, hook] |= fired
    statistics = {setting: {} for setting in settings}
    for setting in settings:
        for hook in hooks:
            part = parts[setting, hook]
            named = bool(part["name"])
            statistics[setting][hook] = HookStatistics(
                torch.cat(part["final"]), labels, attribution[setting, hook] / len(prompts),
                torch.cat(part["positions"]), torch.cat(part["labels"]), active[setting, hook],
                torch.cat(part["final_pass"]), torch.cat(part["name"]) if named else None,
                torch.cat(part["name_pass"]) if named else None, setting)
    return statistics


@torch.no_grad()
def evaluate_on_prompts(model, edits: list[Erasure], concept: Concept, start: int, *, batch_size: int = 16,
                        progress: bool = True) -> list[PromptResults]:
    """Run the clean and every edited model on a split's prompts (one clean pass per batch); each edit acts at
    the applied positions of its own position setting."""
    token_ids = validate_concept(concept, model.tokenizer)
    prompts, labels = concept.prompts_and_labels()
    tokens, finals = tokenize_prompts(model.tokenizer, prompts)
    subjects = subject_token_ids(concept, model.tokenizer)
    device = next(model.parameters()).device
    hooks = sorted({edit.hook for edit in edits})
    settings = sorted({edit.setting for edit in edits if edit.setting in SETTINGS})
    diffs, finals_out, names_out = [[] for _ in edits], [[] for _ in edits], [[] for _ in edits]
    norms = torch.zeros(len(edits), 3, dtype=torch.float64)  # summed |x' - x|, |x| and count over edited positions
    starts = range(0, len(prompts), batch_size)
    bar = progress_bar(total=len(starts) * len(edits), desc=f"evaluate ({concept.split} split)", enabled=progress)
    for begin in starts:
        batch_tokens = tokens[begin:begin + batch_size].to(device)
        batch_finals = finals[begin:begin + batch_size]
        rows, batch_labels = torch.arange(len(batch_finals), device=device), labels[begin:begin + batch_size]
        masks = {setting: position_masks(setting, batch_tokens.cpu(), batch_finals, start, subjects)
                 for setting in settings}
        names = subject_positions(batch_tokens.cpu(), batch_finals, subjects, start) if len(subjects) else None
        clean = run_with_edits(model, batch_tokens, record=hooks)
        passthrough = {hook: passthrough_positions(clean.recorded[hook]) for hook in hooks}
        everywhere = edited_positions(batch_finals, batch_tokens.shape[1], start).to(device)
        for index, edit in enumerate(edits):
            x = clean.recorded[edit.hook]
            if edit.is_identity:
                run, mask = clean, everywhere
            else:  # at its setting's positions; an edit of no setting acts at every prompt position
                mask = masks[edit.setting].apply.to(device) if edit.setting in masks else everywhere
                run = run_with_edits(model, batch_tokens, edits=edit.at(mask), record=[edit.hook])
            mask = mask & ~passthrough[edit.hook]
            edited = run.recorded[edit.hook]  # what the model continued with at the hook
            norms[index, 0] += ((edited - x).norm(dim=-1) * mask).sum().item()
            norms[index, 1] += (x.norm(dim=-1) * mask).sum().item()
            norms[index, 2] += int(mask.sum())
            finals_out[index].append(_rows_at(edited, batch_finals).cpu())
            if names is not None:
                names_out[index].append(_rows_at(edited, names).cpu())
            diffs[index].append(signed_logit_diffs(run.output[rows, batch_finals.to(device)].float(), batch_labels,
                                                   token_ids).cpu())
            bar.update(1)
    bar.close()
    counts = norms[:, 2].clamp(min=1)
    return [PromptResults(torch.cat(diffs[i]), torch.cat(finals_out[i]), (norms[i, 0] / counts[i]).item(),
                          (norms[i, 1] / counts[i]).item(), torch.cat(names_out[i]) if names_out[i] else None)
            for i in range(len(edits))]


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
                transfer: bool = True, positions: Sequence[str] = SETTINGS,
                strengths: Sequence[float] = DEFAULT_STRENGTHS,
                removal_levels: Sequence[float] = DEFAULT_REMOVAL_LEVELS) -> dict[str, str]:
    """For each position setting, fit every method on the train split; measure all of them on test (and
    transfer) and held-out text (one clean pass shared); write the table and the equal-removal comparison.

    Writes OUT/erasure.csv (a row per setting, hook, method and k or strength), OUT/erasure_equal_removal.csv
    (each method's curve interpolated at `removal_levels`), OUT/erasure.png and OUT/erasure.json (settings,
    clean numbers, chosen features); returns their paths. `prompts_per_side` subsamples the test and transfer
    splits (the train split is fitted whole). Cost: one forward per edit over the test (and transfer) prompts
    and the `ce_tokens` of held-out text, with settings x hooks x (4 x len(ks) + 2 x len(strengths)) edits.
    """
    validate_inputs(model, dictionaries, concept_splits)  # before any compute
    ks, methods, strengths = check_ks(ks, dictionaries), check_methods(methods), check_strengths(strengths)
    train, test, transfer_split = concept_splits
    settings = check_settings(positions, train)
    test = subsample_concept(test, prompts_per_side, seed)
    transfer_split = subsample_concept(transfer_split, prompts_per_side, seed) if transfer and transfer_split else None
    device = next(model.parameters()).device
    dictionaries = {hook: dictionaries[hook].to(device).eval() for hook in sorted_hooks(dictionaries)}
    start = 1 if model.tokenizer.bos_token_id is not None else 0
    contexts = held_out_contexts(model, ce_tokens, corpus, context_size, seed)

    edits, chosen = [Erasure(hook) for hook in dictionaries], {}
    statistics = collect_train_statistics_for(model, dictionaries, train, start, settings, batch_size=batch_size,
                                              progress=progress)  # one pass over the train split for all settings
    for setting in settings:
        setting_edits, chosen[setting] = build_edits(dictionaries, statistics[setting], ks, methods, seed, strengths)
        edits += setting_edits
    test_results = evaluate_on_prompts(model, edits, test, start, batch_size=batch_size, progress=progress)
    transfer_results = (evaluate_on_prompts(model, edits, transfer_split, start, batch_size=batch_size,
                                            progress=progress) if transfer_split is not None else None)
    text = evaluate_on_text(model, edits, contexts, start, batch_size=max(1, batch_size // 2), progress=progress)
    frame = erasure_table(result_rows(edits, statistics, test_results, transfer_results, text,
                                      test_labels=test.prompts_and_labels()[1], seed=seed, device=device))
    summary = {"concept": train.name, "seed": seed, "ks": ks, "methods": methods, "hooks": list(dictionaries),
               "positions": settings, "strengths": strengths, "removal_levels": list(removal_levels),
               "prompts": {split.split: len(split.prompts_and_labels()[1])
                           for split in (train, test, transfer_split) if split is not None},
               "held_out_tokens": int(contexts.numel()), "clean_ce_loss": text[0],
               "protocol": {"name": "fitted and applied at the subject's name token",
                            "final": "fitted and applied at the final prompt position",
                            "all": "applied at every prompt position, fitted on the name..final span",
                            "held_out_text": "every edit at every position",
                            "passed_through": "BOS and massive activations, for every method (the engine's rule)"},
               "chosen_features": chosen, "provenance": provenance(model, dictionaries, seed)}
    return write_results(frame, Path(out_dir), summary, progress, removal_levels)
