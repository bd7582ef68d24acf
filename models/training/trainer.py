"""The training loop: Adam, training-only dropout, warm-up + cosine learning rate, gradient
clipping, and model selection on the validation split (the best epoch's weights are kept).
Task-agnostic."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from models.checkpoint import Model
from models.training.progress import Progress
from models.training.tasks import Batch, Hyper, StepResult, Task

CLIP_NORM = 1.0
WARMUP_FRACTION = 0.03
FINAL_LR_FRACTION = 0.05


@dataclass
class TrainResult:
    """What the loop did: steps, time, the selected epoch and its validation metrics."""

    steps: int
    epochs: int
    seconds: float
    best_epoch: int
    valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to FINAL_LR_FRACTION × peak at the last step
    (`step` counts from 0 to total − 1)."""
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    floor = peak * FINAL_LR_FRACTION
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _better(task: Task, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new > best if task.higher_is_better else new < best


def _regularise(model: Model, dropout: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout on embedding outputs (and PyTorch's own between stacked layers), training only:
    it changes no parameter, so the saved checkpoint is the plain architecture."""
    if dropout <= 0:
        return []
    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):

            def drop(mod: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.dropout(output, dropout, mod.training)

            handles.append(module.register_forward_hook(drop))
        if isinstance(module, torch.nn.RNNBase) and module.num_layers > 1:
            module.dropout = dropout
    return handles


def _unregularise(model: Model, hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Undo `_regularise`: the model leaves training as its plain architecture."""
    for hook in hooks:
        hook.remove()
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.dropout = 0.0


def _to(batch: Batch, device: torch.device) -> Batch:
    # NOTE: lengths stay on the CPU (packing reads them there).
    return Batch(batch.inputs.to(device), batch.lengths, batch.targets.to(device))


@dataclass
class _Steps:
    """The optimizer steps taken so far, of `total`, and the schedule's peak learning rate."""

    done: int
    total: int
    peak: float


@dataclass
class _Running:
    """An epoch's running sums: batches, loss, and the task's training metric (`total/count`)."""

    batches: int = 0
    loss: float = 0.0
    total: float = 0.0
    count: int = 0

    def add(self, out: StepResult) -> None:
        self.batches += 1
        self.loss += float(out.loss.item())
        self.total += out.total
        self.count += out.count

    @property
    def mean_loss(self) -> float:
        return self.loss / self.batches

    @property
    def metric(self) -> float:
        return self.total / max(1, self.count)


def train(
    task: Task,
    model: Model,
    hyper: Hyper,
    seed: int,
    progress: Progress | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train `model` in place on `task`; on return it holds the best validation epoch's weights."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(task.train_size() / hyper.batch_size)
    total = per_epoch * hyper.epochs
    steps = _Steps(0, total if max_steps is None else min(max_steps, total), hyper.learning_rate)
    optimizer = torch.optim.Adam(model.parameters(), lr=hyper.learning_rate)
    hooks = _regularise(model, hyper.dropout)
    started = time.monotonic()
    best: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    result = TrainResult(steps=0, epochs=0, seconds=0.0, best_epoch=0, valid={})
    for epoch in range(1, hyper.epochs + 1):
        batches = task.batches(generator, hyper.batch_size)
        running = _train_epoch(task, model, optimizer, batches, steps, epoch, hyper, progress)
        if running.batches == 0:
            break
        model.eval()
        valid = task.evaluate(model, "valid")
        result.epochs = epoch
        result.history.append(
            {
                "epoch": epoch,
                "loss": running.mean_loss,
                task.train_metric: running.metric,
                **{f"valid_{k}": v for k, v in valid.items()},
            }
        )
        if _better(task, valid[task.metric], best):
            best = valid[task.metric]
            best_state = copy.deepcopy(model.state_dict())
            result.best_epoch, result.valid = epoch, valid
        # NOTE: at most ~20 epoch lines, however many epochs (the El Niño task runs 100+).
        every = max(1, hyper.epochs // 20)
        if progress is not None and (epoch % every == 0 or epoch == hyper.epochs):
            shown = " ".join(f"{k} {v:.4f}" for k, v in valid.items())
            progress.message(
                f"epoch {epoch}/{hyper.epochs}: loss {running.mean_loss:.4f} "
                f"{task.train_metric} {running.metric:.4f} | valid {shown}"
            )
        if steps.done >= steps.total:
            break
    if progress is not None:
        progress.close()
    _unregularise(model, hooks)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.steps = steps.done
    result.seconds = time.monotonic() - started
    return result


def _train_epoch(
    task: Task,
    model: Model,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    steps: _Steps,
    epoch: int,
    hyper: Hyper,
    progress: Progress | None,
) -> _Running:
    """One pass over `batches` (stopping at `steps.total`), in train mode."""
    device = next(model.parameters()).device
    model.train()
    running = _Running()
    for batch in batches:
        if steps.done >= steps.total:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(steps.done, steps.total, steps.peak)
        out = task.step(model, _to(batch, device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        steps.done += 1
        running.add(out)
        if progress is not None:
            progress.update(steps.done, epoch, hyper.epochs, running.mean_loss, running.metric)
    return running
