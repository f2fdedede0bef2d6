"""Reading user text files (corpora, contexts, concept and config files): UTF-8 and JSON checked with the
file and line named in every error. Standard library only, so the command line can check files before it
imports torch; each caller passes its own error class (CorpusError, the app's InputError, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


class TextFileError(ValueError):
    """A text file that is not UTF-8, not valid JSON, or not of the expected shape; the message names it."""


def utf8_lines(path: str | Path, what: str = "file", error: type[ValueError] = TextFileError) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is reported with the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as problem:
        line = data[:problem.start].count(b"\n") + 1
        raise error(f"{what} {path}:{line} is not UTF-8 text (byte 0x{data[problem.start]:02x}); "
                    "save it as UTF-8") from None


def read_json(path: str | Path, what: str = "file", error: type[ValueError] = TextFileError):
    """A JSON file's value: UTF-8, valid JSON, not nested absurdly deep; each failure names the file."""
    text = "\n".join(utf8_lines(path, what, error))
    try:
        return json.loads(text)
    except json.JSONDecodeError as problem:
        raise error(f"{what} {path}:{problem.lineno} is not valid JSON ({problem.msg})") from None
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to read; it is not a file this tool wrote") from None


def jsonl_text_records(path: str | Path, what: str = "file",
                       error: type[ValueError] = TextFileError) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-empty line of a .jsonl file, each checked to be a JSON object
    with a string "text"."""
    for number, line in enumerate(utf8_lines(path, what, error), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as problem:
            raise error(f"{what} {path}:{number} is not valid JSON ({problem.msg})") from None
        except RecursionError:
            raise error(f"{what} {path}:{number} is nested too deeply to read") from None
        if not isinstance(record, dict):
            raise error(f"{what} {path}:{number} is a JSON {type(record).__name__}, not an object; each line "
                        'needs to be an object with a "text" field')
        if not isinstance(record.get("text"), str):
            raise error(f"{what} {path}:{number} has no string 'text' field; each line needs one")
        yield number, record
