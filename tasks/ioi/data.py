"""Indirect object identification (IOI) prompts, as in Wang et al. (2022) and Cunningham et al. (2024, Sec. 4).

An IOI prompt introduces two names and then repeats one of them as the subject (S); the model should
complete with the other one, the indirect object (IO):
"When Mary and John went to the store, John gave a drink to" -> " Mary" (order ABBA; BABA introduces
the names the other way round). Its counterfactual is the same prompt with the IO name replaced by a
third name C, so that patching from it removes exactly the information "who is the IO".

Templates use the placeholders {A} and {B} (the two names introduced, in order), {S} (every later
mention of the subject), {PLACE} and {OBJECT}. ABBA fills A=IO, B=S; BABA fills A=S, B=IO. Every
name, place and object is used as one token with its leading space (" Mary").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from sae.progress import progress_bar

from circuits.engine import final_position_logits as engine_final_logits
from circuits.metrics import logit_difference
from tasks.ioi_templates import (NAME_PLACEHOLDERS, PLACEHOLDERS, TEMPLATES, IOIDataError,  # noqa: F401 (re-exported)
                                 check_template, read_template_file, template_problems)

ORDERS = ("ABBA", "BABA")

# Common English first names, places and objects (objects fit "a {OBJECT}": no leading vowel).
NAMES: tuple[str, ...] = tuple(
    """Mary John Tom Anna James Sarah David Emma Paul Lisa Mark Alice Bob Kate Peter Rose Michael Robert
    William Richard Thomas Daniel Matthew Andrew Joseph Charles Steven Kevin Brian George Edward Jason Ryan
    Jacob Eric Adam Henry Jack Frank Scott Patrick Sam Max Ben Luke Dan Joe Mike Sean Tim Jeff Chris Nick
    Alex Jennifer Linda Elizabeth Susan Jessica Karen Nancy Betty Helen Sandra Carol Ruth Sharon Michelle
    Laura Amy Anne Emily Rachel Amanda Julie Maria Grace Jane Claire Lucy Sophie Olivia Hannah Victoria
    Rebecca Katie Martha Diana Eva Nina Sara Ellen Alan Simon Carl Roger Harry Fred Ian Louis Oliver Leo
    Jake Tony Bill Jim Nathan Aaron Bruce Dean Gary Lily Ella Julia Jenny Jill Beth Kim Molly Joan""".split()
)
PLACES: tuple[str, ...] = tuple(
    """store park school office house garden restaurant hospital station market library church beach
    river lake bank kitchen museum airport hotel theater farm shop city town""".split()
)
OBJECTS: tuple[str, ...] = tuple(
    """drink book ball gift letter ring ticket key bottle box bag pen cup phone card flower cake basket
    kiss hat necklace watch computer camera map coin bone toy""".split()
)

MIN_NAMES = 3  # IO, S and the counterfactual name C must all differ


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt and its counterfactual (the IO name replaced by `cf_name`). Names carry no space."""

    text: str
    counterfactual_text: str
    io_name: str
    s_name: str
    cf_name: str
    template_id: int
    order: str  # "ABBA" | "BABA"

    @property
    def io_token_text(self) -> str:
        return " " + self.io_name

    @property
    def s_token_text(self) -> str:
        return " " + self.s_name

    @property
    def cf_token_text(self) -> str:
        return " " + self.cf_name


# ----------------------------------------------------------------------------------------------
# Words and templates


