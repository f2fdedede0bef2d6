"""What a feature is: its max-activating examples, the tokens it fires on, and the logits it moves.

A `FeatureScan` runs the model once over corpus contexts and keeps, for every feature of every
dictionary, its largest activation in each context and where it was. Everything else reads it:
max-activating examples (the top ones, or a seeded sample of those firing between half and all of
the feature's maximum, as the paper's Section 5.3 picks contexts), the tokens a feature fires on
most, and an automatic choice of an active, interpretable-looking feature to trace.

The engine's passed-through positions are never scanned (circuits.engine.positions: BOS, whose
residual in SmolLM2 is a huge outlier no dictionary is trained on, and the massive activations), so
"max activation" always means over the positions a dictionary actually encodes.

Direct logit effect: a feature's decoder direction pushed through the final norm's linear part
(its elementwise weight; for LayerNorm also the centering) and the unembedding, the logits it
raises and lowers directly when added to the last residual stream (the paper's case studies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import networkx as nx
import torch
from sae.progress import progress_bar

from circuits.engine import encode_codes, passthrough_positions
from circuits.hooks import stop_layer, validate_hooks
from sae.dictionary import Dictionary


class ActivatingExample(NamedTuple):
    """One context where a feature fires: which context, at which token, how strongly."""

    context: int  # row of the scanned tokens
    position: int  # token position in that row (>= 1)
    activation: float


class LogitEffect(NamedTuple):
    """Tokens whose logits a direction raises most (promoted) and lowers most (suppressed)."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


@dataclass
class FeatureScan:
    """Per-context maxima of every feature over scanned corpus contexts (BOS position excluded)."""

    tokens: torch.Tensor  # [n_contexts, pos] token ids, BOS first
    max_activation: dict[str, torch.Tensor]  # hook -> [n_contexts, n_features]
    max_position: dict[str, torch.Tensor]  # hook -> [n_contexts, n_features], argmax position (>= 1)
    firing_fraction: dict[str, torch.Tensor]  # hook -> [n_features]: share of scanned tokens with code > 0
    mean_activation: dict[str, torch.Tensor]  # hook -> [n_features]: mean code over scanned tokens

    @property
    def hooks(self) -> list[str]:
        return list(self.max_activation)

    def check(self, hook: str, index: int) -> None:
        """Fail with an actionable message when (hook, index) is not a scanned feature."""
        if hook not in self.max_activation:
            raise ValueError(f"hook {hook!r} was not scanned; scanned hooks: {', '.join(self.hooks)}")
        n_features = self.max_activation[hook].shape[1]
        if not 0 <= index < n_features:
            raise ValueError(f"feature index {index} is out of range for {hook} (0..{n_features - 1})")


# --- scanning ---------------------------------------------------------------------------------


@torch.no_grad()
def scan_features(model, dictionaries: dict[str, Dictionary], tokens: torch.Tensor, batch_size: int = 8,
                  progress: bool = True) -> FeatureScan:
    """Run `model` over `tokens` [n, pos] (BOS first) and record every feature's per-context maximum,
    skipping the engine's passed-through positions (BOS, massive activations) of each hook."""
    hooks = list(dictionaries)
    validate_hooks(model, hooks)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_contexts, pos] with pos >= 2 (BOS + text), got {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    stop = stop_layer(hooks, model.cfg.n_layers)
    maxima = {hook: [] for hook in hooks}
    positions = {hook: [] for hook in hooks}
    fired = {hook: torch.zeros(d.n_features, dtype=torch.float64) for hook, d in dictionaries.items()}
    summed = {hook: torch.zeros(d.n_features, dtype=torch.float64) for hook, d in dictionaries.items()}
    counted = dict.fromkeys(hooks, 0)
    for start in progress_bar(range(0, tokens.shape[0], batch_size), desc="scan features", unit="batch", enabled=progress):
        batch = tokens[start : start + batch_size].to(device)
        _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop)
        for hook, dictionary in dictionaries.items():
            activation = cache[hook].float()
            passthrough = passthrough_positions(activation)
            kept = ~passthrough[:, 1:, None]  # [b, pos - 1, 1]
            codes = encode_codes(dictionary, activation, passthrough)[:, 1:]  # [b, pos - 1, n_features]
            best, where = codes.max(dim=1)
            maxima[hook].append(best.cpu())
            positions[hook].append(where.cpu() + 1)
            fired[hook] += (codes > 0).sum(dim=(0, 1)).double().cpu()
            summed[hook] += codes.sum(dim=(0, 1)).double().cpu()
            counted[hook] += int(kept.sum())
    return FeatureScan(tokens=tokens.cpu(), max_activation={h: torch.cat(v) for h, v in maxima.items()},
                       max_position={h: torch.cat(v) for h, v in positions.items()},
                       firing_fraction={h: (v / max(counted[h], 1)).float() for h, v in fired.items()},
                       mean_activation={h: (v / max(counted[h], 1)).float() for h, v in summed.items()})


