"""rnnserve's serving layer: registry, batching, engine, front-ends, metrics."""
