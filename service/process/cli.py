"""The `rnnserve` command line: serve, train, eval, import-torch."""

from __future__ import annotations

import argparse
import sys

from models import torch_import
from models.training import cli as train_cli
from models.training import evaluate
from service.core.release import server_version
from service.process import serve


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser; each subcommand's module adds its own flags."""
    parser = argparse.ArgumentParser(
        prog="rnnserve", description="A model server for recurrent neural networks."
    )
    parser.add_argument("--version", action="version", version=f"rnnserve {server_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    torch_import.add_arguments(
        sub.add_parser(
            "import-torch",
            help="write a repository version from a vanilla PyTorch nn.RNN/LSTM/GRU state_dict",
        )
    )
    train_cli.add_arguments(
        sub.add_parser("train", help="train a bundled task into a new repository version")
    )
    evaluate.add_arguments(
        sub.add_parser("eval", help="print a bundled task's held-out metric for a repository model")
    )
    serve.add_arguments(
        sub.add_parser("serve", help="serve a model repository over REST (HTTP) and gRPC")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rnnserve` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
