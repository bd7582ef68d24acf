"""Every curl command and every Python snippet in README.md runs as written against the demo
models, and answers what the README shows.

The examples are read out of README.md's fenced code blocks and run against `rnnserve serve` on
the bundled `demo-repository/` (free ports; the README's `localhost:8000` / `127.0.0.1:8001` are
rewritten to them, and any other address is an error). Each shell block's curl commands run in
order in one real bash with real curl (so a variable set by one command reaches the next), and
each command's output must match the comment lines under it (tests/doc_examples.py: `[...]`
elides, JSON is compared as JSON); a command the README shows no output for must answer a 2xx
status. Each Python block runs alone in a fresh interpreter, as a reader pastes it into a file;
the comment on a `print(...)` line is what that line prints. The grpcurl commands are replayed
by tests/system/test_readme_grpc.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.core.settings import Settings
from tests.doc_examples import (
    ROOT,
    CodeBlock,
    DocCommand,
    DocError,
    check_line_output,
    check_output,
    code_blocks,
    shell_commands,
)
from tests.support import ServerProcess

pytestmark = pytest.mark.timeout(300)

README = ROOT / "README.md"
HTTP_PORT: int = Settings.model_fields["http_port"].default
GRPC_PORT: int = Settings.model_fields["grpc_port"].default
ADDRESS = re.compile(r"\b(localhost|127\.0\.0\.1):(\d+)")
CURL = re.compile(r"(^|[\s($|])curl\s")
SHELLS = {"sh", "bash", "shell", "console"}
# Between commands, on stdout and stderr: where one command's output ends.
MARK = "@@rnnserve-readme-replay@@"
STATUS = re.compile(r"@@status (\d{3})@@")
PRINTS = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<output>.+?)\s*$")


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int


@pytest.fixture(scope="module")
def ports(demo_server: ServerProcess) -> Ports:
    return Ports(demo_server.http_port, demo_server.grpc_port)


def rewrite_addresses(text: str, ports: Ports) -> str:
    """The README's addresses (what `make serve` binds) pointed at the test's server."""

    def replace(match: re.Match[str]) -> str:
        port = int(match.group(2))
        if port == HTTP_PORT:
            return f"127.0.0.1:{ports.http}"
        if port == GRPC_PORT:
            return f"127.0.0.1:{ports.grpc}"
        raise DocError(
            f"address {match.group(0)}: `make serve` serves HTTP on {HTTP_PORT}, "
            f"gRPC on {GRPC_PORT}"
        )

    return ADDRESS.sub(replace, text)


# --- curl ---------------------------------------------------------------------------------------


def curl_blocks() -> list[tuple[CodeBlock, list[DocCommand]]]:
    """README.md's shell blocks that hold curl commands, with those commands."""
    found = []
    for block in code_blocks(README):
        if block.language not in SHELLS:
            continue
        commands = [c for c in shell_commands(block) if CURL.search(c.text)]
        if commands:
            found.append((block, commands))
    return found


def replay_curl(commands: list[DocCommand], ports: Ports) -> None:
    """Run `commands` in one bash, in order, each command's output and statuses checked."""
    script = [
        "set -eo pipefail",
        # Every response's status, written to stderr after its body, tells 2xx from refusals.
        "curl() { command curl --write-out '%{stderr}@@status %{http_code}@@\\n' \"$@\"; }",
    ]
    for command in commands:
        script += [
            f"printf '\\n{MARK}\\n'; printf '\\n{MARK}\\n' >&2",
            rewrite_addresses(command.text, ports),
        ]
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    outputs = done.stdout.split(f"\n{MARK}\n")[1:]
    statuses = [STATUS.findall(part) for part in done.stderr.split(f"\n{MARK}\n")[1:]]
    for k, command in enumerate(commands):
        if k >= len(outputs):
            raise DocError(f"{command.where}: the shell stopped before it: {done.stderr[-1500:]}")
        if k == len(outputs) - 1 and done.returncode != 0:
            raise DocError(f"{command.where}: exit status {done.returncode}: {done.stderr[-1500:]}")
        if not statuses[k]:
            raise DocError(f"{command.where}: no HTTP answer: {done.stderr[-1500:]}")
        try:
            check_output(command.output, outputs[k])
        except DocError as exc:
            raise DocError(f"{command.where}: {exc}") from None
        if not command.output and any(not s.startswith("2") for s in statuses[k]):
            raise DocError(
                f"{command.where}: answered HTTP {statuses[k]}, and the README shows no output: "
                f"{outputs[k][:500]}"
            )


