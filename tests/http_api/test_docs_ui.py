"""`/docs` (Swagger UI) and `/redoc` show the whole API offline, each operation once.

The served Swagger UI must read the OpenAPI version the server writes (Swagger UI 4 shows only
"Unable to render this definition" for FastAPI's OpenAPI 3.1), and a real headless Chromium
renders both pages from the server alone. The browser test is skipped, saying why, where no
Chromium is installed (`.ci/run` installs Debian's).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, LiveServer, live_server

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Swagger UI's bundle states its own version in its build info.
SWAGGER_VERSION = re.compile(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"')
# Swagger UI 5.0 is the first release that reads OpenAPI 3.1.
OPENAPI_31_NEEDS = (5, 0)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(ROOT / "demo-repository") as live:
        yield live


@pytest.fixture(scope="module")
def spec(server: LiveServer) -> dict[str, object]:
    document: dict[str, object] = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    return document


def operations(spec: dict[str, object]) -> list[tuple[str, str, dict[str, object]]]:
    """(METHOD, path, operation) of every operation in an OpenAPI document."""
    paths = spec["paths"]
    assert isinstance(paths, dict)
    return [
        (method.upper(), path, operation)
        for path, item in paths.items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def test_the_served_swagger_ui_reads_the_served_openapi_version(
    server: LiveServer, spec: dict[str, object]
) -> None:
    html = httpx.get(f"{server.url}/docs", timeout=30).text
    script = re.search(r'<script src="([^"]*swagger-ui-bundle\.js)"', html)
    assert script is not None, html
    bundle = httpx.get(f"{server.url}{script.group(1)}", timeout=30)
    assert bundle.status_code == 200
    found = SWAGGER_VERSION.search(bundle.text)
    assert found is not None, "the served Swagger UI bundle states no version"
    ui = (int(found.group(1)), int(found.group(2)))
    openapi = str(spec["openapi"])
    if openapi.startswith("3.1"):
        assert ui >= OPENAPI_31_NEEDS, f"Swagger UI {ui} cannot read OpenAPI {openapi}"


def test_docs_pages_load_nothing_from_the_network(server: LiveServer) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{server.url}{page}", timeout=30).text
        assert "http://" not in html and "https://" not in html, page
        for asset in re.findall(r'(?:src|href)="(/[^"]+)"', html):
            assert httpx.get(f"{server.url}{asset}", timeout=30).status_code == 200, asset


def test_each_operation_is_listed_once(spec: dict[str, object]) -> None:
    found = operations(spec)
    assert len(found) >= 30
    for method, path, operation in found:
        # Swagger UI and ReDoc list an operation once under each of its tags.
        assert len(operation.get("tags", [])) == 1, (method, path, operation.get("tags"))  # type: ignore[arg-type]
    ids = Counter(operation["operationId"] for _, _, operation in found)
    assert max(ids.values()) == 1, ids.most_common(3)


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def rendered(url: str, profile: Path) -> str:
    """The DOM of `url` after a headless Chromium ran its scripts (a fresh profile, no
    background traffic, virtual time so that rendering finishes before the dump)."""
    browser = _browser()
    assert browser is not None
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


browser_needed = pytest.mark.skipif(
    _browser() is None, reason="no Chromium installed (apt-get install chromium)"
)


@browser_needed
def test_swagger_ui_renders_every_operation_in_a_browser(
    server: LiveServer, spec: dict[str, object], tmp_path: Path
) -> None:
    dom = rendered(f"{server.url}/docs", tmp_path / "profile")
    assert "Unable to render this definition" not in dom
    shown = Counter(
        re.findall(
            r'<span class="opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"',
            dom,
            flags=re.S,
        )
    )
    expected = Counter((method, path) for method, path, _ in operations(spec))
    assert shown == expected, (expected - shown, shown - expected)


@browser_needed
def test_redoc_renders_every_operation_in_a_browser(
    server: LiveServer, spec: dict[str, object], tmp_path: Path
) -> None:
    dom = rendered(f"{server.url}/redoc", tmp_path / "profile")
    shown = set(re.findall(r'id="operation/([^"]+)"', dom))
    expected = {str(operation["operationId"]) for _, _, operation in operations(spec)}
    assert shown == expected, (expected - shown, shown - expected)


def _example_model_names(value: object) -> set[str]:
    """The model names the examples of an OpenAPI document mention."""
    if isinstance(value, dict):
        names = {
            str(v) for k, v in value.items() if k in ("model", "model_name") and isinstance(v, str)
        }
        for item in value.values():
            names |= _example_model_names(item)
        return names
    if isinstance(value, list):
        return set().union(*(_example_model_names(item) for item in value))
    return set()


def test_examples_name_the_demo_models(spec: dict[str, object]) -> None:
    # "Try it out" against `make serve` should meet models that exist there.
    schemas = spec["components"]["schemas"]  # type: ignore[index]
    examples = [schema.get("examples", []) for schema in schemas.values()]
    demo = {p.name for p in (ROOT / "demo-repository").iterdir() if p.is_dir()}
    status = schemas["ModelStatus"]["examples"] + schemas["V2ModelMetadata"]["examples"]
    named = _example_model_names(examples) | {example["name"] for example in status}
    assert named and named <= demo, named - demo
