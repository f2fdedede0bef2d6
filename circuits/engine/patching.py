"""Patching dictionary features and measuring what it does to the model's output.

`CachedRun` runs a set of prompts (and their counterfactuals) through the model once and keeps the
activation at one hook point. Patched activations are then run *from that layer onward*: the inputs
each later block received in the full forward (attention mask, rotary embeddings, ...) are captured
and replayed, so the prefix is not recomputed. The bridge's own `start_at_layer` does not help here:
it still executes every block below the start (their output is discarded). The replay is checked
against the full forward when the run is built; where it does not reproduce the logits (or the hook
is not a residual-stream hook), a full forward with a replacing hook is used instead.

`FeaturePatcher` edits one dictionary's features at that hook. An edit of the codes c -> c' changes
the activation by (c' - c) @ W_dec, exactly what the spliced model does (circuits/splicing.py), the
error term staying at its clean value unless `include_error`. Modes: "patch" (values from the
counterfactual run, encoded with the same dictionary), "zero", "mean" (mean clean code over the
prompts' patched positions, or given), "scale" (c' = value * c) and "set" (c' = value).
Positions: by default every position but BOS (position 0), which stays unedited.

Metrics read the final-position logits of each prompt: `KLTo` (KL(patched || target)),
`LogitDifference`, `TokenProbability`, or any callable (final_logits [..., m, vocab], rows [m]) -> [..., m].

Gradient attribution estimates every feature's effect at once: effect_i ~ sum over prompts and positions
of (c'_i - c_i) * d metric / d c_i, from one forward and one backward pass from the hook on.
`edit_norm` of a set = mean over prompts of the L2 norm of the whole edit, taken over all positions
and d_in together (sqrt of the sum over positions of |delta x_pos|^2).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.dictionary import Dictionary

MODES = ("patch", "zero", "mean", "scale", "set")
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")
_RESUME_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


# ---------------------------------------------------------------------------------------------
# metrics: final-position logits [..., m, vocab] of rows [m] -> [..., m]


class KLTo:
    """KL(patched || target) of the next-token distributions, per prompt."""

    def __init__(self, target_logits: torch.Tensor):
        self.target = F.log_softmax(target_logits.float(), dim=-1)  # [n, vocab]

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        return (log_p.exp() * (log_p - self.target[rows])).sum(-1)


class LogitDifference:
    """logit[correct] - logit[wrong] per prompt (for IOI: IO minus S)."""

    def __init__(self, correct: torch.Tensor, wrong: torch.Tensor):
        self.correct, self.wrong = correct.long(), wrong.long()

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return _pick(logits, self.correct[rows]) - _pick(logits, self.wrong[rows])


class TokenProbability:
    """The probability of one given token per prompt."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens.long()

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return _pick(torch.softmax(logits.float(), dim=-1), self.tokens[rows])


