"""The `rnnserve` command line: serve, train, eval, import-torch."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser; each subcommand's module adds its own flags."""
    from service.inference_protocol.requests import server_version

    parser = argparse.ArgumentParser(
        prog="rnnserve", description="A model server for recurrent neural networks."
    )
    parser.add_argument("--version", action="version", version=f"rnnserve {server_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from models import torch_import

    torch_import.add_arguments(
        sub.add_parser(
            "import-torch",
            help="write a repository version from a vanilla PyTorch nn.RNN/LSTM/GRU state_dict",
        )
    )

    from models.training import cli as train_cli

    train_cli.add_arguments(
        sub.add_parser("train", help="train a bundled task into a new repository version")
    )

    from models.training import evaluate

    evaluate.add_arguments(
        sub.add_parser("eval", help="print a bundled task's held-out metric for a repository model")
    )

    from service.process import serve as serve_main

    serve_main.add_arguments(
        sub.add_parser("serve", help="serve a model repository over REST (HTTP) and gRPC")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rnnserve` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = args.run
    status: int = run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
