"""`Metrics`: every Prometheus metric of the server, on an injected `CollectorRegistry`.

Names are public (dashboards, alerts and autoscalers depend on them; DESIGN §3). Nothing here
touches prometheus-client's global registry: the caller passes the registry it will expose.

Request outcomes (`rnnserve_requests_total{outcome}`): "success", and one per error class —
"not_found", "invalid_input", "not_ready", "overloaded", "deadline_exceeded", "draining",
"unauthenticated", "permission_denied", "conflict", "compute_error", "cancelled" (client gone),
"error" (anything else). `outcome_of(exc)` gives the value for an exception.
"""

from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.core import errors

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TIMESTEP_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
EFFICIENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

MODEL_STATES = ("LOADING", "READY", "FAILED", "UNLOADING")
# The labels of request metrics and of a model version's metrics.
REQUEST = ("model", "version", "protocol", "endpoint")
MODEL = ("model", "version")

_OUTCOMES: dict[type[errors.ServiceError], str] = {
    errors.NotFound: "not_found",
    errors.InvalidInput: "invalid_input",
    errors.NotReady: "not_ready",
    errors.Overloaded: "overloaded",
    errors.DeadlineExceeded: "deadline_exceeded",
    errors.Draining: "draining",
    errors.Unauthenticated: "unauthenticated",
    errors.PermissionDenied: "permission_denied",
    errors.Conflict: "conflict",
    errors.ComputeError: "compute_error",
}
OUTCOMES = ("success", *_OUTCOMES.values(), "cancelled", "error")


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label for a request that ended with `exc` (None = success)."""
    if exc is None:
        return "success"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # NOTE: GeneratorExit: a streaming answer closed at a yield because its client left.
        return "cancelled"
    for cls in type(exc).__mro__:
        if cls in _OUTCOMES:
            return _OUTCOMES[cls]
    return "error"


class _WithoutCreated(Collector):
    """A registry's collection less the `_created` samples of counters and histograms: one
    timestamp series per child that nobody graphs (prometheus-client's own switch,
    `disable_created_metrics`, is process-wide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            created = family.name + "_created"
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if s.name != created]
            yield kept


# -- cheap metrics for the per-request and per-batch paths --------------------------------------
#
# NOTE: prometheus-client's `inc`/`observe` cost 0.5–1.5 µs each (a check, a lock per value, a
# Python loop over the buckets, exemplars) and the request path records several per request.
# These keep plain numbers under one lock per metric and build the same families (names, labels,
# buckets, values) only when collected (`python -m bench.overhead`, "metrics" in its profile).


class _Family(Collector):
    """A labelled metric whose children are plain numbers, exposed like prometheus-client's own."""

    kind = ""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labels
        # NOTE: the attributes prometheus-client's own metrics carry (tests/system/test_deploy.py
        # reads every metric's names and labels through them).
        self._name = name
        self._labelnames = labels
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        """The child of one label set (created at zero on first use, kept for good)."""
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
        found = self._children.get(key)
        if found is None:
            with self._lock:
                found = self._children.setdefault(key, self._child())
        return found

    def _child(self) -> Any:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield Metric(self.name, self.documentation, self.kind)

    def _items(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._children.items())


