"""Everything a feature dashboard shows about activations, collected in one pass with bounded memory.

Per feature, `FeatureCollector` keeps:

- its `top_k` strongest contexts (one example per context, at the context's maximum) with the window
  of tokens and activations around the activating token: a top-k merge per batch, so it holds exactly
  the true top k whatever the corpus size;
- a uniform reservoir of `reservoir` firing tokens (each firing token gets a seeded random key; the
  largest keys are kept, so the reservoir is a uniform sample without replacement of every firing
  token seen), from which the quantile examples are drawn (see `quantile_bands`);
- a histogram of log10(activation) on fixed bins (plus a bin for zero, one below and one above the
  range), whose counts sum to the number of tokens scanned;
- counts: tokens fired, summed activation, maximum.

Memory is features x (top_k + reservoir) x window, whatever the number of tokens. Tokens the engine
passes through (BOS, massive activations: circuits.engine.passthrough_positions) are neither counted
nor shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuits.engine import encode_codes, passthrough_positions
from circuits.hooks import stop_layer, validate_hooks
from sae.progress import progress_bar


@dataclass(frozen=True)
class CollectionSettings:
    """How much to keep per feature, and the histogram's fixed bins (log10 of the activation)."""

    top_k: int = 20
    reservoir: int = 40
    bands: int = 4
    before: int = 16  # tokens shown before the activating one
    after: int = 4  # and after it
    histogram_low: float = -3.0  # log10 of the smallest binned activation
    histogram_high: float = 3.0
    histogram_bins: int = 60
    seed: int = 0

    @property
    def window(self) -> int:
        return self.before + self.after + 1

    def histogram_edges(self) -> torch.Tensor:
        """[histogram_bins + 1] activation values bounding the log bins."""
        return 10 ** torch.linspace(self.histogram_low, self.histogram_high, self.histogram_bins + 1,
                                    dtype=torch.float64)


@dataclass
class KeptExamples:
    """Examples kept per feature, slot-wise: [n_features, slots] (windows: [n_features, slots, window])."""

    key: torch.Tensor  # ordering key (the activation for top-k; a random key for the reservoir); -inf: empty
    activation: torch.Tensor  # activation of the feature at the example's token
    context: torch.Tensor  # global context number (row of the scanned tokens), -1 when empty
    position: torch.Tensor  # token position in its context
    tokens: torch.Tensor  # token ids of the window, -1 outside the context (or BOS)
    window: torch.Tensor  # the feature's activation on each window token

    @classmethod
    def empty(cls, n_features: int, slots: int, window: int) -> "KeptExamples":
        return cls(key=torch.full((n_features, slots), -torch.inf), activation=torch.zeros(n_features, slots),
                   context=torch.full((n_features, slots), -1, dtype=torch.long),
                   position=torch.zeros(n_features, slots, dtype=torch.long),
                   tokens=torch.full((n_features, slots, window), -1, dtype=torch.int32),
                   window=torch.zeros(n_features, slots, window))

    def filled(self, feature: int) -> torch.Tensor:
        """Slot numbers holding an example for `feature`, in slot order."""
        return torch.nonzero(self.key[feature] > -torch.inf).flatten()


@dataclass
class FeatureStatistics:
    """What one pass collected for features `features` (dictionary indices) of one dictionary."""

    features: torch.Tensor  # [F] dictionary indices, in the order of every per-feature row below
    settings: CollectionSettings
    n_tokens: int  # tokens scanned (passed-through positions left out)
    n_contexts: int
    fired: torch.Tensor  # [F] tokens with activation > 0
    summed: torch.Tensor  # [F] float64 summed activation
    maximum: torch.Tensor  # [F]
    histogram: torch.Tensor  # [F, histogram_bins + 3]: zero, below range, the bins, above range
    top: KeptExamples
    sampled: KeptExamples
    extra: dict = field(default_factory=dict)

    @property
    def density(self) -> torch.Tensor:
        return self.fired.double() / max(self.n_tokens, 1)

    @property
    def mean_when_firing(self) -> torch.Tensor:
        return self.summed / self.fired.clamp_min(1).double()

    def row(self, feature: int) -> int:
        """The row of dictionary feature `feature` in the per-feature tensors."""
        matches = torch.nonzero(self.features == feature).flatten()
        if len(matches) == 0:
            raise ValueError(f"feature {feature} was not collected")
        return int(matches[0])


