"""Metrics: public names, injected registry, outcome labels."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from service.core import errors
from service.core.metrics import OUTCOMES, Metrics, outcome_of

PUBLIC_NAMES = (
    "rnnserve_requests_total",
    "rnnserve_request_duration_seconds",
    "rnnserve_queue_duration_seconds",
    "rnnserve_compute_duration_seconds",
    "rnnserve_batch_size",
    "rnnserve_batch_timesteps",
    "rnnserve_padding_efficiency",
    "rnnserve_queue_depth",
    "rnnserve_inflight_requests",
    "rnnserve_model_state",
    "rnnserve_model_load_duration_seconds",
    "rnnserve_decode_slots_in_use",
    "rnnserve_sessions_active",
)


def test_two_instances_use_their_own_registries() -> None:
    before = {m.name for m in REGISTRY.collect()}
    first, second = CollectorRegistry(), CollectorRegistry()
    Metrics(first).observe_request("m", 1, "rest", "encode", "success", 0.01)
    Metrics(second)
    assert {m.name for m in REGISTRY.collect()} == before
    assert (
        first.get_sample_value(
            "rnnserve_requests_total",
            {
                "model": "m",
                "version": "1",
                "protocol": "rest",
                "endpoint": "encode",
                "outcome": "success",
            },
        )
        == 1.0
    )
    assert (
        second.get_sample_value(
            "rnnserve_requests_total",
            {
                "model": "m",
                "version": "1",
                "protocol": "rest",
                "endpoint": "encode",
                "outcome": "success",
            },
        )
        is None
    )


def test_public_names_are_exposed() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_request("m", None, "grpc", "generate", "overloaded", 0.2)
    metrics.queue_duration.labels("m", "1").observe(0.001)
    metrics.compute_duration.labels("m", "1", "encode").observe(0.001)
    metrics.batch_size.labels("m", "1", "encode").observe(3)
    metrics.batch_timesteps.labels("m", "1").observe(30)
    metrics.padding_efficiency.labels("m", "1").observe(0.5)
    metrics.queue_depth.labels("m", "1", "encode").set(2)
    metrics.inflight_requests.labels("m").set(1)
    metrics.set_model_state("m", 1, "READY")
    metrics.model_load_duration.labels("m", "1").observe(0.3)
    metrics.decode_slots_in_use.labels("m", "1").set(4)
    metrics.sessions_active.labels("m").set(0)
    text = generate_latest(registry).decode()
    for name in PUBLIC_NAMES:
        assert f"\n{name}" in text or text.startswith(name), name


def test_request_duration_is_observed() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for seconds in (0.001, 0.002, 0.5):
        metrics.observe_request("m", 2, "rest", "encode", "success", seconds)
    labels = {"model": "m", "version": "2", "protocol": "rest", "endpoint": "encode"}
    assert registry.get_sample_value("rnnserve_request_duration_seconds_count", labels) == 3
    total = registry.get_sample_value("rnnserve_request_duration_seconds_sum", labels)
    assert total is not None and abs(total - 0.503) < 1e-9


def test_model_state_is_one_hot() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_model_state("m", 1, "LOADING")
    metrics.set_model_state("m", 1, "READY")

    def value(state: str) -> float | None:
        return registry.get_sample_value(
            "rnnserve_model_state", {"model": "m", "version": "1", "state": state}
        )

    assert (value("LOADING"), value("READY"), value("FAILED")) == (0.0, 1.0, 0.0)
    metrics.set_model_state("m", 1, None)
    assert value("READY") == 0.0


def test_every_error_class_has_an_outcome() -> None:
    for cls in errors.ALL_ERRORS:
        exc = cls("f", "m") if cls is errors.InvalidInput else cls("m")  # type: ignore[call-arg]
        assert outcome_of(exc) in OUTCOMES
        assert outcome_of(exc) not in ("success", "error")
    assert outcome_of(None) == "success"
    assert outcome_of(asyncio.CancelledError()) == "cancelled"
    assert outcome_of(RuntimeError("x")) == "error"
    assert len(set(OUTCOMES)) == len(OUTCOMES)
