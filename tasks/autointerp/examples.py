"""The excerpts autointerp shows and scores, per feature, from the dashboard's one-pass collection
(circuits.dashboard: exact top-k contexts and a uniform reservoir of firing tokens) plus random windows of
held-out text encoded once:

- explain: every other top-activating excerpt (ranks 1, 3, 5, ...) and one reservoir excerpt per quantile band;
- score (simulation): the other top excerpts (ranks 2, 4, ...), never shown to the explainer, plus random windows
  (whatever the feature does there), as in Bills et al. / Cunningham et al. "top and random" scoring;
- detection: reservoir excerpts not shown to the explainer (activating) and random windows where the feature is
  zero throughout (non-activating), as many of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuits.dashboard import FeatureStatistics, quantile_bands
from circuits.engine import encode_codes, passthrough_positions
from circuits.hooks import stop_layer
from tasks.autointerp.excerpts import Excerpt


@dataclass(frozen=True)
class ExcerptSettings:
    n_explain: int = 6  # top excerpts shown to the explainer
    n_quantile: int = 2  # quantile-band excerpts shown too (lowest bands skipped first)
    n_score_top: int = 4  # held-out top excerpts simulated
    n_score_random: int = 4  # random windows simulated
    n_detect: int = 4  # activating and (as many) non-activating excerpts judged


@dataclass
class FeatureExcerpts:
    feature: int
    explain_top: list[Excerpt]
    explain_quantiles: list[Excerpt]
    score_top: list[Excerpt]
    score_random: list[Excerpt]
    detect_active: list[Excerpt]
    detect_inactive: list[Excerpt]
    notes: list[str] = field(default_factory=list)

    @property
    def scored(self) -> list[Excerpt]:
        return self.score_top + self.score_random


class TokenTexts:
    """Token id -> its text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.texts:
            self.texts[token] = self.tokenizer.decode([token])
        return self.texts[token]


def kept_excerpt(kept, row: int, slot: int, texts: TokenTexts) -> Excerpt:
    """The window of a kept example, positions outside the context (token -1) left out."""
    tokens, values = kept.tokens[row, slot].tolist(), kept.window[row, slot].tolist()
    pairs = [(texts(token), max(value, 0.0)) for token, value in zip(tokens, values) if token >= 0]
    return Excerpt(tuple(token for token, _ in pairs), tuple(value for _, value in pairs))


@torch.no_grad()
def random_window_codes(model, dictionary, windows: torch.Tensor, features: torch.Tensor,
                        batch_size: int = 16) -> torch.Tensor:
    """[n, pos - 1, F] codes of `features` on windows [n, pos] (BOS first; BOS dropped, passed-through positions 0)."""
    hook = dictionary.cfg.hook_name
    device = next(model.parameters()).device
    selected = features.to(next(dictionary.parameters()).device)
    rows = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        _, cache = model.run_with_cache(batch, names_filter=[hook], stop_at_layer=stop_layer([hook], model.cfg.n_layers))
        activation = cache[hook].float()
        codes = encode_codes(dictionary, activation, passthrough_positions(activation)).index_select(-1, selected)
        rows.append(codes[:, 1:].clamp_min(0).float().cpu())
    return torch.cat(rows)


def eligible_rows(statistics: FeatureStatistics, settings: ExcerptSettings) -> list[int]:
    """Rows of features with enough firing contexts for every excerpt set (explain, score, detect)."""
    needed_top = settings.n_explain + settings.n_score_top
    needed_sampled = settings.n_quantile + settings.n_detect
    return [row for row in range(len(statistics.features))
            if len(statistics.top.filled(row)) >= needed_top and len(statistics.sampled.filled(row)) >= needed_sampled]


def feature_excerpts(statistics: FeatureStatistics, row: int, window_tokens: torch.Tensor, window_codes: torch.Tensor,
                     column: int, texts: TokenTexts, settings: ExcerptSettings) -> FeatureExcerpts:
    """The excerpt sets of feature row `row`; window_codes[:, :, column] are its codes on window_tokens[:, 1:]."""
    top_slots = statistics.top.filled(row).tolist()  # strongest first
    top = [kept_excerpt(statistics.top, row, slot, texts) for slot in top_slots]
    explain_top, score_top = top[0::2][: settings.n_explain], top[1::2][: settings.n_score_top]
    bands = quantile_bands(statistics, row, per_band=1)
    quantile_slots = [band["slots"][0] for band in bands if band["slots"]][::-1][: settings.n_quantile]
    sampled = statistics.sampled
    others = [slot for slot in sampled.filled(row).tolist() if slot not in quantile_slots]
    detect_active = [kept_excerpt(sampled, row, slot, texts) for slot in others[: settings.n_detect]]
    windows = []
    for tokens, codes in zip(window_tokens[:, 1:].tolist(), window_codes[:, :, column].tolist()):
        windows.append(Excerpt(tuple(texts(token) for token in tokens), tuple(codes)))
    silent = [excerpt for excerpt in windows if excerpt.maximum <= 0]
    notes = []
    if len(silent) < settings.n_detect:
        notes.append(f"only {len(silent)} of the random windows are silent for this feature")
    return FeatureExcerpts(
        feature=int(statistics.features[row]), explain_top=explain_top,
        explain_quantiles=[kept_excerpt(sampled, row, slot, texts) for slot in quantile_slots],
        score_top=score_top, score_random=windows[: settings.n_score_random],
        detect_active=detect_active, detect_inactive=silent[: len(detect_active)], notes=notes)
