"""`rnnserve train TASK --out REPOSITORY …`: flags, checks, and one run from data to a published
version with its `metrics.json`. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from models import checkpoint, versions
from models.training import output
from models.training.errors import TrainingError
from models.training.progress import Progress
from models.training.tasks import TASKS, Hyper, Task, make_task
from models.training.trainer import train

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `train` flags to `parser` and set its `run` function."""
    tasks = "; ".join(f"{name}: {task.summary}" for name, task in TASKS.items())
    parser.description = f"Train a bundled task into a model repository. Tasks — {tasks}."
    parser.add_argument("task", metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="REPOSITORY",
        help="model repository folder (created if missing)",
    )
    parser.add_argument("--name", help="model name in the repository (default: the task name)")
    parser.add_argument(
        "--version",
        type=int,
        help="version number to write (default: the next free one; never overwrites)",
    )
    parser.add_argument(
        "--cell", choices=["rnn", "lstm", "gru"], help=f"recurrent cell {_task_defaults('cell')}"
    )
    parser.add_argument("--layers", type=int, help=f"recurrent layers {_task_defaults('layers')}")
    parser.add_argument(
        "--hidden", type=int, help=f"hidden size per direction {_task_defaults('hidden')}"
    )
    parser.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"read the sequence both ways {_task_defaults('bidirectional')}",
    )
    parser.add_argument(
        "--attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="additive attention (seq2seq tasks only; default: on)",
    )
    parser.add_argument(
        "--embedding",
        type=int,
        help=f"embedding size (text tasks) {_task_defaults('embedding', text_only=True)}",
    )
    parser.add_argument("--epochs", type=int, help=f"epochs {_task_defaults('epochs')}")
    parser.add_argument(
        "--batch-size", type=int, help=f"sequences per step {_task_defaults('batch_size')}"
    )
    parser.add_argument(
        "--lr", type=float, help=f"peak learning rate {_task_defaults('learning_rate')}"
    )
    parser.add_argument(
        "--dropout", type=float, help=f"training-only dropout {_task_defaults('dropout')}"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of data splits and weights (default: 0)"
    )
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1; small recurrent ops gain little "
        "from more, and oversubscribed cores slow them down badly)",
    )
    parser.add_argument(
        "--max-steps", type=int, help="stop after this many steps (smoke runs; default: no limit)"
    )
    parser.add_argument(
        "--limit", type=int, help="use at most this many training examples (default: all)"
    )
    parser.set_defaults(run=run)


def _task_defaults(field: str, text_only: bool = False) -> str:
    """`(default: surnames 128, dates 64, elnino 32)`: a hyperparameter's default per task."""
    values = []
    for name, task in TASKS.items():
        if text_only and task.defaults.embedding == 0:
            continue
        value = getattr(task.defaults, field)
        if isinstance(value, bool):
            values.append(f"{name} {'on' if value else 'off'}")
        else:
            values.append(f"{name} {value}" if isinstance(value, str) else f"{name} {value:g}")
    return f"(default: {', '.join(values)})"


