"""Tests of service/process: the `rnnserve` command and real server processes."""