def scan_corpus(model, dictionaries: dict[str, Dictionary], corpus, n_contexts: int = 200, context_size: int = 64,
                split: str = "train", seed: int = 0, batch_size: int = 8, progress: bool = True) -> FeatureScan:
    """Tokenize `n_contexts` contexts of the corpus and scan them (see `scan_features`)."""
    from sae.corpus import tokenize_contexts

    tokens = tokenize_contexts(corpus, model.tokenizer, context_size, n_contexts, split=split, seed=seed)
    return scan_features(model, dictionaries, tokens, batch_size=batch_size, progress=progress)


# --- examples and tokens ----------------------------------------------------------------------


def max_activating_examples(scan: FeatureScan, hook: str, index: int, n: int = 20,
                            band: tuple[float, float] | None = None, seed: int = 0) -> list[ActivatingExample]:
    """The feature's strongest contexts, strongest first (one example per context).

    With `band=(low, high)`, a seeded random sample of the contexts whose maximum lies between
    low and high times the feature's overall maximum (the paper uses (0.5, 1.0)).
    """
    scan.check(hook, index)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    activations = scan.max_activation[hook][:, index]
    top = float(activations.max())
    if top <= 0:
        return []
    if band is None:
        chosen = [row for row in torch.argsort(activations, descending=True, stable=True).tolist()
                  if activations[row] > 0][:n]
    else:
        low, high = band
        if not 0 <= low <= high:
            raise ValueError(f"band must be (low, high) with 0 <= low <= high, got {band}")
        inside = torch.nonzero((activations >= low * top) & (activations <= high * top) & (activations > 0))
        inside = inside.flatten()
        order = torch.randperm(len(inside), generator=torch.Generator().manual_seed(seed))
        chosen = inside[order[:n]].tolist()
    examples = [ActivatingExample(row, int(scan.max_position[hook][row, index]), float(activations[row]))
                for row in chosen]
    return sorted(examples, key=lambda example: (-example.activation, example.context))


def token_texts(tokenizer, ids) -> list[str]:
    """Each token id as its own text (`" world"`, `","`)."""
    return [tokenizer.decode([int(token)]) for token in ids]


def context_entry(tokenizer, token_row: torch.Tensor, position: int, activation: float, before: int = 24,
                  after: int = 4) -> dict:
    """A graph-schema context: the tokens around `position` (BOS left out), the activating one marked."""
    start = max(1, position - before)
    end = min(len(token_row), position + after + 1)
    return {"tokens": token_texts(tokenizer, token_row[start:end].tolist()), "position": position - start,
            "activation": float(activation)}


def example_entries(scan: FeatureScan, examples: list[ActivatingExample], tokenizer, before: int = 24,
                    after: int = 4) -> list[dict]:
    """Graph-schema `contexts` entries for max-activating examples."""
    return [context_entry(tokenizer, scan.tokens[example.context], example.position, example.activation,
                          before, after) for example in examples]


def top_tokens(scan: FeatureScan, hook: str, index: int, tokenizer, n: int = 5, n_examples: int = 50) -> list[str]:
    """The tokens the feature fires on most: activating tokens of its top examples, by summed activation."""
    weights: dict[str, float] = {}
    for example in max_activating_examples(scan, hook, index, n=n_examples):
        text = tokenizer.decode([int(scan.tokens[example.context, example.position])])
        weights[text] = weights.get(text, 0.0) + example.activation
    return [text for text, _ in sorted(weights.items(), key=lambda item: (-item[1], item[0]))[:n]]


def choose_feature(scan: FeatureScan, hook: str, tokenizer, min_contexts: int = 8,
                   max_firing_fraction: float = 0.05, n_examples: int = 20) -> int:
    """An active, interpretable-looking feature at `hook`: fires in at least `min_contexts` contexts
    but on at most `max_firing_fraction` of tokens, and its top examples share their activating
    tokens (the largest share of activation on its three commonest tokens; ties: more contexts, lower index)."""
    if hook not in scan.max_activation:
        raise ValueError(f"hook {hook!r} was not scanned; scanned hooks: {', '.join(scan.hooks)}")
    contexts_fired = (scan.max_activation[hook] > 0).sum(dim=0)
    density = scan.firing_fraction[hook]
    candidates = torch.nonzero((contexts_fired >= min_contexts) & (density > 0) & (density <= max_firing_fraction))
    candidates = candidates.flatten().tolist()
    if not candidates:
        raise ValueError(f"no feature at {hook} fires in at least {min_contexts} of the {scan.tokens.shape[0]} scanned "
                         f"contexts on at most {max_firing_fraction:.0%} of tokens; scan more contexts or pick a "
                         "feature by index")
    best, best_key = candidates[0], None
    for index in candidates:
        key = (_token_consistency(scan, hook, index, tokenizer, n_examples), int(contexts_fired[index]), -index)
        if best_key is None or key > best_key:
            best, best_key = index, key
    return best