class _CounterChild:
    __slots__ = ("_lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (≥ 0)."""
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self.value += amount


class _GaugeChild(_CounterChild):
    __slots__ = ()

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount`."""
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract `amount`."""
        self.inc(-amount)


class LoopCounter(_Family):
    """A counter (`labels(...).inc(n)`), exposed as prometheus-client's Counter is."""

    kind = "counter"
    exposed: type[CounterMetricFamily | GaugeMetricFamily] = CounterMetricFamily

    def _child(self) -> _CounterChild:
        return _CounterChild(self._lock)

    def collect(self) -> Iterator[Metric]:
        family = self.exposed(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._items():
            family.add_metric(key, child.value)
        yield family


class LoopGauge(LoopCounter):
    """A gauge (`labels(...).set/inc/dec`), exposed as prometheus-client's Gauge is."""

    kind = "gauge"
    exposed = GaugeMetricFamily

    def _child(self) -> _GaugeChild:
        return _GaugeChild(self._lock)


class _HistogramChild:
    __slots__ = ("_bounds", "_lock", "counts", "sum")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one value."""
        index = bisect_left(self._bounds, value)
        with self._lock:
            self.counts[index] += 1
            self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        """Record several values at once (one lock for all of them)."""
        bounds, counts = self._bounds, self.counts
        with self._lock:
            for value in values:
                counts[bisect_left(bounds, value)] += 1
                self.sum += value


class LoopHistogram(_Family):
    """A histogram (`labels(...).observe(v)`, `observe_many`), exposed as prometheus-client's
    Histogram is (cumulative `le` buckets, `_count`, `_sum`)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        registry: CollectorRegistry,
        buckets: tuple[float, ...],
    ) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        super().__init__(name, documentation, labels, registry)

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self._lock, self._bounds)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._items():
            with self._lock:
                counts, total = list(child.counts), child.sum
            cumulative = [
                (le, float(c)) for le, c in zip(self._les, accumulate(counts), strict=True)
            ]
            family.add_metric(key, cumulative, total)
        yield family


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """The children one scheduler's queue records with, looked up once: `labels()` costs
    microseconds and these are recorded per request."""

    depth: Any  # rnnserve_queue_depth{kind}
    waited: Any  # rnnserve_queue_duration_seconds
    dropped_deadline: Any  # rnnserve_dropped_sequences_total{reason="deadline"}
    dropped_cancelled: Any  # rnnserve_dropped_sequences_total{reason="cancelled"}


@dataclass(frozen=True, slots=True)
class CallMetrics:
    """The children of one kind of model call (encode or decode) of a version, looked up once."""

    seconds: Any  # rnnserve_compute_duration_seconds
    rows: Any  # rnnserve_batch_size
    count: Any  # rnnserve_model_calls_total

    def observe(self, seconds: float, rows: int) -> None:
        """Record one model call of `rows` rows that computed for `seconds`."""
        self.seconds.observe(seconds)
        self.rows.observe(rows)
        self.count.inc()

    def observe_many(self, calls: list[tuple[int, float]]) -> None:
        """Record several model calls at once: (rows, seconds) each."""
        self.seconds.observe_many([seconds for _, seconds in calls])
        self.rows.observe_many([rows for rows, _ in calls])
        self.count.inc(len(calls))


class Metrics:
    """All rnnserve metrics, registered on `registry` (never the global default)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[object, ...], Any] = {}
        # (model, version, protocol, endpoint, outcome) → the two children a request records in
        self._request_children: dict[tuple[object, ...], tuple[Any, Any]] = {}
        self._request_metrics()
        self._scheduler_metrics()
        self._version_metrics()
        self._session_metrics()

    def _request_metrics(self) -> None:
        """Recorded by the front-ends (through service/core/request_metrics.py) and the engine."""
        self.requests_total = self._loop_counter(
            "rnnserve_requests",
            "Requests answered, by model, version, protocol, endpoint and outcome.",
            (*REQUEST, "outcome"),
        )
        self.request_duration = self._loop_histogram(
            "rnnserve_request_duration_seconds",
            "Time from request received to response ready.",
            REQUEST,
            LATENCY_BUCKETS,
        )
        self.inflight_requests = self._loop_gauge(
            "rnnserve_inflight_requests",
            "Requests admitted by the engine and not yet answered.",
            ("model",),
        )

    def _scheduler_metrics(self) -> None:
        """Recorded by the encode batchers and decode schedulers."""
        self.queue_duration = self._loop_histogram(
            "rnnserve_queue_duration_seconds",
            "Time a sequence waited in the batcher queue before its batch started.",
            MODEL,
            LATENCY_BUCKETS,
        )
        self.queue_depth = self._loop_gauge(
            "rnnserve_queue_depth",
            "Sequences waiting in a model version's queue (encode batcher and decode admission).",
            (*MODEL, "kind"),
        )
        self.dropped_total = self._loop_counter(
            "rnnserve_dropped_sequences",
            "Queued sequences dropped before compute, by reason (deadline, cancelled, draining).",
            (*MODEL, "reason"),
        )
        self.compute_duration = self._loop_histogram(
            "rnnserve_compute_duration_seconds",
            "Time of one model call on the device (an encode batch, or one decode step).",
            (*MODEL, "kind"),
            LATENCY_BUCKETS,
        )
        self.batch_size = self._loop_histogram(
            "rnnserve_batch_size",
            "Sequences (rows) per model call.",
            (*MODEL, "kind"),
            BATCH_SIZE_BUCKETS,
        )
        self.model_calls_total = self._loop_counter(
            "rnnserve_model_calls",
            "Model calls run by the executor (encode batches, decode encodes, decode steps).",
            (*MODEL, "kind"),
        )
        self.batch_timesteps = self._loop_histogram(
            "rnnserve_batch_timesteps",
            "Real (unpadded) time steps per encode model call.",
            MODEL,
            TIMESTEP_BUCKETS,
        )
        self.padding_efficiency = self._loop_histogram(
            "rnnserve_padding_efficiency",
            "Real time steps divided by computed (padded) time steps, per encode model call.",
            MODEL,
            EFFICIENCY_BUCKETS,
        )
        self.decode_slots_in_use = self._loop_gauge(
            "rnnserve_decode_slots_in_use",
            "Rows (greedy requests and beams) in a model version's running decode batch.",
            MODEL,
        )

    def _version_metrics(self) -> None:
        """Recorded by the registry as versions load, fail, restart and unload."""
        self.model_state = self._gauge(
            "rnnserve_model_state",
            "1 for the current state of each model version, 0 for the others.",
            (*MODEL, "state"),
        )
        self.model_restarts_total = self._counter(
            "rnnserve_model_restarts",
            "Restarts of a READY version whose batcher or decode scheduler stopped on its own.",
            MODEL,
        )
        self.model_load_duration = self._histogram(
            "rnnserve_model_load_duration_seconds",
            "Time to load a model version (read, check, place on device, warm up).",
            MODEL,
            LOAD_BUCKETS,
        )

    def _session_metrics(self) -> None:
        """Recorded by the streaming sessions (service/core/sessions.py)."""
        self.sessions_active = self._gauge(
            "rnnserve_sessions_active", "Open streaming sessions.", ("model",)
        )
        self.sessions_expired_total = self._counter(
            "rnnserve_sessions_expired",
            "Server-held streaming sessions closed by the idle timeout.",
            ("model",),
        )
        self.sessions_refused_total = self._counter(
            "rnnserve_sessions_refused",
            "Streaming sessions refused, by reason (limit, not_streamable).",
            ("model", "reason"),
        )
        self.session_chunks_total = self._counter(
            "rnnserve_session_chunks",
            "Streamed chunks answered, by mode (session: server-held; token: portable state).",
            ("model", "mode"),
        )

    def _loop_counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> LoopCounter:
        return LoopCounter(name, documentation, labels, self.registry)

    def _loop_gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> LoopGauge:
        return LoopGauge(name, documentation, labels, self.registry)

    def _loop_histogram(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> LoopHistogram:
        return LoopHistogram(name, documentation, labels, self.registry, buckets)

    def _counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def _gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry)

    def _histogram(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def exposition(self) -> bytes:
        """The Prometheus text of every metric (what `/metrics` serves), without `_created`."""
        return generate_latest(_WithoutCreated(self.registry))

    def observe_request(
        self,
        model: str,
        version: int | str | None,
        protocol: str,
        endpoint: str,
        outcome: str,
        seconds: float,
    ) -> None:
        """Count one answered request and its latency (service/core/request_metrics.py calls
        this once per request)."""
        key = (model, version, protocol, endpoint, outcome)
        found = self._request_children.get(key)
        if found is None:
            v = "" if version is None else str(version)
            found = self._request_children[key] = (
                self.requests_total.labels(model, v, protocol, endpoint, outcome),
                self.request_duration.labels(model, v, protocol, endpoint),
            )
        count, duration = found
        count.inc()
        duration.observe(seconds)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: `labels()` costs microseconds
        and per-request paths call this (label sets are bounded: unknown models are blank)."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def queue(self, model: str, version: int, kind: str) -> QueueMetrics:
        """The queue children of one version's encode batcher or decode scheduler."""
        labels = (model, str(version))
        return QueueMetrics(
            self.queue_depth.labels(*labels, kind),
            self.queue_duration.labels(*labels),
            self.dropped_total.labels(*labels, "deadline"),
            self.dropped_total.labels(*labels, "cancelled"),
        )

    def calls(self, model: str, version: int, kind: str) -> CallMetrics:
        """The children of one version's model calls of `kind` (encode, decode)."""
        labels = (model, str(version), kind)
        return CallMetrics(
            self.compute_duration.labels(*labels),
            self.batch_size.labels(*labels),
            self.model_calls_total.labels(*labels),
        )

    def set_model_state(self, model: str, version: int, state: str | None) -> None:
        """Mark `state` as the current state of a version (None: the version is gone)."""
        for known in MODEL_STATES:
            gauge = self.model_state.labels(model, str(version), known)
            gauge.set(1.0 if known == state else 0.0)