def single_token_id(tokenizer, word: str) -> int | None:
    """The token id of `" " + word` when it is exactly one known token (not unk), else None.

    Counts tokens of the word encoded without special tokens, which works for byte-level BPE
    (" Mary" -> "ĠMary") and for whitespace-splitting word-level tokenizers (" Mary" -> "Mary").
    """
    ids = tokenizer.encode(" " + word.strip(), add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        return None
    return ids[0]


def multi_token_words(tokenizer, words: Iterable[str]) -> list[str]:
    """The words that are not one token (with their leading space) under `tokenizer`."""
    return [word for word in words if single_token_id(tokenizer, word) is None]


def _normalised(words: Iterable[str]) -> list[str]:
    """Strip spaces (users may pass " Mary") and drop duplicates, keeping the order."""
    return list(dict.fromkeys(word.strip() for word in words if word.strip()))


def checked_words(tokenizer, words: Iterable[str] | None, default: Sequence[str], kind: str,
                  minimum: int = 1) -> list[str]:
    """User-given words must all be single tokens (error lists the others); built-in ones are filtered."""
    if words is not None:
        words = _normalised(words)
        bad = multi_token_words(tokenizer, words)
        if bad:
            raise IOIDataError(
                f"these {kind} are not single tokens (with a leading space) under the tokenizer: {bad}; "
                f"IO, S and counterfactual must be one token each so prompts align. Remove them or pick "
                f"other {kind}."
            )
        source = "given"
    else:
        words = [word for word in default if single_token_id(tokenizer, word) is not None]
        source = "built-in single-token"
    if len(words) < minimum:
        raise IOIDataError(
            f"only {len(words)} {source} {kind} ({words}) under this tokenizer; need at least {minimum}. "
            f"Pass your own {kind}=[...] of single-token words."
        )
    return words


def ioi_words(tokenizer, names: Iterable[str] | None = None, places: Iterable[str] | None = None,
              objects: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{"names", "places", "objects"}: the words prompts are drawn from (given ones checked, built-in ones
    filtered to single tokens), as generate_ioi_prompts uses them and results record them."""
    return {"names": checked_words(tokenizer, names, NAMES, "names", minimum=MIN_NAMES),
            "places": checked_words(tokenizer, places, PLACES, "places"),
            "objects": checked_words(tokenizer, objects, OBJECTS, "objects")}


def fill_template(template: str, order: str, *, io: str, s: str, place: str, obj: str) -> str:
    """ABBA puts the IO first ({A}=IO, {B}=S); BABA puts the subject first."""
    if order not in ORDERS:
        raise IOIDataError(f"order must be one of {ORDERS}, got {order!r}")
    first, second = (io, s) if order == "ABBA" else (s, io)
    return template.format(A=first, B=second, S=s, PLACE=place, OBJECT=obj)


# ----------------------------------------------------------------------------------------------
# Generation


def generate_ioi_prompts(
    tokenizer,
    n: int,
    *,
    seed: int = 0,
    templates: Sequence[str] | None = None,
    names: Iterable[str] | None = None,
    places: Iterable[str] | None = None,
    objects: Iterable[str] | None = None,
) -> list[IOIPrompt]:
    """`n` IOI prompts with counterfactuals, alternating ABBA/BABA and cycling through templates.

    Reproducible for a given seed and word lists. Clean and counterfactual prompts are checked to
    have the same token length under `tokenizer`.
    """
    if n <= 0:
        raise IOIDataError(f"n must be a positive number of prompts, got {n}")
    templates = list(TEMPLATES if templates is None else templates)
    if not templates:
        raise IOIDataError("templates is empty; pass at least one template or None for the built-in ones")
    for template in templates:
        check_template(template)
    words = ioi_words(tokenizer, names, places, objects)
    names, places, objects = words["names"], words["places"], words["objects"]

    rng = random.Random(seed)
    prompts = []
    for index in range(n):
        order = ORDERS[index % 2]
        template_id = (index // 2) % len(templates)
        io, s, cf = rng.sample(names, 3)
        place, obj = rng.choice(places), rng.choice(objects)
        template = templates[template_id]
        prompts.append(IOIPrompt(
            text=fill_template(template, order, io=io, s=s, place=place, obj=obj),
            counterfactual_text=fill_template(template, order, io=cf, s=s, place=place, obj=obj),
            io_name=io, s_name=s, cf_name=cf, template_id=template_id, order=order,
        ))
    for prompt in prompts:
        _token_ids_pair(tokenizer, prompt, bos_id=None)
    return prompts


# ----------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class IOIBatch:
    """Tokenised IOI prompts, right-padded; `final_positions` index each prompt's last real token."""

    clean_tokens: torch.Tensor  # [n, pos] long
    counterfactual_tokens: torch.Tensor  # [n, pos] long
    final_positions: torch.Tensor  # [n] long
    io_tokens: torch.Tensor  # [n] long
    s_tokens: torch.Tensor  # [n] long
    cf_tokens: torch.Tensor  # [n] long
    prompts: list[IOIPrompt] = field(default_factory=list)

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        """[n, pos] 1 on real tokens, 0 on right padding."""
        positions = torch.arange(self.clean_tokens.shape[1], device=self.clean_tokens.device)
        return (positions[None, :] <= self.final_positions[:, None]).long()

    def to(self, device) -> "IOIBatch":
        tensors = {name: getattr(self, name).to(device) for name in (
            "clean_tokens", "counterfactual_tokens", "final_positions", "io_tokens", "s_tokens", "cf_tokens")}
        return IOIBatch(**tensors, prompts=self.prompts)


def _tokenizer_of(model_or_tokenizer):
    from transformers import PreTrainedTokenizerBase

    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    raise IOIDataError(f"expected a model with a .tokenizer or a tokenizer, got {type(model_or_tokenizer).__name__}")


def _token_ids_pair(tokenizer, prompt: IOIPrompt, bos_id: int | None) -> tuple[list[int], list[int]]:
    """Token ids of the clean and counterfactual text; they must differ only where IO became C."""
    prefix = [] if bos_id is None else [bos_id]
    clean = prefix + tokenizer.encode(prompt.text, add_special_tokens=False)
    counterfactual = prefix + tokenizer.encode(prompt.counterfactual_text, add_special_tokens=False)
    if len(clean) != len(counterfactual):
        raise IOIDataError(
            f"clean and counterfactual prompts tokenize to different lengths ({len(clean)} vs "
            f"{len(counterfactual)}): {prompt.text!r} / {prompt.counterfactual_text!r}; the names "
            f"{prompt.io_name!r}/{prompt.cf_name!r} merge with their neighbours under this tokenizer"
        )
    io_id = single_token_id(tokenizer, prompt.io_name)
    cf_id = single_token_id(tokenizer, prompt.cf_name)
    differing = [(a, b) for a, b in zip(clean, counterfactual) if a != b]
    if not differing or any(pair != (io_id, cf_id) for pair in differing):
        raise IOIDataError(
            f"the IO name {prompt.io_token_text!r} is not a token of its own inside {prompt.text!r} under "
            "this tokenizer (clean and counterfactual differ elsewhere or not at all); use other names"
        )
    return clean, counterfactual


def _name_ids(tokenizer, names: list[str]) -> torch.Tensor:
    return torch.tensor([single_token_id(tokenizer, name) for name in names], dtype=torch.long)


def tokenize_ioi(model_or_tokenizer, prompts: Sequence[IOIPrompt], prepend_bos: bool = True) -> IOIBatch:
    """Tokenise prompts and counterfactuals, right-padding with the pad (or eos) id.

    BOS is prepended when `prepend_bos` and the tokenizer has one. Padding sits after each prompt's
    final position, so a causal model's logits there are unaffected by it.
    """
    if not prompts:
        raise IOIDataError("no prompts to tokenize; generate some with generate_ioi_prompts")
    tokenizer = _tokenizer_of(model_or_tokenizer)
    bos_id = tokenizer.bos_token_id if prepend_bos else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else pad_id

    pairs = [_token_ids_pair(tokenizer, prompt, bos_id) for prompt in prompts]
    width = max(len(clean) for clean, _ in pairs)
    clean_tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    counterfactual_tokens = clean_tokens.clone()
    for row, (clean, counterfactual) in enumerate(pairs):
        clean_tokens[row, : len(clean)] = torch.tensor(clean)
        counterfactual_tokens[row, : len(counterfactual)] = torch.tensor(counterfactual)
    return IOIBatch(
        clean_tokens=clean_tokens,
        counterfactual_tokens=counterfactual_tokens,
        final_positions=torch.tensor([len(clean) - 1 for clean, _ in pairs], dtype=torch.long),
        io_tokens=_name_ids(tokenizer, [prompt.io_name for prompt in prompts]),
        s_tokens=_name_ids(tokenizer, [prompt.s_name for prompt in prompts]),
        cf_tokens=_name_ids(tokenizer, [prompt.cf_name for prompt in prompts]),
        prompts=list(prompts),
    )


# ----------------------------------------------------------------------------------------------
# Metrics


def io_logit_diff(logits: torch.Tensor, batch: IOIBatch) -> torch.Tensor:
    """logit[IO] - logit[S] per prompt, from final-position logits [n, vocab] -> [n]."""
    return logit_difference(logits, batch.io_tokens, batch.s_tokens)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(getattr(model, "cfg", None), "device", None) or "cpu")


@torch.no_grad()
def final_position_logits(model, tokens: torch.Tensor, final_positions: torch.Tensor,
                          batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Run `model(tokens)` in chunks and keep the logits at each row's final position -> [n, vocab]."""
    device = _device_of(model)
    chunks = []
    starts = range(0, tokens.shape[0], batch_size)
    for start in progress_bar(starts, desc="forward", enabled=progress):
        chunk = tokens[start : start + batch_size].to(device)  # unembedded at the final positions only
        chunks.append(engine_final_logits(model, chunk, final_positions[start : start + batch_size]).float().cpu())
    return torch.cat(chunks)


def ioi_performance(model, batch: IOIBatch, batch_size: int = 32, progress: bool = False) -> dict[str, float]:
    """How well `model` does IOI on the clean prompts.

    accuracy: fraction with logit[IO] > logit[S]; top1_accuracy: fraction whose top token is IO;
    mean_logit_diff: mean of logit[IO] - logit[S]; also accuracy per order (ABBA, BABA).
    """
    logits = final_position_logits(model, batch.clean_tokens, batch.final_positions, batch_size, progress)
    diffs = io_logit_diff(logits, batch)
    top1 = logits.argmax(dim=-1) == batch.io_tokens
    result = {
        "n_prompts": float(len(batch)),
        "accuracy": (diffs > 0).float().mean().item(),
        "top1_accuracy": top1.float().mean().item(),
        "mean_logit_diff": diffs.mean().item(),
        "median_logit_diff": diffs.median().item(),
    }
    if len(batch.prompts) == len(batch):
        orders = [prompt.order for prompt in batch.prompts]
        for order in ORDERS:
            mask = torch.tensor([item == order for item in orders], dtype=torch.bool)
            if mask.any():
                result[f"accuracy_{order}"] = (diffs[mask] > 0).float().mean().item()
    return result
