"""The `rnnserve` command line as a new user meets it: `--version`, and `--help` that shows
every option's default."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from service.core.release import server_version
from service.process.cli import build_parser
from tests.support import DEMO_REPOSITORY

DEMO = DEMO_REPOSITORY


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_version_prints_the_installed_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.process.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rnnserve {server_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", server_version())


@pytest.mark.parametrize("command", ["serve", "train", "import-torch"])
def test_help_shows_every_default(command: str) -> None:
    parser = _subcommands()[command]
    for action in parser._actions:
        if not action.option_strings or action.required or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "default" in action.help.lower(), (command, action.option_strings)


def test_serve_help_shows_values_and_variables() -> None:
    text = " ".join(_subcommands()["serve"].format_help().split())
    for expected in (
        "[default: 8000; env RNNSERVE_HTTP_PORT]",
        "[default: 8001; env RNNSERVE_GRPC_PORT]",
        "[default: 1024; env RNNSERVE_MAX_SEQUENCES_PER_REQUEST]",
        "[default: 67108864 (64 MiB); env RNNSERVE_MAX_BODY_BYTES]",
        "[default: on; env RNNSERVE_STRICT_READINESS]",
        "[default: unset; env RNNSERVE_MANAGEMENT_TOKEN]",
    ):
        assert expected in text, expected


def test_version_policies_example_names_a_demo_model() -> None:
    (action,) = (
        a for a in _subcommands()["serve"]._actions if "--version-policies" in a.option_strings
    )
    assert action.help is not None
    example = re.search(r"(\{.*?\})", action.help)
    assert example is not None, action.help
    demo_models = {p.name for p in DEMO.iterdir() if p.is_dir()}
    assert set(json.loads(example.group(1))) <= demo_models, action.help
