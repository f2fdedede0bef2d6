"""IOI templates: the placeholders, the built-in templates, the checks on a template and the reader of a
template file (one template per line). Standard library only, so that the command line can check a
`--templates` file before torch is imported; tasks.ioi.data uses the same rules when it fills them.

Templates use the placeholders {A} and {B} (the two names introduced, in order), {S} (every later
mention of the subject), {PLACE} and {OBJECT}.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

NAME_PLACEHOLDERS = ("A", "B", "S")
PLACEHOLDERS = frozenset(NAME_PLACEHOLDERS + ("PLACE", "OBJECT"))

TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument at the {PLACE}. Afterwards {S} said to",
    "When {A} and {B} met at the {PLACE}, {S} brought a {OBJECT} and gave it to",
    "Then, {A} and {B} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
    "When {A} and {B} arrived at the {PLACE}, it was already late, and after a short rest {S} handed the {OBJECT} to",
    "After a long day at the {PLACE}, {A} and {B} walked home together. Later that evening, {S} sent a {OBJECT} to",
)


class IOIDataError(ValueError):
    """IOI templates or word lists that cannot give well-formed prompts under this tokenizer."""


def template_problems(template: str) -> list[str]:
    """What is wrong with a template (empty: nothing): {A}, {B} once each, {S} at least once, a space before
    every name, no other fields, no trailing whitespace."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:  # an unmatched brace
        return [f"it is not a format string ({error}); write a literal brace as {{{{ or }}}}"]
    unknown = sorted(set(fields) - PLACEHOLDERS)
    problems = []
    if unknown:
        problems.append(f"unknown placeholders {unknown}")
    if fields.count("A") != 1 or fields.count("B") != 1:
        problems.append("{A} and {B} must appear exactly once each")
    if "S" not in fields:
        problems.append("{S} must appear at least once")
    for match in re.finditer(r"\{(A|B|S)\}", template):
        if match.start() == 0 or template[match.start() - 1] != " ":
            problems.append(f"{match.group()} must follow a space (names are tokens with a leading space)")
            break
    if template != template.rstrip():
        problems.append("it must not end with whitespace (the answer token carries the space)")
    return problems


def check_template(template: str) -> None:
    """Raise IOIDataError naming every problem of `template` (see template_problems)."""
    problems = template_problems(template)
    if problems:
        raise IOIDataError(f"bad IOI template {template!r}: {'; '.join(problems)}. Example: {TEMPLATES[0]!r}")


def template_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, template) for each line of a template file that is neither blank nor a '#' comment."""
    return [(number, line.rstrip()) for number, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")]


def read_template_file(path: str | Path, error: type[ValueError] = IOIDataError) -> list[str]:
    """The templates of a UTF-8 file, one per line (blank and '#' lines skipped), each checked; an error names
    the file and line."""
    from sae.textfiles import utf8_lines

    templates = []
    for number, template in template_lines(utf8_lines(path, "template file", error)):
        problems = template_problems(template)
        if problems:
            raise error(f"template file {path}:{number}: {'; '.join(problems)} in {template!r}. Each line needs "
                        f"{{A}}, {{B}} once and {{S}}, e.g. {TEMPLATES[0]!r}")
        templates.append(template)
    if not templates:
        raise error(f"template file {path} holds no template (only blank or '#' lines)")
    return templates
