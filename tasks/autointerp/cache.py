"""Prompts and responses cached on disk, so that a rerun with the same model and prompts costs nothing.

One JSON file per request, named by the sha256 of (model name, kind, request, settings), written to a
temporary file and renamed into place (a killed run leaves no half-written entry). Responses are cached as
received; whether they parse is decided by the caller each time, so a malformed response is not retried
by a rerun (the cache is the record). Delete the folder to ask again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


class CachedClient:
    """Wraps a client; `complete` and `option_probabilities` answer from the cache when they can."""

    def __init__(self, inner, folder: Path):
        self.inner, self.folder = inner, Path(folder).expanduser()
        self.name = inner.name
        self.hits = self.misses = 0

    @property
    def supports_likelihood(self) -> bool:
        return bool(getattr(self.inner, "supports_likelihood", False))

    def render(self, messages: list[dict]) -> str:
        return self.inner.render(messages)

    def complete(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0) -> str:
        request = {"kind": "complete", "model": self.name, "messages": messages, "max_tokens": max_tokens,
                   "temperature": temperature}
        return self._cached(request, lambda: self.inner.complete(messages, max_tokens, temperature))

    def option_probabilities(self, segments: list[str], options: list[str]) -> list[list[float]]:
        request = {"kind": "option_probabilities", "model": self.name, "segments": segments, "options": options}
        return self._cached(request, lambda: self.inner.option_probabilities(segments, options))

    def path(self, request: dict) -> Path:
        key = hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=True).encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.json"

    def _cached(self, request: dict, compute):
        path = self.path(request)
        try:
            entry = json.loads(path.read_text())
            if entry.get("request") == request:
                self.hits += 1
                return entry["response"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # absent or unreadable: ask again and overwrite
        response = compute()
        self.misses += 1
        write_json_atomically(path, {"request": request, "response": response})
        return response


def write_json_atomically(path: Path, value) -> None:
    """`value` as JSON at `path`, via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(value, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
