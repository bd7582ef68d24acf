"""The server's name and installed version (the CLI's `--version`, the OpenAPI document, V2
server metadata)."""

from __future__ import annotations

import functools
from importlib import metadata

SERVER_NAME = "rnnserve"


@functools.cache
def server_version() -> str:
    """The installed rnnserve package's version ("0.0.0" when run from an uninstalled tree)."""
    try:
        return metadata.version("rnnserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"