def _pick(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """values [..., m, vocab], tokens [m] -> [..., m]."""
    index = tokens.to(values.device).expand(*values.shape[:-1]).unsqueeze(-1)
    return values.gather(-1, index).squeeze(-1).float()


Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# running from the hook onward


def resume_block(hook: str, n_layers: int) -> int | None:
    """The first block to run after an activation at `hook`; None when it is not a residual-stream hook."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    if match is None:
        return None
    layer = int(match.group(1))
    return layer if match.group(2) == "pre" else layer + 1


@dataclass
class _Bucket:
    """Prompts of similar length run together, right-padded to `tokens.shape[1]`."""

    rows: torch.Tensor  # [m] indices into the prompt list
    tokens: torch.Tensor  # [m, length]
    final: torch.Tensor  # [m] each row's final position
    clean: torch.Tensor | None = None  # [m, length, d] activation at the hook
    counterfactual: torch.Tensor | None = None
    block_inputs: list | None = None  # per later block: (args, kwargs) it received


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


class CachedRun:
    """Clean (and counterfactual) prompts run once; activations at `hook` kept for patching from there on."""

    def __init__(self, model, hook: str, tokens: torch.Tensor, final_positions: torch.Tensor,
                 counterfactual_tokens: torch.Tensor | None = None, resume: bool = True, progress: bool = False):
        from sae.activation_store import validate_hooks

        validate_hooks(model, [hook])
        if counterfactual_tokens is not None and counterfactual_tokens.shape != tokens.shape:
            raise ValueError(f"counterfactual tokens {tuple(counterfactual_tokens.shape)} must have the clean "
                             f"tokens' shape {tuple(tokens.shape)}; pair every prompt with one of equal length")
        self.model, self.hook = model, hook
        self.n_prompts = tokens.shape[0]
        self.device = next(model.parameters()).device
        self.start_block = resume_block(hook, model.cfg.n_layers) if resume else None
        self.buckets = [_Bucket(rows, tokens[rows, : int(final_positions[rows].max()) + 1],
                                final_positions[rows].long()) for rows in length_buckets(final_positions)]
        vocab_logits = {}
        for bucket in tqdm(self.buckets, desc="clean/counterfactual runs", disable=not progress):
            bucket.clean, logits, bucket.block_inputs = self._full_run(bucket, bucket.tokens, capture=True)
            vocab_logits.setdefault("clean", []).append((bucket.rows, logits))
            if counterfactual_tokens is not None:
                cf_tokens = counterfactual_tokens[bucket.rows, : bucket.tokens.shape[1]]
                bucket.counterfactual, logits, _ = self._full_run(bucket, cf_tokens, capture=False)
                vocab_logits.setdefault("counterfactual", []).append((bucket.rows, logits))
        self.clean_logits = self._gather(vocab_logits["clean"])  # [n, vocab] at final positions
        self.counterfactual_logits = (self._gather(vocab_logits["counterfactual"])
                                      if counterfactual_tokens is not None else None)
        self.mode = "resume" if self.start_block is not None and self._resume_reproduces() else "hooks"

    # -- full forwards

    @torch.no_grad()
    def _full_run(self, bucket: _Bucket, tokens: torch.Tensor, capture: bool):
        """(activation at hook [m, len, d], final logits [m, vocab], inputs of later blocks or None)."""
        store: dict = {}
        handles = []
        if capture and self.start_block is not None:
            store["blocks"] = [None] * (self.model.cfg.n_layers - self.start_block)
            for offset, block in enumerate(self.model.blocks[self.start_block:]):
                handles.append(block.register_forward_pre_hook(_recorder(store["blocks"], offset), with_kwargs=True))

        def keep(activation, hook=None):
            store["activation"] = activation.detach().clone()

        try:
            logits = self.model.run_with_hooks(tokens.to(self.device), fwd_hooks=[(self.hook, keep)])
        finally:
            for handle in handles:
                handle.remove()
        return store["activation"], _final(logits, bucket.final), store.get("blocks")

    @staticmethod
    def _gather(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        n = sum(rows.numel() for rows, _ in pieces)
        out = torch.empty(n, pieces[0][1].shape[-1], dtype=pieces[0][1].dtype)
        for rows, values in pieces:
            out[rows] = values.cpu()
        return out

    # -- running patched activations

    def run(self, bucket: _Bucket, activations: torch.Tensor) -> torch.Tensor:
        """Final-position logits [k * m, vocab] for activations [k * m, len, d] at the hook (k copies of the bucket)."""
        copies = activations.shape[0] // bucket.rows.numel()
        final = bucket.final.repeat(copies)
        if self.mode == "resume":
            return self._resume(bucket, activations, copies, final)
        tokens = bucket.tokens.repeat(copies, 1).to(self.device)

        def replace(activation, hook=None):
            return activations.to(activation.dtype)

        logits = self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook, replace)])
        return _final(logits, final)

    def _resume(self, bucket: _Bucket, hidden: torch.Tensor, copies: int, final: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.device)
        for block, (args, kwargs) in zip(self.model.blocks[self.start_block:], bucket.block_inputs):
            args, kwargs = _tile((args, kwargs), copies, bucket.rows.numel())
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
            output = block(*args, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, final.to(hidden.device)][:, None]  # [k*m, 1, d]
        return self.model.unembed(self.model.ln_final(last))[:, 0]

    @torch.no_grad()
    def _resume_reproduces(self) -> bool:
        bucket = self.buckets[0]
        keep = min(2, bucket.rows.numel())
        part = _Bucket(bucket.rows[:keep], bucket.tokens[:keep], bucket.final[:keep],
                       block_inputs=[_take_rows(inputs, keep, bucket.rows.numel()) for inputs in bucket.block_inputs])
        try:
            resumed = self._resume(part, bucket.clean[:keep], 1, part.final).cpu()
        except Exception as error:  # an architecture whose blocks cannot be replayed: fall back to hooks
            warnings.warn(f"running from {self.hook} onward failed ({type(error).__name__}: {error}); "
                          "using full forwards with hooks instead", stacklevel=3)
            return False
        expected = self.clean_logits[bucket.rows[:keep]]
        tolerance = _RESUME_TOLERANCE.get(expected.dtype, 1e-2) * max(1.0, expected.abs().max().item())
        difference = (resumed.to(expected.dtype) - expected).abs().max().item()
        if difference > tolerance:
            warnings.warn(f"running from {self.hook} onward differs from the full forward by {difference:.2e}; "
                          "using full forwards with hooks instead", stacklevel=3)
            return False
        return True


def _final(logits: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, final.to(logits.device)]


def _is_cache(key: str, value) -> bool:
    """A key/value cache passed to a block: replayed blocks must not read or grow it."""
    return key in _CACHE_KWARGS or type(value).__name__.endswith("Cache")


def _recorder(store: list, offset: int):
    def record(module, args, kwargs):
        args = tuple(None if _is_cache("", value) else value for value in args)
        kwargs = {key: (None if _is_cache(key, value) else value) for key, value in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        store[offset] = (args, kwargs)

    return record


def _map_tensors(value, fn):
    """Apply `fn` to every tensor inside nested tuples, lists and dicts (other values pass through)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(item, fn) for item in value)
    if isinstance(value, list):
        return [_map_tensors(item, fn) for item in value]
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    return value


