"""`rnnserve serve`'s flags: one per `Settings` field (`--http-port` for `http_port`), each also
its `RNNSERVE_*` environment variable; `--help` shows each one's default (or the rule that makes
it) and its variable."""

from __future__ import annotations

import argparse
import json
from typing import Any, get_args, get_origin

from pydantic.fields import FieldInfo

from service.core.settings import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and args and all(isinstance(a, str) for a in args):
        return [str(a) for a in args]
    return None


def _default_text(field: FieldInfo) -> str:
    """A setting's default as `--help` shows it."""
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value} ({value // (1024 * 1024)} MiB)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; a flag given overrides its RNNSERVE_* variable."""
    for name, field in Settings.model_fields.items():
        env = f"RNNSERVE_{name.upper()}"
        description = field.description or ""
        # NOTE: a field whose default is computed says so in its description ("default: ...").
        shown = "" if "default:" in description.lower() else f"default: {_default_text(field)}; "
        help_text = f"{description} [{shown}env {env}]"
        # NOTE: SUPPRESS keeps unset flags out of the namespace, so the environment applies.
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        elif get_origin(annotation) is dict:
            parser.add_argument(_flag(name), type=json.loads, metavar="JSON", **common)
        else:
            choices = _choices(annotation)
            parser.add_argument(
                _flag(name), choices=choices, metavar=None if choices else name.upper(), **common
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given on the command line."""
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**given)
