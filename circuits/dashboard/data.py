"""The site's data: collected statistics, logit effects and neighbours turned into plain JSON values
(token texts, rounded numbers) per feature, and the index's one row per feature."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from circuits.dashboard.collect import FeatureStatistics, KeptExamples, quantile_bands
from circuits.dashboard.effects import Neighbours, TokenEffects


@dataclass(frozen=True)
class SiteInfo:
    """What the site is about, shown on every page and written to dashboard.json."""

    title: str
    hook: str
    model: str
    source: str  # the dictionary folder, or "baseline: pca" ...
    n_features_total: int  # width of the dictionary (pages may cover fewer)
    provenance: dict = field(default_factory=dict)


def rounded(value: float, digits: int = 3) -> float | int:
    """A number with `digits` significant digits (0 stays 0): keeps the data files small."""
    value = float(value)
    if value == 0 or value != value:
        return 0
    return float(f"{value:.{digits}g}")


class TokenTexts:
    """Token id -> its text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        token = int(token)
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


def example_entry(kept: KeptExamples, row: int, slot: int, before: int, texts: TokenTexts) -> dict[str, Any]:
    """One context window: its tokens (BOS and slots outside the context dropped), the feature's activation on
    each ("v"), the index of the activating token among them ("k"), its activation ("a") and where it came from
    (context "c", position "p")."""
    tokens = kept.tokens[row, slot]
    inside = torch.nonzero(tokens >= 0).flatten()
    first = int(inside[0]) if len(inside) else 0  # slots outside the context are at the start or the end
    return {"a": rounded(kept.activation[row, slot], 4), "c": int(kept.context[row, slot]),
            "p": int(kept.position[row, slot]), "k": before - first,
            "t": [texts(token) for token in tokens[inside].tolist()],
            "v": [rounded(value) for value in kept.window[row, slot, inside].tolist()]}


def top_tokens(statistics: FeatureStatistics, row: int, texts: TokenTexts, n: int = 6) -> list[str]:
    """The tokens the feature fires on in its top contexts, by summed activation."""
    weights: dict[str, float] = {}
    top, centre = statistics.top, statistics.settings.before
    for slot in top.filled(row).tolist():
        text = texts(int(top.tokens[row, slot, centre]))
        weights[text] = weights.get(text, 0.0) + float(top.activation[row, slot])
    return [text for text, _ in sorted(weights.items(), key=lambda item: (-item[1], item[0]))[:n]]


def histogram_entry(statistics: FeatureStatistics, row: int) -> dict[str, Any]:
    settings = statistics.settings
    counts = statistics.histogram[row].tolist()
    return {"low": settings.histogram_low, "high": settings.histogram_high, "zero": counts[0], "below": counts[1],
            "counts": counts[2:-1], "above": counts[-1]}


def feature_entry(statistics: FeatureStatistics, row: int, texts: TokenTexts, *, effects: TokenEffects,
                  neighbours: Neighbours, labels: dict[int, list[str]], per_band: int = 5) -> dict[str, Any]:
    """Everything the feature's page shows, as plain values; `labels`: the top tokens of each feature with a page
    (nearest features without one are listed unlinked)."""
    before = statistics.settings.before
    top, sampled = statistics.top, statistics.sampled
    bands = [{"from": band["from"], "to": band["to"], "low": rounded(band["low"], 4), "high": rounded(band["high"], 4),
              "examples": [example_entry(sampled, row, slot, before, texts) for slot in band["slots"]]}
             for band in quantile_bands(statistics, row, per_band)]
    return {
        "index": int(statistics.features[row]), "fired": int(statistics.fired[row]),
        "density": rounded(statistics.density[row], 4), "max": rounded(statistics.maximum[row], 4),
        "mean": rounded(statistics.mean_when_firing[row], 4), "top_tokens": top_tokens(statistics, row, texts),
        "top": [example_entry(top, row, slot, before, texts) for slot in top.filled(row).tolist()],
        "bands": bands, "histogram": histogram_entry(statistics, row),
        "promoted": [[texts(token), rounded(value)] for token, value in
                     zip(effects.promoted[row].tolist(), effects.promoted_values[row].tolist())],
        "suppressed": [[texts(token), rounded(value)] for token, value in
                       zip(effects.suppressed[row].tolist(), effects.suppressed_values[row].tolist())],
        "nearest": [[int(index), rounded(cosine), int(index) in labels, labels.get(int(index), [])[:3]]
                    for index, cosine in zip(neighbours.indices[row].tolist(), neighbours.cosines[row].tolist())],
    }


def index_rows(statistics: FeatureStatistics, texts: TokenTexts) -> list[list]:
    """One row per feature: [index, density, max activation, mean when firing, top tokens]."""
    density, maximum, mean = statistics.density.tolist(), statistics.maximum.tolist(), statistics.mean_when_firing.tolist()
    return [[int(feature), rounded(density[row], 4), rounded(maximum[row], 4), rounded(mean[row], 4),
             top_tokens(statistics, row, texts)] for row, feature in enumerate(statistics.features.tolist())]
