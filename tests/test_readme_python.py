"""Every Python example in the README runs against the real server and prints what it shows.

Each ```python block that addresses the server (`127.0.0.1:8000` / `:8001`, as `make serve`
serves) runs in a process of its own against `rnnserve serve` on the bundled demo repository
(its ports put in place of the documented ones), so the rnnserve_client and tritonclient
examples run as a user would run them. A `print(...)  # output` line promises that output:
each promised output must appear in what the example printed, in order; `...` elides a part,
and a note in parentheses after the output is no part of it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_server import ServerProcess, running_server

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo-repository"
DOCUMENTED = {"127.0.0.1:8000", "127.0.0.1:8001"}
_PRINTED = re.compile(r"^\s*print\(.*\)\s*#\s?(?P<output>.*)$")
_NOTE = re.compile(r"\s*\([^()]*\)$")


@dataclass(frozen=True)
class Example:
    where: str  # "README.md:180"
    code: str


def examples(path: Path) -> list[Example]:
    """The ```python blocks of a Markdown file that talk to the documented server."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Example] = []
    start: int | None = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            code = "\n".join(lines[start : number - 1]) + "\n"
            if any(address in code for address in DOCUMENTED):
                found.append(Example(f"{path.relative_to(ROOT)}:{start}", code))
            start = None
    return found


README_EXAMPLES = examples(ROOT / "README.md")


def promised(code: str) -> list[str]:
    """The outputs the example's print lines promise, in order."""
    outputs = []
    for line in code.splitlines():
        if match := _PRINTED.match(line):
            outputs.append(_NOTE.sub("", match["output"]).strip())
    return outputs


def appears_in_order(outputs: list[str], printed: str) -> str | None:
    """The first promised output that is not in `printed` after the ones before it."""
    position = 0
    for output in outputs:
        pattern = ".*?".join(re.escape(part) for part in output.split("..."))
        match = re.compile(pattern, re.DOTALL).search(printed, position)
        if match is None:
            return output
        position = match.end()
    return None


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(DEMO) as served:
        yield served


def test_the_readme_shows_the_client_on_both_wires() -> None:
    code = "".join(example.code for example in README_EXAMPLES)
    assert "from rnnserve_client import Client" in code
    assert 'Client("grpc://127.0.0.1:8001")' in code and 'Client("http://127.0.0.1:8000")' in code
    assert "import tritonclient.grpc" in code
    assert "service._proto" not in code, "the stubs live in the client package now"


@pytest.mark.parametrize("example", README_EXAMPLES, ids=[e.where for e in README_EXAMPLES])
def test_readme_example_runs_and_prints_what_it_shows(
    example: Example, server: ServerProcess
) -> None:
    code = example.code.replace("127.0.0.1:8000", f"127.0.0.1:{server.http_port}")
    code = code.replace("127.0.0.1:8001", f"127.0.0.1:{server.grpc_port}")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, f"{example.where} failed:\n{done.stderr[-3000:]}"
    outputs = promised(example.code)
    assert outputs, f"{example.where}: no print line says what it prints"
    missing = appears_in_order(outputs, done.stdout)
    assert missing is None, f"{example.where}: promised {missing!r}, printed:\n{done.stdout}"


@pytest.mark.parametrize(
    ("outputs", "printed", "missing"),
    [
        (["21.52..."], "21.5248\n", None),
        (["3 [...]"], "3 [25.25]\n", None),
        (["['Finnish'] (1, 256)"], "['Finnish'] (1, 256)\n", None),
        (["2023-10-02", "-> 2023-10-02"], "2023-10-02 -> 2023-10-02\n", None),
        (["21.52..."], "22.07\n", "21.52..."),
        (["b", "a"], "a b\n", "a"),
    ],
)
def test_outputs_are_checked(outputs: list[str], printed: str, missing: str | None) -> None:
    assert appears_in_order(outputs, printed) == missing
