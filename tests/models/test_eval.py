"""`rnnserve eval`: a repository model of a bundled task on its held-out data, in a given dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.precision import cpu_bfloat16_missing, cpu_capabilities
from service.process.cli import main
from tests.support import DEMO_REPOSITORY

DEMO = DEMO_REPOSITORY
MISSING = cpu_bfloat16_missing(cpu_capabilities())


def _eval(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["eval", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _recorded(name: str) -> dict[str, float]:
    report = json.loads((DEMO / name / "1" / "metrics.json").read_text(encoding="utf-8"))
    heldout: dict[str, float] = report["heldout"]
    return heldout


@pytest.mark.parametrize(("name", "metric"), [("elnino", "mae"), ("surnames", "accuracy")])
def test_float32_eval_prints_the_metric_recorded_at_training(
    capsys: pytest.CaptureFixture[str], name: str, metric: str
) -> None:
    status, out, _ = _eval(capsys, name, "--repository", str(DEMO))
    assert status == 0
    assert f"held-out {metric}: {_recorded(name)[metric]:.4f} " in out
    assert "precision: encoder float32, head float32" in out


def test_bfloat16_eval_runs_every_part_in_it_and_stays_close(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, err = _eval(
        capsys, "elnino", "--repository", str(DEMO), "--dtype", "bfloat16", "--every-part"
    )
    if MISSING is not None:
        assert status == 2 and f"lacks {MISSING}" in err
        return
    assert status == 0
    assert "precision: encoder bfloat16, head bfloat16" in out
    line = next(x for x in out.splitlines() if x.startswith("held-out mae: "))
    mae = float(line.split()[2])
    assert mae != pytest.approx(_recorded("elnino")["mae"], abs=1e-6)  # bfloat16 really ran
    assert mae == pytest.approx(_recorded("elnino")["mae"], abs=0.05)


def test_a_model_without_metrics_json_needs_its_task(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    shutil.copytree(DEMO / "elnino", tmp_path / "forecaster")
    (tmp_path / "forecaster" / "1" / "metrics.json").unlink()
    status, _, err = _eval(capsys, "forecaster", "--repository", str(tmp_path))
    assert status == 2 and "give --task" in err
    status, out, _ = _eval(
        capsys, "forecaster", "--repository", str(tmp_path), "--task", "elnino", "--seed", "0"
    )
    assert status == 0 and f"held-out mae: {_recorded('elnino')['mae']:.4f}" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch"], "is not a model folder"),
        (["elnino", "--version", "7"], "has no version 7"),
        (["elnino", "--task", "dates"], "task 'dates' needs seq2seq/text"),
        (["surnames", "--task", "elnino"], "are encode/text; task 'elnino' needs encode/features"),
        (["elnino", "--dtype", "float16"], "float16 needs a GPU"),
    ],
)
def test_refusals_are_one_line_with_status_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status, _, err = _eval(capsys, *args, "--repository", str(DEMO))
    assert status == 2
    assert err.startswith("rnnserve eval: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
