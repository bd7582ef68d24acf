"""The bundled demo checkpoints load and reach the held-out quality their metrics.json reports.

The held-out data are regenerated from the recorded seed and fed through the loaded checkpoint's
own tokenizers, as a server would; the whole held-out split of each task runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from models import checkpoint
from models.encoder import EncoderModel, collate
from models.seq2seq import Seq2SeqModel
from models.tokenizer import Tokenizer
from models.training import metrics
from models.training.dates import load_dates
from models.training.series import load_series
from models.training.surnames import load_surnames
from tests.support import DEMO_REPOSITORY

DEMO = DEMO_REPOSITORY
MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024
MAX_TRAINING_SECONDS = 300


def _latest(name: str) -> Path:
    versions = sorted(int(p.name) for p in (DEMO / name).iterdir() if p.name.isdigit())
    assert versions, f"no version of {name} in {DEMO}"
    return DEMO / name / str(versions[-1])


def _report(folder: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return report


def _ids(tokenizer: Tokenizer | None, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    assert tokenizer is not None
    return collate([torch.tensor(tokenizer.encode(t) or [tokenizer.unk_id]) for t in texts])


@pytest.mark.parametrize("name", ["surnames", "dates", "elnino"])
def test_demo_checkpoints_are_small_and_fast_to_train(name: str) -> None:
    folder = _latest(name)
    report = _report(folder)
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.name != "metrics.json")
    assert weights == report["checkpoint_bytes"] < MAX_CHECKPOINT_BYTES
    assert report["training_seconds"] < MAX_TRAINING_SECONDS
    assert report["command"].startswith(f"rnnserve train {report['task']} ")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_surnames_demo_reaches_its_reported_accuracy() -> None:
    folder = _latest("surnames")
    report = _report(folder)
    loaded = checkpoint.load(folder)
    assert isinstance(loaded.model, EncoderModel) and loaded.config.head is not None
    splits = load_surnames(report["seed"])
    assert loaded.config.head.labels == splits.labels
    inputs, lengths = _ids(loaded.input_tokenizer, [name for name, _ in splits.test])
    with torch.inference_mode():
        scores = loaded.model(inputs, lengths).scores
    assert scores is not None
    predicted = scores.argmax(-1).tolist()
    accuracy = metrics.accuracy(predicted, [label for _, label in splits.test])
    assert accuracy == pytest.approx(report["heldout"]["accuracy"], abs=0.01)
    majority = report["baselines"]["majority_class_accuracy"]
    assert accuracy > 0.70 and accuracy > 5 * majority


def test_dates_demo_reaches_its_reported_exact_match() -> None:
    folder = _latest("dates")
    report = _report(folder)
    loaded = checkpoint.load(folder)
    assert isinstance(loaded.model, Seq2SeqModel) and loaded.output_tokenizer is not None
    sizes = report["data"]
    splits = load_dates(report["seed"], sizes["train"], sizes["valid"], sizes["test"])
    inputs, lengths = _ids(loaded.input_tokenizer, [source for source, _ in splits.test])
    with torch.inference_mode():
        outputs = loaded.model.generate(inputs, lengths)
    predicted = [loaded.output_tokenizer.decode(tokens) for tokens in outputs]
    exact = metrics.accuracy(predicted, [target for _, target in splits.test])
    assert exact == pytest.approx(report["heldout"]["exact_match"], abs=0.01)
    assert exact >= 0.95 > report["baselines"]["copy_exact_match"]


def test_elnino_demo_beats_the_last_value_forecast() -> None:
    folder = _latest("elnino")
    report = _report(folder)
    loaded = checkpoint.load(folder)
    assert isinstance(loaded.model, EncoderModel)
    splits = load_series()
    windows = torch.tensor([w for w, _ in splits.test])[:, :, None]  # [N, 24, 1] in °C
    with torch.inference_mode():
        scores = loaded.model(windows, torch.full((len(windows),), windows.shape[1])).scores
    assert scores is not None
    forecast = scores[:, 0].tolist()
    expected = [target for _, target in splits.test]
    mae = metrics.mae(forecast, expected)
    assert mae == pytest.approx(report["heldout"]["mae"], rel=0.01)
    assert mae < 0.6 * report["baselines"]["last_value_mae"]
