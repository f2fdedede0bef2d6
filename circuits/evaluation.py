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

Memory: a forward keeps full logits [rows, positions, vocabulary] (1 GB for 8 x 128 tokens of Gemma-3's
262k vocabulary) and three of them live at once, so the rows per forward are capped by
`circuits.metrics.LOGIT_BUDGET_BYTES` (256 MB a tensor): 8 contexts of 128 tokens on SmolLM2, 2 on Gemma-3.
"""

from __future__ import annotations

import torch
from sae.progress import progress_bar

from circuits.engine import ActivationMap, passthrough_positions, run_with_edits
from circuits.hooks import check_width
from circuits.metrics import cross_entropy, rows_within_logit_budget, summed_kl
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
    # several full-logit tensors live at once: each forward's rows are capped so one stays under the budget
    batch_size = rows_within_logit_budget(batch_size, contexts.shape[1], model.cfg.d_vocab)
    for begin in progress_bar(range(0, contexts.shape[0], batch_size), desc="evaluate", unit="batch", enabled=progress):
        tokens = contexts[begin : begin + batch_size]
        clean = run_with_edits(model, tokens, record=list(dict.fromkeys(hooks)))
        tokens = tokens.to(clean.output.device)
        ce_clean += cross_entropy(clean.output, tokens, start).item()
        predicted += tokens.shape[0] * (tokens.shape[1] - 1 - start)
        for dictionary, total, sum_ in zip(dictionaries, totals, sums):
            hook = dictionary.cfg.hook_name
            x = clean.recorded[hook]
            flat = x[:, start:].reshape(-1, x.shape[-1])
            reconstruction, codes = dictionary(flat)
            total.update(flat, reconstruction, codes)

            def reconstruct(activation: torch.Tensor) -> torch.Tensor:
                return dictionary(activation)[0]

            def run(fn, pass_massive: bool = exclude_outliers) -> torch.Tensor:
                edit = ActivationMap(fn, exclude_bos=exclude_bos, pass_massive=pass_massive)
                return run_with_edits(model, tokens, {hook: edit}).output

            spliced = run(reconstruct)
            sum_["ce_spliced"] += cross_entropy(spliced, tokens, start).item()
            sum_["ce_zero"] += cross_entropy(run(torch.zeros_like), tokens, start).item()
            sum_["kl"] += summed_kl(clean.output, spliced, start).item()
            massive = exclude_outliers and bool((passthrough_positions(x, exclude_bos=False)).any())
            replaced = run(reconstruct, pass_massive=False) if massive else spliced
            sum_["ce_replaced"] += cross_entropy(replaced, tokens, start).item()
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
