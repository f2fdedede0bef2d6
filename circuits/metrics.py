"""Model-output metrics, the one place each is defined: KL, cross-entropy, logit difference and rank
agreement, plus the metric callables that patching and attribution evaluate.

Vocabulary-sized work runs in chunks of rows, so memory follows the batch rather than
positions x vocabulary (a 262k-token vocabulary would otherwise hold several GB of fp32 logits).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256  # positions per chunk when a softmax over the vocabulary is needed
LOGIT_BUDGET_BYTES = 256 << 20  # one forward's full logits stay under this (rows are split to fit)


def rows_within_logit_budget(rows: int, positions: int, vocab: int, budget: int = LOGIT_BUDGET_BYTES) -> int:
    """How many of `rows` contexts of `positions` tokens one forward may run so that its fp32 logits
    [rows, positions, vocab] fit `budget` bytes (at least 1): memory bounded by the batch, not the vocabulary."""
    return max(1, min(rows, budget // max(1, positions * vocab * 4)))


def _chunks(*tensors: torch.Tensor, rows: int = CHUNK_ROWS):
    """Matching slices of tensors [n, ...] along their first dimension."""
    n = tensors[0].shape[0]
    for start in range(0, n, rows):
        yield tuple(tensor[start : start + rows] for tensor in tensors)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of the next-token distributions, one value per row: logits [..., vocab] -> [...]."""
    shape = p_logits.shape[:-1]
    p_flat, q_flat = p_logits.reshape(-1, p_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
    pieces = []
    for p, q in _chunks(p_flat, q_flat):
        log_p, log_q = F.log_softmax(p.float(), dim=-1), F.log_softmax(q.float(), dim=-1)
        pieces.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(pieces).reshape(shape) if pieces else p_logits.new_zeros(shape, dtype=torch.float32)


def next_token_logits(logits: torch.Tensor, tokens: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions [n, vocab], targets [n]) for positions start..pos-2 of logits [b, pos, vocab], tokens [b, pos]."""
    predicted = logits[:, start:-1].reshape(-1, logits.shape[-1])
    return predicted, tokens[:, start + 1 :].reshape(-1).to(logits.device)


def cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over positions start..pos-2; logits [b, pos, vocab], tokens [b, pos]."""
    return summed_cross_entropy(*next_token_logits(logits, tokens, start))


def summed_cross_entropy(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predictions [n, vocab] against targets [n] (float64 total)."""
    total = torch.zeros((), dtype=torch.float64, device=predicted.device)
    for rows, wanted in _chunks(predicted, targets.to(predicted.device)):
        total = total + F.cross_entropy(rows.float(), wanted, reduction="sum").double()
    return total


def position_windows(positions: int, start: int, rows: int, vocab: int, budget: int = LOGIT_BUDGET_BYTES // 4):
    """(a, b) windows of the predicting positions start..positions-2, each [a, b) small enough that the
    fp32 logits of `rows` x (b - a) positions fit `budget` bytes: CE and KL computed window by window
    keep memory bounded by the batch, not by positions x vocabulary."""
    width = max(1, budget // max(1, rows * vocab * 4))
    for a in range(start, positions - 1, width):
        yield a, min(a + width, positions - 1)


def summed_kl(reference_logits: torch.Tensor, other_logits: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Summed KL(reference || other) over the predicting positions start..pos-2 of [b, pos, vocab] logits."""
    reference = reference_logits[:, start:-1]
    other = other_logits[:, start:-1]
    return kl_divergence(reference, other).double().sum()


def pick(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """values [..., m, vocab], tokens [m] -> [..., m]: each row's value at its token."""
    index = tokens.to(values.device).expand(*values.shape[:-1]).unsqueeze(-1)
    return values.gather(-1, index).squeeze(-1).float()


def logit_difference(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """logit[correct] - logit[wrong] per row: logits [..., m, vocab], tokens [m] -> [..., m]."""
    return pick(logits, correct) - pick(logits, wrong)


def spearman(predicted: torch.Tensor, measured: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (nan when either is constant or shorter than 2)."""
    from scipy.stats import spearmanr

    if predicted.numel() < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr(predicted.double().cpu().numpy(), measured.double().cpu().numpy())
    return float(result.statistic if hasattr(result, "statistic") else result.correlation)


# ---------------------------------------------------------------------------------------------
# metric callables: final-position logits [..., m, vocab] of prompt rows [m] -> [..., m]

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class KLTo:
    """KL(patched || target) of the next-token distributions, per prompt."""

    def __init__(self, target_logits: torch.Tensor):
        self.target = target_logits  # [n, vocab]

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        target = self.target[rows.cpu()].to(logits.device).expand_as(logits)
        return kl_divergence(logits, target)


class LogitDifference:
    """logit[correct] - logit[wrong] per prompt (for IOI: IO minus S)."""

    def __init__(self, correct: torch.Tensor, wrong: torch.Tensor):
        self.correct, self.wrong = correct.long(), wrong.long()

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.cpu()
        return logit_difference(logits, self.correct[rows], self.wrong[rows])


class TokenProbability:
    """The probability of one given token per prompt."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens.long()

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return pick(torch.softmax(logits.float(), dim=-1), self.tokens[rows.cpu()])