def _tile(value, copies: int, m: int):
    """Repeat every tensor whose first dimension is the bucket's row count `copies` times (set-major)."""
    if copies == 1:
        return value
    return _map_tensors(value, lambda t: t.repeat(copies, *([1] * (t.ndim - 1)))
                        if t.ndim >= 2 and t.shape[0] == m else t)


def _take_rows(value, keep: int, m: int):
    """The first `keep` rows of every tensor whose first dimension is the bucket's row count."""
    return _map_tensors(value, lambda t: t[:keep] if t.ndim >= 2 and t.shape[0] == m and m > 1 else t)


# ---------------------------------------------------------------------------------------------
# editing features


@dataclass
class SetEvaluation:
    """Exact results for k feature sets: metric means over prompts and the edit size."""

    values: dict[str, torch.Tensor]  # name -> [k] mean over prompts
    per_prompt: dict[str, torch.Tensor]  # name -> [k, n]
    edit_norm: torch.Tensor  # [k]


@dataclass
class Attribution:
    """Estimated effect on a metric (mean over prompts) of editing each feature alone."""

    features: torch.Tensor  # [n_features], or [n_prompts, n_features] per prompt
    error: float  # the same estimate for editing the error term
    metric_value: float  # the metric's mean on the unedited run


class FeaturePatcher:
    """Edits of one dictionary's features at a `CachedRun`'s hook, evaluated exactly or by attribution."""

    def __init__(self, run: CachedRun, dictionary: Dictionary, positions: torch.Tensor | None = None,
                 mean_codes: torch.Tensor | None = None):
        sample = run.buckets[0].clean
        dictionary.check_input_width(sample.shape[-1], run.hook)
        self.run, self.dictionary = run, dictionary
        self.directions = dictionary.feature_directions.detach().to(sample.device, sample.dtype)  # [F, d]
        self.n_features = self.directions.shape[0]
        self._codes = [self._encode(bucket.clean) for bucket in run.buckets]
        self._counterfactual = ([self._encode(bucket.counterfactual) for bucket in run.buckets]
                                if run.counterfactual_logits is not None else None)
        self._masks = [self._position_mask(bucket, positions) for bucket in run.buckets]
        self.mean_codes = mean_codes if mean_codes is not None else self._mean_codes()

    @torch.no_grad()
    def _encode(self, activations: torch.Tensor) -> torch.Tensor:
        """[m, len, d] -> codes [m, len, F]; BOS codes are zero (that position is never edited)."""
        dtype = next(self.dictionary.parameters()).dtype
        codes = self.dictionary.encode(activations.to(dtype)).to(activations.dtype)
        codes[:, 0] = 0
        return codes

    def _position_mask(self, bucket: _Bucket, positions: torch.Tensor | None) -> torch.Tensor:
        """[m, len] bool: the edited positions (by default all but BOS, up to each row's final one)."""
        length = bucket.tokens.shape[1]
        index = torch.arange(length)
        real = index[None, :] <= bucket.final[:, None]
        if positions is None:
            return real & (index[None, :] > 0)
        positions = torch.as_tensor(positions)
        if positions.dtype == torch.bool:
            if positions.ndim != 2 or positions.shape[0] != self.run.n_prompts:
                raise ValueError(f"a position mask must be [n_prompts={self.run.n_prompts}, pos], got "
                                 f"{tuple(positions.shape)}")
            mask = torch.zeros(bucket.rows.numel(), length, dtype=torch.bool)
            width = min(length, positions.shape[1])
            mask[:, :width] = positions[bucket.rows, :width]
        else:
            mask = torch.zeros(bucket.rows.numel(), length, dtype=torch.bool)
            mask[:, positions[(positions >= 0) & (positions < length)]] = True
        return mask & real & (index[None, :] > 0)

    def _mean_codes(self) -> torch.Tensor:
        total = sum((codes * mask[..., None]).sum((0, 1)) for codes, mask in zip(self._codes, self._masks))
        count = sum(int(mask.sum()) for mask in self._masks)
        return total / max(count, 1)

    # -- deltas

    def _delta(self, index: int, mode: str, value) -> torch.Tensor:
        """Masked code change [m, len, F] of one bucket for a mode (before choosing features)."""
        codes = self._codes[index]
        if mode == "patch":
            if self._counterfactual is None:
                raise ValueError("mode 'patch' needs counterfactual prompts in the CachedRun")
            target = self._counterfactual[index]
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
        return (target - codes) * self._masks[index][..., None]

    def _error_delta(self, index: int) -> torch.Tensor:
        """Counterfactual minus clean error term [m, len, d], masked."""
        bucket = self.run.buckets[index]
        clean = bucket.clean - self._reconstruct(self._codes[index])
        other = bucket.counterfactual - self._reconstruct(self._counterfactual[index])
        return (other - clean) * self._masks[index][..., None]

    def _reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        dtype = next(self.dictionary.parameters()).dtype
        with torch.no_grad():
            return self.dictionary.decode(codes.to(dtype)).to(codes.dtype)

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
        delta = self._delta(index, mode, value) if delta is None else delta
        chosen = self._feature_index(features)
        if chosen.ndim == 1:
            change = delta[..., chosen] @ self.directions[chosen]
        else:  # a set per prompt: rows [m, k] of this bucket, -1 = no feature
            rows = chosen[self.run.buckets[index].rows]
            picked = delta.gather(-1, rows.clamp(min=0)[:, None, :].expand(-1, delta.shape[1], -1))
            picked = picked * (rows >= 0)[:, None, :].to(picked.dtype)  # [m, len, k]
            change = torch.einsum("mlk,mkd->mld", picked, self.directions[rows.clamp(min=0)])
        if include_error:
            change = change + self._error_delta(index)
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
        for index, start in tqdm(steps, desc="patching", disable=not progress or len(steps) < 2):
            bucket = self.run.buckets[index]
            chunk = feature_sets[start : start + self._sets_per_batch(bucket, max_batch_tokens)]
            delta = self._delta(index, mode, value)
            edits = torch.stack([self.edit(index, features, mode, value, include_error, delta) for features in chunk])
            squared[start : start + len(chunk), bucket.rows] = edits.pow(2).sum((-1, -2)).float().cpu()
            patched = (bucket.clean[None] + edits).reshape(-1, *bucket.clean.shape[1:])
            logits = self.run.run(bucket, patched).reshape(len(chunk), bucket.rows.numel(), -1)
            for name, metric in metrics.items():
                per_prompt[name][start : start + len(chunk), bucket.rows] = metric(logits, bucket.rows).float().cpu()
        return SetEvaluation({name: values.mean(1) for name, values in per_prompt.items()}, per_prompt,
                             squared.sqrt().mean(1))

    def _sets_per_batch(self, bucket: _Bucket, max_batch_tokens: int) -> int:
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

        The gradient is taken on the clean run (points=(0,)), or averaged over runs with every feature
        already moved a fraction `point` of the way (integrated gradients: points=(0.25, 0.75), ...), which
        estimates each feature's share of the whole edit rather than its effect alone. `per_prompt` keeps
        one row per prompt ([n_prompts, n_features], each row's share of the mean over prompts).
        """
        n = self.run.n_prompts
        shape = (n, self.n_features) if per_prompt else (self.n_features,)
        totals = {name: torch.zeros(shape, dtype=torch.float64) for name in metrics}
        error_totals = {name: 0.0 for name in metrics}
        values = {name: 0.0 for name in metrics}
        for index in range(len(self.run.buckets)):
            delta = self._delta(index, mode, value)
            error_delta = self._error_delta(index) if self._counterfactual is not None and mode == "patch" else None
            for point in points:
                grads, outputs = self._gradients(index, metrics, delta, float(point))
                for name, (grad_codes, grad_error) in grads.items():
                    effect = (delta * grad_codes).sum(1).double().cpu() / len(points)  # [m, F]
                    if per_prompt:
                        totals[name][self.run.buckets[index].rows] += effect
                    else:
                        totals[name] += effect.sum(0)
                    if error_delta is not None:
                        error_totals[name] += (error_delta * grad_error).sum().item() / len(points)
                    values[name] += outputs[name] / len(points)
        return {name: Attribution(totals[name].float(), error_totals[name], values[name]) for name in metrics}

    def _gradients(self, index: int, metrics: dict[str, Metric], delta: torch.Tensor, point: float):
        """{metric: (d metric / d codes, d metric / d error)} in bucket `index`, codes moved `point` of delta."""
        bucket, n = self.run.buckets[index], self.run.n_prompts
        dtype = next(self.dictionary.parameters()).dtype
        with torch.no_grad():
            error = bucket.clean - self._reconstruct(self._codes[index])
        codes = (self._codes[index] + point * delta).to(dtype).requires_grad_(True)
        error = error.clone().requires_grad_(True)
        with torch.enable_grad():
            activations = self.dictionary.decode(codes).to(error.dtype) + error
            logits = self.run.run(bucket, activations)
            outputs = {name: metric(logits, bucket.rows).sum() / n for name, metric in metrics.items()}
            grads = {}
            names = list(metrics)
            for position, name in enumerate(names):
                grad_codes, grad_error = torch.autograd.grad(outputs[name], [codes, error],
                                                             retain_graph=position < len(names) - 1)
                grads[name] = (grad_codes.to(delta.dtype), grad_error)
        return grads, {name: output.item() for name, output in outputs.items()}


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


def spearman(predicted: torch.Tensor, measured: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (nan when either is constant)."""
    from scipy.stats import spearmanr

    if predicted.numel() < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr(predicted.double().numpy(), measured.double().numpy())
    return float(result.statistic if hasattr(result, "statistic") else result.correlation)
