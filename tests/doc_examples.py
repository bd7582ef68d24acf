"""Reading the examples of the Markdown docs and the outputs they show, for the replay tests
(tests/system/test_readme_grpc.py: grpcurl; tests/system/test_readme_examples.py: curl and Python).

A doc shows what a command prints in the comment lines right below it (for Python, in the
comment on a `print(...)` line). What it leaves out is marked, and the rest must match:

- `[...]`, `[...256 floats...]`: any value;
- `[1, 2, ...]`: a list that starts with these items; `{"a": 1, ...}`: an object with at least
  these members (an object may always have members the doc does not show);
- `21.52...`: a number that starts with these digits; `"AQ..."`: a string with this prefix;
- a line `...` (or `… text`) in line-by-line output: any lines.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# `[...]`, `[...256 floats...]`: a value the doc leaves out.
ELIDED = re.compile(r"\[\s*\.\.\.[^\[\]]*\]")
ANY = "<elided>"
_MORE = "<more>"
_APPROX = "<approx>"
_PREFIX = "<prefix>"
_NUMBER_PREFIX = re.compile(r"(-?\d+\.\d+)\.\.\.")
_STRING_PREFIX = re.compile(r'"((?:[^"\\]|\\.)*?)\.\.\."')
_LIST_TAIL = re.compile(r",\s*\.\.\.\s*\]")
_OBJECT_REST = re.compile(r",\s*\.\.\.\s*(?=[,}])")


class DocError(Exception):
    """A documented example that does not run, or whose output differs from the doc."""


@dataclass(frozen=True)
class DocCommand:
    where: str  # "README.md:135"
    text: str  # the shell text, continuation lines joined as the shell joins them
    output: list[str]  # the comment lines right below it: what the doc says it prints


@dataclass(frozen=True)
class CodeBlock:
    where: str  # "README.md:135" (the first line inside the fence)
    language: str
    lines: list[str]


def doc_files() -> list[Path]:
    """Every Markdown file of the repository (hidden folders left out)."""
    return sorted(
        path
        for path in ROOT.rglob("*.md")
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    )


def code_blocks(path: Path) -> list[CodeBlock]:
    """The fenced code blocks of one Markdown file, with their language."""
    blocks: list[CodeBlock] = []
    current: list[str] | None = None
    language, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = line.strip()
        if current is None and fence.startswith("```"):
            current, language, start = [], fence[3:].strip(), number + 1
        elif current is not None and fence.startswith("```"):
            where = f"{path.relative_to(ROOT)}:{start}"
            blocks.append(CodeBlock(where, language, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def shell_commands(block: CodeBlock) -> list[DocCommand]:
    """The commands of a shell block (continuation lines joined) with the comment lines below
    each, which show its output."""
    file, _, first = block.where.rpartition(":")
    commands: list[DocCommand] = []
    lines = block.lines
    i = 0
    while i < len(lines):
        stripped = lines[i].strip().removeprefix("$ ")
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start = i
        raw = [stripped]
        # NOTE: a command goes on past a line ending in a backslash or inside an open quote.
        while (raw[-1].endswith("\\") or not _closed("\n".join(raw))) and i + 1 < len(lines):
            i += 1
            raw.append(lines[i])
        output: list[str] = []
        while i + 1 < len(lines) and lines[i + 1].strip().startswith("#"):
            i += 1
            output.append(lines[i].strip().removeprefix("#").strip())
        where = f"{file}:{int(first) + start}"
        commands.append(DocCommand(where, "\n".join(raw).replace("\\\n", ""), output))
        i += 1
    return commands


def _closed(text: str) -> bool:
    """Whether every quote in a shell text is closed."""
    try:
        shlex.split(text.replace("\\\n", ""))
    except ValueError:
        return False
    return True


# --- the documented output ----------------------------------------------------------------------


def _marked(text: str) -> str:
    """Documented JSON with its elisions turned into marker values JSON can carry."""
    while (elided := ELIDED.sub(json.dumps(ANY), text)) != text:
        text = elided
    text = _LIST_TAIL.sub(f', "{_MORE}"]', text)
    text = _OBJECT_REST.sub("", text)
    text = _NUMBER_PREFIX.sub(lambda m: json.dumps(f"{_APPROX}{m.group(1)}"), text)
    return _STRING_PREFIX.sub(lambda m: json.dumps(f"{_PREFIX}{m.group(1)}"), text)


def documented_json(output: list[str]) -> list[Any]:
    """The JSON values the doc shows as the output (one per message), elisions as markers."""
    text = _marked(" ".join(output))
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
    while text[position:].strip():
        position = len(text) - len(text[position:].lstrip())
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DocError(f"documented output is not JSON ([...] elides): {exc}") from None
        values.append(value)
    return values


def matches(documented: Any, printed: Any) -> bool:
    """Whether a printed value fits the documented one (see the module's docstring)."""
    if documented == ANY:
        return True
    if isinstance(documented, str) and documented.startswith(_APPROX):
        shown = documented.removeprefix(_APPROX)
        decimals = len(shown.partition(".")[2])
        return (
            isinstance(printed, int | float)
            and not isinstance(printed, bool)
            and abs(printed - float(shown)) < 10.0**-decimals
        )
    if isinstance(documented, str) and documented.startswith(_PREFIX):
        return isinstance(printed, str) and printed.startswith(documented.removeprefix(_PREFIX))
    if isinstance(documented, dict):
        return isinstance(printed, dict) and all(
            key in printed and matches(value, printed[key]) for key, value in documented.items()
        )
    if isinstance(documented, list):
        more = bool(documented) and documented[-1] == _MORE
        shown = documented[:-1] if more else documented
        return (
            isinstance(printed, list)
            and (len(printed) >= len(shown) if more else len(printed) == len(shown))
            and all(matches(d, p) for d, p in zip(shown, printed, strict=False))
        )
    return bool(documented == printed)


def brief(value: Any) -> Any:
    """`value` with long lists cut to their first items, for a readable failure message."""
    if isinstance(value, dict):
        return {key: brief(item) for key, item in value.items()}
    if isinstance(value, list):
        return [brief(item) for item in value[:3]] + (["..."] if len(value) > 3 else [])
    return value


def printed_json(text: str) -> list[Any] | None:
    """The JSON values printed one after another in `text`, or None if it is not JSON."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
    try:
        while text[position:].strip():
            position = len(text) - len(text[position:].lstrip())
            value, position = decoder.raw_decode(text, position)
            values.append(value)
    except json.JSONDecodeError:
        return None
    return values


def check_json_output(documented: list[Any], printed: list[Any]) -> None:
    """Each documented value is printed, in order (a stream's doc may show only some)."""
    remaining = iter(printed)
    for value in documented:
        if not any(matches(value, message) for message in remaining):
            raise DocError(
                f"the doc says it prints {json.dumps(value, ensure_ascii=False)}, it printed "
                f"{json.dumps(brief(printed), ensure_ascii=False)}"
            )


def _line_matches(documented: str, printed: str) -> bool:
    """A documented output line against a printed one: `prefix {json}` compares the JSON part
    (with elisions), anything else as text with `...` standing for any characters."""
    brace = min((documented.find(c) for c in "{[" if c in documented), default=-1)
    if brace >= 0:
        prefix, document = documented[:brace], documented[brace:]
        if not printed.startswith(prefix):
            return False
        try:
            (wanted,) = documented_json([document])
            got = json.loads(printed[len(prefix) :])
        except (DocError, ValueError):
            pass
        else:
            return matches(wanted, got)
    pattern = ".*".join(re.escape(part) for part in documented.split("..."))
    return re.fullmatch(pattern, printed.strip()) is not None


def check_line_output(documented: list[str], printed: str) -> None:
    """Each documented line is printed, in order, other lines between them allowed; a line that
    starts with `...` or `…` only says that more lines come."""
    lines = iter(line for line in printed.splitlines() if line.strip())
    for line in documented:
        if line.startswith(("...", "…")):
            continue
        if not any(_line_matches(line, got) for got in lines):
            raise DocError(f"the doc says it prints {line!r}; it printed:\n{printed[:2000]}")


def check_output(documented: list[str], printed: str) -> None:
    """`printed` against the output lines a doc shows: JSON when the doc shows JSON, else
    line by line."""
    if not documented:
        return
    try:
        values = documented_json(documented)
    except DocError:
        check_line_output(documented, printed)
        return
    got = printed_json(printed)
    if got is None:
        raise DocError(f"the doc shows JSON, it printed: {printed[:2000]!r}")
    check_json_output(values, got)
