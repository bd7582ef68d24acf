"""Tests of service/core: the engine, batchers, registry, sessions and metrics, without a wire."""