def _token_consistency(scan: FeatureScan, hook: str, index: int, tokenizer, n_examples: int) -> float:
    """Share of the top examples' activation that falls on the three commonest activating tokens."""
    weights: dict[str, float] = {}
    for example in max_activating_examples(scan, hook, index, n=n_examples):
        text = tokenizer.decode([int(scan.tokens[example.context, example.position])]).strip().lower()
        weights[text] = weights.get(text, 0.0) + example.activation
    total = sum(weights.values())
    return sum(sorted(weights.values(), reverse=True)[:3]) / total if total > 0 else 0.0


# --- direct logit effect ----------------------------------------------------------------------


def final_norm_linear(model, direction: torch.Tensor) -> torch.Tensor:
    """`direction` [..., d_model] through the final norm's linear part: centering (LayerNorm only)
    and the elementwise weight, as the bridge reports the norm (Gemma's RMSNorm multiplies by
    1 + weight: `cfg.rmsnorm_uses_offset`); the per-token scale 1/rms is left out."""
    normalization = str(getattr(model.cfg, "normalization_type", "") or "")
    if normalization.startswith("LN"):
        direction = direction - direction.mean(dim=-1, keepdim=True)
    weight = getattr(model.ln_final, "weight", None) if hasattr(model, "ln_final") else None
    if isinstance(weight, torch.Tensor) and not normalization.endswith("Pre"):
        weight = weight.detach().to(direction)
        if getattr(model.cfg, "rmsnorm_uses_offset", False):
            weight = 1.0 + weight
        direction = direction * weight
    return direction


@torch.no_grad()
def direct_logit_effect(model, direction: torch.Tensor, k: int = 10) -> LogitEffect:
    """The k tokens whose logits `direction` [d_model] raises most and lowers most, with the change."""
    unembed = model.W_U.detach().float()  # [d_model, vocab]
    logits = final_norm_linear(model, direction.to(unembed)) @ unembed  # [vocab]
    k = min(k, logits.shape[0])
    tokenizer = model.tokenizer
    up, down = torch.topk(logits, k), torch.topk(-logits, k)
    return LogitEffect([(tokenizer.decode([int(i)]), float(v)) for v, i in zip(up.values, up.indices)],
                       [(tokenizer.decode([int(i)]), -float(v)) for v, i in zip(down.values, down.indices)])


def feature_logit_effect(model, dictionary: Dictionary, index: int, k: int = 10) -> LogitEffect:
    """The direct logit effect of one unit of feature `index` (its decoder row)."""
    if not 0 <= index < dictionary.n_features:
        raise ValueError(f"feature index {index} is out of range (0..{dictionary.n_features - 1})")
    return direct_logit_effect(model, dictionary.feature_directions[index].detach(), k)


# --- filling graph nodes ----------------------------------------------------------------------


def annotate_feature_nodes(graph: nx.DiGraph, model, dictionaries: dict[str, Dictionary],
                           scan: FeatureScan | None = None, n_contexts: int = 5, n_tokens: int = 5,
                           n_logit_tokens: int = 8) -> nx.DiGraph:
    """Fill each feature node's top_tokens, contexts (from `scan`, when given) and promoted /
    suppressed tokens (its direct logit effect); returns the same graph."""
    tokenizer = model.tokenizer
    graph.graph.setdefault("n_layers", int(model.cfg.n_layers))  # pages mark middle-layer logit effects as such
    for node, data in graph.nodes(data=True):
        if data.get("kind") != "feature" or data.get("hook") not in dictionaries:
            continue
        hook, index = data["hook"], int(data["index"])
        effect = feature_logit_effect(model, dictionaries[hook], index, n_logit_tokens)
        data["promoted_tokens"] = [text for text, _ in effect.promoted]
        data["suppressed_tokens"] = [text for text, _ in effect.suppressed]
        if scan is not None and hook in scan.max_activation:
            examples = max_activating_examples(scan, hook, index, n=n_contexts)
            if examples:
                data["contexts"] = example_entries(scan, examples, tokenizer)
                data["top_tokens"] = top_tokens(scan, hook, index, tokenizer, n=n_tokens)
    return graph