def quantile_bands(statistics: FeatureStatistics, row: int, per_band: int = 5) -> list[dict]:
    """The reservoir's samples of feature row `row`, sorted by activation and cut into `settings.bands`
    equal groups (the quantile bands of the sampled firing activations, lowest first); from each band up to
    `per_band` examples spread evenly over it. Each band: {"low", "high", "from", "to", "slots"}."""
    sampled = statistics.sampled
    slots = sampled.filled(row)
    if len(slots) == 0:
        return []
    values = sampled.activation[row, slots]
    order = slots[torch.argsort(values, stable=True)]
    n_bands = min(statistics.settings.bands, len(order))
    bands = []
    for band in range(n_bands):
        start, end = band * len(order) // n_bands, (band + 1) * len(order) // n_bands
        members = order[start:end]
        picks = torch.linspace(len(members) - 1, 0, min(per_band, len(members))).round().long().unique()
        chosen = members[picks.flip(0)] if len(picks) else members[:0]
        band_values = sampled.activation[row, members]
        bands.append({"from": band / n_bands, "to": (band + 1) / n_bands, "low": float(band_values.min()),
                      "high": float(band_values.max()), "slots": chosen.tolist()})
    return bands


class FeatureCollector:
    """Feed it codes batch by batch (`update`); `result()` gives the FeatureStatistics."""

    def __init__(self, features: torch.Tensor, settings: CollectionSettings = CollectionSettings()):
        n = len(features)
        self.features, self.settings = features.clone(), settings
        self.top = KeptExamples.empty(n, settings.top_k, settings.window)
        self.sampled = KeptExamples.empty(n, settings.reservoir, settings.window)
        self.fired = torch.zeros(n, dtype=torch.long)
        self.summed = torch.zeros(n, dtype=torch.float64)
        self.maximum = torch.zeros(n)
        self.histogram = torch.zeros(n, settings.histogram_bins + 3, dtype=torch.long)
        self.n_tokens = self.n_contexts = 0
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.offsets = torch.arange(-settings.before, settings.after + 1)

    @torch.no_grad()
    def update(self, codes: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor) -> None:
        """codes [b, pos, F] (zero at passed-through positions), tokens [b, pos], counted [b, pos] bool: the
        positions that are scanned (not passed through). Contexts are numbered in the order they arrive."""
        codes = codes.detach().float().cpu().clamp_min(0) * counted.cpu()[..., None]
        tokens, counted = tokens.cpu(), counted.cpu()
        n_batch, n_pos, n_features = codes.shape
        first = self.n_contexts
        flat = codes[counted]  # [tokens counted, F]
        self._count(flat)
        best, where = codes.max(dim=1)  # [b, F]: each context's maximum, one example per context
        self._merge(self.top, torch.where(best > 0, best, -torch.inf).T, where.T, None, codes, tokens, first)
        keys = torch.rand(codes.shape, generator=self.generator)
        keys = torch.where(codes > 0, keys, -torch.inf).reshape(n_batch * n_pos, n_features).T  # [F, b * pos]
        self._merge(self.sampled, keys, None, n_pos, codes, tokens, first)
        self.n_tokens += int(counted.sum())
        self.n_contexts += n_batch

    def _count(self, flat: torch.Tensor) -> None:
        settings = self.settings
        fired = flat > 0
        self.fired += fired.sum(dim=0)
        self.summed += flat.double().sum(dim=0)
        if len(flat):
            self.maximum = torch.maximum(self.maximum, flat.max(dim=0).values)
        width = (settings.histogram_high - settings.histogram_low) / settings.histogram_bins
        logs = torch.log10(flat.double().clamp_min(1e-300))
        bins = torch.floor((logs - settings.histogram_low) / width).long() + 2
        bins = torch.where(fired, bins.clamp(1, settings.histogram_bins + 2), 0)  # [tokens, F]
        n_bins = self.histogram.shape[1]
        shifted = bins + torch.arange(flat.shape[1]) * n_bins
        self.histogram += torch.bincount(shifted.flatten(), minlength=flat.shape[1] * n_bins).view(-1, n_bins)

    def _merge(self, kept: KeptExamples, keys: torch.Tensor, argmax: torch.Tensor | None, n_pos: int | None,
               codes: torch.Tensor, tokens: torch.Tensor, first: int) -> None:
        """Keep the largest keys among the kept slots and the candidates keys [F, M]: candidate m is context m at
        position argmax[f, m] (top-k) or token m of the flattened batch (reservoir, n_pos given)."""
        slots = kept.key.shape[1]
        chosen = torch.cat([kept.key, keys], dim=1).topk(slots, dim=1, sorted=True).indices  # [F, slots]
        new = chosen >= slots
        if not new.any():
            return
        candidate = (chosen - slots).clamp_min(0)
        if n_pos is None:
            row, position = candidate, argmax.gather(1, candidate)
        else:
            row, position = candidate // n_pos, candidate % n_pos
        feature = torch.arange(keys.shape[0])[:, None]
        at = position[..., None] + self.offsets  # [F, slots, window]
        inside = (at >= 1) & (at < codes.shape[1])
        at = at.clamp(0, codes.shape[1] - 1)
        old = chosen.clamp_max(slots - 1)
        expanded = old[..., None].expand(-1, -1, self.offsets.shape[0])
        new_window = new[..., None]
        kept.window = torch.where(new_window, torch.where(inside, codes[row[..., None], at, feature[..., None]], 0.0),
                                  kept.window.gather(1, expanded))
        kept.tokens = torch.where(new_window, torch.where(inside, tokens[row[..., None], at].int(), -1),
                                  kept.tokens.gather(1, expanded))
        kept.activation = torch.where(new, codes[row, position, feature], kept.activation.gather(1, old))
        kept.context = torch.where(new, row + first, kept.context.gather(1, old))
        kept.position = torch.where(new, position, kept.position.gather(1, old))
        kept.key = torch.cat([kept.key, keys], dim=1).gather(1, chosen)

    def result(self, **extra) -> FeatureStatistics:
        return FeatureStatistics(self.features, self.settings, self.n_tokens, self.n_contexts, self.fired, self.summed,
                                 self.maximum, self.histogram, self.top, self.sampled, dict(extra))


