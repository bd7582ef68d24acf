"""The one error of `rnnserve train`: a bad argument or a missing dependency, said in one line."""

from __future__ import annotations


class TrainingError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits non-zero."""
