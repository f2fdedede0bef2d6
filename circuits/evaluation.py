"""Evaluating dictionaries inside the model on held-out text.

For each dictionary at its hook point: the activation metrics (L0, FVU, dead and dense fractions)
and the spliced-model metrics: next-token cross-entropy of the clean model, of the model with the
activation replaced by the dictionary's reconstruction, and with it zero-ablated; CE loss recovered
= (CE_zero - CE_spliced) / (CE_zero - CE_clean); and KL(clean || spliced) per token.

With `exclude_bos` (the default, as in training) the BOS position keeps its clean activation and
its prediction is left out of every average: in Llama-family models that position's residual is a
huge outlier that no dictionary is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.dictionary import Dictionary


@dataclass
class _Sums:
    """Running sums for exact metrics over all evaluated tokens."""

    tokens: int = 0
    squared_error: float = 0.0
    activation_sum: torch.Tensor | None = None
    activation_squared: float = 0.0
    active: float = 0.0
    fired: torch.Tensor | None = None
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    extra: dict = field(default_factory=dict)

    def add_activations(self, x: torch.Tensor, reconstruction: torch.Tensor, codes: torch.Tensor) -> None:
        # x, reconstruction: [tokens, d_in]; codes: [tokens, n_features]
        x64 = x.double()
        self.tokens += x.shape[0]
        self.squared_error += (reconstruction.double() - x64).pow(2).sum().item()
        total = x64.sum(0)
        self.activation_sum = total if self.activation_sum is None else self.activation_sum + total
        self.activation_squared += x64.pow(2).sum().item()
        nonzero = codes != 0
        self.active += nonzero.sum().item()
        counts = nonzero.sum(0)
        self.fired = counts if self.fired is None else self.fired + counts

    def fvu(self) -> float:
        mean = self.activation_sum / self.tokens
        total_variance = self.activation_squared - self.tokens * mean.pow(2).sum().item()
        return self.squared_error / total_variance


def _cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Summed next-token CE over positions start..pos-2; logits [b, pos, vocab], tokens [b, pos]."""
    predicted = logits[:, start:-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(predicted, tokens[:, start + 1 :].reshape(-1), reduction="sum")


def _kl_clean_to(clean_logits: torch.Tensor, other_logits: torch.Tensor, start: int) -> torch.Tensor:
    """Summed KL(clean || other) over positions start..pos-2."""
    clean = F.log_softmax(clean_logits[:, start:-1].float(), dim=-1)
    other = F.log_softmax(other_logits[:, start:-1].float(), dim=-1)
    return (clean.exp() * (clean - other)).sum()


def replacement_hook(replacement, start: int):
    """A forward hook that replaces positions `start:` of the activation with `replacement(x)`."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        edited = activation.clone()
        edited[:, start:] = replacement(activation[:, start:])
        return edited

    return hook


@torch.inference_mode()
def evaluate_dictionaries(
    model,
    dictionaries: list[Dictionary],
    contexts: torch.Tensor,
    batch_size: int = 8,
    exclude_bos: bool = True,
    dense_threshold: float = 0.1,
    progress: bool = True,
) -> list[dict]:
    """One metrics dict per dictionary (see module docstring), over `contexts` [n, ctx]."""
    hooks = [dictionary.cfg.hook_name for dictionary in dictionaries]
    for dictionary in dictionaries:
        if dictionary.cfg.hook_name not in model.hook_dict:
            raise ValueError(f"dictionary hook {dictionary.cfg.hook_name!r} is not a hook point of this model")
    device = next(model.parameters()).device
    start = 1 if exclude_bos else 0
    sums = [_Sums() for _ in dictionaries]
    ce_clean, predicted = 0.0, 0
    for begin in tqdm(range(0, contexts.shape[0], batch_size), desc="evaluate", disable=not progress):
        tokens = contexts[begin : begin + batch_size].to(device)
        clean_logits, cache = model.run_with_cache(tokens, names_filter=list(set(hooks)))
        ce_clean += _cross_entropy(clean_logits, tokens, start).item()
        predicted += tokens.shape[0] * (tokens.shape[1] - 1 - start)
        for dictionary, total in zip(dictionaries, sums):
            x = cache[dictionary.cfg.hook_name]
            dictionary.check_input_width(x.shape[-1], dictionary.cfg.hook_name)
            flat = x[:, start:].reshape(-1, x.shape[-1])
            reconstruction, codes = dictionary(flat)
            total.add_activations(flat, reconstruction, codes)
            hook = dictionary.cfg.hook_name
            spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, replacement_hook(lambda a: dictionary(a)[0], start))])
            zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, replacement_hook(torch.zeros_like, start))])
            total.ce_spliced += _cross_entropy(spliced, tokens, start).item()
            total.ce_zero += _cross_entropy(zeroed, tokens, start).item()
            total.kl += _kl_clean_to(clean_logits, spliced, start).item()
    results = []
    for dictionary, total in zip(dictionaries, sums):
        clean, spliced, zero = ce_clean / predicted, total.ce_spliced / predicted, total.ce_zero / predicted
        frequency = total.fired.double() / total.tokens
        results.append({
            "hook": dictionary.cfg.hook_name,
            "n_features": dictionary.n_features,
            "tokens": total.tokens,
            "l0": total.active / total.tokens,
            "fvu": total.fvu(),
            "mse": total.squared_error / (total.tokens * dictionary.d_in),
            "dead_fraction": (frequency == 0).double().mean().item(),
            "dense_fraction": (frequency > dense_threshold).double().mean().item(),
            "ce_loss_clean": clean,
            "ce_loss_spliced": spliced,
            "ce_loss_zero_ablated": zero,
            "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
            "kl": total.kl / predicted,
        })
    return results
