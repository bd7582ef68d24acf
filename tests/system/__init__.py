"""Whole-system tests: both wires at once, the client libraries, the docs, deploy, the GPU."""
