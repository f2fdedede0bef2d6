"""Evaluating dictionaries inside the model on held-out text, through the engine.

For each dictionary at its hook point: the activation metrics (L0, FVU, dead and dense fractions;
sae.metrics, the one place they are defined) and the spliced-model metrics: next-token cross-entropy
of the clean model, of the model with the activation replaced by the dictionary's reconstruction,
and with it zero-ablated; CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean); and
KL(clean || spliced) per token (circuits.metrics).

The replacements are engine edits (circuits.engine.ActivationMap), so they leave the engine's
passed-through positions alone: BOS (with `exclude_bos`, whose prediction is also left out of every
average) and the massive activations (with `exclude_outliers`), as a spliced dictionary does.
`ce_loss_spliced_outliers_replaced` is the spliced CE with the reconstruction put in at the massive
positions too, to show what passing them through is worth.

`fvu` and `l0` are over typical tokens (norm <= 10 x the batch median, sae.metrics.typical_token_mask):
the massive activations are a few in ten thousand tokens but would hold most of the variance;
`fvu_all_tokens` and `outlier_fraction` are reported beside them.

Memory: no forward here produces full logits. Each run stops after the last block (its final residual
is [rows, pos, d_model]) and the CE and KL are summed window by window over positions, unembedding a
few positions of each run at a time (`circuits.metrics.position_windows`: a window's logits fit 64 MB),
so memory follows the batch, not positions x vocabulary (full logits of 8 x 128 tokens of Gemma-3's
262k vocabulary are 1 GB each, and several used to live at once).
"""

from __future__ import annotations

import torch
from sae.progress import progress_bar

from circuits.engine import ActivationMap, passthrough_positions, run_with_edits, unembed_positions
from circuits.hooks import check_width
from circuits.metrics import kl_divergence, position_windows, summed_cross_entropy
from sae.dictionary import Dictionary
from sae.metrics import ReconstructionTotals


@torch.inference_mode()
def evaluate_dictionaries(model, dictionaries: list[Dictionary], contexts: torch.Tensor, batch_size: int = 8,
                          exclude_bos: bool = True, exclude_outliers: bool = True, dense_threshold: float = 0.1,
                          progress: bool = True) -> list[dict]:
    """One metrics dict per dictionary (see module docstring), over `contexts` [n, ctx]."""
    hooks = [dictionary.cfg.hook_name for dictionary in dictionaries]
    for dictionary in dictionaries:
        check_width(model, dictionary.cfg.hook_name, dictionary.d_in)
    start = 1 if exclude_bos else 0
    totals = [ReconstructionTotals(dictionary.d_in, dictionary.n_features, dense_threshold)
              for dictionary in dictionaries]
    sums = [{"ce_spliced": 0.0, "ce_zero": 0.0, "ce_replaced": 0.0, "kl": 0.0} for _ in dictionaries]
    ce_clean, predicted = 0.0, 0
    for begin in progress_bar(range(0, contexts.shape[0], batch_size), desc="evaluate", unit="batch", enabled=progress):
        tokens = contexts[begin : begin + batch_size]
        clean = run_with_edits(model, tokens, record=list(dict.fromkeys(hooks)), final_residual=True)
        tokens = tokens.to(clean.output.device)
        predicted += tokens.shape[0] * (tokens.shape[1] - 1 - start)
        runs = []  # per dictionary: the final residuals of the spliced, zero-ablated and outliers-replaced runs
        for dictionary, total in zip(dictionaries, totals):
            hook = dictionary.cfg.hook_name
            x = clean.recorded[hook]
            flat = x[:, start:].reshape(-1, x.shape[-1])
            reconstruction, codes = dictionary(flat)
            total.update(flat, reconstruction, codes)

            def reconstruct(activation: torch.Tensor, dictionary=dictionary) -> torch.Tensor:
                return dictionary(activation)[0]

            def run(fn, hook=hook, pass_massive: bool = exclude_outliers) -> torch.Tensor:
                edit = ActivationMap(fn, exclude_bos=exclude_bos, pass_massive=pass_massive)
                return run_with_edits(model, tokens, {hook: edit}, final_residual=True).output

            spliced = run(reconstruct)
            massive = exclude_outliers and bool((passthrough_positions(x, exclude_bos=False)).any())
            runs.append({"spliced": spliced, "zero": run(torch.zeros_like),
                         "replaced": run(reconstruct, pass_massive=False) if massive else spliced})
        # CE and KL window by window over positions: never [rows, pos, vocab] logits at once
        for a, b in position_windows(tokens.shape[1], start, tokens.shape[0], model.cfg.d_vocab):
            targets = tokens[:, a + 1 : b + 1].reshape(-1)
            clean_logits = unembed_positions(model, clean.output, a, b)
            ce_clean += summed_cross_entropy(clean_logits.reshape(len(targets), -1), targets).item()
            for run_outputs, sum_ in zip(runs, sums):
                for name, key in (("spliced", "ce_spliced"), ("zero", "ce_zero"), ("replaced", "ce_replaced")):
                    logits = unembed_positions(model, run_outputs[name], a, b)
                    sum_[key] += summed_cross_entropy(logits.reshape(len(targets), -1), targets).item()
                    if name == "spliced":
                        sum_["kl"] += kl_divergence(clean_logits, logits).double().sum().item()
    return [_result(dictionary, {"tokens": total.all.tokens, **total.summary()}, sum_, ce_clean / predicted, predicted)
            for dictionary, total, sum_ in zip(dictionaries, totals, sums)]


def _result(dictionary: Dictionary, activation_metrics: dict, sums: dict, clean: float, predicted: int) -> dict:
    spliced, zero = sums["ce_spliced"] / predicted, sums["ce_zero"] / predicted
    return {
        "hook": dictionary.cfg.hook_name,
        "n_features": dictionary.n_features,
        "tokens": activation_metrics.pop("tokens"),
        **activation_metrics,
        "ce_loss_clean": clean,
        "ce_loss_spliced": spliced,
        "ce_loss_zero_ablated": zero,
        "ce_loss_spliced_outliers_replaced": sums["ce_replaced"] / predicted,
        "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        "kl": sums["kl"] / predicted,
    }
