"""Patching dictionary features at one hook and measuring the output, run from that layer onward.

`CachedRun` runs a set of prompts (and their counterfactuals) through the model once and keeps the
activation at one hook point; edited activations are then replayed through the later blocks only
(circuits.engine.replay), checked against the full forward when the run is built, with a full
forward and a replacing hook as the fallback.

`FeaturePatcher` edits one dictionary's features there. An edit of the codes c -> c' changes the
activation by (c' - c) @ W_dec, exactly what the spliced model does, the error term staying at its
clean value unless `include_error`. Modes: "patch" (values from the counterfactual run, encoded
with the same dictionary), "zero", "mean" (mean clean code over the prompts' patched positions, or
given), "scale" (c' = value * c) and "set" (c' = value). Positions: every position but the engine's
passed-through ones (BOS and massive activations, circuits.engine.positions), or a subset given.

Metrics (circuits.metrics) read the final-position logits of each prompt. `attribution()` estimates
every feature's effect with the one attribution function (circuits.attribution) from gradients taken
through the replay; `check_attribution()` confirms the top ones by exact patching.
`edit_norm` of a set = mean over prompts of the L2 norm of the whole edit (all positions and d_in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from sae.progress import progress_bar

from circuits.attribution import Attribution, attribution_scores
from circuits.engine.positions import encode_codes, passthrough_positions
from circuits.engine.replay import PrefixReplay
from circuits.engine.run import final_position_logits
from circuits.hooks import validate_hooks
from circuits.metrics import Metric, spearman
from sae.dictionary import Dictionary
from sae.finite import check_finite_rows

MODES = ("patch", "zero", "mean", "scale", "set")


@dataclass
class Bucket:
    """Prompts of similar length run together, right-padded to `tokens.shape[1]`."""

    rows: torch.Tensor  # [m] indices into the prompt list
    tokens: torch.Tensor  # [m, length]
    final: torch.Tensor  # [m] each row's final position
    clean: torch.Tensor | None = None  # [m, length, d] activation at the hook
    counterfactual: torch.Tensor | None = None
    replay: PrefixReplay | None = None


def length_buckets(final_positions: torch.Tensor, max_padding: float = 0.15) -> list[torch.Tensor]:
    """Row indices grouped by length so that padding adds at most `max_padding` of the real tokens."""
    lengths = final_positions + 1
    order = torch.argsort(lengths, stable=True)
    buckets, current = [], []
    for row in order.tolist():
        candidate = current + [row]
        real = int(lengths[candidate].sum())
        if current and int(lengths[row]) * len(candidate) > (1 + max_padding) * real:
            buckets.append(current)
            candidate = [row]
        current = candidate
    buckets.append(current)
    return [torch.tensor(rows, dtype=torch.long) for rows in buckets]


def final_logits(logits: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """logits [m, pos, vocab] at each row's final position -> [m, vocab]."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, final.to(logits.device)]


