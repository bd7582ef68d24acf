"""The training loop: Adam, training-only dropout, warm-up + cosine learning rate, gradient
clipping, and model selection on the validation split (the best epoch's weights are kept).
Task-agnostic."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from models.checkpoint import Model
from models.training.progress import Progress
from models.training.tasks import Batch, Hyper, Task

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


def _to(batch: Batch, device: torch.device) -> Batch:
    # NOTE: lengths stay on the CPU (packing reads them there).
    return Batch(batch.inputs.to(device), batch.lengths, batch.targets.to(device))


def train(
    task: Task,
    model: Model,
    hyper: Hyper,
    seed: int,
    progress: Progress | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train `model` in place on `task`; on return it holds the best validation epoch's weights."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(task.train_size() / hyper.batch_size)
    total = (
        per_epoch * hyper.epochs if max_steps is None else min(max_steps, per_epoch * hyper.epochs)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=hyper.learning_rate)
    hooks = _regularise(model, hyper.dropout)
    started = time.monotonic()
    step = 0
    best: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    result = TrainResult(steps=0, epochs=0, seconds=0.0, best_epoch=0, valid={})
    for epoch in range(1, hyper.epochs + 1):
        model.train()
        loss_sum, metric_total, metric_count, batches = 0.0, 0.0, 0, 0
        for batch in task.batches(generator, hyper.batch_size):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, hyper.learning_rate)
            out = task.step(model, _to(batch, device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            step += 1
            batches += 1
            loss_sum += float(out.loss.item())
            metric_total += out.total
            metric_count += out.count
            if progress is not None:
                progress.update(
                    step, epoch, hyper.epochs, loss_sum / batches, metric_total / metric_count
                )
        if batches == 0:
            break
        model.eval()
        valid = task.evaluate(model, "valid")
        result.epochs = epoch
        result.history.append(
            {
                "epoch": epoch,
                "loss": loss_sum / batches,
                task.train_metric: metric_total / max(1, metric_count),
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
                f"epoch {epoch}/{hyper.epochs}: loss {loss_sum / batches:.4f} "
                f"{task.train_metric} {metric_total / max(1, metric_count):.4f} | valid {shown}"
            )
        if step >= total:
            break
    if progress is not None:
        progress.close()
    for hook in hooks:
        hook.remove()
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.dropout = 0.0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.steps = step
    result.seconds = time.monotonic() - started
    return result
