"""`rnnserve train`: smoke-sized real training runs of each task, and the CLI's error handling.

Each run goes through the real CLI entry point, writes a real checkpoint with
`models.checkpoint.save`, and is loaded back with `models.checkpoint.load`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.config import ModelConfig
from models.encoder import EncoderModel, collate
from models.seq2seq import Seq2SeqModel
from service.process.cli import main

SMOKE = ["--hidden", "8", "--epochs", "1", "--max-steps", "3", "--limit", "200"]
TEXT_SMOKE = [*SMOKE, "--embedding", "4"]


def _train(repository: Path, *args: str) -> int:
    return main(["train", *args, "--out", str(repository)])


def _metrics(folder: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return loaded


def _check_metrics(folder: Path, task: str, metric: str) -> None:
    report = _metrics(folder)
    assert report["task"] == task and report["metric"] == metric
    heldout, baselines = report["heldout"], report["baselines"]
    assert isinstance(heldout, dict) and metric in heldout and baselines
    assert str(report["command"]).startswith(f"rnnserve train {task} --out ")
    assert report["steps"] == 3
    assert report["checkpoint_bytes"] == sum(
        p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "metrics.json"
    )


def test_surnames_smoke_run_writes_a_loadable_classifier(repository: Path) -> None:
    assert _train(repository, "surnames", *TEXT_SMOKE, "--bidirectional", "--cell", "lstm") == 0
    folder = repository / "surnames" / "1"
    loaded = checkpoint.load(folder)
    config = ModelConfig.model_validate_json((folder / "config.json").read_text())
    assert config == loaded.config and config.head is not None and config.head.labels
    assert config.encoder.cell == "lstm" and config.encoder.bidirectional
    assert isinstance(loaded.model, EncoderModel) and loaded.input_tokenizer is not None
    names = ["Kowalczyk", "O'Brien", "Nakamura"]
    inputs, lengths = collate([torch.tensor(loaded.input_tokenizer.encode(n)) for n in names])
    with torch.inference_mode():
        out = loaded.model(inputs, lengths)
    assert out.encodings.shape == (3, 2 * 8)
    assert out.scores is not None and out.scores.shape == (3, len(config.head.labels))
    torch.testing.assert_close(out.scores.sum(-1), torch.ones(3))
    _check_metrics(folder, "surnames", "accuracy")


def test_dates_smoke_run_writes_a_loadable_seq2seq(repository: Path) -> None:
    assert _train(repository, "dates", *TEXT_SMOKE, "--no-bidirectional", "--cell", "gru") == 0
    folder = repository / "dates" / "1"
    loaded = checkpoint.load(folder)
    assert isinstance(loaded.model, Seq2SeqModel)
    decoder = loaded.config.decoder
    assert decoder is not None and decoder.attention == "additive"
    assert loaded.input_tokenizer is not None and loaded.output_tokenizer is not None
    sources = ["3 September 2021", "2021-09-03"]
    inputs, lengths = collate([torch.tensor(loaded.input_tokenizer.encode(s)) for s in sources])
    with torch.inference_mode():
        outputs = loaded.model.generate(inputs, lengths)
    assert len(outputs) == 2
    for tokens in outputs:
        assert len(tokens) <= decoder.max_length
        assert all(0 <= t < decoder.vocab_size for t in tokens)
    _check_metrics(folder, "dates", "exact_match")


def test_elnino_smoke_run_writes_a_loadable_forecaster(repository: Path) -> None:
    assert _train(repository, "elnino", *SMOKE, "--layers", "2", "--cell", "rnn") == 0
    folder = repository / "elnino" / "1"
    loaded = checkpoint.load(folder)
    assert isinstance(loaded.model, EncoderModel)
    assert loaded.config.input.type == "features" and loaded.config.input.size == 1
    head = loaded.config.head
    assert head is not None and head.size == 1 and head.labels is None
    windows = torch.full((4, 24, 1), 25.0)
    with torch.inference_mode():
        out = loaded.model(windows, torch.full((4,), 24))
    assert out.encodings.shape == (4, 8) and out.scores is not None
    assert out.scores.shape == (4, 1) and bool(torch.isfinite(out.scores).all())
    _check_metrics(folder, "elnino", "mae")


def test_a_second_run_writes_the_next_version(repository: Path) -> None:
    assert _train(repository, "elnino", *SMOKE) == 0
    first = (repository / "elnino" / "1" / "model.safetensors").read_bytes()
    assert _train(repository, "elnino", *SMOKE, "--seed", "1", "--name", "sst") == 0
    assert _train(repository, "elnino", *SMOKE, "--seed", "1") == 0
    assert (repository / "elnino" / "1" / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in (repository / "elnino").iterdir()) == ["1", "2"]
    assert (repository / "sst" / "1" / "config.json").is_file()
    assert _metrics(repository / "elnino" / "2")["seed"] == 1


def test_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert _train(tmp_path / name, "surnames", *TEXT_SMOKE) == 0
    weights = [(tmp_path / n / "surnames/1/model.safetensors").read_bytes() for n in "ab"]
    assert weights[0] == weights[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nonsense"], "unknown task 'nonsense'; choose one of: surnames, dates, elnino"),
        (["elnino", "--attention"], "--attention applies to seq2seq tasks only"),
        (["elnino", "--embedding", "8"], "--embedding applies to text tasks"),
        (["surnames", "--layers", "0"], "--layers must be between 1 and 8, got 0"),
        (["surnames", "--hidden", "100000"], "--hidden must be between 1 and 4096"),
        (["surnames", "--dropout", "0.95"], "--dropout must be between 0 and 0.9"),
        (["surnames", "--name", "../escape"], "--name '../escape' is not a valid model name"),
        (["surnames", "--name", ".."], "--name '..' is not a valid model name"),
        (["surnames", "--version", "0"], "--version must be ≥ 1, got 0"),
        (["surnames", "--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(
    repository: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _train(repository, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnserve train: error: ") and message in err
    assert err.count("\n") == 1
    assert list(repository.rglob("*.safetensors")) == []


def test_missing_cuda_is_a_clear_error(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        device, expected = f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    else:
        device, expected = "cuda", "CUDA is not available on this machine"
    assert _train(repository, "elnino", "--device", device) == 2
    assert expected in capsys.readouterr().err


def test_an_existing_version_is_refused(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repository / "elnino" / "3").mkdir(parents=True)
    assert _train(repository, "elnino", *SMOKE, "--version", "3") == 2
    assert "version 3 of 'elnino' already exists" in capsys.readouterr().err
    assert list((repository / "elnino" / "3").iterdir()) == []
    assert _train(repository, "elnino", *SMOKE) == 0
    assert (repository / "elnino" / "4" / "config.json").is_file()


def test_an_unwritable_output_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _train(blocker / "repo", "dates") == 2
    assert f"--out {blocker / 'repo'}: cannot write there" in capsys.readouterr().err
    # A real process: one line on stderr, no traceback, a non-zero status.
    done = subprocess.run(
        [sys.executable, "-m", "service.process.cli", "train", "dates", "--out", str(blocker)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == f"rnnserve train: error: --out {blocker} exists and is not a folder\n"


def test_the_thread_setting_does_not_leak(repository: Path) -> None:
    before = torch.get_num_threads()
    assert _train(repository, "elnino", *SMOKE, "--threads", "3") == 0
    assert torch.get_num_threads() == before