class CachedRun:
    """Clean (and counterfactual) prompts run once; activations at `hook` kept for patching from there on."""

    def __init__(self, model, hook: str, tokens: torch.Tensor, final_positions: torch.Tensor,
                 counterfactual_tokens: torch.Tensor | None = None, resume: bool = True, progress: bool = False):
        validate_hooks(model, [hook])
        if counterfactual_tokens is not None and counterfactual_tokens.shape != tokens.shape:
            raise ValueError(f"counterfactual tokens {tuple(counterfactual_tokens.shape)} must have the clean "
                             f"tokens' shape {tuple(tokens.shape)}; pair every prompt with one of equal length")
        self.model, self.hook = model, hook
        self.n_prompts = tokens.shape[0]
        self.device = next(model.parameters()).device
        self.start_block = PrefixReplay.start_for(model, hook) if resume else None
        self.buckets = [Bucket(rows, tokens[rows, : int(final_positions[rows].max()) + 1],
                               final_positions[rows].long()) for rows in length_buckets(final_positions)]
        logits: dict[str, list] = {"clean": [], "counterfactual": []}
        for bucket in progress_bar(self.buckets, desc="clean/counterfactual runs", enabled=progress):
            bucket.clean, clean_logits, bucket.replay = self._full_run(bucket, bucket.tokens, capture=True)
            logits["clean"].append((bucket.rows, clean_logits))
            if counterfactual_tokens is not None:
                cf_tokens = counterfactual_tokens[bucket.rows, : bucket.tokens.shape[1]]
                bucket.counterfactual, cf_logits, _ = self._full_run(bucket, cf_tokens, capture=False)
                logits["counterfactual"].append((bucket.rows, cf_logits))
        self.clean_logits = self._gather(logits["clean"])  # [n, vocab] at final positions
        self.counterfactual_logits = self._gather(logits["counterfactual"]) if counterfactual_tokens is not None else None
        self.mode = "resume" if self.start_block is not None and self._replay_reproduces() else "hooks"

    @torch.no_grad()
    def _full_run(self, bucket: Bucket, tokens: torch.Tensor, capture: bool):
        """(activation at hook [m, len, d], final logits [m, vocab], the replay or None)."""
        store: dict = {}

        def keep(activation, hook=None):
            store["activation"] = activation.detach().clone()

        if capture and self.start_block is not None:
            with PrefixReplay.recording(self.model, self.start_block) as recording:
                logits = final_position_logits(self.model, tokens.to(self.device), bucket.final, [(self.hook, keep)])
            replay = recording.finish(tokens.shape[0])
        else:
            logits = final_position_logits(self.model, tokens.to(self.device), bucket.final, [(self.hook, keep)])
            replay = None
        return store["activation"], logits, replay

    @staticmethod
    def _gather(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        n = sum(rows.numel() for rows, _ in pieces)
        out = torch.empty(n, pieces[0][1].shape[-1], dtype=pieces[0][1].dtype)
        for rows, values in pieces:
            out[rows] = values.cpu()
        return out

    def run(self, bucket: Bucket, activations: torch.Tensor) -> torch.Tensor:
        """Final-position logits [k * m, vocab] for activations [k * m, len, d] at the hook (k copies of the bucket);
        NonFiniteError if any is NaN or infinite (nothing is measured or written from them)."""
        logits = self._patched_logits(bucket, activations)
        check_finite_rows(logits, f"patched model output at hook '{self.hook}'", rows_are="prompts' logits")
        return logits

    def _patched_logits(self, bucket: Bucket, activations: torch.Tensor) -> torch.Tensor:
        copies = activations.shape[0] // bucket.rows.numel()
        final = bucket.final.repeat(copies)
        if self.mode == "resume":
            return bucket.replay.logits_at(activations.to(self.device), final)
        tokens = bucket.tokens.repeat(copies, 1).to(self.device)

        def replace(activation, hook=None):
            return activations.to(activation.dtype)

        return final_position_logits(self.model, tokens, final, [(self.hook, replace)])

    def _replay_reproduces(self) -> bool:
        bucket = self.buckets[0]
        keep = min(2, bucket.rows.numel())
        replay = bucket.replay.first_rows(keep)
        return replay.reproduces(bucket.clean[:keep], bucket.final[:keep], self.clean_logits[bucket.rows[:keep]],
                                 self.hook)


@dataclass
class SetEvaluation:
    """Exact results for k feature sets: metric means over prompts and the edit size."""

    values: dict[str, torch.Tensor]  # name -> [k] mean over prompts
    per_prompt: dict[str, torch.Tensor]  # name -> [k, n]
    edit_norm: torch.Tensor  # [k]


class FeaturePatcher:
    """Edits of one dictionary's features at a `CachedRun`'s hook, evaluated exactly or by attribution."""

    def __init__(self, run: CachedRun, dictionary: Dictionary, positions: torch.Tensor | None = None,
                 mean_codes: torch.Tensor | None = None):
        sample = run.buckets[0].clean
        dictionary.check_input_width(sample.shape[-1], run.hook)
        self.run, self.dictionary = run, dictionary
        self.directions = dictionary.feature_directions.detach().to(sample.device, sample.dtype)  # [F, d]
        self.n_features = self.directions.shape[0]
        self.codes = [self._encode(bucket.clean, bucket) for bucket in run.buckets]
        self.counterfactual_codes = ([self._encode(bucket.counterfactual, bucket) for bucket in run.buckets]
                                     if run.counterfactual_logits is not None else None)
        self.masks = [self._position_mask(bucket, positions) for bucket in run.buckets]
        self.mean_codes = mean_codes if mean_codes is not None else self._mean_codes()

    @torch.no_grad()
    def _encode(self, activations: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """[m, len, d] -> codes [m, len, F], zero at the passed-through positions (never edited)."""
        passthrough = passthrough_positions(activations, lengths=bucket.final + 1)
        return encode_codes(self.dictionary, activations, passthrough).to(activations.dtype)

    def _position_mask(self, bucket: Bucket, positions: torch.Tensor | None) -> torch.Tensor:
        """[m, len] bool: the edited positions (by default all but the passed-through ones, up to each
        row's final position)."""
        length = bucket.tokens.shape[1]
        index = torch.arange(length)
        passthrough = passthrough_positions(bucket.clean, lengths=bucket.final + 1).cpu()
        allowed = (index[None, :] <= bucket.final[:, None]) & ~passthrough
        if positions is None:
            return allowed
        positions = torch.as_tensor(positions)
        mask = torch.zeros(bucket.rows.numel(), length, dtype=torch.bool)
        if positions.dtype == torch.bool:
            if positions.ndim != 2 or positions.shape[0] != self.run.n_prompts:
                raise ValueError(f"a position mask must be [n_prompts={self.run.n_prompts}, pos], got "
                                 f"{tuple(positions.shape)}")
            width = min(length, positions.shape[1])
            mask[:, :width] = positions[bucket.rows, :width]
        else:
            mask[:, positions[(positions >= 0) & (positions < length)]] = True
        return mask & allowed

    def _mean_codes(self) -> torch.Tensor:
        total = sum((codes * mask[..., None]).sum((0, 1)) for codes, mask in zip(self.codes, self.masks))
        count = sum(int(mask.sum()) for mask in self.masks)
        return total / max(count, 1)

    # -- deltas

    def code_delta(self, index: int, mode: str = "patch", value=None) -> torch.Tensor:
        """Masked code change [m, len, F] of bucket `index` for a mode (before choosing features)."""
        codes = self.codes[index]
        if mode == "patch":
            if self.counterfactual_codes is None:
                raise ValueError("mode 'patch' needs counterfactual prompts in the CachedRun")
            target = self.counterfactual_codes[index]
        elif mode == "zero":
            target = torch.zeros_like(codes)
        elif mode == "mean":
            target = self.mean_codes.to(codes.dtype).expand_as(codes)
        elif mode == "scale":
            target = codes * float(value if value is not None else 0.0)
        elif mode == "set":
            if value is None:
                raise ValueError("mode 'set' needs a value (a number or a [n_features] tensor)")
            target = torch.as_tensor(value, dtype=codes.dtype).expand_as(codes)
        else:
            raise ValueError(f"unknown patching mode '{mode}'; choose one of {MODES}")
        return (target - codes) * self.masks[index][..., None]

    def error_delta(self, index: int) -> torch.Tensor:
        """Counterfactual minus clean error term [m, len, d], masked: the error node's patch."""
        bucket = self.run.buckets[index]
        clean = bucket.clean - self._reconstruct(self.codes[index])
        other = bucket.counterfactual - self._reconstruct(self.counterfactual_codes[index])
        return (other - clean) * self.masks[index][..., None]

    def _reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        dtype = next(self.dictionary.parameters()).dtype
        with torch.no_grad():
            return self.dictionary.decode(codes.to(dtype)).to(codes.dtype)

    def candidates(self, per_prompt: bool = False) -> torch.Tensor:
        """Features whose code differs between the runs at a patched position: [F] bool, or [n_prompts, F]."""
        active = torch.zeros(self.run.n_prompts, self.n_features, dtype=torch.bool)
        for index, bucket in enumerate(self.run.buckets):
            active[bucket.rows] = (self.code_delta(index) != 0).any(1).cpu()
        return active if per_prompt else active.any(0)

    def _feature_index(self, features) -> torch.Tensor:
        """1-D: one set for every prompt; 2-D [n_prompts, k]: a set per prompt (-1 pads shorter ones)."""
        if features is None:
            return torch.arange(self.n_features)
        index = torch.as_tensor(features, dtype=torch.long)
        if index.ndim == 2 and index.shape[0] != self.run.n_prompts:
            raise ValueError(f"per-prompt feature sets need one row per prompt ({self.run.n_prompts}), "
                             f"got {index.shape[0]}")
        index = index.reshape(-1) if index.ndim != 2 else index
        valid = index[index >= 0] if index.ndim == 2 else index
        if valid.numel() and (valid.min() < 0 or valid.max() >= self.n_features):
            raise ValueError(f"feature indices must be in [0, {self.n_features}), got {valid.min()}..{valid.max()}")
        return index

    def edit(self, index: int, features, mode: str = "patch", value=None, include_error: bool = False,
             delta: torch.Tensor | None = None) -> torch.Tensor:
        """The activation change [m, len, d] in bucket `index` from editing `features` (None: all)."""
        delta = self.code_delta(index, mode, value) if delta is None else delta
        chosen = self._feature_index(features)
        if chosen.ndim == 1:
            change = delta[..., chosen] @ self.directions[chosen]
        else:  # a set per prompt: rows [m, k] of this bucket, -1 = no feature
            rows = chosen[self.run.buckets[index].rows]
            picked = delta.gather(-1, rows.clamp(min=0)[:, None, :].expand(-1, delta.shape[1], -1))
            picked = picked * (rows >= 0)[:, None, :].to(picked.dtype)  # [m, len, k]
            change = torch.einsum("mlk,mkd->mld", picked, self.directions[rows.clamp(min=0)])
        if include_error:
            change = change + self.error_delta(index)
        return change

    # -- exact evaluation

    @torch.no_grad()
    def evaluate(self, feature_sets: Sequence, metrics: dict[str, Metric], mode: str = "patch", value=None,
                 include_error: bool = False, max_batch_tokens: int = 16384, progress: bool = False
                 ) -> SetEvaluation:
        """Run the model with each feature set edited (k sets, each over all prompts) and measure it."""
        k, n = len(feature_sets), self.run.n_prompts
        per_prompt = {name: torch.zeros(k, n) for name in metrics}
        squared = torch.zeros(k, n)
        steps = [(index, start) for index, bucket in enumerate(self.run.buckets)
                 for start in range(0, k, self._sets_per_batch(bucket, max_batch_tokens))]
        for index, start in progress_bar(steps, desc="patching", enabled=progress and len(steps) >= 2):
            bucket = self.run.buckets[index]
            chunk = feature_sets[start : start + self._sets_per_batch(bucket, max_batch_tokens)]
            delta = self.code_delta(index, mode, value)
            edits = torch.stack([self.edit(index, features, mode, value, include_error, delta) for features in chunk])
            squared[start : start + len(chunk), bucket.rows] = edits.pow(2).sum((-1, -2)).float().cpu()
            patched = (bucket.clean[None] + edits).reshape(-1, *bucket.clean.shape[1:])
            logits = self.run.run(bucket, patched).reshape(len(chunk), bucket.rows.numel(), -1)
            for name, metric in metrics.items():
                per_prompt[name][start : start + len(chunk), bucket.rows] = metric(logits, bucket.rows).float().cpu()
        return SetEvaluation({name: values.mean(1) for name, values in per_prompt.items()}, per_prompt,
                             squared.sqrt().mean(1))

    def _sets_per_batch(self, bucket: Bucket, max_batch_tokens: int) -> int:
        return max(1, max_batch_tokens // bucket.tokens.numel())

    def baseline(self, metrics: dict[str, Metric]) -> dict[str, float]:
        """Metric means with nothing edited (the clean run)."""
        rows = torch.arange(self.run.n_prompts)
        return {name: metric(self.run.clean_logits, rows).float().mean().item() for name, metric in metrics.items()}

    def exact_effects(self, features: Iterable[int], metrics: dict[str, Metric], mode: str = "patch", value=None,
                      progress: bool = False) -> dict[str, torch.Tensor]:
        """Metric change (mean over prompts) from editing each feature alone -> {name: [len(features)]}."""
        sets = [[int(feature)] for feature in features]
        result = self.evaluate(sets, metrics, mode, value, progress=progress)
        base = self.baseline(metrics)
        return {name: values - base[name] for name, values in result.values.items()}

    # -- gradient attribution

    def attribution(self, metrics: dict[str, Metric], mode: str = "patch", value=None,
                    points: Sequence[float] = (0.0,), per_prompt: bool = False) -> dict[str, Attribution]:
        """(c' - c) . d metric / d c for every feature, and the same for the error term, for each metric.

        The gradient is taken on the clean run (points=(0,)), or at several points with every feature
        already moved a fraction `point` of the way (integrated gradients: points=(0.25, 0.75), ...).
        `per_prompt` keeps one row per prompt ([n_prompts, n_features], each row's share of the mean).
        """
        n = self.run.n_prompts
        shape = (n, self.n_features) if per_prompt else (self.n_features,)
        totals = {name: torch.zeros(shape, dtype=torch.float64) for name in metrics}
        errors = {name: 0.0 for name in metrics}
        values = {name: 0.0 for name in metrics}
        for index, bucket in enumerate(self.run.buckets):
            delta = self.code_delta(index, mode, value)
            error_delta = self.error_delta(index) if self.counterfactual_codes is not None and mode == "patch" else None
            grads: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
            for point in points:
                for name, (grad, output) in self._gradients(index, metrics, delta, float(point)).items():
                    grads[name].append(grad)
                    values[name] += output / len(points)
            for name in metrics:
                scores = attribution_scores(grads[name], delta, self.directions, error_delta, per_row=per_prompt)
                if per_prompt:
                    totals[name][bucket.rows] += scores.features
                else:
                    totals[name] += scores.features
                errors[name] += scores.error
        return {name: Attribution(totals[name].float(), errors[name], values[name]) for name in metrics}

    def _gradients(self, index: int, metrics: dict[str, Metric], delta: torch.Tensor, point: float):
        """{metric: (d metric / d activation [m, len, d], metric value)} in bucket `index`, with the
        codes moved `point` of the way along delta."""
        bucket, n = self.run.buckets[index], self.run.n_prompts
        with torch.no_grad():  # x as the spliced model computes it: decode(codes + t delta) + error
            error = bucket.clean - self._reconstruct(self.codes[index])
            activation = self._reconstruct(self.codes[index] + point * delta) + error
        leaf = activation.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.run.run(bucket, leaf)
            outputs = {name: metric(logits, bucket.rows).sum() / n for name, metric in metrics.items()}
            result = {}
            names = list(metrics)
            for position, name in enumerate(names):
                (grad,) = torch.autograd.grad(outputs[name], [leaf], retain_graph=position < len(names) - 1)
                result[name] = (grad, outputs[name].item())
        return result


def check_attribution(patcher: FeaturePatcher, metrics: dict[str, Metric], attributions: dict[str, Attribution],
                      top: int = 50, rank_by: str | None = None, mode: str = "patch", value=None) -> dict:
    """Patch the `top` features by |attribution| (of metric `rank_by`, default the first) one at a time,
    exactly, and report the Spearman rank correlation of predicted and measured effects per metric."""
    rank_by = rank_by or next(iter(metrics))
    features = torch.argsort(attributions[rank_by].features.abs(), descending=True, stable=True)[:top]
    exact = patcher.exact_effects(features.tolist(), metrics, mode, value)
    predicted = {name: attributions[name].features[features] for name in metrics}
    return {"features": features.tolist(),
            "predicted": {name: values.tolist() for name, values in predicted.items()},
            "exact": {name: values.tolist() for name, values in exact.items()},
            "spearman": {name: spearman(predicted[name], exact[name]) for name in metrics}}