@torch.no_grad()
def collect_feature_statistics(model, dictionary, tokens: torch.Tensor, features: torch.Tensor | None = None, *,
                               settings: CollectionSettings = CollectionSettings(), batch_size: int = 8,
                               progress: bool = True) -> FeatureStatistics:
    """Run the model over `tokens` [n, pos] (BOS first) once, encode the dictionary's hook with the engine's
    pass-through rule, and collect the statistics of `features` (default: all)."""
    hook = dictionary.cfg.hook_name
    validate_hooks(model, [hook])
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_contexts, pos] with pos >= 2 (BOS + text), got {tuple(tokens.shape)}")
    features = torch.arange(dictionary.n_features) if features is None else torch.as_tensor(features).long()
    if len(features) and not 0 <= int(features.min()) <= int(features.max()) < dictionary.n_features:
        raise ValueError(f"feature indices must be in 0..{dictionary.n_features - 1}")
    device = next(model.parameters()).device
    stop = stop_layer([hook], model.cfg.n_layers)
    collector = FeatureCollector(features, settings)
    selected = features.to(next(dictionary.parameters()).device)
    for start in progress_bar(range(0, tokens.shape[0], batch_size), desc="dashboard: collect", unit="batch",
                              enabled=progress):
        batch = tokens[start : start + batch_size]
        _, cache = model.run_with_cache(batch.to(device), names_filter=[hook], stop_at_layer=stop)
        activation = cache[hook].float()
        passthrough = passthrough_positions(activation)
        codes = encode_codes(dictionary, activation, passthrough).index_select(-1, selected)
        collector.update(codes, batch, ~passthrough)
    return collector.result(hook=hook)
