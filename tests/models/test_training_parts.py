"""The parts of `rnnserve train`: data splits, metrics, the schedule, the El Niño weight folding,
progress output and version naming. Property tests where inputs vary."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import versions
from models.checkpoint import build_model
from models.encoder import EncoderModel
from models.training import metrics, output
from models.training.dates import load_dates
from models.training.errors import TrainingError
from models.training.progress import Progress
from models.training.series import load_elnino, load_series
from models.training.surnames import load_surnames
from models.training.tasks import ElninoTask, Hyper
from models.training.trainer import FINAL_LR_FRACTION, learning_rate


def test_surname_splits_are_disjoint_and_unambiguous() -> None:
    splits = load_surnames(seed=0)
    names = [[n for n, _ in part] for part in (splits.train, splits.valid, splits.test)]
    assert all(len(set(part)) == len(part) for part in names)
    assert not set(names[0]) & set(names[1]) and not set(names[0]) & set(names[2])
    assert len(splits.labels) == 15 and all(label in range(15) for _, label in splits.test)
    assert load_surnames(seed=0) == splits and load_surnames(seed=1).test != splits.test


def test_date_targets_are_the_iso_form_of_held_out_days() -> None:
    splits = load_dates(seed=0, train_size=3000, valid_size=300, test_size=300)
    train_days = {target for _, target in splits.train}
    for _, target in splits.valid + splits.test:
        assert dt.date.fromisoformat(target).isoformat() == target
        assert target not in train_days
    # Numeric sources carry the answer; check the ones that are plain ISO already.
    for source, target in splits.train:
        if len(source) == 10 and source[4] == "-" and source[:4].isdigit():
            assert source == target
    assert len({source for source, _ in splits.train}) > 2500


def test_the_elnino_series_is_the_shipped_file() -> None:
    months, values = load_elnino()
    assert months[0] == "1950-01" and months[-1] == "2010-12" and len(values) == 61 * 12
    assert all(15.0 < v < 35.0 for v in values)
    splits = load_series()
    assert splits.first_test_month == "1999-01" and len(splits.test) == 144
    last_train_target = splits.train[-1][1]
    assert splits.valid[0][0][-1] == last_train_target  # time order, no gap, no overlap


@given(
    cell=st.sampled_from(["rnn", "lstm", "gru"]),
    bidirectional=st.booleans(),
    mean=st.floats(-30, 30),
    std=st.floats(0.1, 10),
    seed=st.integers(0, 1000),
)
@settings(max_examples=25, deadline=None)
def test_folding_the_normalisation_keeps_every_forecast(
    cell: str, bidirectional: bool, mean: float, std: float, seed: int
) -> None:
    task = ElninoTask()
    task.mean, task.std, task.folded, task.window = mean, std, False, 6
    hyper = Hyper(
        cell=cell,  # type: ignore[arg-type]
        layers=2,
        hidden=5,
        bidirectional=bidirectional,
        attention=False,
        embedding=0,
        attention_size=0,
        epochs=1,
        batch_size=1,
        learning_rate=1e-3,
    )
    torch.manual_seed(seed)
    model = build_model(task.config(hyper))
    windows = (torch.randn(7, 6) * std + mean).tolist()
    before = task.forecast(model, windows)
    task.finish(model)
    after = task.forecast(model, windows)
    assert isinstance(model, EncoderModel)
    for b, a in zip(before, after, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4 * (abs(mean) + std))


@given(total=st.integers(1, 5000), peak=st.floats(1e-5, 1.0))
@settings(deadline=None)  # NOTE: shared 2-core machines stall at random
def test_the_learning_rate_warms_up_then_decays_to_the_floor(total: int, peak: float) -> None:
    rates = [learning_rate(step, total, peak) for step in range(total)]
    assert all(0 < r <= peak * (1 + 1e-9) for r in rates)
    top = rates.index(max(rates))
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(rates[: top + 1]))
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(rates[top:]))
    if total >= 2:
        assert rates[-1] == pytest.approx(peak * FINAL_LR_FRACTION)


@given(pairs=st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=1))
@settings(deadline=None)  # NOTE: shared 2-core machines stall at random
def test_error_metrics(pairs: list[tuple[float, float]]) -> None:
    predicted, expected = [p for p, _ in pairs], [e for _, e in pairs]
    # NOTE: the absolute slack covers squares of tiny errors underflowing to 0.
    assert (
        0
        <= metrics.mae(predicted, expected)
        <= metrics.rmse(predicted, expected) * (1 + 1e-9) + 1e-150
    )
    assert metrics.mae(expected, expected) == 0 == metrics.rmse(expected, expected)


@given(labels=st.lists(st.integers(0, 4), min_size=1))
@settings(deadline=None)  # NOTE: shared 2-core machines stall at random
def test_accuracy_and_majority(labels: list[int]) -> None:
    top = metrics.majority(labels)
    share = metrics.accuracy([top] * len(labels), labels)
    assert all(share >= labels.count(label) / len(labels) for label in set(labels))
    assert metrics.accuracy(labels, labels) == 1.0
    with pytest.raises(ValueError):
        metrics.accuracy([], [])


@given(name=st.from_regex(r"[A-Za-z0-9_.-]{1,40}", fullmatch=True))
@settings(deadline=None)  # NOTE: shared 2-core machines stall at random
def test_valid_model_names_are_accepted(name: str) -> None:
    if set(name) == {"."}:
        with pytest.raises(TrainingError):
            output.check_name(name)
    else:
        assert output.check_name(name) == name


@given(
    head=st.text(max_size=10),
    separator=st.sampled_from(["/", "\\", " ", "\0", ":", "\n"]),
    tail=st.text(max_size=10),
)
@settings(deadline=None)  # NOTE: shared 2-core machines stall at random
def test_names_with_separators_are_refused(head: str, separator: str, tail: str) -> None:
    name = head + separator + tail
    with pytest.raises(TrainingError, match="not a valid model name"):
        output.check_name(name)


def test_versions_are_published_whole(tmp_path: Path) -> None:
    model_dir, version = output.reserve(tmp_path / "repo", "m", None)
    assert version == 1
    staging = versions.staging_folder(model_dir, version)
    (staging / "config.json").write_text("{}")
    (staging / "model.safetensors").touch(mode=0o600)
    assert output.existing_versions(model_dir) == []  # a staging folder is not a version
    final = output.publish(staging, model_dir, version)
    assert final == model_dir / "1" and (final / "config.json").is_file()
    # NOTE: the server may run as another user; a published version is readable like any file.
    assert (final / "model.safetensors").stat().st_mode & 0o044 == 0o044
    assert output.reserve(tmp_path / "repo", "m", None)[1] == 2
    again = versions.staging_folder(model_dir, 1)
    with pytest.raises(TrainingError, match="nothing was overwritten"):
        output.publish(again, model_dir, 1)
    assert not again.exists() and (final / "config.json").read_text() == "{}"


def test_a_failed_run_removes_only_an_empty_model_folder(tmp_path: Path) -> None:
    model_dir, _ = output.reserve(tmp_path, "fresh", None)
    assert model_dir.is_dir()
    output.remove_if_empty(model_dir)
    assert not model_dir.exists()
    (tmp_path / "kept" / "1").mkdir(parents=True)
    output.remove_if_empty(tmp_path / "kept")
    assert (tmp_path / "kept" / "1").is_dir()


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise() -> None:
    tty = io.StringIO()
    bar = Progress(10, "acc", stream=tty, tty=True)
    for step in range(1, 11):
        bar.update(step, 1, 1, 0.5, 0.75)
    bar.message("epoch 1/1: done")
    bar.close()
    text = tty.getvalue()
    assert text.count("\r") >= 10 and "[########################] 100%" in text
    assert "loss 0.5000 acc 0.7500" in text and "ETA" in text and "epoch 1/1: done\n" in text

    log = io.StringIO()
    lines = Progress(10, "mae", stream=log, tty=False, log_every_s=0.0)
    for step in range(1, 11):
        lines.update(step, 1, 1, 0.25, 0.5)
    rows = log.getvalue().splitlines()
    assert len(rows) == 10 and "\r" not in log.getvalue()
    assert rows[-1].startswith("epoch 1/1 step 10/10 loss 0.2500 mae 0.5000")

    quiet = io.StringIO()
    throttled = Progress(10, "mae", stream=quiet, tty=False, log_every_s=math.inf)
    throttled.update(1, 1, 1, 0.25, 0.5)
    assert quiet.getvalue() == ""
