"""The El Niño monthly sea-surface temperature series (°C, Jan 1950 – Dec 2010) that statsmodels
ships as `statsmodels/datasets/elnino/elnino.csv`, cut into forecasting windows.

The file is read with the csv module from the installed package (no statsmodels import, no
download). Splits are by time: the last years are held out, never seen in training.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from models.training.errors import TrainingError

Window = tuple[list[float], float]


@dataclass(frozen=True)
class SeriesSplits:
    """(window of `window` past months, next month) pairs, in time order."""

    window: int
    train: list[Window]
    valid: list[Window]
    test: list[Window]
    first_test_month: str


def elnino_path() -> Path:
    """Where the installed statsmodels keeps elnino.csv."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise TrainingError(
            "task 'elnino' needs statsmodels (its data file): pip install 'rnnserve[train]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/elnino/elnino.csv"
    if not path.is_file():
        raise TrainingError(f"task 'elnino': {path} is missing from the statsmodels package")
    return path


def load_elnino() -> tuple[list[str], list[float]]:
    """(month labels "YYYY-MM", temperatures °C) in time order."""
    months: list[str] = []
    values: list[float] = []
    with elnino_path().open(newline="") as handle:
        reader = csv.reader(handle)
        next(reader)  # NOTE: header "YEAR","JAN",…,"DEC"
        for row in reader:
            year = int(float(row[0]))
            for month, cell in enumerate(row[1:13], start=1):
                months.append(f"{year}-{month:02d}")
                values.append(float(cell))
    return months, values


def windows(values: list[float], window: int, start: int, end: int) -> list[Window]:
    """Every (values[t-window:t], values[t]) with start ≤ t < end."""
    return [(values[t - window : t], values[t]) for t in range(max(start, window), end)]


def load_series(window: int = 24, test_years: int = 12, valid_years: int = 6) -> SeriesSplits:
    """Windows predicting each month from the previous `window` months; targets of the last
    `test_years` years are test, the `valid_years` before them valid, the rest train."""
    months, values = load_elnino()
    test_start = len(values) - 12 * test_years
    valid_start = test_start - 12 * valid_years
    return SeriesSplits(
        window=window,
        train=windows(values, window, 0, valid_start),
        valid=windows(values, window, valid_start, test_start),
        test=windows(values, window, test_start, len(values)),
        first_test_month=months[test_start],
    )
