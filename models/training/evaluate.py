"""`rnnserve eval MODEL --repository DIR [--dtype …]`: a repository model of a bundled task, run
on that task's held-out data, prints its metric (accuracy, exact match, MAE).

The task and the data seed come from the version's `metrics.json` (written by `rnnserve
train`), or from `--task` / `--seed`. The model is loaded as the server loads it
(`models.checkpoint.load`, each part in the dtype `models.precision` plans for `--dtype` on
`--device`), and reads its inputs through its own vocab files. Every user error is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models import checkpoint
from models.checkpoint import CheckpointError, LoadedModel
from models.precision import DTYPES, check_cpu_dtype, cpu_capabilities
from models.training.cli import resolve_device
from models.training.errors import TrainingError
from models.training.tasks import TASKS, Task, make_task

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `eval` flags to `parser` and set its `run` function."""
    parser.description = (
        "Run a repository model of a bundled task on the task's held-out data and print its "
        f"metric. Tasks: {', '.join(TASKS)}."
    )
    parser.add_argument("model", metavar="MODEL", help="model name in the repository")
    parser.add_argument(
        "--repository", required=True, type=Path, metavar="DIR", help="model repository folder"
    )
    parser.add_argument("--version", type=int, help="version to evaluate (default: the latest)")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="precision asked for, as the server's --dtype (a model's serving.dtype wins); "
        "each part runs in it only where models.precision plans so",
    )
    parser.add_argument(
        "--every-part",
        action="store_true",
        help="run every part in --dtype, whatever the plan (accuracy of the whole model in it)",
    )
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    parser.add_argument(
        "--task", choices=list(TASKS), help="the bundled task (default: from metrics.json)"
    )
    parser.add_argument("--seed", type=int, help="the data seed (default: from metrics.json)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run `rnnserve eval`; returns the exit status."""
    threads = torch.get_num_threads()
    try:
        return _evaluate(args)
    except (TrainingError, CheckpointError, ValueError) as exc:
        print(f"rnnserve eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        # NOTE: the thread count is process-wide; leave it as found (tests call `run` in-process).
        torch.set_num_threads(threads)


def _evaluate(args: argparse.Namespace) -> int:
    if not 1 <= args.threads <= 1024:
        raise TrainingError(f"--threads must be between 1 and 1024, got {args.threads}")
    folder = _version_folder(args.repository, args.model, args.version)
    report = _training_report(folder)
    task_name = args.task or report.get("task")
    if task_name is None:
        raise TrainingError(
            f"{folder} has no metrics.json naming its task (from rnnserve train): give --task"
        )
    seed = args.seed if args.seed is not None else int(report.get("seed", 0))
    device = resolve_device(args.device)
    if device.type == "cpu":
        check_cpu_dtype(args.dtype, cpu_capabilities())
    torch.set_num_threads(args.threads)
    task = make_task(task_name)
    task.load(seed, _train_limit(task_name, report))
    loaded = checkpoint.load(folder, device, DTYPES[args.dtype], every_part=args.every_part)
    _use_checkpoint(task, loaded)
    start = time.perf_counter()
    heldout = task.evaluate(loaded.model, "test")
    seconds = time.perf_counter() - start
    _print_setup(args, folder, task, seed, loaded)
    _print_result(task, heldout, report, seconds)
    return 0


def _version_folder(repository: Path, model: str, version: int | None) -> Path:
    folder = repository / model
    if not folder.is_dir():
        raise TrainingError(f"{folder} is not a model folder")
    numbers = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not numbers:
        raise TrainingError(f"{folder} has no version folders")
    if version is None:
        return folder / str(numbers[-1])
    if version not in numbers:
        raise TrainingError(f"{folder} has no version {version} (it has {numbers})")
    return folder / str(version)


def _training_report(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(report, dict):
        raise TrainingError(f"{path}: not a JSON object")
    return report


def _train_limit(task_name: str, report: dict[str, Any]) -> int | None:
    """The training examples the run used (`--limit`): the dates task draws its held-out split
    after them, so the same split needs the same number."""
    train = report.get("data", {}).get("train") if isinstance(report.get("data"), dict) else None
    return int(train) if task_name == "dates" and train else None


def _use_checkpoint(task: Task, loaded: LoadedModel) -> None:
    """The task reads the checkpoint's own vocab and labels (the model's ids and outputs)."""
    config, wanted = loaded.config, task.config(task.defaults)
    if (config.task, config.input.type) != (wanted.task, wanted.input.type):
        raise TrainingError(
            f"the model's task and input are {config.task}/{config.input.type}; task "
            f"{task.name!r} needs {wanted.task}/{wanted.input.type}"
        )
    head, wanted_head = config.head, wanted.head
    if wanted_head is not None and (
        head is None or (head.size, head.labels) != (wanted_head.size, wanted_head.labels)
    ):
        raise TrainingError(f"the model's head is not task {task.name!r}'s outputs")
    if loaded.input_tokenizer is not None:
        task.tokenizer = loaded.input_tokenizer  # type: ignore[attr-defined]
    if loaded.output_tokenizer is not None:
        task.target_tokenizer = loaded.output_tokenizer  # type: ignore[attr-defined]
    task.saved()


def _print_setup(
    args: argparse.Namespace, folder: Path, task: Task, seed: int, loaded: LoadedModel
) -> None:
    """What was evaluated: the folder, task, seed, and the dtype each part computed in."""
    parts = ", ".join(
        f"{part} {d.describe()['dtype']}"
        + (f" from {d.min_rows} rows (float32 below)" if d.switches else "")
        for part, d in loaded.plan.items()
    )
    every = " on every part" if args.every_part else ""
    print(f"{folder}: task {task.name}, seed {seed}, {args.dtype}{every} on {args.device}")
    print(f"precision: {parts}")


def _print_result(
    task: Task, heldout: dict[str, float], report: dict[str, Any], seconds: float
) -> None:
    """The held-out metrics, beside the figure recorded at training when there is one."""
    figures = ", ".join(f"{name} {value:.4f}" for name, value in heldout.items())
    print(f"held-out {task.metric}: {heldout[task.metric]:.4f} ({figures}; {seconds:.1f} s)")
    trained = report.get("heldout", {}).get(task.metric)
    if isinstance(trained, int | float):
        print(f"recorded at training (float32): {trained:.4f}")
