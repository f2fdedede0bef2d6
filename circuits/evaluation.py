"""Evaluating dictionaries inside the model on held-out text.

For each dictionary at its hook point: the activation metrics (L0, FVU, dead and dense fractions)
and the spliced-model metrics: next-token cross-entropy of the clean model, of the model with the
activation replaced by the dictionary's reconstruction, and with it zero-ablated; CE loss recovered
= (CE_zero - CE_spliced) / (CE_zero - CE_clean); and KL(clean || spliced) per token.

With `exclude_bos` (the default, as in training) the BOS position keeps its clean activation and
its prediction is left out of every average: in Llama-family models that position's residual is a
huge outlier that no dictionary is trained on.

The same "massive activation" appears at some other tokens too: in SmolLM2, the first token after BOS
when a context starts mid-document has a residual norm near 25,000 (against about 150) in about one
context in ten. Such tokens are a few in ten thousand but hold most of the variance, so an FVU over
all tokens mostly measures them. `fvu` (and `l0`) is therefore over typical tokens, those whose norm is
at most 10 times the batch median (`sae.metrics.typical_token_mask`); `fvu_all_tokens` and `outlier_fraction` are
reported beside it. With `exclude_outliers` (the default) the spliced and zero-ablated runs also leave
these positions at their clean activation, as a spliced dictionary does (circuits/splicing.py) and as
training leaves them out (sae/training.py); `ce_loss_spliced_outliers_replaced` is the spliced CE with
the reconstruction put in at those positions too, to show what passing them through is worth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.dictionary import Dictionary
from sae.metrics import outlier_positions, typical_token_mask


@dataclass
class _Sums:
    """Running sums for exact metrics over all evaluated tokens."""

    tokens: int = 0  # typical (non-outlier) tokens
    all_tokens: int = 0
    squared_error: float = 0.0
    activation_sum: torch.Tensor | None = None
    activation_squared: float = 0.0
    all_squared_error: float = 0.0
    all_activation_sum: torch.Tensor | None = None
    all_activation_squared: float = 0.0
    active: float = 0.0
    fired: torch.Tensor | None = None
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    ce_spliced_replaced: float = 0.0  # with the reconstruction at outlier positions too
    kl: float = 0.0
    extra: dict = field(default_factory=dict)

    def add_activations(self, x: torch.Tensor, reconstruction: torch.Tensor, codes: torch.Tensor) -> None:
        # x, reconstruction: [tokens, d_in]; codes: [tokens, n_features]
        x64 = x.double()
        error = (reconstruction.double() - x64).pow(2).sum(-1)  # [tokens]
        typical = typical_token_mask(x64)
        self.all_tokens += x.shape[0]
        self.all_squared_error += error.sum().item()
        self.all_activation_sum = _add(self.all_activation_sum, x64.sum(0))
        self.all_activation_squared += x64.pow(2).sum().item()
        self.tokens += int(typical.sum())
        self.squared_error += error[typical].sum().item()
        self.activation_sum = _add(self.activation_sum, x64[typical].sum(0))
        self.activation_squared += x64[typical].pow(2).sum().item()
        nonzero = codes != 0
        self.active += nonzero[typical].sum().item()
        self.fired = _add(self.fired, nonzero.sum(0))

    def fvu(self) -> float:
        return _fvu(self.squared_error, self.activation_sum, self.activation_squared, self.tokens)

    def fvu_all_tokens(self) -> float:
        return _fvu(self.all_squared_error, self.all_activation_sum, self.all_activation_squared, self.all_tokens)


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _fvu(squared_error: float, activation_sum: torch.Tensor, activation_squared: float, tokens: int) -> float:
    """Squared error over the summed squared deviation from the mean, from running sums."""
    mean = activation_sum / tokens
    return squared_error / (activation_squared - tokens * mean.pow(2).sum().item())


def _cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Summed next-token CE over positions start..pos-2; logits [b, pos, vocab], tokens [b, pos]."""
    predicted = logits[:, start:-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(predicted, tokens[:, start + 1 :].reshape(-1), reduction="sum")


def _kl_clean_to(clean_logits: torch.Tensor, other_logits: torch.Tensor, start: int) -> torch.Tensor:
    """Summed KL(clean || other) over positions start..pos-2."""
    clean = F.log_softmax(clean_logits[:, start:-1].float(), dim=-1)
    other = F.log_softmax(other_logits[:, start:-1].float(), dim=-1)
    return (clean.exp() * (clean - other)).sum()


def replacement_hook(replacement, start: int, keep: torch.Tensor | None = None):
    """A forward hook that replaces positions `start:` of the activation with `replacement(x)`,
    except where `keep` [batch, pos] (bool) is set: those positions stay as they are."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        edited = activation.clone()
        edited[:, start:] = replacement(activation[:, start:])
        if keep is not None:
            edited[keep] = activation[keep]
        return edited

    return hook


@torch.inference_mode()
def evaluate_dictionaries(
    model,
    dictionaries: list[Dictionary],
    contexts: torch.Tensor,
    batch_size: int = 8,
    exclude_bos: bool = True,
    exclude_outliers: bool = True,
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
            keep = outlier_positions(x) if exclude_outliers else None

            def reconstruct(a: torch.Tensor) -> torch.Tensor:
                return dictionary(a)[0]

            spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, replacement_hook(reconstruct, start, keep))])
            zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, replacement_hook(torch.zeros_like, start, keep))])
            total.ce_spliced += _cross_entropy(spliced, tokens, start).item()
            total.ce_zero += _cross_entropy(zeroed, tokens, start).item()
            total.kl += _kl_clean_to(clean_logits, spliced, start).item()
            if keep is not None and bool(keep.any()):
                replaced = model.run_with_hooks(tokens, fwd_hooks=[(hook, replacement_hook(reconstruct, start))])
                total.ce_spliced_replaced += _cross_entropy(replaced, tokens, start).item()
            else:
                total.ce_spliced_replaced += _cross_entropy(spliced, tokens, start).item()
    results = []
    for dictionary, total in zip(dictionaries, sums):
        clean, spliced, zero = ce_clean / predicted, total.ce_spliced / predicted, total.ce_zero / predicted
        frequency = total.fired.double() / total.all_tokens
        results.append({
            "hook": dictionary.cfg.hook_name,
            "n_features": dictionary.n_features,
            "tokens": total.all_tokens,
            "l0": total.active / total.tokens,
            "fvu": total.fvu(),
            "fvu_all_tokens": total.fvu_all_tokens(),
            "outlier_fraction": 1 - total.tokens / total.all_tokens,
            "mse": total.squared_error / (total.tokens * dictionary.d_in),
            "dead_fraction": (frequency == 0).double().mean().item(),
            "dense_fraction": (frequency > dense_threshold).double().mean().item(),
            "ce_loss_clean": clean,
            "ce_loss_spliced": spliced,
            "ce_loss_zero_ablated": zero,
            "ce_loss_spliced_outliers_replaced": total.ce_spliced_replaced / predicted,
            "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
            "kl": total.kl / predicted,
        })
    return results
