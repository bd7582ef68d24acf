"""The serving core: transport-free (no web or RPC framework); both front-ends call it."""