CURL_BLOCKS = curl_blocks()


def test_the_readme_shows_curl_for_every_demo_model() -> None:
    text = " ".join(c.text for _, commands in CURL_BLOCKS for c in commands)
    for path in ("surnames/encode", "elnino/encode", "dates/generate", "elnino/stream", "/v2/"):
        assert path in text, path


@pytest.mark.parametrize(
    "block", [b for b, _ in CURL_BLOCKS], ids=[b.where for b, _ in CURL_BLOCKS]
)
def test_readme_curl_commands_work(block: CodeBlock, ports: Ports) -> None:
    commands = next(commands for b, commands in CURL_BLOCKS if b == block)
    try:
        replay_curl(commands, ports)
        return
    except DocError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)


# --- Python -------------------------------------------------------------------------------------


def python_blocks() -> list[CodeBlock]:
    return [block for block in code_blocks(README) if block.language == "python"]


def replay_python(block: CodeBlock, ports: Ports, workdir: Path) -> None:
    """Run the snippet alone in a fresh interpreter; check what its commented prints print."""
    source = rewrite_addresses("\n".join(block.lines), ports)
    expected = [m.group("output") for line in block.lines if (m := PRINTS.match(line))]
    done = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(workdir)},
    )
    if done.returncode != 0:
        raise DocError(f"exit status {done.returncode}: {done.stderr[-2000:]}")
    try:
        check_line_output(expected, done.stdout)
    except DocError as exc:
        raise DocError(f"{exc}\n(stderr: {done.stderr[-500:]})") from None


PYTHON_BLOCKS = python_blocks()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_readme_python_snippets_work(block: CodeBlock, ports: Ports, tmp_path: Path) -> None:
    try:
        replay_python(block, ports, tmp_path)
        return
    except DocError as exc:
        problem = str(exc)
    pytest.fail(f"README.md:{block.where.rpartition(':')[2]}: {problem}", pytrace=False)


# --- the replay itself can fail -----------------------------------------------------------------


def _command(text: str, *output: str) -> DocCommand:
    return DocCommand("example", text, list(output))


ENCODE = """curl -s localhost:8000/v1/models/surnames/encode -d '{"texts": ["Rossi"]}'"""


@pytest.mark.parametrize(
    ("commands", "error"),
    [
        ([_command(ENCODE, '{"model":"surnames","labels":["Italian"]}')], None),
        ([_command(ENCODE, '{"model":"surnames","labels":["French"]}')], "the doc says"),
        ([_command(ENCODE, '{"model":"surnames","version":1,"labels":[...]}')], None),
        ([_command(ENCODE, '{"model":"surnames","version":2}')], "the doc says"),
        ([_command(ENCODE.replace("surnames", "tagger"))], "HTTP ['404']"),
        ([_command(ENCODE.replace("8000", "8080"))], "8080"),
        ([_command(ENCODE, "event: token")], "the doc says"),
        (
            [
                _command(
                    "curl -s localhost:8000/v1/models/elnino/stream -d '{\"inputs\": [[1.0]]}'",
                    '{"steps":1,"scores":[24.45...]}',
                )
            ],
            "the doc says",
        ),
        (
            [
                _command("t=$(curl -s localhost:8000/nope)"),
                _command('test -n "$t" && curl -s localhost:8000/readyz'),
            ],
            "HTTP ['404']",
        ),
        ([_command("curl -s localhost:1/readyz")], "8000"),
    ],
)
def test_replay_catches_wrong_examples(
    commands: list[DocCommand], error: str | None, ports: Ports
) -> None:
    if error is None:
        replay_curl(commands, ports)
        return
    with pytest.raises(DocError, match=re.escape(error)):
        replay_curl(commands, ports)


def test_python_replay_catches_wrong_prints(ports: Ports, tmp_path: Path) -> None:
    good = CodeBlock("README.md:1", "python", ["print(21.5234)  # 21.52..."])
    replay_python(good, ports, tmp_path)
    with pytest.raises(DocError, match="the doc says"):
        replay_python(CodeBlock("README.md:1", "python", ["print(3)  # 4"]), ports, tmp_path)
    with pytest.raises(DocError, match="exit status 1"):
        replay_python(CodeBlock("README.md:1", "python", ["api.Encode()"]), ports, tmp_path)