def run(args: argparse.Namespace) -> int:
    """Run `rnnserve train`; returns the exit status."""
    threads = torch.get_num_threads()
    try:
        return _train(args)
    except TrainingError as exc:
        print(f"rnnserve train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rnnserve train: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        # NOTE: the thread count is process-wide; leave it as found (tests call `run` in-process).
        torch.set_num_threads(threads)


def _check_range(flag: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise TrainingError(f"{flag} must be between {low:g} and {high:g}, got {value:g}")


def hyper_from_args(task: Task, args: argparse.Namespace) -> Hyper:
    """The task's defaults with the flags given on the command line; checks every limit."""
    _check_range("--layers", args.layers, 1, 8)
    _check_range("--hidden", args.hidden, 1, 4096)
    _check_range("--embedding", args.embedding, 1, 4096)
    _check_range("--epochs", args.epochs, 1, 100_000)
    _check_range("--batch-size", args.batch_size, 1, 65536)
    _check_range("--lr", args.lr, 1e-7, 10.0)
    _check_range("--dropout", args.dropout, 0.0, 0.9)
    _check_range("--max-steps", args.max_steps, 1, 10**9)
    _check_range("--limit", args.limit, 1, 10**9)
    _check_range("--threads", args.threads, 1, 1024)
    if args.attention and task.kind != "seq2seq":
        raise TrainingError(
            f"--attention applies to seq2seq tasks only; task {task.name!r} is an encoder"
        )
    if args.embedding is not None and task.defaults.embedding == 0:
        raise TrainingError(f"--embedding applies to text tasks; task {task.name!r} reads features")
    given = {
        "cell": args.cell,
        "layers": args.layers,
        "hidden": args.hidden,
        "bidirectional": args.bidirectional,
        "attention": args.attention,
        "embedding": args.embedding,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "dropout": args.dropout,
    }
    return dataclasses.replace(task.defaults, **{k: v for k, v in given.items() if v is not None})


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def command_line(args: argparse.Namespace, task: Task, hyper: Hyper, name: str) -> str:
    """The full command that reproduces this run (every effective setting spelled out)."""
    parts = ["rnnserve", "train", task.name, "--out", str(args.out), "--name", name]
    parts += ["--cell", hyper.cell, "--layers", str(hyper.layers), "--hidden", str(hyper.hidden)]
    parts.append("--bidirectional" if hyper.bidirectional else "--no-bidirectional")
    if task.kind == "seq2seq":
        parts.append("--attention" if hyper.attention else "--no-attention")
    if hyper.embedding:
        parts += ["--embedding", str(hyper.embedding)]
    parts += ["--epochs", str(hyper.epochs), "--batch-size", str(hyper.batch_size)]
    parts += ["--lr", f"{hyper.learning_rate:g}", "--dropout", f"{hyper.dropout:g}"]
    parts += ["--seed", str(args.seed), "--device", args.device, "--threads", str(args.threads)]
    if args.max_steps is not None:
        parts += ["--max-steps", str(args.max_steps)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    return shlex.join(parts)


def _train(args: argparse.Namespace) -> int:
    task = make_task(args.task)
    hyper = hyper_from_args(task, args)
    device = resolve_device(args.device)
    name = args.name or task.name
    model_dir, version = output.reserve(args.out, name, args.version)
    try:
        return _train_into(args, task, hyper, device, name, model_dir, version)
    except BaseException:
        output.remove_if_empty(model_dir)
        raise


def _train_into(
    args: argparse.Namespace,
    task: Task,
    hyper: Hyper,
    device: torch.device,
    name: str,
    model_dir: Path,
    version: int,
) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task.load(args.seed, args.limit)
    try:
        config = task.config(hyper)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise TrainingError(f"these settings make an invalid model: {first['msg']}") from exc
    model = checkpoint.build_model(config).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"training {task.name} ({task.summary}): {task.train_size()} examples, "
        f"{parameters:,} parameters, {hyper.cell} ×{hyper.layers} hidden {hyper.hidden}"
        f"{' bidirectional' if hyper.bidirectional else ''} on {device}",
        file=sys.stderr,
    )
    steps_per_epoch = -(-task.train_size() // hyper.batch_size)
    total = steps_per_epoch * hyper.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    progress = Progress(total, task.train_metric)
    result = train(task, model, hyper, args.seed, progress, max_steps=args.max_steps)
    task.finish(model)

    staging = versions.staging_folder(model_dir, version)
    try:
        vocab, target_vocab = task.vocabs()
        checkpoint.save(model, staging, vocab=vocab, target_vocab=target_vocab)
        # NOTE: the reported figures are those of the saved files, loaded back as a server would.
        loaded = checkpoint.load(staging, device=device)
        test = task.evaluate(loaded.model, "test")
        baselines = task.baselines()
        report = _report(args, task, hyper, name, version, result, test, baselines, parameters)
        report["checkpoint_bytes"] = output.folder_bytes(staging)
        checkpoint.write_json(staging / "metrics.json", report)
        final = output.publish(staging, model_dir, version)
    except BaseException:
        versions.discard(staging)
        raise
    _print_summary(final, task, report)
    return 0


def _report(
    args: argparse.Namespace,
    task: Task,
    hyper: Hyper,
    name: str,
    version: int,
    result: Any,
    test: dict[str, float],
    baselines: dict[str, float],
    parameters: int,
) -> dict[str, Any]:
    return {
        "task": task.name,
        "model": name,
        "version": version,
        "summary": task.summary,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "heldout": test,
        "baselines": baselines,
        "valid": result.valid,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs,
        "steps": result.steps,
        "training_seconds": round(result.seconds, 1),
        "parameters": parameters,
        "seed": args.seed,
        "hyperparameters": dataclasses.asdict(hyper),
        "data": task.data_summary(),
        "command": command_line(args, task, hyper, name),
        "environment": {
            "torch": torch.__version__,
            "device": args.device,
            "threads": args.threads,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "history": result.history,
    }


def _print_summary(final: Path, task: Task, report: dict[str, Any]) -> None:
    test = ", ".join(f"{k} {v:.4f}" for k, v in report["heldout"].items())
    base = ", ".join(f"{k} {v:.4f}" for k, v in report["baselines"].items())
    seconds = report["training_seconds"]
    print(
        f"wrote {final} ({report['checkpoint_bytes'] / 1e6:.2f} MB, "
        f"{report['parameters']:,} parameters)"
    )
    print(f"trained in {seconds:.0f} s: {report['steps']} steps, best epoch {report['best_epoch']}")
    print(f"held-out {task.name} ({report['data']['test']} examples): {test}")
    print(f"baselines: {base}")
